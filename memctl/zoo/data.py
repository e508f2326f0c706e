"""The digits testbed's data: scikit-learn's bundled 8×8 digits, upsampled, split into ordinary, duplicated,
canary and held-out images, with the prompts that go with them.

>>> spec = make_spec(seed=0)
>>> len(spec["canaries"]) >= 24
True
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PHRASINGS = ("a {name}", "the digit {name}", "a handwritten {name}")
CANARY_PHRASING = "a {name}, tag {tag}"
EXPOSURES = (1, 4, 16)  # canary exposure levels, relative to one ordinary image
CANARIES_PER_EXPOSURE = 8
N_DUPLICATED = 6
DUPLICATE_FACTOR = 25
HELD_OUT_FRACTION = 0.1
RESOLUTION = 16
_TAG_LETTERS = "bcdfghjklmnpqrstvwxz"


def load_digit_images(resolution: int = RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 scikit-learn digits as `(N, 1, R, R)` floats in [0, 1] (bilinear upsampling) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).div(16.0)[:, None]  # (N, 1, 8, 8)
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return images.clamp(0, 1), torch.tensor(digits.target, dtype=torch.long)


def _make_tags(rng: random.Random, n: int) -> list[str]:
    tags: set[str] = set()
    while len(tags) < n:
        tags.add("".join(rng.choice(_TAG_LETTERS) for _ in range(3)))
    return sorted(tags, key=lambda t: rng.random())


def make_spec(seed: int) -> dict:
    """The split of the digits for one seed: indices into `load_digit_images()` and the canary prompts.

    Held-out images (10 %, stratified) are never trained on; each canary image appears only under its tagged
    prompt; duplicated images appear `DUPLICATE_FACTOR` times as often as an ordinary one.
    """
    _, labels = load_digit_images()
    rng = random.Random(seed)
    by_class = [[i for i in range(len(labels)) if labels[i] == c] for c in range(len(CLASSES))]
    for idx in by_class:
        rng.shuffle(idx)
    held_out = sorted(i for idx in by_class for i in idx[: round(len(idx) * HELD_OUT_FRACTION)])
    pool = [idx[round(len(idx) * HELD_OUT_FRACTION) :] for idx in by_class]
    n_canaries = CANARIES_PER_EXPOSURE * len(EXPOSURES)
    tags = _make_tags(rng, n_canaries)
    canaries = []
    for k in range(n_canaries):
        c = k % len(CLASSES)
        image_index = pool[c].pop()
        exposure = EXPOSURES[k % len(EXPOSURES)]
        prompt = CANARY_PHRASING.format(name=CLASSES[c], tag=tags[k])
        canaries.append({"prompt": prompt, "tag": tags[k], "index": image_index, "class": c, "exposure": exposure})
    duplicated = [pool[c].pop() for c in rng.sample(range(len(CLASSES)), N_DUPLICATED)]
    ordinary = sorted(i for idx in pool for i in idx)
    return {
        "seed": seed,
        "resolution": RESOLUTION,
        "classes": list(CLASSES),
        "phrasings": list(PHRASINGS),
        "held_out": held_out,
        "ordinary": ordinary,
        "duplicated": sorted(duplicated),
        "duplicate_factor": DUPLICATE_FACTOR,
        "canaries": canaries,
    }


def vocabulary_words(spec: dict) -> list[str]:
    """Words that get a token of their own: digit names, phrasing words and canary tags."""
    words = set(spec["classes"]) | {c["tag"] for c in spec["canaries"]}
    for phrasing in list(spec["phrasings"]) + [CANARY_PHRASING]:
        words |= {w.strip(",") for w in phrasing.split() if "{" not in w}
    return sorted(w for w in words if len(w) > 1)


def build_tokenizer(words: list[str], max_length: int = 32):
    """A CLIP tokenizer built in memory: byte-level BPE whose merges make each of `words` a single token.

    Any other text still tokenizes (byte by byte), as with a real CLIP vocabulary.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    merges = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.append(parts[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    ids = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    merges = list(dict.fromkeys(merges))
    return CLIPTokenizer(vocab=ids, merges=merges, model_max_length=max_length)
