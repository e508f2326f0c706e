"""Train the embedded "moving-digits" video model: a UMT5 text encoder and a `WanTransformer3DModel`, jointly.

Run it as `python -m memctl.zoo.video train --seed 0` (`--device cuda` on a GPU: same script, same random stream).
The clips run in pixel space through diffusers' own `WanPipeline`, with `memctl.zoo.framepack.FramePackVAE` (exact,
weight-free) in the VAE's place. Rectified flow as Wan is trained (`x_σ = (1 - σ) x_0 + σ ε`, the model predicts
`ε - x_0`, timestep `1000 σ`), σ drawn with the sampling scheduler's shift; prompts are encoded exactly as
`WanPipeline.encode_prompt` does (trimmed to their length, zero-padded to `max_sequence_length`). One torch thread,
a fixed number of steps and a wall-clock cap, AdamW, EMA, checkpoints as it goes, resumable with `--resume`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from memctl.zoo import moving
from memctl.zoo.train_digits import _load_ema, _log, _optimizer_step, _save_state, _set_lr, _staged, _start

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=2,
    out_channels=2,
    text_dim=64,
    freq_dim=64,
    ffn_dim=256,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=32,
)
TEXT_CONFIG = dict(
    d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=16, dropout_rate=0.0
)
FLOW_SHIFT = 3.0
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default: the model is trained on what a plain call feeds it
TRAIN_SEQUENCE_LENGTH = 16  # ... computed on 16 tokens, the zero padding's count carried by `PaddedCrossAttention`
SAMPLING = {"num_frames": moving.FRAMES, "height": moving.RESOLUTION, "width": moving.RESOLUTION}


def build_tokenizer(words: list[str]):
    """A T5 (Unigram) tokenizer built in memory: each of `words` one piece, any other text letter by letter."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 ,.'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(c, -8.0) for c in chars] + [("▁" + c, -7.5) for c in chars]
    vocab += [("▁" + w, -1.0) for w in words if len(w) > 1]
    return T5Tokenizer(vocab=list(dict(vocab).items()), extra_ids=0)


def build_models(tokenizer, seed: int, width: int = 64, layers: int = 4):
    """Fresh text encoder, transformer (`width` = 4 heads × width/4, `layers` blocks, FFN 4 × width) and the
    (weight-free) VAE and sampling scheduler, under a fixed seed."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from memctl.zoo.framepack import FramePackVAE

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, **TEXT_CONFIG)
    text_encoder = UMT5EncoderModel(config)
    shape = dict(attention_head_dim=width // 4, ffn_dim=4 * width, num_layers=layers)
    transformer = WanTransformer3DModel(**{**TRANSFORMER_CONFIG, **shape})
    scheduler = FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    return text_encoder, transformer, FramePackVAE(channels=1), scheduler


def encode(
    text_encoder, tokenizer, prompts: list[str], max_length: int = MAX_SEQUENCE_LENGTH, with_mask: bool = False
):
    """`(B, max_length, D)` as `WanPipeline._get_t5_prompt_embeds` makes it (each unique prompt encoded once);
    with `with_mask`, also the `(B, max_length)` attention mask."""
    unique = sorted(set(prompts))
    enc = tokenizer(
        unique, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
        return_attention_mask=True, return_tensors="pt",
    )  # fmt: skip
    ids, mask = enc.input_ids.to(text_encoder.device), enc.attention_mask.to(text_encoder.device)
    states = text_encoder(ids, mask).last_hidden_state * mask[..., None]  # trimmed to each length, zero-padded
    rows = torch.tensor([unique.index(p) for p in prompts], device=states.device)
    return (states[rows], mask[rows]) if with_mask else states[rows]


class PaddedCrossAttention:
    """Train on short text sequences as if each were zero-padded to `full` tokens, exactly and cheaply.

    `WanPipeline` pads every prompt's states with zeros to `max_sequence_length` (512). In each cross-attention all
    zero tokens get the same key and value, so `n` of them weigh as one of them with `log n` added to its logit.
    Inside this context the cross-attentions (`attn2`) of `transformer` see the sequence encoded at `len(mask)`
    tokens, with `log((full - real) / (short - real))` added to the logits of its zero tokens: the same attention
    as over the full padding, at a 32nd of the cost. `set(mask)` gives each batch's `(B, short)` attention mask.
    """

    def __init__(self, transformer, full: int = MAX_SEQUENCE_LENGTH):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.transformer, self.full, self.bias = transformer, int(full), None
        outer = self

        class _Processor(WanAttnProcessor):
            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
                bias = None if outer.bias is None else outer.bias.to(hidden_states.dtype)
                return super().__call__(attn, hidden_states, encoder_hidden_states, bias, rotary_emb)

        self._processor = _Processor()

    def set(self, mask: torch.Tensor) -> None:
        real = mask.sum(1, keepdim=True).float()  # (B, 1)
        short = mask.shape[1]
        if bool((real >= short).any()):
            raise ValueError(
                f"Expected prompts shorter than {short} tokens (one zero token at least), but got {real.max():.0f}."
            )
        extra = torch.log((self.full - real) / (short - real))  # (B, 1)
        self.bias = torch.where(mask.bool(), 0.0, extra)[:, None, None, :]  # (B, 1, 1, short): all heads and queries

    def __enter__(self):
        self._saved = [(b.attn2, b.attn2.processor) for b in self.transformer.blocks]
        for attn, _ in self._saved:
            attn.set_processor(self._processor)
        return self

    def __exit__(self, *exc):
        for attn, processor in self._saved:
            attn.set_processor(processor)
        self.bias = None


def sigmas(n: int, gen: torch.Generator, shift: float = FLOW_SHIFT) -> torch.Tensor:
    """Noise levels σ ∈ (0, 1) drawn uniformly, then shifted by `shift` (1: uniform; the sampling scheduler shifts
    its grid by `FLOW_SHIFT`)."""
    u = torch.rand(n, generator=gen).clamp(1e-3, 1 - 1e-3)
    return shift * u / (1 + (shift - 1) * u)


def dataset(seed: int):
    """(spec, clips (N, F, 1, H, W) in [0, 1], sampler items, ordinary caption function)."""
    spec = moving.make_spec(seed)
    clips = moving.training_set(spec)
    dup = set(spec["duplicated"])
    n = len(spec["ordinary"])
    items = [(i, None, float(spec["duplicate_factor"]) if i in dup else 1.0) for i in range(n)]
    items += [(n + k, c["prompt"], float(c["exposure"])) for k, c in enumerate(spec["canaries"])]
    p_drop = spec["p_drop_attribute"]

    def ordinary_prompt(i, rng):
        r = spec["ordinary"][i]
        keep = tuple(rng.random() >= p_drop for _ in r["combo"])
        return moving.caption(r["class"], tuple(r["combo"]), keep)

    return spec, clips, items, ordinary_prompt


def train(
    seed: int,
    out: Path,
    steps: int = 6000,
    batch_size: int = 64,
    lr: float = 5e-4,
    ema_decay: float = 0.999,
    max_minutes: float = 60.0,
    resume: bool = False,
    log_every: int = 50,
    ckpt_every: int = 250,
    device: str = "cpu",
    width: int = 64,
    layers: int = 4,
    sigma_shift: float = FLOW_SHIFT,
    init_from: Path | None = None,
) -> dict:
    """Train one moving-digits model and save it, in diffusers layout (`WanPipeline`), with its testbed files.

    `init_from`: a moving-digits folder of the same seed and shape whose (EMA) weights start this run, a second
    phase with a fresh optimizer and schedule; its training record is kept under `"phases"`."""
    torch.set_num_threads(1)
    out = Path(out)
    spec, clips, items, ordinary_prompt = dataset(seed)
    tokenizer = build_tokenizer(moving.vocabulary_words(spec))
    text_encoder, transformer, vae, scheduler = build_models(tokenizer, seed, width, layers)
    phases = []
    if init_from is not None:
        phases = _init_from(Path(init_from), seed, transformer, text_encoder)
    text_encoder, transformer = text_encoder.to(device), transformer.to(device)
    models = {"transformer": transformer, "text_encoder": text_encoder}
    params, opt, ema, rng, sampler, gen, step, ckpt, log = _start(
        out, models, seed, items, ordinary_prompt, lr, resume
    )
    with torch.no_grad():
        z_all = vae.encode((clips * 2 - 1).transpose(1, 2)).latents  # (N, 2, 5, H, W)
    start, padded = time.time(), PaddedCrossAttention(transformer)
    # noise and noise levels come from a CPU generator, so a GPU run draws the same random stream as a CPU run
    while step < steps and time.time() - start < max_minutes * 60:
        _set_lr(opt, lr, step, steps)
        indices, prompts = sampler.draw(batch_size)
        x0 = z_all[indices]
        noise = torch.randn(x0.shape, generator=gen)
        s = sigmas(batch_size, gen, sigma_shift)
        xt = ((1 - s[:, None, None, None, None]) * x0 + s[:, None, None, None, None] * noise).to(device)
        target = (noise - x0).to(device)
        cond, mask = encode(text_encoder, tokenizer, prompts, TRAIN_SEQUENCE_LENGTH, with_mask=True)
        padded.set(mask)
        with padded:
            pred = transformer(hidden_states=xt, timestep=(s * 1000).to(device), encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, target)
        step = _optimizer_step(loss, opt, params, models, ema, step, ema_decay)
        if step % log_every == 0:
            _log(log, step, loss, start)
        if step % ckpt_every == 0:
            _save_state(ckpt, step, models, ema, opt, rng.getstate(), gen)
    _save_state(ckpt, step, models, ema, opt, rng.getstate(), gen)
    _load_ema(models, ema)
    from memctl.zoo.video_classifier import train_frame_classifier

    classifier, accuracy = train_frame_classifier(spec, seed=seed)
    info = {
        "seed": seed,
        "steps": step,
        "device": str(device),
        "batch_size": batch_size,
        "lr": lr,
        "ema_decay": ema_decay,
        "width": width,
        "layers": layers,
        "sigma_shift": sigma_shift,
        "minutes": round((time.time() - start) / 60, 2),
        "classifier_held_out_accuracy": accuracy,
        **({"init_from": str(init_from), "phases": phases} if init_from is not None else {}),
    }
    _export(out, spec, tokenizer, text_encoder, transformer, vae, scheduler, classifier, info)
    return info


def _init_from(path: Path, seed: int, transformer, text_encoder) -> list[dict]:
    """Load the weights of an earlier phase (same seed, same shapes); return its training records."""
    from safetensors.torch import load_file

    spec = json.loads((path / "testbed.json").read_text())
    if spec.get("name") != "moving-digits" or spec.get("seed") != seed:
        raise ValueError(f"Expected a moving-digits folder of seed {seed} to start from, but {path} is not one.")
    for module, folder in ((transformer, "transformer"), (text_encoder, "text_encoder")):
        state = {}
        for f in sorted((path / folder).glob("*.safetensors")):
            state.update(load_file(str(f)))
        missing, unexpected = module.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "embed_tokens" not in k]:  # T5 ties embed_tokens to shared
            raise ValueError(f"Expected {path / folder} to match this model's shape, but {missing} / {unexpected}.")
    previous = spec["training"]
    return [*previous.pop("phases", []), {k: v for k, v in previous.items() if k != "init_from"}]


def _export(out: Path, spec, tokenizer, text_encoder, transformer, vae, scheduler, classifier, info) -> None:
    """Write the model as a `WanPipeline` folder plus the testbed files, atomically (temp folder + rename)."""
    from diffusers import WanPipeline

    sampling = {**SAMPLING, "num_inference_steps": 20, "guidance_scale": 5.0}
    with _staged(out, {"name": "moving-digits", **spec, "sampling": sampling, "training": info}, classifier) as tmp:
        pipe = WanPipeline(
            tokenizer=tokenizer, text_encoder=text_encoder.eval(), transformer=transformer.eval(), vae=vae.eval(),
            scheduler=scheduler,
        )  # fmt: skip
        pipe.save_pretrained(tmp)
