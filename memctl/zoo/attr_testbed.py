"""The "digits-attr" testbed: digits drawn with attributes, captioned in ordinary words, with no give-away token.

>>> from memctl.zoo import load_testbed
>>> tb = load_testbed("digits-attr")
>>> tb.canaries[0][0].count(",")  # "a zero, small, bold, leaning left": digit and three attributes, no tag
3
>>> len(tb.unseen_prompts())
20

Same interface as the digits `Testbed`, plus `classify_attributes` (digit, size, stroke, slant ids from the shipped
classifier, trained on real renders only), `unseen` (never-shown combinations: the compositional half) and
`unseen_prompts()`. `classify` reads the digit alone; validity on this testbed also asks for the attributes.
"""

from __future__ import annotations

import random
from functools import cached_property

import torch

from memctl.zoo import attr
from memctl.zoo.testbed import Testbed


class AttrTestbed(Testbed):
    """One digits-attr model with its ground truth."""

    grammar = attr

    def _records(self) -> list[dict]:
        return [dict(r) for r in self.spec["ordinary"]] + [dict(r) for r in self.spec["canaries"]]

    @cached_property
    def _renders(self) -> tuple[torch.Tensor, list[dict]]:
        return attr.training_set(self.spec)

    @cached_property
    def seen_combos(self) -> list[list[tuple[int, ...]]]:
        """Per class, the attribute combinations ordinary training images show (sorted)."""
        seen: list[set] = [set() for _ in self.classes]
        for r in self.spec["ordinary"]:
            seen[r["class"]].add(tuple(r["combo"]))
        return [sorted(s) for s in seen]

    def prompt(self, c: int, phrasing: int = 0) -> str:
        """The caption of class `c` at its `phrasing`-th seen combination ("a seven, large, thin, upright")."""
        if not 0 <= int(c) < len(self.classes):
            raise ValueError(f"Expected a class id in [0, {len(self.classes) - 1}], but got {c!r}.")
        combos = self.seen_combos[int(c)]
        return attr.caption(int(c), combos[phrasing % len(combos)])

    def combo_of(self, prompt: str) -> tuple[int, tuple[int, ...]]:
        """(class id, attribute combination) a full caption names."""
        for c in range(len(self.classes)):
            for combo in attr.COMBOS:
                if attr.caption(c, combo) == prompt:
                    return c, combo
        raise ValueError(f"Expected a full caption such as {attr.caption(7, (0, 1, 0))!r}, but got {prompt!r}.")

    @cached_property
    def train_images(self) -> torch.Tensor:
        return self._renders[0]

    @cached_property
    def train_classes(self) -> torch.Tensor:
        return torch.tensor([r["class"] for r in self._renders[1]])

    @cached_property
    def train_indices(self) -> list[int]:
        return list(range(len(self.train_images)))

    @cached_property
    def canaries(self) -> list[tuple[str, torch.Tensor, int, int]]:
        n = len(self.spec["ordinary"])
        images = self.train_images
        return [(c["prompt"], images[n + k], c["exposure"], c["class"]) for k, c in enumerate(self.spec["canaries"])]

    @property
    def unseen(self) -> list[tuple[int, tuple[int, ...]]]:
        """(class id, attribute combination) of each combination never shown in training."""
        return [(u["class"], tuple(u["combo"])) for u in self.spec["unseen"]]

    def unseen_prompts(self) -> list[str]:
        return [attr.caption(c, combo) for c, combo in self.unseen]

    def eval_prompts(self) -> list[tuple[str, int]]:
        """Two seen captions per class (phrasings 0 and 1)."""
        return [(self.prompt(c, ph), c) for ph in (0, 1) for c in range(len(self.classes))]

    @cached_property
    def held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out digits, each drawn at one seen combination of its class (`general_pairs` has the captions)."""
        sources, labels = attr.load_sources()
        idx = self.spec["held_out"]
        combos = [
            self.seen_combos[int(labels[i])][k % len(self.seen_combos[int(labels[i])])] for k, i in enumerate(idx)
        ]
        return attr.render(sources[idx], combos), labels[idx]

    def general_pairs(self, n: int) -> list[tuple[str, torch.Tensor]]:
        sources, labels = attr.load_sources()
        images, classes = self.held_out
        out = []
        for k, (im, c) in enumerate(zip(images[:n], classes[:n], strict=False)):
            combos = self.seen_combos[int(c)]
            out.append((attr.caption(int(c), combos[k % len(combos)]), im))
        return out

    @cached_property
    def _classifier(self):
        from memctl.zoo.classifier import load_attr_classifier

        return load_attr_classifier(self.path / "classifier.safetensors")

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1:] != self.train_images.shape[1:]:
            raise ValueError(
                f"Expected images of shape (N, {', '.join(map(str, self.train_images.shape[1:]))}), "
                f"but got {tuple(images.shape)}."
            )

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Digit ids `(N,)`."""
        return self.classify_attributes(images)[:, 0]

    @torch.no_grad()
    def classify_attributes(self, images: torch.Tensor) -> torch.Tensor:
        """`(N, 4)` ids: digit, size (small, large), stroke (thin, bold), slant (left, upright, right)."""
        self._check_images(images)
        return self._classifier.read(images.float().cpu())

    def attribute_correct(self, images: torch.Tensor, c: int, combo: tuple[int, ...]) -> torch.Tensor:
        """`(N,)` bool: the digit and every attribute read as `(c, combo)`."""
        want = torch.tensor([int(c), *combo])
        return (self.classify_attributes(images) == want).all(1)

    def ordinary_prompts(self) -> list[str]:
        """Every seen caption of every class: prompts that must generalize."""
        return [attr.caption(c, combo) for c in range(len(self.classes)) for combo in self.seen_combos[c]]

    def decoy_prompts(self, n: int = 30, seed: int = 0) -> list[str]:
        """`n` never-trained but unusual prompts: the unseen combinations' captions first, then seen captions with
        their attributes in a word order training never used ("a seven, leaning left, small, bold")."""
        rng = random.Random(seed)
        pool = list(self.unseen_prompts())
        ordinary = self.ordinary_prompts()
        rng.shuffle(ordinary)
        limit = len(pool) + len(ordinary)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= limit:
            raise ValueError(f"Expected n an int in [0, {limit}], but got {n!r}.")
        for p in ordinary[: max(0, n - len(pool))]:
            head, *words = p.split(", ")
            pool.append(", ".join([head, *words[1:], words[0]]))
        return pool[:n]
