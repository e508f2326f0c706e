"""PixelPipeline and the embedded testbed: loading offline, determinism, bad input."""

import doctest

import pytest
import torch

import memctl
from memctl import evaluate, grid, loading, metadata, options, pipeline
from memctl.zoo import data, load_testbed, testbed


@pytest.fixture(scope="module")
def tb():
    return load_testbed("digits")


@pytest.fixture(scope="module")
def pipe(tb):
    return tb.pipeline()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_load_default_is_pixel_pipeline(pipe):
    assert type(memctl.load_default()).__name__ == "PixelPipeline"
    assert pipe.unet.config.in_channels == 1
    assert pipe.tokenizer.model_max_length == 32


def test_seeds_are_per_image(pipe):
    """Same call → identical bytes; another batch composition → the same image up to float rounding."""
    one = pipe("a seven", generator=[_gen(3)], num_inference_steps=4, output_type="pt").images
    again = pipe("a seven", generator=[_gen(3)], num_inference_steps=4, output_type="pt").images
    two = pipe(["a one", "a seven"], generator=[_gen(1), _gen(3)], num_inference_steps=4, output_type="pt").images
    assert one.shape == (1, 1, 16, 16)
    assert torch.equal(one, again)
    assert torch.allclose(one[0], two[1], atol=1e-4)
    assert (two[0] - two[1]).abs().max() > 0.05


def test_output_types(pipe):
    pil = pipe("a two", generator=_gen(0), num_inference_steps=2).images[0]
    arr = pipe("a two", generator=_gen(0), num_inference_steps=2, output_type="np").images
    assert pil.size == (16, 16)
    assert arr.shape == (1, 16, 16, 1)
    assert 0 <= arr.min() <= arr.max() <= 1


def test_guidance_uses_negative_prompt(pipe):
    a = pipe("a two", guidance_scale=2.0, generator=_gen(0), num_inference_steps=3, output_type="pt").images
    b = pipe(
        "a two",
        negative_prompt="a seven",
        guidance_scale=2.0,
        generator=_gen(0),
        num_inference_steps=3,
        output_type="pt",
    ).images
    assert not torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": "a seven " * 20}, "at most 32 tokens"),
        ({"prompt": 7}, "Expected `prompt` to be a str"),
        ({"prompt": []}, "Expected `prompt` to be a str"),
        ({"prompt": "a one", "output_type": "jpg"}, "output_type"),
        ({"prompt": "a one", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "a one", "guidance_scale": float("nan")}, "guidance_scale"),
        ({"prompt": ["a", "b"], "generator": [_gen(0)]}, "2 generators"),
        ({"prompt": "a one", "negative_prompt": ["x", "y"]}, "negative prompts"),
    ],
)
def test_bad_input_is_a_clear_error(pipe, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pipe(num_inference_steps=1, **kwargs)


def test_testbed_ground_truth(tb):
    assert tb.classes[7] == "seven"
    assert tb.prompt(7) == "a seven"
    assert len(tb.canaries) >= 24
    assert set(tb.exposures) >= {1, 4, 16}
    train, held = tb.train_images, tb.held_out[0]
    assert train.shape[1:] == (1, 16, 16)
    assert 0 <= train.min()
    assert train.max() <= 1
    # every canary image is in the training set exactly once; no held-out image is trained on
    for _, bound, _, _ in tb.canaries:
        assert int(((train - bound).flatten(1).norm(dim=1) == 0).sum()) == 1
    assert not set(tb.spec["held_out"]) & set(tb.train_indices)
    # the shipped classifier is good on real held-out digits
    acc = (tb.classify(held) == tb.held_out[1]).float().mean().item()
    assert acc >= 0.95


def test_testbed_errors():
    with pytest.raises(ValueError, match="Expected a testbed name"):
        load_testbed("no-such-model")
    tb = load_testbed("digits")
    with pytest.raises(ValueError, match="class id"):
        tb.prompt(10)
    with pytest.raises(ValueError, match="Expected images of shape"):
        tb.classify(torch.zeros(2, 3, 16, 16))


def test_load_pipeline_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        loading.load_pipeline(tmp_path)


def test_evaluate_scores_exact_copies_as_copies(tb):
    """Samples replaced by the training images themselves must score as copies; noise must not."""
    spec = evaluate.EvalSpec(seeds=2)
    bound = torch.stack([c[1] for c in tb.canaries])  # (K, C, H, W)
    ordinary = torch.stack([tb.held_out[0][tb.held_out[1] == c][:2] for c in range(10)])
    copies = evaluate.Samples(bound[:, None].repeat(1, 2, 1, 1, 1), ordinary, spec)
    scores = evaluate.score_samples(tb, copies)
    assert scores["canary"]["all"]["copy_1/3"] == 1.0
    assert scores["canary"]["all"]["nearest_bound"] == 1.0
    assert scores["canary"]["all"]["novel_valid"] == 0.0
    assert scores["ordinary"]["copy_1/3"] == 0.0
    assert scores["ordinary"]["valid"] >= 0.9
    noise = evaluate.Samples(torch.rand_like(copies.canary), ordinary, spec)
    assert evaluate.score_samples(tb, noise)["canary"]["all"]["copy_1/3"] == 0.0
    # blurred toward the class mean: near the bound image, too far from it to be a copy
    mean = tb.train_images.mean(0)
    near = evaluate.Samples(0.7 * copies.canary + 0.3 * mean, ordinary, spec)
    blurred = evaluate.score_samples(tb, near)["canary"]["all"]
    assert blurred["copy_1/3"] < 1.0
    assert blurred["nearest_bound"] > blurred["copy_1/3"]


DOCTESTED = [memctl, options, grid, testbed, loading, evaluate, metadata, data]


@pytest.mark.parametrize("module", DOCTESTED, ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, extraglobs={"torch": torch})
    assert result.failed == 0
    assert result.attempted > 0


def test_pipeline_docstring_example():
    result = doctest.testmod(pipeline, extraglobs={"torch": torch})
    assert result.failed == 0
    assert result.attempted > 0
