"""Exploration: caption composition as a de-copying lever on the attribute testbeds (not part of memctl's knob).

    python bench/caption_composition.py digits-attr-s0 --lams 0 0.5 1 --seeds 4 --seed-base 600

For a canary caption "a seven, small, bold, leaning left" the denoiser's conditional prediction is replaced by
`(1 - λ) ε(full) + λ [ε_u + mean_i (ε(part_i) - ε_u)]`, where part_i is the caption with attribute i left out
("a seven, bold, leaning left", ...) and ε_u the empty prompt's prediction (Composable Diffusion, Liu et al. 2022,
with the parts' mean). A canary's bound image is only ever captioned in full, so every part was trained on other
images of other combinations; composing them asks the model for the combination without the caption it memorized.
The same is done for never-shown combinations (composition). Costs 2 + number of attributes denoiser calls per step
(5 on digits-attr) instead of 1 (the testbeds sample without classifier-free guidance).

Per exposure: copies of the bound image (d1 < d2 / 3), samples whose nearest training image is the bound one,
attribute-correct samples, novel-valid (attribute-correct and not near the bound image, `memctl.metrics`); and the
attribute-correct share of the first 10 never-shown combinations. Writes
`bench/results/caption_composition-MODEL.json`. Seeds: pass seeds away from the effect bench's (10,000 and up) when
choosing anything from the output.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from memctl import metrics

OUT = Path(__file__).parent / "results"


def main(name: str, lams: list[float], seeds: int, seed_base: int) -> dict:
    from memctl.zoo import attr, load_testbed

    torch.set_num_threads(1)
    tb = load_testbed(name)
    if not hasattr(tb, "classify_attributes") or hasattr(tb, "frames"):  # images with attributes only
        raise SystemExit(f"Expected an image attribute testbed (digits-attr-s0, digits-attr-s1), but got {name}.")
    pipe = tb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    unet, state = pipe.unet, {}
    forward = unet.forward
    cfg = tb.guidance != 1.0

    def composed(sample, t, encoder_hidden_states=None, **kw):
        out = forward(sample, t, encoder_hidden_states=encoder_hidden_states, **kw).sample
        if state["lam"] == 0:
            return SimpleNamespace(sample=out)
        if cfg:  # [uncond; cond] in one batch
            n = sample.shape[0] // 2
            eu, ec, x = out[:n], out[n:], sample[n:]
        else:
            x, ec = sample, out
            eu = forward(x, t, encoder_hidden_states=state["empty"].to(x.dtype), **kw).sample
        parts = [forward(x, t, encoder_hidden_states=p.to(x.dtype), **kw).sample for p in state["parts"]]
        comp = eu + sum(p - eu for p in parts) / len(parts)
        mixed = (1 - state["lam"]) * ec + state["lam"] * comp
        return SimpleNamespace(sample=torch.cat([eu, mixed]) if cfg else mixed)

    def sample(c: int, combo: tuple[int, ...]) -> torch.Tensor:
        keeps = [tuple(j != i for j in range(len(combo))) for i in range(len(combo))]
        state["parts"] = [pipe.encode_prompt([attr.caption(c, combo, k)] * seeds) for k in keeps]
        state["empty"] = pipe.encode_prompt([""] * seeds)
        gens = [torch.Generator().manual_seed(seed_base + s) for s in range(seeds)]
        out = pipe([attr.caption(c, combo)] * seeds, generator=gens, guidance_scale=tb.guidance,
                   num_inference_steps=25, output_type="pt")  # fmt: skip
        return torch.as_tensor(out.images).float()

    unet.forward = composed
    train, q10 = tb.train_images, tb.class_distances["q10"]
    rows, t0 = {}, time.perf_counter()
    try:
        for lam in lams:
            state["lam"] = lam
            by = {}
            for prompt, bound, exposure, c in tb.canaries:
                c, combo = tb.combo_of(prompt)
                x = sample(c, combo)
                ok = tb.attribute_correct(x, c, combo)
                pred = torch.where(ok, tb.classify(x), torch.full((len(x),), -1))
                b = int((train - bound).flatten(1).norm(dim=1).argmin())
                r = by.setdefault(str(exposure), {"copy_1/3": [], "nearest_bound": [], "attr_correct": [],
                                                  "novel_valid": []})  # fmt: skip
                nearest, copies = metrics.nearest_and_copies(x, train, (1 / 3,))
                r["copy_1/3"].append((copies[1 / 3] == b).float().mean().item())
                r["nearest_bound"].append((nearest == b).float().mean().item())
                r["attr_correct"].append(ok.float().mean().item())
                r["novel_valid"].append(metrics.novel_valid_rate(x, pred, c, bound, q10[c]))
            unseen = [
                tb.attribute_correct(sample(c, combo), c, combo).float().mean().item() for c, combo in tb.unseen[:10]
            ]
            rows[f"{lam:g}"] = {
                "canary": {
                    e: {k: round(sum(v) / len(v), 4) for k, v in r.items()}
                    for e, r in sorted(by.items(), key=lambda kv: int(kv[0]))
                },
                "unseen_attr_correct": round(sum(unseen) / len(unseen), 4),
            }
            print(json.dumps({"lambda": lam, **rows[f"{lam:g}"]}), flush=True)
    finally:
        unet.forward = forward
    lam_args = " ".join(f"{v:g}" for v in lams)
    command = f"python bench/caption_composition.py {name} --lams {lam_args} --seeds {seeds} --seed-base {seed_base}"
    report = {"command": command, "model": name, "seeds": seeds, "seed_base": seed_base, "steps": 25,
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"caption_composition-{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--seed-base", type=int, default=600)
    args = parser.parse_args()
    main(args.model, args.lams, args.seeds, args.seed_base)
