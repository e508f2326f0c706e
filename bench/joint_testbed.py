"""The joint-attention lever measured in samples: SD3 and Flux transformers trained on digits-s0's data.

    python bench/joint_testbed.py train --family sd3 --minutes 40 --steps 8000   # -> bench/results/joint-sd3/
    python bench/joint_testbed.py train --family flux --minutes 40 --steps 8000  # -> bench/results/joint-flux/
    python bench/joint_testbed.py effect --family sd3   # (and flux) -> bench/results/joint_lever.{json,md}
    python bench/joint_testbed.py grid --family sd3     # (and flux) -> bench/results/joint_lever_sd3.png

Until now the joint lever (`memctl.joint`: SD3 blocks, Flux double- and single-stream blocks, CogVideoX) was only
tested for its mechanics on random tiny pipelines. This trains a small transformer of each family with its text
encoders on exactly the data of the digits-s0 testbed (`memctl.zoo.data.make_spec(0)`: ordinary captions, canaries
with tag tokens at exposures 1 / 4 / 16, duplicates), in pixel space: the pipeline's "VAE" keeps the size and is
never called (`output_type="latent"` gives the 16×16 pixels in [-1, 1]), so digits-s0's classifier and copy
criterion judge the samples. The pipelines are stock `StableDiffusion3Pipeline` (two CLIPs, no T5; 4 joint blocks)
and `FluxPipeline` (CLIP pooled, T5 text stream; 2 double- and 2 single-stream blocks); weights ~1-2 MB each.

`effect` probes the map with `probe(method="prompt")` on the canary prompts (memorized) and the ordinary prompts
(general) at probe seeds, and samples at evaluation seeds (10,000 on) with `memctl.evaluate`, as `memctl bench
effect` does for digits-s0 (guidance 1, 25 steps): plain, the map at fidelity -0.5 and -1, and a control that puts
every joint block at the map's top row ("uniform").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from memctl.atomic import atomic_write
from memctl.zoo import data
from memctl.zoo.train_digits import _load_ema, _log, _optimizer_step, _save_state, _set_lr, _start, digits_dataset

RESULTS = Path(__file__).parent / "results"
SEED = 0
FLOW_SHIFT = 3.0
MAX_SEQUENCE_LENGTH = {"sd3": 4, "flux": 16}  # SD3: its T5 part (zeros, no T5) kept short; Flux: the T5 tokens
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=32)  # fmt: skip
SD3 = dict(sample_size=data.RESOLUTION, patch_size=2, in_channels=1, out_channels=1, num_layers=4,
           attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64,
           pooled_projection_dim=32, pos_embed_max_size=data.RESOLUTION)  # fmt: skip
FLUX = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
            axes_dims_rope=(4, 6, 6))  # fmt: skip


def out_dir(family: str) -> Path:
    return RESULTS / f"joint-{family}"


def _vae():
    """A VAE that keeps the size (one block) on one channel; never called: the pipelines return latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=1, out_channels=1, latent_channels=1, block_out_channels=(8,), norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         scaling_factor=1.0, shift_factor=0.0).eval()  # fmt: skip


def build_pipeline(family: str, tokenizer, seed: int = SEED):
    """A stock diffusers pipeline on 1-channel 16×16 pixels. SD3: two CLIP text encoders (hidden 32 + 32 = joint
    64), no T5, 4 joint blocks. Flux: a CLIP (pooled) and a T5 encoder (the text stream) over the same word-level
    tokenizer, 2 double-stream and 2 single-stream blocks, no guidance embedding."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    if family == "sd3":
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**ids, **TEXT, projection_dim=16)) for _ in range(2)]
        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**SD3), scheduler=scheduler, vae=_vae(), text_encoder=encoders[0],
            tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer, text_encoder_3=None,
            tokenizer_3=None,
        )  # fmt: skip
    from diffusers import FluxPipeline, FluxTransformer2DModel

    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 pad_token_id=tokenizer.pad_token_id))  # fmt: skip
    return FluxPipeline(
        scheduler=scheduler, vae=_vae(), text_encoder=CLIPTextModel(CLIPTextConfig(**ids, **TEXT)),
        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer, transformer=FluxTransformer2DModel(**FLUX),
    )  # fmt: skip


def _predict(family: str, pipe, xt: torch.Tensor, s: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The transformer's velocity for pixel latents `xt` (B, 1, H, W) at noise levels `s`, as the pipeline calls it."""
    n = MAX_SEQUENCE_LENGTH[family]
    if family == "sd3":
        e, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                             max_sequence_length=n)  # fmt: skip
        return pipe.transformer(hidden_states=xt, timestep=s * 1000, encoder_hidden_states=e,
                                pooled_projections=pooled).sample  # fmt: skip
    b, c, h, w = xt.shape
    e, pooled, text_ids = pipe.encode_prompt(prompts, None, max_sequence_length=n)
    packed = pipe._pack_latents(xt, b, c, h, w)
    image_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, xt.device, xt.dtype)
    out = pipe.transformer(
        hidden_states=packed,
        timestep=s,  # Flux's transformer takes t / 1000
        pooled_projections=pooled,
        encoder_hidden_states=e,
        txt_ids=text_ids,
        img_ids=image_ids,
    ).sample
    return pipe._unpack_latents(out, h, w, 1)


def _sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=gen)
    return FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)


def train(
    family: str, minutes: float, steps: int = 8000, batch_size: int = 64, lr: float = 5e-4, resume: bool = False
) -> dict:
    """Flow matching (as the pipeline's scheduler samples), AdamW, EMA; one thread, a wall-clock cap, checkpoints.
    `resume`: continue from the last checkpoint to `steps`, on a cosine schedule over all `steps`."""
    torch.set_num_threads(1)
    out = out_dir(family)
    ds = digits_dataset(SEED)
    tokenizer = data.build_tokenizer(ds.words)
    pipe = build_pipeline(family, tokenizer)
    models = {n: getattr(pipe, n) for n in ("transformer", "text_encoder", "text_encoder_2")}
    for m in models.values():
        m.train()
    params, opt, ema, rng, sampler, gen, step, ckpt, log = _start(out, models, SEED, ds.items, ds.ordinary_prompt, lr,
                                                                  resume=resume)  # fmt: skip
    first = step
    x_all, start = ds.images * 2 - 1, time.time()
    while step < steps and time.time() - start < minutes * 60:
        _set_lr(opt, lr, step, steps)
        indices, prompts = sampler.draw(batch_size)
        x0 = x_all[indices]
        noise = torch.randn(x0.shape, generator=gen)
        s = _sigmas(batch_size, gen)
        xt = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
        loss = F.mse_loss(_predict(family, pipe, xt, s, prompts), noise - x0)
        step = _optimizer_step(loss, opt, params, models, ema, step, 0.999)
        if step % 100 == 0:
            _log(log, step, loss, start)
        if step % 1000 == 0:
            _save_state(ckpt, step, models, ema, opt, rng.getstate(), gen)
    _save_state(ckpt, step, models, ema, opt, rng.getstate(), gen)  # a later --resume starts where this one ended
    _load_ema(models, ema)
    for m in models.values():
        m.eval()
    info = {
        "family": family,
        "seed": SEED,
        "steps": step,
        "steps_planned": steps,
        "batch_size": batch_size,
        "lr": lr,
        "minutes": round((time.time() - start) / 60, 2),
        "data": "digits-s0 (memctl.zoo.data.make_spec(0))",
        "command": f"python bench/joint_testbed.py train --family {family} --minutes {minutes} --steps {steps}"
        + (" --resume" if resume else ""),
    }
    if resume and (out / "training.json").exists():  # the runs before this one, and where this one started
        before = json.loads((out / "training.json").read_text())
        info.update(first_step=first, phases=before.pop("phases", []) + [before])
    pipe.save_pretrained(out, safe_serialization=True)
    atomic_write(out / "training.json", json.dumps(info, indent=1).encode())
    return info


def load_pipeline(family: str, path: Path | None = None):
    """The trained pipeline, its class's own, whose images are its latents (the 16×16 pixels)."""
    import numpy as np
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
    from PIL import Image

    base = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline

    class PixelPipeline(base):
        def __call__(self, *args, output_type="pil", **kwargs):
            kwargs.setdefault("max_sequence_length", MAX_SEQUENCE_LENGTH[family])
            kwargs.setdefault("height", data.RESOLUTION)  # (Flux's default size is 128 × the VAE's factor)
            kwargs.setdefault("width", data.RESOLUTION)
            out = super().__call__(*args, output_type="latent", **kwargs)
            if output_type == "latent":
                return out
            x = out.images
            if family == "flux":
                x = self._unpack_latents(x, kwargs["height"], kwargs["width"], self.vae_scale_factor)
            x = (x / 2 + 0.5).clamp(0, 1)  # (B, 1, H, W)
            if output_type == "pt":
                return ImagePipelineOutput(images=x)
            arr = x.permute(0, 2, 3, 1).float().numpy()
            if output_type == "np":
                return ImagePipelineOutput(images=arr)
            pil = [Image.fromarray((a[..., 0] * 255).round().astype(np.uint8)) for a in arr]
            return ImagePipelineOutput(images=pil)

    load = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    pipe = PixelPipeline.from_pretrained(path or out_dir(family), **load)
    pipe.set_progress_bar_config(disable=True)
    return pipe


FIDELITIES = (-0.5, -1.0)
# the probe's signal needs an unconditional pass: Flux runs one only with true CFG and a negative prompt
PROBE_CALL = {"sd3": {}, "flux": {"negative_prompt": "", "true_cfg_scale": 2.0}}


def prompt_map(family: str, pipe, tb):
    """`probe(method="prompt")` with the testbed's canary prompts as memorized and its ordinary prompts as general."""
    import memctl

    probes = memctl.ProbeSet(memorized=[(c[0], None) for c in tb.canaries],
                             general=[(p, None) for p in tb.ordinary_prompts()])  # fmt: skip
    return memctl.probe(pipe, probes, method="prompt", progress=False, call_kwargs=PROBE_CALL[family])


def effect(family: str, seeds: int = 8, steps: int = 25, path: Path | None = None) -> dict:
    """Plain, the prompt map at `FIDELITIES` and the uniform control, on digits-s0's ground truth; the family's
    record joins `bench/results/joint_lever.json`."""
    from contextlib import nullcontext

    from memctl.controls import _top_row, with_scores
    from memctl.effect import _measure, knob_setup
    from memctl.evaluate import EvalSpec
    from memctl.zoo import load_testbed

    torch.set_num_threads(1)
    path = path or out_dir(family)
    tb, pipe = load_testbed("digits-s0"), load_pipeline(family, path)
    spec = EvalSpec(seeds=seeds, guidance=tb.guidance, steps=steps)
    t0 = time.perf_counter()
    bmap = prompt_map(family, pipe, tb)
    probe_seconds = round(time.perf_counter() - t0, 1)
    everywhere = list(range(bmap.n_blocks))
    uniform = with_scores(bmap, _top_row(bmap, everywhere).expand(bmap.n_blocks, -1).clone(), {"kind": "uniform"})
    plain, ref = _measure(tb, pipe, spec, None, nullcontext)
    rows = {"plain": {"0": plain}}
    for name, m in (("map", bmap), ("uniform", uniform)):
        for f in FIDELITIES:
            rows.setdefault(name, {})[f"{f:+.1f}"] = _measure(tb, pipe, spec, ref, knob_setup(pipe, m, f))[0]
    record = {
        "command": f"python bench/joint_testbed.py effect --family {family} --seeds {seeds}",
        "training": json.loads((path / "training.json").read_text()),
        "probe_seconds": probe_seconds,
        "map": {
            "lever": bmap.lever,
            "names": bmap.names,
            "kinds": bmap.kinds,
            "top_score": [round(float(v), 4) for v in bmap.scores.abs().amax(1)],
        },
        "eval": spec.to_dict(),
        "rows": rows,
    }
    results = RESULTS / "joint_lever.json"
    everything = json.loads(results.read_text()) if results.exists() else {}
    everything[family] = record
    atomic_write(results, json.dumps(everything, indent=1).encode())
    print(write_table())
    return record


def write_table() -> str:
    """`bench/results/joint_lever.md` from `joint_lever.json`."""
    everything = json.loads((RESULTS / "joint_lever.json").read_text())
    text = "\n".join(markdown(f, r, (1, 4, 16)) for f, r in everything.items())
    atomic_write(RESULTS / "joint_lever.md", text.encode())
    return text


def grid(family: str, seeds: int = 6) -> Path:
    """`bench/results/joint_lever_<family>.png`: per row a prompt (three 16× canaries, two 4×, an ordinary one),
    its bound image, then `seeds` samples at fidelity 0 and the same seeds at -1 (the map probed as in `effect`)."""
    from PIL import Image

    import memctl
    from memctl.zoo import load_testbed

    torch.set_num_threads(1)
    tb, pipe = load_testbed("digits-s0"), load_pipeline(family)
    chosen = [c for c in tb.canaries if c[2] == 16][:3] + [c for c in tb.canaries if c[2] == 4][:2]
    prompts, bound = [c[0] for c in chosen] + [tb.prompt(2)], [c[1] for c in chosen] + [torch.zeros(1, 16, 16)]

    def run():
        gens = [torch.Generator().manual_seed(10_000 + s) for _ in prompts for s in range(seeds)]
        batch = [p for p in prompts for _ in range(seeds)]
        return pipe(batch, generator=gens, num_inference_steps=25, guidance_scale=tb.guidance, output_type="pt").images

    plain = run()
    memctl.apply_knob(pipe, prompt_map(family, pipe, tb))
    with memctl.fidelity(pipe, -1.0):
        pulled = run()
    memctl.remove_knob(pipe)
    rows = []
    for k in range(len(prompts)):
        a, b = plain[k * seeds : (k + 1) * seeds], pulled[k * seeds : (k + 1) * seeds]
        rows.append(torch.cat([bound[k], torch.ones(1, 16, 2), *a, torch.ones(1, 16, 4), *b], -1))
        rows.append(torch.ones(1, 2, rows[-1].shape[-1]))
    image = (torch.cat(rows, 1)[0].clamp(0, 1) * 255).byte().numpy()
    out = RESULTS / f"joint_lever_{family}.png"
    Image.fromarray(image).resize((image.shape[1] * 4, image.shape[0] * 4), Image.NEAREST).save(out)
    return out


def markdown(family: str, record: dict, exposures) -> str:
    lines = [
        f"# The joint-attention lever in samples: {family} transformer on digits-s0's data",
        "",
        f"`{record['command']}` after `{record['training']['command']}` "
        f"({record['training']['steps']} steps, {record['training']['minutes']} min on this CPU). "
        f"{record['eval']['seeds']} evaluation seeds per prompt, {record['eval']['steps']} steps, guidance "
        f'{record["eval"]["guidance"]}. Map: `probe(method="prompt")`, lever `{record["map"]["lever"]}`, '
        f"{len(record['map']['names'])} blocks ({', '.join(record['map']['names'])}). "
        "Copies: nearest training image closer than 1/3 (or 1/2) of the second nearest; novel-valid: the right "
        "digit and no copy of the bound image; collateral: change of ordinary samples "
        "against fidelity 0, in units of the class's mean distance.",
        "",
        " | ".join(
            [
                "row",
                *[f"{e}× copies" for e in exposures],
                *[f"{e}× novel-valid" for e in exposures],
                f"{max(exposures)}× copies at ratio 1/2",
                "ordinary valid",
                "ordinary collateral",
            ]
        ),
        " | ".join(["---"] * (2 * len(exposures) + 4)),
    ]
    for name, settings in record["rows"].items():
        for setting, row in settings.items():
            c = row["canary"]
            cells = [f"{100 * c[str(e)]['copy_1/3']:.0f} %" for e in exposures]
            cells += [f"{100 * c[str(e)]['novel_valid']:.0f} %" for e in exposures]
            cells += [f"{100 * c[str(max(exposures))]['copy_1/2']:.0f} %"]
            cells += [f"{100 * row['ordinary']['valid']:.0f} %", f"{row['ordinary'].get('collateral', 0):.2f}"]
            lines.append(" | ".join([f"{name} {setting}", *cells]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--family", choices=("sd3", "flux"), default="sd3")
    t.add_argument("--minutes", type=float, default=40.0)
    t.add_argument("--steps", type=int, default=8000)
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint to --steps")
    e = sub.add_parser("effect")
    e.add_argument("--family", choices=("sd3", "flux"), default="sd3")
    e.add_argument("--seeds", type=int, default=8)
    g = sub.add_parser("grid")
    g.add_argument("--family", choices=("sd3", "flux"), default="sd3")
    sub.add_parser("table")
    args = parser.parse_args()
    if args.cmd == "train":
        print(train(args.family, args.minutes, args.steps, resume=args.resume))
    elif args.cmd == "effect":
        effect(args.family, args.seeds)
    elif args.cmd == "grid":
        print(grid(args.family))
    else:
        print(write_table())


if __name__ == "__main__":
    main()
