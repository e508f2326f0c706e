"""The published mitigations (memctl.baselines) and the localization controls (memctl.controls) on tiny pipelines."""

import pytest
import torch

import memctl
from memctl.baselines import BASELINES, Jain, NeMo, Ren, Wen
from memctl.controls import TextEdit, control_maps, placement_shuffled, uniform_map
from memctl.probe import text_states
from tests.tiny import tiny_sd_pipeline

PROMPTS = ["abcabc", "ba"]


@pytest.fixture(scope="module")
def pipe():
    p = tiny_sd_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def probes():
    return memctl.ProbeSet(memorized=[("abcabc", None)], general=[(p, None) for p in ("ba", "aa", "b", "ab", "ca")])


def _sample(pipe, guidance=1.0, steps=3):
    gens = [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=steps, height=8, width=8, guidance_scale=guidance, output_type="pt",
                generator=gens).images  # fmt: skip


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_baseline_changes_samples_and_leaves_no_trace(pipe, probes, name, guidance):
    kw = {"wen": {"quantile": 0.1, "lr": 0.5}, "nemo": {"theta": 0.0}, "jain": {"transition": 0.5}}.get(name, {})
    ref = _sample(pipe, guidance)
    b = BASELINES[name](pipe, **kw).fit(probes)
    with b.applied() as p:
        out = _sample(p, guidance)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref), f"{name} changed nothing"
    assert torch.equal(_sample(pipe, guidance), ref), f"{name} left hooks behind"
    assert set(b.settings()) >= set(kw)


def test_wen_optimizes_until_below_its_calibrated_target(pipe, probes):
    wen = Wen(pipe, steps=4, lr=0.5, quantile=0.1).fit(probes)
    assert wen.target is not None
    assert wen.target > 0
    with wen.applied() as p:
        _sample(p, steps=3)
    # 2 rows: one forward for the unconditional reference, then up to 4 × (forward + backward)
    assert 2 * 3 <= wen.extra_rows <= 2 * (1 + 2 * 4)
    with pytest.raises(ValueError, match="Expected steps >= 1"):
        Wen(pipe, steps=0)
    with pytest.raises(ValueError, match="Expected Wen.fit"), Wen(pipe).applied() as p:
        _sample(p)


def test_wen_reoptimizes_for_every_sample(pipe, probes):
    wen = Wen(pipe, steps=2, lr=0.5, quantile=0.01).fit(probes)
    with wen.applied() as p:
        _sample(p)
        first = wen.extra_rows
        _sample(p)
    assert wen.extra_rows == 2 * first


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_wen_optimizes_every_prompt_when_seeds_repeat(pipe, probes, guidance):
    """Two prompts from the same seed make a batch of two identical halves of latents. Without guidance both rows
    are conditional and both are optimized; with guidance the batch is [uncond, cond] and the cond rows are. (Until
    stop 32 the halves alone decided, and without guidance the first prompt was left as it was.)"""
    rows = {}
    for seeds in ((10, 11), (10, 10)):
        wen = Wen(pipe, steps=1, lr=0.5, quantile=0.01).fit(probes)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        with wen.applied() as p:
            p(PROMPTS, num_inference_steps=2, height=8, width=8, guidance_scale=guidance, output_type="pt",
              generator=gens)  # fmt: skip
        rows[seeds] = wen.extra_rows
    assert rows[(10, 10)] == rows[(10, 11)] == 2 * (1 + 2 * 1)  # 2 rows: uncond reference + one forward/backward


def test_pixel_pipeline_says_whether_it_guides():
    from memctl.baselines.base import cfg_rows
    from memctl.zoo import load_testbed

    pipe = load_testbed("digits").pipeline()
    pipe.set_progress_bar_config(disable=True)
    x = torch.ones(4, 1, 2, 2)
    assert cfg_rows(x) == 2  # no pipeline to ask: identical halves read as guidance
    for guidance, expected in ((1.0, 0), (3.0, 2)):
        pipe(["a"], num_inference_steps=1, guidance_scale=guidance, output_type="pt")
        assert pipe.do_classifier_free_guidance is (guidance != 1.0) and cfg_rows(x, pipe) == expected


def test_jain_on_wan_swaps_in_the_empty_prompt_as_the_transformer_takes_it(probes):
    from tests.tiny import sample, tiny_pipeline

    pipe = tiny_pipeline("wan")
    ref = sample(pipe, "wan", prompt="ab")
    b = Jain(pipe, transition=0.5).fit(probes)
    with b.applied() as p:
        out = sample(p, "wan", prompt="ab")
    assert not torch.equal(out, ref)
    assert torch.equal(sample(pipe, "wan", prompt="ab"), ref)  # no trace
    with Jain(pipe, transition=1.0).fit(probes).applied() as p:  # never above its transition: plain
        assert torch.equal(sample(p, "wan", prompt="ab"), ref)


def test_wen_on_wan_optimizes_both_prompts_of_a_repeated_seed(probes):
    """Wan guides with two calls ("cond", "uncond"): a conditional call whose latents repeat in halves (one seed
    for two prompts) is all conditional, and the unconditional call is left alone."""
    from tests.tiny import PIPELINE_FAMILIES, tiny_pipeline

    pipe = tiny_pipeline("wan")
    call = {**PIPELINE_FAMILIES["wan"].call, "prompt": ["ab", "ba"], "output_type": "pt"}
    assert call["guidance_scale"] > 1  # both calls run
    rows = {}
    for seeds in ((3, 4), (3, 3)):
        wen = Wen(pipe, steps=1, lr=0.5, quantile=0.01).fit(probes)
        with wen.applied() as p:
            p(**call, generator=[torch.Generator().manual_seed(s) for s in seeds])
        rows[seeds] = wen.extra_rows
    assert rows[(3, 3)] == rows[(3, 4)] == 2 * (1 + 2 * 1)  # 2 rows, once per sample: uncond reference + one step


def test_wen_on_a_video_transformer_calibrates_at_its_first_call(probes):
    """Wan takes its latent size per call: Wen's calibration noise takes the first call's latent shape."""
    from tests.tiny import sample, tiny_pipeline

    pipe = tiny_pipeline("wan")
    ref = sample(pipe, "wan", prompt="ab")
    wen = Wen(pipe, steps=2, lr=0.5, quantile=0.01).fit(probes)
    assert wen.target is None  # not yet: no size known
    with wen.applied() as p:
        out = sample(p, "wan", prompt="ab")
    assert wen.target is not None and wen.target > 0
    assert len(wen.calibrated_on) == 4  # (C, F, H, W) of the call's latents
    assert wen.extra_rows > 0 and not torch.equal(out, ref)
    assert torch.equal(sample(pipe, "wan", prompt="ab"), ref)  # no trace


def test_ren_refuses_prompts_without_a_beginning_token():
    """Ren et al. rescale CLIP's beginning-of-text token; T5-encoded prompts (Wan) have none."""
    from tests.tiny import tiny_pipeline

    with pytest.raises(ValueError, match="beginning-of-text token"):
        Ren(tiny_pipeline("wan"))


def test_ren_masks_summary_tokens_of_encoded_prompts(pipe):
    ren = Ren(pipe)
    with ren.applied():
        states = text_states(pipe, ["ab"])  # goes through the text encoder: recorded
        mask = ren.mask_for(states)
        unseen = ren.mask_for(torch.randn_like(states))
    assert mask[0, :3].tolist() == [1.0, 1.0, 1.0]  # BOS, a, b kept
    assert mask[0, 3:].sum() == 0  # EOS and padding masked
    assert unseen.all()
    with pytest.raises(ValueError, match="Expected a logit factor"):
        Ren(pipe, c=0)


def test_jain_is_plain_below_its_transition(pipe):
    ref = _sample(pipe)
    with Jain(pipe, transition=1.0).applied() as p:
        assert torch.equal(_sample(p), ref)
    with pytest.raises(ValueError, match="transition noise level"):
        Jain(pipe, transition=1.5)


def test_nemo_spares_in_distribution_prompts(pipe, probes):
    nemo = NeMo(pipe).fit(probes)
    assert nemo.theta is not None
    assert len(nemo.stats) > 0
    with nemo.applied():
        text_states(pipe, ["ba"])  # general prompt: z-scores come from it
    with pytest.raises(ValueError, match="Expected NeMo.fit"):
        NeMo(pipe).hooks()


@pytest.fixture(scope="module")
def digits():
    tb = memctl.zoo.load_testbed("digits")
    return tb, tb.pipeline(), tb.block_map()


def test_control_maps_keep_or_replace_what_they_say(digits):
    tb, pipe, bmap = digits
    maps = control_maps(pipe.unet, bmap, seeds=2)
    attn = [i for i, n in enumerate(bmap.names) if "attentions" in n]
    others = [i for i in range(bmap.n_blocks) if i not in attn]
    uni = maps["uniform"].scores
    assert torch.equal(uni[attn], uni[attn][:1].expand(len(attn), -1))
    assert torch.equal(uni[others], bmap.scores[others])
    assert uni[attn][0].abs().max() == bmap.scores[attn].abs().max()
    shuffled = placement_shuffled(pipe.unet, bmap, seed=1)
    assert torch.equal(shuffled.lever_tensors["read"], bmap.lever_tensors["read"])
    assert sorted(shuffled.scores[attn].sum(1).tolist()) == sorted(bmap.scores[attn].sum(1).tolist())
    assert not torch.equal(maps["random subspace 0"].lever_tensors["read"], bmap.lever_tensors["read"])
    assert uniform_map(pipe.unet, bmap).meta["control"] == {"kind": "uniform"}


def test_text_edit_pulls_canary_states_once_and_is_exact_at_zero(digits):
    tb, pipe, bmap = digits
    canary = tb.canaries[2][0]
    gens = lambda: [torch.Generator().manual_seed(10_000)]  # noqa: E731
    ref = pipe([canary], num_inference_steps=4, generator=gens(), output_type="pt").images
    with TextEdit(pipe, bmap, 0.0).applied():
        assert torch.equal(pipe([canary], num_inference_steps=4, generator=gens(), output_type="pt").images, ref)
    edit = TextEdit(pipe, bmap, -1.0)
    assert edit.alpha.max() > 0
    with edit.applied():
        out = pipe([canary], num_inference_steps=4, generator=gens(), output_type="pt").images
    assert not torch.equal(out, ref)


def test_text_edit_edits_each_wan22_expert_with_its_own_tensors():
    """On Wan 2.2 the text-edit control pulls what each expert's attn2 reads, with that expert's own subspace and
    bank (`BlockMap.select`): both text projections are hooked, exact at 0, changes at -1, nothing left behind."""
    from tests.tiny import PIPELINE_FAMILIES, wan22_prompt_mapped

    pipe, bmap = wan22_prompt_mapped()
    edit = TextEdit(pipe, bmap, -1.0)
    assert [part.model for part in edit.parts] == [pipe.transformer, pipe.transformer_2]
    for part, component in zip(edit.parts, ("transformer", "transformer_2"), strict=True):
        assert torch.equal(part.tensors["bank"], bmap.select(component).lever_tensors["bank"])
    assert not torch.equal(edit.parts[0].tensors["bank"], edit.parts[1].tensors["bank"])

    def run():
        return pipe(**PIPELINE_FAMILIES["wan22"].call, generator=torch.Generator().manual_seed(0), output_type="pt")

    plain = run().frames
    with TextEdit(pipe, bmap, 0.0).applied():
        assert torch.equal(run().frames, plain)
    with edit.applied():
        projections = [m.condition_embedder.text_embedder for m in (pipe.transformer, pipe.transformer_2)]
        assert all(len(p._forward_hooks) == 1 for p in projections)
        assert not torch.equal(run().frames, plain)
    assert not any(p._forward_hooks for p in projections)
    assert torch.equal(run().frames, plain)
