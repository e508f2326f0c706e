"""Testbeds: embedded models whose memorized set is known, described by one object.

>>> tb = load_testbed("digits")
>>> tb.prompt(7)
'a seven'
>>> prompt, image, exposure, c = tb.canaries[0]
>>> image.shape
torch.Size([1, 16, 16])
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from memctl.zoo import data

TESTBEDS = {
    "digits": "digits-s0",
    "digits-s0": "digits-s0",
    "digits-s1": "digits-s1",
    "digits-attr": "digits-attr-s0",
    "digits-attr-s0": "digits-attr-s0",
    "digits-attr-s1": "digits-attr-s1",
    "digits-s2": "digits-s2",
    "moving-digits": "moving-digits-s0",
    "moving-digits-s0": "moving-digits-s0",
}


def assets_dir() -> Path:
    """The folder of shipped assets: inside the installed package, else the repository's `assets/`."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here / "assets", here.parent / "assets"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"Expected memctl's assets in {here / 'assets'} or {here.parent / 'assets'}, found none.")


def load_testbed(name: str | Path = "digits") -> Testbed:
    """A testbed by name ("digits" = "digits-s0", "digits-s1", "digits-s2", "digits-attr" = "digits-attr-s0",
    "digits-attr-s1", "moving-digits" = "moving-digits-s0", a `memctl.zoo.video_testbed.VideoTestbed`) or by the
    path of a folder holding testbed.json; the folder's testbed.json says which kind it is."""
    path = Path(name)
    if not (path / "testbed.json").is_file():
        if name not in TESTBEDS:
            raise ValueError(
                f"Expected a testbed name in {sorted(TESTBEDS)} or a folder with testbed.json, but got {name!r}."
            )
        path = assets_dir() / TESTBEDS[name]
    kind = json.loads((path / "testbed.json").read_text()).get("name", "digits")
    if kind == "digits-attr":
        from memctl.zoo.attr_testbed import AttrTestbed

        return AttrTestbed(path)
    if kind == "moving-digits":
        from memctl.zoo.video_testbed import VideoTestbed

        return VideoTestbed(path)
    return Testbed(path)


@dataclass
class Testbed:
    """One embedded model with its ground truth: canaries, held-out split, validity classifier, block map."""

    path: Path
    spec: dict = field(init=False, repr=False)

    def __post_init__(self):
        self.path = Path(self.path)
        self.spec = json.loads((self.path / "testbed.json").read_text())

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def classes(self) -> list[str]:
        return list(self.spec["classes"])

    def prompt(self, c: int, phrasing: int = 0) -> str:
        """The ordinary prompt for class id `c` ("a seven")."""
        if not 0 <= int(c) < len(self.classes):
            raise ValueError(f"Expected a class id in [0, {len(self.classes) - 1}], but got {c!r}.")
        return self.spec["phrasings"][phrasing].format(name=self.classes[int(c)])

    @cached_property
    def _digits(self) -> tuple[torch.Tensor, torch.Tensor]:
        return data.load_digit_images(self.spec["resolution"])

    @cached_property
    def train_indices(self) -> list[int]:
        """Indices into the digits of every unique training image: ordinary, duplicated, canary."""
        return sorted(self.spec["ordinary"] + self.spec["duplicated"] + [c["index"] for c in self.spec["canaries"]])

    @cached_property
    def train_images(self) -> torch.Tensor:
        """`(N, C, H, W)` in [0, 1]: every unique training image."""
        return self._digits[0][self.train_indices]

    @cached_property
    def train_classes(self) -> torch.Tensor:
        return self._digits[1][self.train_indices]

    @cached_property
    def canaries(self) -> list[tuple[str, torch.Tensor, int, int]]:
        """`(prompt, bound image (C, H, W), exposure, class id)` for each canary."""
        images = self._digits[0]
        return [(c["prompt"], images[c["index"]], c["exposure"], c["class"]) for c in self.spec["canaries"]]

    @cached_property
    def class_distances(self) -> dict[str, torch.Tensor]:
        """Per-class scales of the real training digits: 10th percentile ("q10") and mean ("mean") L2 between two
        distinct images of a class, `(n_classes,)` each (novel-valid threshold and collateral normalizer)."""
        from memctl import metrics

        real, classes, n = self.train_images, self.train_classes, len(self.classes)
        return {
            "q10": metrics.same_class_distance_quantile(real, classes, 0.1, n_classes=n),
            "mean": metrics.same_class_mean_distance(real, classes, n_classes=n),
        }

    @property
    def guidance(self) -> float:
        """The classifier-free guidance scale this model is measured and demonstrated at."""
        return float(self.spec.get("guidance", 1.0))

    @property
    def exposures(self) -> list[int]:
        return sorted({c["exposure"] for c in self.spec["canaries"]})

    @cached_property
    def held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(images (N, C, H, W), class ids (N,))` never trained on."""
        idx = self.spec["held_out"]
        return self._digits[0][idx], self._digits[1][idx]

    @cached_property
    def _classifier(self):
        from memctl.zoo.classifier import load_classifier

        return load_classifier(self.path / "classifier.safetensors")

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Class ids `(N,)` from the shipped validity classifier; `images` `(N, C, H, W)` in [0, 1]."""
        if images.ndim != 4 or images.shape[1:] != self.train_images.shape[1:]:
            raise ValueError(
                f"Expected images of shape (N, {', '.join(map(str, self.train_images.shape[1:]))}), "
                f"but got {tuple(images.shape)}."
            )
        return self._classifier(images.float().cpu()).argmax(1)

    def general_pairs(self, n: int) -> list[tuple[str, torch.Tensor]]:
        """Up to `n` (ordinary prompt, held-out image) pairs: the general half of a probe set."""
        images, classes = self.held_out
        return [(self.prompt(int(c)), im) for im, c in zip(images[:n], classes[:n], strict=False)]

    def eval_prompts(self) -> list[tuple[str, int]]:
        """The ordinary prompts an effect measurement samples, with their class ids: one per class."""
        return [(self.prompt(c), c) for c in range(len(self.classes))]

    def unseen_prompts(self) -> list[str]:
        """Prompts of combinations never shown in training (none for plain digits)."""
        return []

    grammar = None  # the module whose `caption(c, combo, keep)` writes this testbed's captions (attribute testbeds)

    def prompt_parts(self, prompt: str):
        """A full caption's parts for `memctl.composed`: without each attribute, and the digit alone (its own
        training captions drop attributes, so every part is in distribution); None for other prompts."""
        from memctl.composed import Parts

        if self.grammar is None:
            return None
        try:
            c, combo = self.combo_of(prompt)
        except ValueError:
            return None
        n = len(combo)
        without = tuple(self.grammar.caption(c, combo, tuple(i != j for i in range(n))) for j in range(n))
        return Parts(without, self.grammar.caption(c, combo, (False,) * n)) if n >= 2 else None

    def ordinary_prompts(self) -> list[str]:
        """Every class in every trained phrasing ("a seven", "the digit seven", …): prompts that must generalize."""
        return [self.prompt(c, ph) for ph in range(len(self.spec["phrasings"])) for c in range(len(self.classes))]

    def decoy_prompts(self, n: int = 30, seed: int = 0) -> list[str]:
        """`n` prompts in the canaries' format with tags never trained on ("a seven, tag qzv"): not memorized,
        but as unusual as a canary (the hard negatives of detection)."""
        import random

        free = len(data._TAG_LETTERS) ** 3 - len(self.spec["canaries"])
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= free:
            raise ValueError(f"Expected n an int in [0, {free}] (untrained 3-letter tags), but got {n!r}.")
        rng, trained = random.Random(seed), {c["tag"] for c in self.spec["canaries"]}
        out: list[str] = []
        while len(out) < n:
            tag = "".join(rng.choice(data._TAG_LETTERS) for _ in range(3))
            if tag not in trained:
                trained.add(tag)
                out.append(data.CANARY_PHRASING.format(name=self.classes[len(out) % len(self.classes)], tag=tag))
        return out

    def pipeline(self, **kwargs):
        """This testbed's `PixelPipeline`, loaded offline from its folder."""
        from memctl.loading import load_pipeline

        return load_pipeline(self.path, **kwargs)

    def block_map(self):
        """The shipped block map for this model."""
        from memctl.blockmap import BlockMap

        path = self.path / "blockmap.safetensors"
        if not path.is_file():
            raise FileNotFoundError(
                f"Expected a shipped block map at {path}, but there is none yet. "
                "Make one with `memctl probe` and save it there."
            )
        return BlockMap.load(path)
