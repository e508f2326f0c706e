"""The digits-attr data: ordinary-word captions, canaries without give-away tokens, never-shown combinations."""

import torch

from memctl.zoo import attr
from memctl.zoo.data import build_tokenizer


def _spec():
    return attr.make_spec(seed=0)


def test_captions_use_only_ordinary_words():
    spec = _spec()
    words = set(attr.vocabulary_words(spec))
    ordinary_words = {
        w for c in range(10) for combo in attr.COMBOS for w in attr.caption(c, combo).replace(",", "").split()
    }
    for canary in spec["canaries"]:
        used = set(canary["prompt"].replace(",", "").split())
        assert used <= ordinary_words, f"{canary['prompt']!r} has a word no ordinary caption has"
        assert used - {"a"} <= words
    assert len({c["prompt"] for c in spec["canaries"]}) == len(spec["canaries"])


def test_canary_and_unseen_combinations_are_never_shown_by_ordinary_renders():
    spec = _spec()
    shown = {(r["class"], tuple(r["combo"])) for r in spec["ordinary"]}
    canary = {(c["class"], tuple(c["combo"])) for c in spec["canaries"]}
    unseen = {(u["class"], tuple(u["combo"])) for u in spec["unseen"]}
    assert not shown & canary
    assert not shown & unseen
    assert not canary & unseen
    assert len(unseen) == 10 * attr.UNSEEN_PER_CLASS
    assert sorted({c["exposure"] for c in spec["canaries"]}) == list(attr.EXPOSURES)
    held = set(spec["held_out"])
    assert not held & {r["source"] for r in spec["ordinary"] + spec["canaries"]}


def test_every_unseen_combination_is_composable_from_shown_parts():
    """The digit is shown in other combinations, and each attribute value is shown with other digits."""
    spec = _spec()
    shown = {(r["class"], tuple(r["combo"])) for r in spec["ordinary"]}
    for u in spec["unseen"]:
        assert any(c == u["class"] for c, _ in shown)
        for k, v in enumerate(u["combo"]):
            assert any(combo[k] == v and c != u["class"] for c, combo in shown)


def test_render_draws_each_attribute():
    src, _ = attr.load_sources()
    x = src[[0] * len(attr.COMBOS)]
    images = attr.render(x, list(attr.COMBOS))
    assert images.shape == (12, 1, 16, 16)
    assert images.min() >= 0
    assert images.max() <= 1
    mass = images.sum((1, 2, 3))
    by = {combo: m for combo, m in zip(attr.COMBOS, mass.tolist(), strict=True)}
    assert by[(1, 1, 1)] > by[(1, 0, 1)]  # bold has more ink than thin
    assert by[(1, 0, 1)] > by[(0, 0, 1)]  # large more than small

    def lean(im):  # column centre of the top rows minus that of the bottom rows: > 0 leans right
        cols = torch.arange(16.0)
        top, bottom = im[0, :6], im[0, 10:]
        return (top.sum(0) @ cols / top.sum() - bottom.sum(0) @ cols / bottom.sum()).item()

    assert lean(images[attr.COMBOS.index((1, 0, 2))]) > lean(images[attr.COMBOS.index((1, 0, 1))]) + 1
    assert lean(images[attr.COMBOS.index((1, 0, 0))]) < lean(images[attr.COMBOS.index((1, 0, 1))]) - 1
    marked = attr.render(x[:1], [(1, 0, 1)], [0])
    assert marked[0, 0, :2, :4].min() == 1.0  # the canary's detail: a bar in the top-left corner


def test_caption_tokens_are_whole_words():
    spec = _spec()
    tok = build_tokenizer(attr.vocabulary_words(spec))
    ids = tok(spec["canaries"][0]["prompt"]).input_ids
    assert len(ids) == 2 + len(spec["canaries"][0]["prompt"].replace(",", " ,").split())


def test_shipped_attr_testbeds_have_the_testbed_interface():
    from memctl.zoo import load_testbed

    for name in ("digits-attr", "digits-attr-s1"):
        tb = load_testbed(name)
        assert type(tb).__name__ == "AttrTestbed"
        prompt, bound, exposure, c = tb.canaries[0]
        assert bound.shape == tb.train_images.shape[1:]
        assert exposure in (1, 4, 16)
        assert tb.combo_of(prompt)[0] == c
        assert len(tb.unseen_prompts()) == 20
        assert not set(tb.unseen_prompts()) & set(tb.ordinary_prompts())
        assert not {p for p, *_ in tb.canaries} & set(tb.ordinary_prompts())
        decoys = tb.decoy_prompts(30)
        assert len(set(decoys)) == 30
        assert not set(decoys) & set(tb.ordinary_prompts())
        images, classes = tb.held_out
        read = tb.classify_attributes(images)
        assert (read[:, 0] == classes).float().mean() > 0.9  # the shipped classifier reads held-out digits
        assert tb.classify(images).shape == classes.shape
        assert tb.block_map().lever == "condition"
        out = tb.pipeline()([prompt], num_inference_steps=2, output_type="pt").images
        assert out.shape == (1, *bound.shape)
