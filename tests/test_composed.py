"""memctl.composed: the prompt rebuilt from its parts, exact at 0, the formula at -1, removable, clear refusals."""

import pytest
import torch
from tiny import denoisers, sample, tiny_pipeline

from memctl.composed import Parts, attach_composed, comma_parts, composed, detach_composed, set_composed
from memctl.hooks import list_hooks

torch.set_num_threads(1)
PROMPT = "a,b,c"  # the tiny tokenizer reads one token per character: 5 tokens of 8


def test_comma_parts():
    assert comma_parts("a two, small, bold, leaning left") == Parts(
        ("a two, bold, leaning left", "a two, small, leaning left", "a two, small, bold"), "a two"
    )
    assert comma_parts(PROMPT) == Parts(("a, c", "a, b"), "a")
    assert comma_parts("a two, small") is None  # one attribute: nothing to compose
    assert comma_parts("ab") is None
    with pytest.raises(ValueError, match="at least 2 prompts"):
        Parts(("a",), "b")


def _states(pipe, prompts: list[str]) -> torch.Tensor:
    """What the denoiser reads for `prompts` (encode_prompt's conditional states, unwrapped)."""
    encode = type(pipe).encode_prompt.__get__(pipe)
    if hasattr(pipe, "unet"):
        return encode(prompts, "cpu", 1, False)[0]
    return encode(prompts, do_classifier_free_guidance=False, max_sequence_length=8, device="cpu")[0]


@pytest.mark.parametrize("name", ["sd", "wan"])
def test_composed_prediction_is_the_parts_formula(name):
    pipe = tiny_pipeline(name)
    model = next(iter(denoisers(pipe).values()))
    calls = []

    def record(module, args, kwargs, out):  # copies: the pipeline may update its latents in place afterwards
        copy = [a.clone() if torch.is_tensor(a) else a for a in args]
        calls.append((copy, {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, out[0].clone()))

    handle = model.register_forward_hook(record, with_kwargs=True)
    try:
        with composed(pipe, -1.0) as h:
            sample(pipe, name, prompt=PROMPT)
    finally:
        handle.remove()
    assert h.extra_rows > 0
    parts = comma_parts(PROMPT)
    cond, part_states = _states(pipe, [PROMPT]), _states(pipe, [*parts.without, parts.common])
    found, first = 0, None
    for args, kwargs, out in calls:  # every call of the first step (Wan: a conditional and an unconditional call)
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        e = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        step = float(torch.as_tensor(t).flatten()[0])
        first = step if first is None else first
        if step != first:
            break
        found += _check_call(model, x, t, e, out, cond, part_states)
    assert found == 1  # the prompt's conditional row, once per step


def _check_call(model, x, t, e, out, cond, part_states) -> int:
    """Assert a recorded call's output: the formula on rows holding the prompt's states, the model's own on others;
    the number of composed rows."""
    with torch.no_grad():
        plain = model(x, t, encoder_hidden_states=e, return_dict=False)[0]
        # (encoded here in another batch than the pipeline's: equal up to rounding)
        rows = [b for b in range(len(e)) if torch.allclose(e[b], cond[0].to(e.dtype), atol=1e-5)]
        for b in range(len(e)):
            if b not in rows:  # classifier-free guidance's unconditional rows pass as they were
                assert torch.equal(out[b], plain[b])
                continue
            k = len(part_states)
            tb = t[b : b + 1].expand(k) if torch.is_tensor(t) and t.dim() else t
            xb = x[b : b + 1].expand(k, *x.shape[1:])
            s = model(xb, tb, encoder_hidden_states=part_states, return_dict=False)[0]
            expected = (s[:-1].sum(0) - s[-1]) / (k - 2)
            assert torch.allclose(out[b], expected, atol=1e-5)
            assert not torch.allclose(out[b], plain[b], atol=1e-3)
    return len(rows)


@pytest.mark.parametrize("name", ["sd", "wan"])
def test_at_minus_one_the_exact_prompt_is_never_evaluated(name):
    """At fidelity -1 the prompt's own rows read its first part (one extra row fewer); at -0.5 they read the prompt."""
    pipe = tiny_pipeline(name)
    cond = _states(pipe, [PROMPT])[0]
    seen = []  # per denoiser row below the hook (the pipeline's calls and the parts' calls): the prompt's states?

    def count_exact(fidelity: float) -> tuple[int, int]:
        seen.clear()
        with composed(pipe, fidelity) as h:
            hook = pipe.__dict__["_memctl_composed"][0][next(iter(denoisers(pipe)))]
            original = hook.fn_ref.forward

            def spy(*args, **kwargs):
                e = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
                seen.extend(bool(torch.allclose(row, cond.to(row.dtype), atol=1e-5)) for row in e)
                return original(*args, **kwargs)

            hook.fn_ref.forward = spy
            sample(pipe, name, prompt=PROMPT)
        return sum(seen), h.extra_rows

    exact_full, rows_full = count_exact(-1.0)
    exact_half, rows_half = count_exact(-0.5)
    assert exact_full == 0 and len(seen) > 0
    assert exact_half > 0  # the mix needs the prompt's own prediction
    assert rows_full * 3 == rows_half * 2  # 2 of the 3 parts' rows per composed row and step, against 3


@pytest.mark.parametrize("name", ["sd", "wan"])
def test_composed_is_exact_at_zero_and_removable(name):
    pipe = tiny_pipeline(name)
    model = next(iter(denoisers(pipe).values()))
    plain = sample(pipe, name, prompt=PROMPT)
    with composed(pipe, 0.0) as h:
        assert torch.equal(sample(pipe, name, prompt=PROMPT), plain)  # no extra rows, the model's own output
        set_composed(pipe, -1.0)
        changed = sample(pipe, name, prompt=PROMPT)
        assert not torch.allclose(changed, plain, atol=1e-4)
        plain_other = sample(pipe, name, prompt="ab")  # no attributes: passes unchanged
    assert h.extra_rows > 0
    assert "encode_prompt" not in pipe.__dict__ and list_hooks(model) == []
    assert torch.equal(sample(pipe, name, prompt=PROMPT), plain)
    assert torch.equal(sample(pipe, name, prompt="ab"), plain_other)


@pytest.mark.parametrize("name", ["sd", "wan"])
def test_composed_acts_only_in_its_window(name):
    """Outside [start, stop] (noise level = timestep / num_train_timesteps) the step is the denoiser's own and nothing
    extra runs; an empty window gives the plain sample exactly."""
    pipe = tiny_pipeline(name)
    model = next(iter(denoisers(pipe).values()))
    plain = sample(pipe, name, prompt=PROMPT)
    levels = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: levels.append(float(torch.as_tensor(kwargs.get("timestep", args[1] if len(args) > 1
                                                                              else None)).float().max())),
        with_kwargs=True,
    )  # fmt: skip
    try:
        with composed(pipe, -1.0) as whole:
            sample(pipe, name, prompt=PROMPT)
    finally:
        handle.remove()
    scale = float(pipe.scheduler.config.num_train_timesteps)
    calls = sorted({t / scale for t in levels})
    cut = (calls[0] + calls[-1]) / 2  # between the first (noisiest) and last steps' levels
    with composed(pipe, -1.0, start=cut, stop=1.0) as upper:
        windowed = sample(pipe, name, prompt=PROMPT)
    gap = (calls[0] + calls[1]) / 2  # a window between two steps' levels holds no call
    with composed(pipe, -1.0, start=gap, stop=gap) as empty:
        assert torch.equal(sample(pipe, name, prompt=PROMPT), plain)
    assert empty.extra_rows == 0 < upper.extra_rows < whole.extra_rows
    share = sum(t / scale >= cut for t in levels) / len(levels)
    assert upper.extra_rows == pytest.approx(whole.extra_rows * share)
    assert not torch.allclose(windowed, plain, atol=1e-4)
    with pytest.raises(ValueError, match="start <= stop"):
        attach_composed(pipe, start=0.8, stop=0.2)
    assert "_memctl_composed" not in pipe.__dict__


def test_composed_with_given_parts_and_errors():
    pipe = tiny_pipeline("sd")
    plain = sample(pipe, "sd", prompt="ab")
    with composed(pipe, -1.0, parts=lambda p: Parts(("a", "b"), "c") if p == "ab" else None):
        assert not torch.allclose(sample(pipe, "sd", prompt="ab"), plain, atol=1e-4)
    with pytest.raises(ValueError, match="attached"):
        set_composed(pipe, -1.0)
    attach_composed(pipe, parts=lambda p: ["a", "b"])
    try:
        with pytest.raises(ValueError, match=r"in \[-1, 0\]"):
            set_composed(pipe, 0.5)
        with pytest.raises(TypeError, match="Parts or None"):
            sample(pipe, "sd", prompt="ab")
    finally:
        detach_composed(pipe)
    detach_composed(pipe)  # twice: no-op
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        attach_composed(tiny_pipeline("sdxl"))


def test_only_the_last_two_encode_calls_are_kept():
    pipe = tiny_pipeline("sd")
    attach_composed(pipe)
    try:
        for prompt in ("a,b,c", "b,c,a", "c,a,b"):
            pipe.encode_prompt(prompt, "cpu", 1, True)
        (hook,) = pipe.__dict__["_memctl_composed"][0].values()
        assert [len(call) for call in hook.table.calls] == [1, 1]
        assert hook.table.find(_states(pipe, ["c,a,b"])[0]) is not None
        assert hook.table.find(_states(pipe, ["a,b,c"])[0]) is None  # the oldest call's prompt was let go
    finally:
        detach_composed(pipe)


def test_testbed_parts_follow_their_grammar():
    from memctl.zoo import attr, moving
    from memctl.zoo.attr_testbed import AttrTestbed
    from memctl.zoo.video_testbed import VideoTestbed

    class Attr(AttrTestbed):
        def __init__(self):  # the grammar only: no weights loaded
            self.spec = {"classes": list(attr.CLASSES)}

    class Video(VideoTestbed):
        def __init__(self):
            self.spec = {"classes": list(moving.CLASSES)}

    full = attr.caption(2, (0, 1, 1))
    assert Attr().prompt_parts(full) == comma_parts(full)
    assert Video().prompt_parts(moving.caption(2, (1, 0))) == Parts(
        (moving.caption(2, (1, 0), (False, True)), moving.caption(2, (1, 0), (True, False))), "a two"
    )
    assert Video().prompt_parts("a two") is None


def test_calibrate_window_finds_copies_and_widens_until_they_stop():
    """A sample equal to its bound image copies (d1 = 0); the narrowest start is tried first, then wider ones; the
    first at or under `max_copy` is chosen, else the widest, with `reached` False."""
    from memctl.composed import calibrate_window
    from memctl.evaluate import EvalSpec, generate

    pipe = tiny_pipeline("sd")
    kwargs = {"height": 8, "width": 8}
    prompts, seeds = ["a,b,c", "b,c,a"], (0,)
    with composed(pipe, -1.0, start=0.6, stop=1.0):  # what the narrowest candidate will draw
        bound = generate(pipe, prompts, [0, 0], EvalSpec(seeds=1, steps=2, guidance=5.0), **kwargs)
    others = torch.rand(6, *bound.shape[1:], generator=torch.Generator().manual_seed(0))
    memorized = list(zip(prompts, bound, strict=True))
    common = dict(seeds=seeds, steps=2, guidance=5.0, starts=(0.6, 0.0), **kwargs)
    choice = calibrate_window(pipe, memorized, None, torch.cat([bound, others]), **common)
    assert choice["copy_rates"][0.6] == 1.0  # every sample is its own bound image: copies
    assert list(choice["copy_rates"]) == [0.6, 0.0] and choice["start"] == 0.0 and choice["stop"] == 1.0
    assert choice["reached"] == (choice["copy_rates"][0.0] <= 0.05)
    first = calibrate_window(pipe, memorized, None, torch.cat([bound, others]), max_copy=1.0, **common)
    assert (first["start"], list(first["copy_rates"]), first["reached"]) == (0.6, [0.6], True)  # stops at once
    never = calibrate_window(pipe, memorized, None, torch.cat([bound, others]), max_copy=-1.0, **common)
    assert never["start"] == 0.0 and not never["reached"]
    with pytest.raises(ValueError, match="memorized probe pairs"):
        calibrate_window(pipe, [], None, **common)
    with pytest.raises(ValueError, match=r"starts in \[0, 1\]"):
        calibrate_window(pipe, memorized, None, **{**common, "starts": (1.5,)})
    assert "_memctl_composed" not in pipe.__dict__


def test_calibrate_window_counts_near_copies_with_the_nearest_test():
    """`copy_test="nearest"` counts a sample whose nearest reference image is its own bound image even when a decoy
    lies within 3x the distance (no strict copy); "strict" does not, and anything else is refused."""
    from memctl.composed import calibrate_window
    from memctl.evaluate import EvalSpec, generate

    pipe = tiny_pipeline("sd")
    kwargs = {"height": 8, "width": 8}
    prompts = ["a,b,c", "b,c,a"]
    with composed(pipe, -1.0, start=0.6, stop=1.0):  # what the narrowest candidate draws
        drawn = generate(pipe, prompts, [0, 0], EvalSpec(seeds=1, steps=2, guidance=5.0), **kwargs)
    g = torch.Generator().manual_seed(1)
    noise = [torch.randn(drawn.shape, generator=g) for _ in range(2)]
    own, decoy = drawn + 0.01 * noise[0], drawn + 0.015 * noise[1]  # own bound nearest, the decoy within 3x
    memorized = list(zip(prompts, own, strict=True))
    common = dict(seeds=(0,), steps=2, guidance=5.0, starts=(0.6,), **kwargs)
    near = calibrate_window(pipe, memorized, None, torch.cat([own, decoy]), copy_test="nearest", **common)
    strict = calibrate_window(pipe, memorized, None, torch.cat([own, decoy]), **common)
    assert (near["copy_rates"][0.6], near["copy_test"]) == (1.0, "nearest")
    assert (strict["copy_rates"][0.6], strict["copy_test"]) == (0.0, "strict")
    with pytest.raises(ValueError, match="copy_test 'strict' or 'nearest', but got 'close'"):
        calibrate_window(pipe, memorized, None, copy_test="close", **common)
