"""Tests of memctl.metrics on hand-made cases whose answers are known."""

import doctest
import math

import numpy as np
import pytest
import torch

import memctl.metrics
from memctl.metrics import (
    collateral,
    copied,
    copy_index,
    copy_rate,
    nearest_distances,
    nearest_index,
    novel_valid,
    novel_valid_rate,
    novelty,
    same_class_distance_quantile,
    same_class_mean_distance,
    summarize,
    unique_images,
    validity,
    vendi_score,
)

torch.set_num_threads(1)


def one_hot_images(n: int, side: int = 4) -> torch.Tensor:
    """`n` orthogonal images (N, 1, side, side), each lit at one pixel."""
    return torch.eye(side * side)[:n].reshape(n, 1, side, side)


def pixels(*values: float) -> torch.Tensor:
    """One-pixel images (N, 1, 1, 1) with the given values."""
    return torch.tensor(values).reshape(-1, 1, 1, 1)


def test_docstring_examples_run():
    result = doctest.testmod(memctl.metrics)
    assert result.failed == 0
    assert result.attempted > 0


# nearest neighbours and copies


def test_nearest_distances_match_brute_force_and_copies_are_exactly_zero():
    gen = torch.Generator().manual_seed(0)
    reference = torch.rand(40, 3, 4, 4, generator=gen)  # > 25 rows: cdist takes its matmul path
    samples = torch.cat([reference[[5, 17]], torch.rand(28, 3, 4, 4, generator=gen)])
    dists, indices = nearest_distances(samples, reference, k=3)
    brute = (samples.flatten(1)[:, None] - reference.flatten(1)[None]).norm(dim=-1).sort(dim=1)
    assert torch.allclose(dists, brute.values[:, :3], atol=1e-6)  # (torch.testing costs 1 s of imports)
    assert torch.equal(indices, brute.indices[:, :3])
    assert dists[0, 0] == 0
    assert dists[1, 0] == 0
    chunked = nearest_distances(samples, reference, k=3, chunk_size=7)
    assert torch.equal(chunked[0], dists)
    assert torch.equal(chunked[1], indices)


def test_exact_copy_is_copied_at_both_ratios_and_midpoint_is_not():
    train = one_hot_images(5)
    samples = torch.stack([train[3], (train[0] + train[1]) / 2])
    for ratio in (1 / 3, 1 / 2):
        assert copied(samples, train, ratio).tolist() == [True, False]
        assert copy_index(samples, train, ratio).tolist() == [3, -1]
        assert copy_rate(samples, train, ratio) == 0.5


def test_nearest_index_is_the_nearest_distinct_image_copy_or_not():
    train = torch.cat([pixels(0.0, 1.0), pixels(1.0), pixels(4.0)])  # image 1 twice: its first occurrence counts
    samples = pixels(0.45, 0.55, 1.0, 3.0)
    assert nearest_index(samples, train).tolist() == [0, 1, 1, 3]
    assert copy_index(samples, train).tolist() == [-1, -1, 1, -1]  # near, not copies, but for the exact one


def test_ratio_decides_between_one_third_and_one_half():
    train = pixels(0.0, 1.0)
    sample = pixels(0.3)  # d1 / d2 = 0.3 / 0.7 ≈ 0.43
    assert not copied(sample, train, 1 / 3)
    assert copied(sample, train, 1 / 2)


def test_duplicated_training_image_is_still_copied():
    train = torch.cat([one_hot_images(3), one_hot_images(2)[1:].expand(4, -1, -1, -1)])  # image 1 five times
    sample = one_hot_images(2)[1:]
    raw, _ = nearest_distances(sample, train, k=2)
    assert raw[0, 0] == raw[0, 1] == 0  # why deduplication is needed: d2 = d1 for a duplicate
    assert copied(sample, train).tolist() == [True]
    assert copy_index(sample, train).tolist() == [1]  # first occurrence
    unique, first = unique_images(train)
    assert first.tolist() == [0, 1, 2]
    assert torch.equal(unique, one_hot_images(3))


def test_fewer_than_two_distinct_training_images_is_an_error():
    with pytest.raises(ValueError, match="at least 2 distinct training images, but got 1"):
        copied(pixels(0.5), pixels(1.0, 1.0, 1.0))


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5])
def test_ratio_out_of_range_is_an_error(ratio):
    with pytest.raises(ValueError, match="Expected a ratio in"):
        copied(pixels(0.5), pixels(0.0, 1.0), ratio)


# validity and same-class distances


def test_validity_with_an_int_or_per_sample_targets():
    assert validity(torch.tensor([7, 7, 1, 7]), 7) == 0.75
    assert validity(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 0.5


def test_same_class_quantile_and_mean_by_hand():
    images = pixels(0.0, 1.0, 3.0, 6.0, 0.5, 0.7)
    classes = torch.tensor([0, 0, 0, 0, 2, 2])
    # class 0 distances: 1, 3, 6, 2, 5, 3 → sorted 1, 2, 3, 3, 5, 6; class 1 empty; class 2: 0.2
    for q, expected in [(0.0, 1.0), (0.1, 1.5), (0.5, 3.0), (1.0, 6.0)]:
        got = same_class_distance_quantile(images, classes, q)
        assert got[0].item() == pytest.approx(expected)
        assert got[0].item() == pytest.approx(np.quantile([1, 2, 3, 3, 5, 6], q))
        assert math.isnan(got[1])
        assert got[2].item() == pytest.approx(0.2)
    mean = same_class_mean_distance(images, classes, n_classes=4)
    assert mean.shape == (4,)
    assert mean[0].item() == pytest.approx(20 / 6)
    assert math.isnan(mean[1])
    assert math.isnan(mean[3])


# canaries, collateral, novelty


def test_novel_valid_on_constructed_cases():
    bound = torch.zeros(1, 2, 2)
    samples = torch.stack([bound, bound + 0.5, bound + 0.5, bound + 0.25, bound + 0.5])  # distances 0, 1, 1, 0.5, 1
    pred = torch.tensor([7, 7, 3, 7, 7])
    mask = novel_valid(samples, pred, 7, bound, threshold=0.5)
    assert mask.tolist() == [False, True, False, False, True]  # copy, new seven, not a seven, at threshold, new
    assert novel_valid_rate(samples, pred, 7, bound, threshold=torch.tensor(0.5)) == 0.4


def test_collateral_of_identical_is_zero_and_of_a_known_shift_is_known():
    at_zero = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    assert collateral(at_zero, at_zero, norm=2.0) == 0.0
    shifted = at_zero.clone()
    shifted[0] += 0.1  # L2 = 0.1 · 4 = 0.4
    assert collateral(shifted, at_zero, norm=2.0) == pytest.approx(0.4 / 3 / 2.0)
    assert collateral(shifted, at_zero, norm=torch.tensor([0.4, 1.0, 1.0])) == pytest.approx(1 / 3)


def test_novelty_counts_only_valid_samples_and_is_nan_without_any():
    copies = torch.tensor([True, False, False, True])
    assert novelty(copies, torch.tensor([True, True, False, False])) == 0.5
    assert novelty(copies, torch.tensor([False, True, True, False])) == 1.0
    assert math.isnan(novelty(copies, torch.zeros(4, dtype=torch.bool)))


# diversity


def test_vendi_of_identical_is_one_and_of_orthogonal_is_n():
    assert vendi_score(torch.full((6, 1, 4, 4), 0.3)) == pytest.approx(1.0, abs=1e-4)
    assert vendi_score(one_hot_images(6)) == pytest.approx(6.0, abs=1e-4)
    assert vendi_score(one_hot_images(2).repeat(3, 1, 1, 1)) == pytest.approx(2.0, abs=1e-4)  # two groups of 3
    assert vendi_score(torch.full((6, 1, 4, 4), 0.3), kernel="rbf") == pytest.approx(1.0, abs=1e-4)
    assert vendi_score(one_hot_images(6), kernel="rbf", sigma=0.1) == pytest.approx(6.0, abs=1e-4)


def test_vendi_lies_between_one_and_n():
    samples = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    for kernel in ("cosine", "rbf"):
        assert 1.0 <= vendi_score(samples, kernel=kernel) <= 10.0


def test_summarize_reports_every_rate():
    train = one_hot_images(4)
    samples = torch.stack([train[0], train[1], (train[2] + train[3]) / 2])
    out = summarize(samples, train, torch.tensor([0, 1, 0]), 0)
    assert out["copy_rate_0.33"] == out["copy_rate_0.5"] == pytest.approx(2 / 3)
    assert out["validity"] == pytest.approx(2 / 3)
    assert out["novelty"] == 0.5  # valid: samples 0 (a copy) and 2 (not)


# bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: copied(torch.rand(2, 4, 4), one_hot_images(3)), r"samples as a float tensor \(N, C, H, W\)"),
        (lambda: copied(one_hot_images(2).long(), one_hot_images(3)), "but got torch.int64"),
        (lambda: copied(torch.rand(0, 1, 4, 4), one_hot_images(3)), "non-empty samples"),
        (lambda: copied(torch.rand(2, 1, 2, 2), one_hot_images(3)), r"shape \(1, 2, 2\), but got \(1, 4, 4\)"),
        (lambda: nearest_distances(pixels(0.0), pixels(0.0, 1.0), k=3), "k <= len"),
        (lambda: validity(torch.tensor([1.0, 2.0]), 1), "1-D integer tensor"),
        (lambda: validity(torch.tensor([1, 2]), torch.tensor([1, 2, 3])), r"int or of shape \(2,\)"),
        (lambda: same_class_distance_quantile(pixels(0.0, 1.0), torch.tensor([0]), 0.1), "one class per image"),
        (lambda: same_class_distance_quantile(pixels(0.0, 1.0), torch.tensor([0, 0]), 10), r"q in \[0, 1\]"),
        (lambda: novel_valid(pixels(0.0), torch.tensor([1]), 1, torch.zeros(1, 2, 2), 0.1), "bound_image"),
        (lambda: novel_valid(pixels(0.0), torch.tensor([1, 1]), 1, torch.zeros(1, 1, 1), 0.1), "one predicted"),
        (lambda: collateral(pixels(0.0, 1.0), pixels(0.0), 1.0), "reference_samples of shape"),
        (lambda: collateral(pixels(0.0), pixels(0.0), 0.0), "norm > 0"),
        (lambda: novelty(torch.tensor([1, 0]), torch.tensor([True, False])), "two bool masks"),
        (lambda: vendi_score(torch.zeros(2, 1, 2, 2)), "all-zero image"),
        (lambda: vendi_score(one_hot_images(2), kernel="linear"), "kernel 'cosine' or 'rbf'"),
    ],
)
def test_bad_input_raises_a_value_error_that_says_what_was_expected(call, message):
    with pytest.raises(ValueError, match=f"Expected.*{message}|{message}.*but got"):
        call()
