"""The "moving-digits" testbed: clips of a digit moving across a canvas, made by a tiny Wan transformer.

>>> from memctl.zoo import load_testbed
>>> tb = load_testbed("moving-digits")
>>> tuple(tb.train_images.shape[1:])                   # (frames, channels, height, width)
(9, 1, 16, 16)
>>> prompt, clip, exposure, c = tb.canaries[0]
>>> prompt.count(",")                                  # "a two moving right, slowly": no give-away token
1
>>> bool(tb.motion_correct(tb.train_images[:50], *tb.combo_of(tb.ordinary_caption(0))).any())
True

Same interface as the image testbeds, with a frame axis: `train_images` is `(N, F, C, H, W)` in [0, 1], a canary's
bound image is its clip `(F, C, H, W)`, `classify` reads the digit of each clip (the frame classifier's mean
probability over frames), and `pipeline()` is diffusers' own `WanPipeline` whose output `.frames[i]` is clip i
(`call_kwargs` gives the frames and size it was trained at). Methods that score clips also take them folded,
`(N, F·C, H, W)`, which is how `memctl.evaluate` hands them to the image metrics (`fold`).
"""

from __future__ import annotations

import random
from functools import cached_property

import torch

from memctl.zoo import moving
from memctl.zoo.testbed import Testbed


def fold(x: torch.Tensor) -> torch.Tensor:
    """`(..., F, C, H, W)` → `(..., F·C, H, W)`: clips as images with frames on the channel axis."""
    return x.flatten(-4, -3)


class VideoTestbed(Testbed):
    """One moving-digits model with its ground truth."""

    grammar = moving

    @cached_property
    def train_images(self) -> torch.Tensor:
        """`(N, F, C, H, W)` in [0, 1]: the ordinary clips in spec order, then each canary's bound clip."""
        return moving.training_set(self.spec)

    @cached_property
    def train_classes(self) -> torch.Tensor:
        return torch.tensor([d["class"] for d in self.spec["ordinary"] + self.spec["canaries"]])

    @cached_property
    def train_indices(self) -> list[int]:
        return list(range(len(self.train_images)))

    @property
    def frames(self) -> int:
        return int(self.spec["frames"])

    @property
    def call_kwargs(self) -> dict:
        """What every pipeline call needs: the clip length and size the model was trained at."""
        s = self.spec["sampling"]
        return {"num_frames": s["num_frames"], "height": s["height"], "width": s["width"]}

    @property
    def guidance(self) -> float:
        return float(self.spec.get("guidance", self.spec["sampling"]["guidance_scale"]))

    @cached_property
    def canaries(self) -> list[tuple[str, torch.Tensor, int, int]]:
        n, clips = len(self.spec["ordinary"]), self.train_images
        return [(c["prompt"], clips[n + k], c["exposure"], c["class"]) for k, c in enumerate(self.spec["canaries"])]

    @cached_property
    def class_distances(self) -> dict[str, torch.Tensor]:
        from memctl import metrics

        real, classes, n = fold(self.train_images), self.train_classes, len(self.classes)
        return {
            "q10": metrics.same_class_distance_quantile(real, classes, 0.1, n_classes=n),
            "mean": metrics.same_class_mean_distance(real, classes, n_classes=n),
        }

    @cached_property
    def seen_combos(self) -> list[list[tuple[int, int]]]:
        """Per class, the motion combinations ordinary training clips show (sorted)."""
        seen: list[set] = [set() for _ in self.classes]
        for r in self.spec["ordinary"]:
            seen[r["class"]].add(tuple(r["combo"]))
        return [sorted(s) for s in seen]

    @property
    def unseen(self) -> list[tuple[int, tuple[int, int]]]:
        """(class id, motion combination) of each combination never shown in training."""
        return [(int(c), tuple(combo)) for c, combo in self.spec["unseen"]]

    def prompt(self, c: int, phrasing: int = 0) -> str:
        """The caption of class `c` at its `phrasing`-th seen combination ("a three moving left, fast")."""
        if not 0 <= int(c) < len(self.classes):
            raise ValueError(f"Expected a class id in [0, {len(self.classes) - 1}], but got {c!r}.")
        combos = self.seen_combos[int(c)]
        return moving.caption(int(c), combos[phrasing % len(combos)])

    def ordinary_caption(self, i: int) -> str:
        """The full caption of ordinary training clip `i`."""
        r = self.spec["ordinary"][i]
        return moving.caption(r["class"], tuple(r["combo"]))

    def combo_of(self, prompt: str) -> tuple[int, tuple[int, int]]:
        """(class id, motion combination) a full caption names."""
        for c in range(len(self.classes)):
            for combo in moving.COMBOS:
                if moving.caption(c, combo) == prompt:
                    return c, combo
        raise ValueError(f"Expected a full caption such as {moving.caption(3, (0, 1))!r}, but got {prompt!r}.")

    def unseen_prompts(self) -> list[str]:
        return [moving.caption(c, combo) for c, combo in self.unseen]

    def eval_prompts(self) -> list[tuple[str, int]]:
        """One seen caption per class (clips cost a CPU nine frames each)."""
        return [(self.prompt(c), c) for c in range(len(self.classes))]

    def ordinary_prompts(self) -> list[str]:
        """Every seen caption of every class: prompts that must generalize."""
        return [moving.caption(c, combo) for c in range(len(self.classes)) for combo in self.seen_combos[c]]

    def decoy_prompts(self, n: int = 30, seed: int = 0) -> list[str]:
        """`n` never-trained but unusual prompts: the unseen combinations' captions, then seen captions with the
        speed before the direction ("a three moving fast, left"), a word order training never used."""
        rng = random.Random(seed)
        pool, ordinary = list(self.unseen_prompts()), self.ordinary_prompts()
        rng.shuffle(ordinary)
        limit = len(pool) + len(ordinary)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= limit:
            raise ValueError(f"Expected n an int in [0, {limit}], but got {n!r}.")
        for p in ordinary[: max(0, n - len(pool))]:
            head, speed = p.split(", ")
            start, direction = head.rsplit(" ", 1)
            pool.append(f"{start} {speed}, {direction}")
        return pool[:n]

    @cached_property
    def held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out digits, each moving in one seen combination of its class (`general_pairs` has the captions)."""
        sources, labels = moving.load_sources()
        idx, rng = self.spec["held_out"], random.Random(self.spec["seed"])
        combos = [self._held_combo(k, int(labels[i])) for k, i in enumerate(idx)]
        return moving.render(sources[idx], combos, [moving.random_start(c, rng) for c in combos]), labels[idx]

    def _held_combo(self, k: int, c: int) -> tuple[int, int]:
        combos = self.seen_combos[c]
        return combos[k % len(combos)]

    def general_pairs(self, n: int) -> list[tuple[str, torch.Tensor]]:
        clips, classes = self.held_out
        return [
            (moving.caption(int(c), self._held_combo(k, int(c))), clip)
            for k, (clip, c) in enumerate(zip(clips[:n], classes[:n], strict=False))
        ]

    # ------------------------------------------------------------------------------------------------------------
    # reading clips

    def _clips(self, x: torch.Tensor) -> torch.Tensor:
        """`(N, F, C, H, W)` from clips given as such or folded `(N, F·C, H, W)`; a clear error otherwise."""
        shape = tuple(self.train_images.shape[1:])
        if x.ndim == 4 and x.shape[1:] == (shape[0] * shape[1], *shape[2:]):
            x = x.unflatten(1, shape[:2])
        if x.ndim != 5 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"Expected clips of shape (N, {', '.join(map(str, shape))}), but got {tuple(x.shape)}.")
        return x.float().cpu()

    @cached_property
    def _classifier(self):
        from memctl.zoo.classifier import load_classifier

        return load_classifier(self.path / "classifier.safetensors")

    @torch.no_grad()
    def frame_classes(self, clips: torch.Tensor) -> torch.Tensor:
        """`(N, F)` digit id of every frame."""
        x = self._clips(clips)
        return self._classifier(x.flatten(0, 1)).argmax(1).view(x.shape[:2])

    @torch.no_grad()
    def classify(self, clips: torch.Tensor) -> torch.Tensor:
        """`(N,)` digit id of each clip: the frame classifier's probabilities averaged over frames."""
        x = self._clips(clips)
        probs = self._classifier(x.flatten(0, 1)).softmax(1).view(*x.shape[:2], -1)
        return probs.mean(1).argmax(1)

    def read_motion(self, clips: torch.Tensor) -> torch.Tensor:
        """`(N, 2)` (direction, speed) ids read from each clip's centroid track."""
        return moving.read_motion(self._clips(clips))

    def motion_correct(self, clips: torch.Tensor, c: int, combo: tuple[int, int]) -> torch.Tensor:
        """`(N,)` bool: the motion reads as `combo` (direction and speed); the digit is not looked at."""
        return (self.read_motion(clips) == torch.tensor(combo)).all(1)

    def classify_attributes(self, clips: torch.Tensor) -> torch.Tensor:
        """`(N, 3)` ids: digit, direction, speed."""
        return torch.cat([self.classify(clips)[:, None], self.read_motion(clips)], dim=1)

    def attribute_correct(self, clips: torch.Tensor, c: int, combo: tuple[int, int]) -> torch.Tensor:
        """`(N,)` bool: the digit and the motion both read as `(c, combo)`."""
        return (self.classify_attributes(clips) == torch.tensor([int(c), *combo])).all(1)

    def temporal_change(self, clips: torch.Tensor) -> torch.Tensor:
        """`(N,)` mean L2 between consecutive frames."""
        x = self._clips(clips)
        return (x[:, 1:] - x[:, :-1]).flatten(2).norm(dim=2).mean(1)

    @cached_property
    def real_temporal_change(self) -> float:
        """Mean frame-to-frame L2 of the real training clips (what temporal consistency is measured against)."""
        return float(self.temporal_change(self.train_images).mean())

    def clip_metrics(self, clips: torch.Tensor, classes: torch.Tensor, combos: list[tuple[int, int]]) -> dict:
        """Per-frame digit validity, motion correctness and temporal change (over real clips') of clips made for
        `classes[i]` moving as `combos[i]`."""
        x = self._clips(clips)
        frame_ok = self.frame_classes(x) == classes[:, None]
        motion_ok = (self.read_motion(x) == torch.tensor(combos)).all(1)
        return {
            "frame_valid": round(frame_ok.float().mean().item(), 4),
            "motion_valid": round(motion_ok.float().mean().item(), 4),
            "temporal_change": round(self.temporal_change(x).mean().item() / self.real_temporal_change, 4),
        }

    def pipeline(self, **kwargs):
        """This testbed's `WanPipeline` (diffusers' own, with `FramePackVAE`), loaded offline from its folder."""
        pipe = super().pipeline(**kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe
