"""The head-level condition lever (memctl.heads): exact at α = 0, acts on the chosen head only."""

import torch

import memctl
from memctl.heads import HeadKnob, HeadLever, cross_attention_heads
from memctl.probe import text_states


def test_head_lever_is_exact_at_zero_and_acts_per_head():
    tb = memctl.zoo.load_testbed("digits")
    pipe, bmap = tb.pipeline(), tb.block_map()
    unet = pipe.unet
    heads = cross_attention_heads(unet)
    assert len(heads) == 24
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    e = text_states(pipe, [tb.canaries[2][0], tb.prompt(1)])
    t = torch.tensor(500)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=e).sample
        lever = HeadLever(unet, bmap.lever_tensors)
        with lever.applied():
            lever.set([0.0] * len(heads))
            assert torch.equal(unet(x, t, encoder_hidden_states=e).sample, ref)
            lever.set([1.0 if i == 0 else 0.0 for i in range(len(heads))])
            one = unet(x, t, encoder_hidden_states=e).sample
            path = heads[0][0]
            alpha = lever.alphas[path]
            width = alpha.shape[0] // heads[0][2]
        assert torch.equal(unet(x, t, encoder_hidden_states=e).sample, ref)  # hooks gone
    assert alpha[:width].eq(1).all()
    assert alpha[width:].eq(0).all()
    assert (one - ref)[0].abs().max() > (one - ref)[1].abs().max()  # the canary moves more than the ordinary prompt


def test_head_knob_factors_follow_the_knob_law():
    tb = memctl.zoo.load_testbed("digits")
    pipe, bmap = tb.pipeline(), tb.block_map()
    scores = torch.linspace(-0.1, 1.0, 24)[:, None].repeat(1, 2)
    knob = HeadKnob(pipe, bmap.lever_tensors, scores, [0.2, 0.8], -1.0, pull_max=2.0)
    assert knob.alpha.shape == (24, 2)
    assert knob.alpha[0, 0] < 0  # generalization-leaning head: pushed the other way, as units are
    assert knob.alpha[-1, 0] == knob.alpha.max() > 1  # the most selective head: pulled past the general one
