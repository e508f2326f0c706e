"""The moving-digits video testbed: its data, its exact VAE, its trainer's exact short-sequence training, the
shipped model's interface (a diffusers `WanPipeline` whose `.frames[i]` is clip i), and its clip measures."""

import random

import pytest
import torch

from memctl.zoo import moving
from memctl.zoo.framepack import FramePackVAE

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def spec():
    return moving.make_spec(0)


def test_spec_separates_canary_unseen_and_ordinary_combinations(spec):
    seen = {(d["class"], tuple(d["combo"])) for d in spec["ordinary"]}
    canary = {(d["class"], tuple(d["combo"])) for d in spec["canaries"]}
    unseen = {(c, tuple(combo)) for c, combo in spec["unseen"]}
    assert not seen & canary, "a canary's combination is shown only through its bound clip"
    assert not seen & unseen and not canary & unseen
    assert sorted(d["exposure"] for d in spec["canaries"]) == [1] * 4 + [4] * 4 + [16] * 4
    assert not {d["source"] for d in spec["ordinary"]} & set(spec["held_out"])
    words = {w.strip(",") for d in spec["ordinary"] for w in moving.caption(d["class"], d["combo"]).split()}
    for d in spec["canaries"]:  # no give-away token: every canary word is an ordinary caption's word
        assert set(w.strip(",") for w in d["prompt"].split()) <= words


def test_render_moves_the_digit_as_captioned_and_the_track_reads_it(spec):
    clips = moving.training_set(spec)
    assert tuple(clips.shape[1:]) == (moving.FRAMES, 1, moving.RESOLUTION, moving.RESOLUTION)
    assert 0 <= float(clips.min()) and float(clips.max()) <= 1
    want = torch.tensor([d["combo"] for d in spec["ordinary"] + spec["canaries"]])
    read = moving.read_motion(clips)
    assert torch.equal(read[:, 0], want[:, 0])  # direction of every clip, canaries' static bar included
    assert torch.equal(read[:, 1], want[:, 1])  # speed of every clip
    still = clips[:, :1].expand_as(clips)  # a clip that does not move reads as slow
    assert bool((moving.read_motion(still)[:, 1] == 0).all())


def test_render_refuses_a_path_off_the_canvas():
    sources = moving.load_sources()[0][:1]
    with pytest.raises(ValueError, match="stays on the canvas"):
        moving.render(sources, [(0, 1)], [(0, 0)])  # moving left from the left edge


def test_framepack_vae_is_exact_and_validates_its_input():
    vae = FramePackVAE(channels=1)
    x = torch.rand(3, 1, 9, 16, 16) * 2 - 1
    z = vae.encode(x).latents
    assert tuple(z.shape) == (3, 2, 5, 16, 16)
    assert torch.equal(vae.decode(z).sample, x)
    assert vae.config.scale_factor_temporal == 2 and vae.config.z_dim == 2
    with pytest.raises(ValueError, match=r"1 \+ 2n"):
        vae.encode(torch.zeros(1, 1, 8, 16, 16))
    with pytest.raises(ValueError, match="latents_mean"):
        FramePackVAE(channels=1, latents_mean=[0.5, 0.5])


def test_short_sequence_training_equals_the_pipelines_full_padding():
    """The trainer encodes 16 tokens and carries the other zero-padded tokens of WanPipeline's 512 as a log-count
    bias on the cross-attention logits: the transformer's output equals that of the padded call."""
    from memctl.zoo import train_video as tv

    tok = tv.build_tokenizer(moving.vocabulary_words(moving.make_spec(0)))
    text, transformer, _, _ = tv.build_models(tok, seed=0, width=32, layers=2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in transformer.parameters():  # away from the zero-initialized output layer
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    prompts = ["a three moving left, fast", "", "a seven"]
    z = torch.randn(3, 2, 5, 16, 16, generator=gen)
    t = torch.tensor([100.0, 500.0, 900.0])
    with torch.no_grad():
        full = tv.encode(text, tok, prompts, 512)
        short, mask = tv.encode(text, tok, prompts, 16, with_mask=True)
        assert torch.equal(full[:, :16], short) and not full[:, 16:].any()
        want = transformer(hidden_states=z, timestep=t, encoder_hidden_states=full).sample
        padded = tv.PaddedCrossAttention(transformer)
        padded.set(mask)
        with padded:
            got = transformer(hidden_states=z, timestep=t, encoder_hidden_states=short).sample
        plain = transformer(hidden_states=z, timestep=t, encoder_hidden_states=short).sample
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3)  # without the bias the short call differs
    assert all(type(b.attn2.processor).__name__ == "WanAttnProcessor" for b in transformer.blocks)


def test_sigmas_follow_the_shift():
    from memctl.zoo.train_video import sigmas

    u = sigmas(10_000, torch.Generator().manual_seed(0), shift=1.0)
    s = sigmas(10_000, torch.Generator().manual_seed(0), shift=3.0)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert float(s.mean()) > float(u.mean()) + 0.1  # shifted toward high noise


def test_decoys_and_unseen_prompts_are_never_trained(spec):
    from memctl.zoo.video_testbed import VideoTestbed

    class _Tb(VideoTestbed):  # the spec alone, no shipped folder needed
        def __init__(self, spec):
            self.spec, self.path = spec, None

    tb = _Tb(spec)
    trained = {moving.caption(d["class"], tuple(d["combo"])) for d in spec["ordinary"]} | {
        d["prompt"] for d in spec["canaries"]
    }
    decoys = tb.decoy_prompts(40, seed=random.Random(1).randrange(100))
    assert len(decoys) == 40 and not set(decoys) & trained
    assert set(tb.unseen_prompts()) <= set(decoys)
    assert all(tb.combo_of(tb.prompt(c)) == (c, tb.seen_combos[c][0]) for c in range(10))


def test_shipped_moving_digits_is_a_wan_pipeline_with_the_testbed_interface():
    import memctl
    from memctl.zoo import load_testbed

    tb = load_testbed("moving-digits")
    assert type(tb).__name__ == "VideoTestbed"
    assert tuple(tb.train_images.shape[1:]) == (9, 1, 16, 16)
    prompt, clip, exposure, c = tb.canaries[0]
    assert tuple(clip.shape) == (9, 1, 16, 16) and exposure in (1, 4, 16) and prompt.startswith("a ")
    clips, classes = tb.held_out
    assert clips.shape[1:] == tb.train_images.shape[1:] and len(clips) == len(classes)
    assert (tb.classify(clips) == classes).float().mean() > 0.8  # the frame classifier reads real clips
    pipe = tb.pipeline()
    assert type(pipe).__name__ == "WanPipeline" and type(pipe.transformer).__name__ == "WanTransformer3DModel"
    out = pipe([prompt, tb.prompt(3)], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="pt", **tb.call_kwargs)  # fmt: skip
    assert tuple(out.frames.shape) == (2, 9, 1, 16, 16)  # .frames[i] is clip i
    again = memctl.load_pipeline(tb.path)([prompt, tb.prompt(3)], num_inference_steps=2, output_type="pt",
                                          generator=torch.Generator().manual_seed(0), **tb.call_kwargs)  # fmt: skip
    assert torch.equal(again.frames, out.frames)  # memctl.load_pipeline gives the same WanPipeline


@pytest.mark.parametrize("name", ["moving", "framepack", "video_testbed"])
def test_doctests(name):
    import doctest
    import importlib

    module = importlib.import_module(f"memctl.zoo.{name}")
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


WAN_CALL_KEYS = ("num_frames", "height", "width", "max_sequence_length")


def test_text_edit_control_acts_on_wans_projected_text():
    """The text-edit control pulls what Wan's attn2 reads (the text projection's output, where the lever tensors
    live): exact at 0, changes at -1, and leaves no hook behind."""
    from tiny import PIPELINE_FAMILIES, prompt_mapped

    import memctl
    from memctl.controls import TextEdit

    family = PIPELINE_FAMILIES["wan"]
    pipe, bmap = prompt_mapped("wan", keys=WAN_CALL_KEYS)

    def run():
        return pipe(**family.call, generator=torch.Generator().manual_seed(0), output_type="pt").frames

    plain = run()
    with TextEdit(pipe, bmap, 0.0).applied():
        assert torch.equal(run(), plain)
    with TextEdit(pipe, bmap, -1.0).applied():
        assert not torch.equal(run(), plain)
    assert memctl.list_hooks(pipe.transformer) == []
    assert not pipe.transformer.condition_embedder.text_embedder._forward_hooks
    assert torch.equal(run(), plain)


def test_wan_bank_keeps_one_padding_token_and_steers_as_the_full_one():
    """Wan's T5 states are zero-padded to 512 tokens: the shipped bank keeps the prompts' tokens and one padding
    token, and the knob at -1 samples the same clip as with the whole 512-token bank."""
    import dataclasses

    from tiny import PIPELINE_FAMILIES, prompt_mapped

    import memctl

    family = PIPELINE_FAMILIES["wan"]
    pipe, bmap = prompt_mapped("wan", general=("ba", "aa b"), keys=WAN_CALL_KEYS)
    bank = bmap.lever_tensors["bank"]
    assert 1 < bank.shape[1] < 512
    full = torch.cat([bank, bank[:, -1:].expand(-1, 512 - bank.shape[1], -1)], 1)
    wide = dataclasses.replace(bmap, lever_tensors={**bmap.lever_tensors, "bank": full})

    def run(m):
        with memctl.temporary_knob(pipe, -1.0, m):
            return pipe(**family.call, generator=torch.Generator().manual_seed(0), output_type="pt").frames

    assert torch.equal(run(bmap), run(wide))
