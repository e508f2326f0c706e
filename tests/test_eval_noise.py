"""`EvalSpec.noise`: whether every prompt's samples share the same seeds (paired rows, few noise draws) or each
prompt gets its own (still paired across rows); older records' specs compare equal."""

from types import SimpleNamespace

import pytest
import torch

from memctl.evaluate import EvalSpec, sample_testbed


class SeedPipe:
    """Returns, per sample, an image holding its generator's seed."""

    def __call__(self, prompts, generator, **kwargs):
        seeds = [float(g.initial_seed()) for g in generator]
        return SimpleNamespace(images=torch.tensor(seeds).view(-1, 1, 1, 1))


TB = SimpleNamespace(
    canaries=[("c0", None, 16, 0), ("c1", None, 16, 1)],
    eval_prompts=lambda: [("o0", 0), ("o1", 1), ("o2", 2)],
    unseen_prompts=lambda: ["u0"],
)


def _seeds(noise: str) -> dict[str, torch.Tensor]:
    s = sample_testbed(SeedPipe(), TB, EvalSpec(seeds=2, seed_base=100, noise=noise))
    return {"canary": s.canary.flatten(1), "ordinary": s.ordinary.flatten(1), "unseen": s.unseen.flatten(1)}


def test_shared_noise_repeats_the_seeds_for_every_prompt_and_per_prompt_does_not():
    shared = _seeds("shared")
    assert all(torch.equal(v, torch.tensor([[100.0, 101.0]] * len(v))) for v in shared.values())
    per = _seeds("per-prompt")
    every = torch.cat([per["canary"], per["ordinary"], per["unseen"]]).flatten()
    assert every.tolist() == [100.0 + k for k in range(12)]  # prompt i, seed s -> 100 + 2 i + s: all distinct


def test_noise_setting_is_checked_and_old_specs_compare_equal():
    assert "noise" not in EvalSpec().to_dict()  # records made before the field: the same dict
    assert EvalSpec(noise="per-prompt").to_dict()["noise"] == "per-prompt"
    assert EvalSpec(**EvalSpec(noise="per-prompt").to_dict()) == EvalSpec(noise="per-prompt")
    with pytest.raises(ValueError, match="noise 'shared' or 'per-prompt'"):
        EvalSpec(noise="random")
