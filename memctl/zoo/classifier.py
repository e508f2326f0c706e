"""The testbed's validity classifier: a small CNN trained on real digits only, stored as safetensors.

It is independent of the diffusion model: it never sees a generated sample. Robustness comes from light
augmentation (one-pixel shifts, pixel noise), since generated digits are slightly off-manifold.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


class DigitClassifier(nn.Module):
    """`(B, 1, 16, 16)` images in [0, 1] → `(B, 10)` logits."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, n_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, epochs: int, gen: torch.Generator):
    """Adam (2e-3), batches of 128 in a `gen`-shuffled order, augmented inputs; the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 128):
            b = perm[i : i + 128]
            loss = loss_fn(model(_augment(x[b], gen)), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def train_classifier(images: torch.Tensor, labels: torch.Tensor, spec: dict, seed: int, epochs: int = 60):
    """Train on every real digit that is not held out; return the model and its held-out accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    held = torch.tensor(spec["held_out"])
    mask = torch.ones(len(images), dtype=torch.bool)
    mask[held] = False
    x, y = images[mask], labels[mask]
    model = _fit(DigitClassifier(), x, y, F.cross_entropy, epochs, gen)
    with torch.no_grad():
        accuracy = (model(images[held]).argmax(1) == labels[held]).float().mean().item()
    return model, round(accuracy, 4)


def save_classifier(model: DigitClassifier, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_classifier(path: Path) -> DigitClassifier:
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


ATTR_HEADS = (10, 2, 2, 3)  # digit, size, stroke, slant


class AttrClassifier(nn.Module):
    """`(B, 1, 16, 16)` images in [0, 1] → `(B, 17)` logits: digit (10), size (2), stroke (2), slant (3)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 24, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(24, 48, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(48 * 4 * 4, 96), nn.ReLU(), nn.Linear(96, sum(ATTR_HEADS)),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, 4)` ids: digit, size, stroke, slant."""
        return torch.stack([h.argmax(1) for h in self(x).split(ATTR_HEADS, dim=1)], dim=1)


def _attr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(h, y[:, j]) for j, h in enumerate(logits.split(ATTR_HEADS, dim=1)))


def train_attr_classifier(spec: dict, seed: int, epochs: int = 12):
    """Train on every non-held-out real digit drawn at every attribute combination (never a generated sample);
    return the model and its held-out accuracy (all four heads right, held-out digits at every combination)."""
    from memctl.zoo import attr

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sources, labels = attr.load_sources()
    held = set(spec["held_out"])

    def renders(indices, marks: bool):
        combos = list(attr.COMBOS)
        src = sources[[i for i in indices for _ in combos]]
        # a quarter of the training renders carry a canary-style corner bar, so the bar does not sway the reading
        detail = [k % 4 if marks and k % 16 < 4 else None for k in range(len(src))]
        x = attr.render(src, [c for _ in indices for c in combos], detail)
        y = torch.tensor([[int(labels[i]), *c] for i in indices for c in combos])
        return x, y

    x, y = renders([i for i in range(len(labels)) if i not in held], marks=True)
    model = _fit(AttrClassifier(), x, y, _attr_loss, epochs, gen)
    xh, yh = renders(sorted(held), marks=False)
    with torch.no_grad():
        accuracy = (model.read(xh) == yh).all(1).float().mean().item()
    return model, round(accuracy, 4)


def load_attr_classifier(path: Path) -> AttrClassifier:
    model = AttrClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
