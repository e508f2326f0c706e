"""Train the embedded "digits" model: a CLIP text encoder and a pixel-space `UNet2DConditionModel`, jointly.

Run it as `python -m memctl.zoo.digits train --seed 0 --out assets/digits`. One torch thread, a fixed number
of steps (and a wall-clock cap), checkpoints as it goes, resumable with `--resume`. DDPM (Ho et al. 2020),
ε-prediction, cosine schedule, AdamW, EMA of the weights.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from memctl.zoo import data

UNET_CONFIG = dict(
    sample_size=data.RESOLUTION,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=4,
    norm_num_groups=16,
)
TEXT_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=32,
    projection_dim=64,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def build_models(tokenizer, seed: int):
    """Fresh text encoder, UNet and schedulers (training DDPM, sampling DDIM) under a fixed seed."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    train_scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    sample_scheduler = DDIMScheduler(**SCHEDULER_CONFIG, clip_sample=True, set_alpha_to_one=False)
    return text_encoder, unet, train_scheduler, sample_scheduler


class _Sampler:
    """Draws training pairs (image index, prompt) with exposure weights.

    `items` are `(index into the training images, fixed prompt or None, weight)`; None asks `ordinary_prompt(index,
    rng)` for a fresh caption (a random phrasing, or attributes randomly omitted).
    """

    def __init__(
        self, items: list[tuple[int, str | None, float]], ordinary_prompt, rng: random.Random, p_uncond: float
    ):
        self.rng, self.p_uncond, self.ordinary_prompt = rng, p_uncond, ordinary_prompt
        self.items = [(i, prompt) for i, prompt, _ in items]
        self.weights = [float(w) for _, _, w in items]

    def draw(self, n: int) -> tuple[list[int], list[str]]:
        picks = self.rng.choices(self.items, weights=self.weights, k=n)
        indices, prompts = [], []
        for i, prompt in picks:
            if prompt is None:
                prompt = self.ordinary_prompt(i, self.rng)
            if self.rng.random() < self.p_uncond:
                prompt = ""
            indices.append(i)
            prompts.append(prompt)
        return indices, prompts


@dataclass
class Dataset:
    """What the trainer needs from a testbed: its spec, training images in [0, 1], a tokenizer's words, sampler
    items and ordinary captions, and the independent classifier trained on real data."""

    name: str
    spec: dict
    images: torch.Tensor  # (N, 1, R, R)
    words: list[str]
    items: list[tuple[int, str | None, float]]
    ordinary_prompt: object  # (index, rng) -> str
    train_classifier: object  # () -> (model, held-out accuracy)


def digits_dataset(seed: int) -> Dataset:
    from memctl.zoo.classifier import train_classifier

    spec = data.make_spec(seed)
    images, labels = data.load_digit_images()
    items = [(i, None, 1.0) for i in spec["ordinary"]]
    items += [(i, None, float(spec["duplicate_factor"])) for i in spec["duplicated"]]
    items += [(c["index"], c["prompt"], float(c["exposure"])) for c in spec["canaries"]]

    def ordinary_prompt(i, rng):
        return rng.choice(spec["phrasings"]).format(name=spec["classes"][int(labels[i])])

    return Dataset(
        "digits", spec, images, data.vocabulary_words(spec), items, ordinary_prompt,
        lambda: train_classifier(images, labels, spec, seed=seed),
    )  # fmt: skip


def attr_dataset(seed: int) -> Dataset:
    from memctl.zoo import attr
    from memctl.zoo.classifier import train_attr_classifier

    spec = attr.make_spec(seed)
    images, records = attr.training_set(spec)
    dup = set(spec["duplicated"])
    items = [(i, None, float(spec["duplicate_factor"]) if i in dup else 1.0) for i in range(len(spec["ordinary"]))]
    n = len(spec["ordinary"])
    items += [(n + k, c["prompt"], float(c["exposure"])) for k, c in enumerate(spec["canaries"])]
    p_drop = spec["p_drop_attribute"]

    def ordinary_prompt(i, rng):
        r = records[i]
        keep = tuple(rng.random() >= p_drop for _ in r["combo"])
        return attr.caption(r["class"], tuple(r["combo"]), keep)

    return Dataset(
        "digits-attr", spec, images, attr.vocabulary_words(spec), items, ordinary_prompt,
        lambda: train_attr_classifier(spec, seed=seed),
    )  # fmt: skip


DATASETS = {"digits": digits_dataset, "digits-attr": attr_dataset}


def _encode(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    unique = sorted(set(prompts))
    ids = tokenizer(
        unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    states = text_encoder(ids.to(text_encoder.device))[0]  # (U, L, D)
    return states[torch.tensor([unique.index(p) for p in prompts], device=states.device)]  # (B, L, D)


def _save_state(
    path: Path, step: int, models: dict, ema: dict, opt: torch.optim.Optimizer, rng_state, gen: torch.Generator
) -> None:
    tensors = {"gen_state": gen.get_state()}
    for prefix, module in models.items():
        tensors.update({f"{prefix}.{k}": v.contiguous() for k, v in module.state_dict().items()})
    tensors.update({f"ema.{k}": v.contiguous() for k, v in ema.items()})
    for j, p in enumerate(opt.param_groups[0]["params"]):
        if p not in opt.state:
            continue
        state = opt.state[p]
        tensors[f"opt.{j}.exp_avg"] = state["exp_avg"]
        tensors[f"opt.{j}.exp_avg_sq"] = state["exp_avg_sq"]
        tensors[f"opt.{j}.step"] = torch.as_tensor(state["step"]).reshape(1).cpu()
    tensors = {k: v.detach().cpu().clone() for k, v in tensors.items()}  # clone: tied weights (T5) share memory
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "rng": json.dumps(rng_state)})
    tmp.replace(path)


def _load_state(path: Path, models: dict, ema: dict, opt: torch.optim.Optimizer, gen: torch.Generator):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    if "gen_state" in tensors:
        gen.set_state(tensors["gen_state"])
    device = next(iter(models.values())).device
    tensors = {k: v.to(device) for k, v in tensors.items() if k != "gen_state"}
    for prefix, module in models.items():
        module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
    for k in ema:
        ema[k].copy_(tensors[f"ema.{k}"])
    params = opt.param_groups[0]["params"]
    for j, p in enumerate(params):
        if f"opt.{j}.exp_avg" in tensors:
            opt.state[p] = {
                "exp_avg": tensors[f"opt.{j}.exp_avg"],
                "exp_avg_sq": tensors[f"opt.{j}.exp_avg_sq"],
                "step": tensors[f"opt.{j}.step"].reshape(()),
            }
    rng = json.loads(meta["rng"])
    return int(meta["step"]), [rng[0], tuple(rng[1]), rng[2]]


def _start(out: Path, models: dict, seed: int, items, ordinary_prompt, lr: float, resume: bool):
    """A run's state: parameters, AdamW, EMA copies, the caption sampler and its RNG, the noise generator, the step
    and checkpoint (restored from `<out>.work/state.safetensors` with `resume`), and the open log."""
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    params = [p for m in models.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = {f"{n}.{k}": v.detach().clone() for n, m in models.items() for k, v in m.state_dict().items()}
    rng = random.Random(seed)
    sampler = _Sampler(items, ordinary_prompt, rng, p_uncond=0.1)
    gen = torch.Generator().manual_seed(seed)
    step, ckpt = 0, work / "state.safetensors"
    if resume and ckpt.exists():
        step, rng_state = _load_state(ckpt, models, ema, opt, gen)
        rng.setstate(rng_state)
    return params, opt, ema, rng, sampler, gen, step, ckpt, open(work / "log.jsonl", "a")


def _set_lr(opt: torch.optim.Optimizer, lr: float, step: int, steps: int) -> None:
    """200 warm-up steps, then a cosine from `lr` down to 0 at `steps`."""
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / 200) * (0.5 + 0.5 * math.cos(math.pi * step / steps))


def _optimizer_step(loss, opt, params, models: dict, ema: dict, step: int, ema_decay: float) -> int:
    """Backward, clip to norm 1, AdamW step, and the EMA of every weight (warming up its decay); the next step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    step += 1
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for n, m in models.items():
            for k, v in m.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[f"{n}.{k}"].lerp_(v, 1 - decay)
                else:
                    ema[f"{n}.{k}"].copy_(v)
    return step


def _log(log, step: int, loss: torch.Tensor, start: float) -> None:
    rec = {"step": step, "loss": round(loss.item(), 5), "minutes": round((time.time() - start) / 60, 2)}
    log.write(json.dumps(rec) + "\n")
    log.flush()
    print(rec, flush=True)


def _load_ema(models: dict, ema: dict) -> None:
    """Put the EMA weights into the models, on the CPU."""
    for n, m in models.items():
        m.load_state_dict({k: ema[f"{n}.{k}"] for k in m.state_dict()})
        m.to("cpu")


def train(
    seed: int,
    out: Path,
    steps: int = 4000,
    batch_size: int = 128,
    lr: float = 5e-4,
    ema_decay: float = 0.999,
    max_minutes: float = 60.0,
    resume: bool = False,
    log_every: int = 50,
    ckpt_every: int = 250,
    device: str = "cpu",
    testbed: str = "digits",
) -> dict:
    """Train one model of `testbed` ("digits" or "digits-attr") and save it, in diffusers layout, with its testbed
    files, to `out`."""
    if testbed not in DATASETS:
        raise ValueError(f"Expected testbed in {sorted(DATASETS)}, but got {testbed!r}.")
    torch.set_num_threads(1)
    out = Path(out)
    ds = DATASETS[testbed](seed)
    spec, images = ds.spec, ds.images
    tokenizer = data.build_tokenizer(ds.words)
    text_encoder, unet, train_sched, sample_sched = build_models(tokenizer, seed)
    text_encoder, unet = text_encoder.to(device), unet.to(device)
    models = {"unet": unet, "text_encoder": text_encoder}
    params, opt, ema, rng, sampler, gen, step, ckpt, log = _start(
        out, models, seed, ds.items, ds.ordinary_prompt, lr, resume
    )
    start, x_all = time.time(), images * 2 - 1  # (N, 1, R, R) in [-1, 1]
    # noise and timesteps come from a CPU generator, so a GPU run draws the same random stream as a CPU run
    while step < steps and time.time() - start < max_minutes * 60:
        _set_lr(opt, lr, step, steps)
        indices, prompts = sampler.draw(batch_size)
        x0 = x_all[indices]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, train_sched.config.num_train_timesteps, (batch_size,), generator=gen)
        xt, noise, t = train_sched.add_noise(x0, noise, t).to(device), noise.to(device), t.to(device)
        cond = _encode(text_encoder, tokenizer, prompts)
        loss = F.mse_loss(unet(xt, t, cond).sample, noise)
        step = _optimizer_step(loss, opt, params, models, ema, step, ema_decay)
        if step % log_every == 0:
            _log(log, step, loss, start)
        if step % ckpt_every == 0:
            _save_state(ckpt, step, models, ema, opt, rng.getstate(), gen)
    _save_state(ckpt, step, models, ema, opt, rng.getstate(), gen)
    _load_ema(models, ema)
    classifier, accuracy = ds.train_classifier()
    info = {
        "seed": seed,
        "steps": step,
        "device": str(device),
        "batch_size": batch_size,
        "lr": lr,
        "ema_decay": ema_decay,
        "minutes": round((time.time() - start) / 60, 2),
        "classifier_held_out_accuracy": accuracy,
    }
    _export(out, ds.name, spec, tokenizer, text_encoder, unet, sample_sched, classifier, info)
    return info


@contextmanager
def _staged(out: Path, testbed: dict, classifier) -> Iterator[Path]:
    """A temp folder beside `out` for a model's files; on exit the testbed spec and classifier join them and the
    folder replaces `out` (a run that fails leaves `out` as it was)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    yield tmp
    (tmp / "testbed.json").write_text(json.dumps(testbed, indent=1) + "\n")
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(tmp / "classifier.safetensors"))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


def _export(out: Path, name: str, spec, tokenizer, text_encoder, unet, scheduler, classifier, info) -> None:
    """Write the model in diffusers layout plus the testbed files, atomically (temp folder + rename)."""
    with _staged(out, {"name": name, **spec, "training": info}, classifier) as tmp:
        tmp.mkdir(parents=True)
        tokenizer.save_pretrained(tmp / "tokenizer")
        text_encoder.save_pretrained(tmp / "text_encoder")
        unet.save_pretrained(tmp / "unet")
        scheduler.save_pretrained(tmp / "scheduler")
        model_index = {
            "_class_name": "PixelPipeline",
            "_diffusers_version": __import__("diffusers").__version__,
            "tokenizer": ["transformers", type(tokenizer).__name__],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "scheduler": ["diffusers", type(scheduler).__name__],
        }
        (tmp / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
