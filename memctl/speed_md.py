"""The markdown of `memctl bench speed`: CPU ratio tables per model, compile sweeps, and the GPU section (absolute
seconds from `bench/gpu/speed.sh` when a device was lent, else rows that say no device was lent)."""

from __future__ import annotations

GPU_CONFIGS = ("plain", "knob 0, condition map", "knob -1, condition map",
               "knob +1, condition map, extra-pass guidance", "knob +1, condition map, in-attention guidance",
               "knob +1, condition map, cached guidance",
               "knob 0, residual map", "knob -1, residual map", "knob +1, residual map", "FreeU (UNet)", "PAG (UNet)",
               "baked (UNet)")  # fmt: skip


def _ratio(row: dict) -> str:
    r = row.get("ratio")
    return f"{r['median']:.3f} ({r['min']:.3f}–{r['max']:.3f})" if r else "–"


def model_md(name: str, m: dict) -> list[str]:
    """One model's section: its bars, its ratio table, and its compile sweep when it has one."""
    md = [f"\n## {name} ({m['params_m']} M parameters, random weights), inputs "
          + ", ".join(f"`{k}` {tuple(v)}" for k, v in m["inputs"].items()) + "\n\n"]  # fmt: skip
    md += [f"- {check}: {verdict}\n" for check, verdict in m["bar"].items()]
    md.append("\nconfiguration | per forward, ratio to plain: median (range) of the repeats | ratio of best times | "
              "s / forward (median)\n--- | --- | --- | ---\n")  # fmt: skip
    for cfg, row in m["rows"].items():
        s = row["seconds"]["median"] if row.get("seconds") else None
        md.append(f"{cfg} | {_ratio(row)} | {row.get('best_ratio', '–')} | {s if s is not None else '–'}\n")
    for cfg, why in m.get("not_measured", {}).items():
        md.append(f"{cfg} | not measured: {why} | – | –\n")
    c = m.get("compile")
    if c:
        md.append(f"\n`torch.compile(fullgraph=True)`, backend `{c['backend']}`"
                  f"{' (graph capture only, no code generation on this CPU)' if c['backend'] == 'eager' else ''}, "
                  f"knob{' in ' + c['fidelity_mode'] + ' mode' if c['fidelity_mode'] else ''}: fidelity sweep "
                  f"{c['fidelities']}; graphs compiled after each fidelity "
                  f"{c['graphs_compiled_after_each_fidelity']}, "
                  f"{c['graphs_while_timing']} more while timing (recompiles); the plain model compiled to "
                  f"{c['plain_graphs']} graph(s).\n\n")  # fmt: skip
        md.append("compiled configuration | ratio to compiled plain: median (range) | ratio of best times | "
                  "s / forward\n--- | --- | --- | ---\n")  # fmt: skip
        for cfg, row in c["rows"].items():
            md.append(f"{cfg} | {_ratio(row)} | {row.get('best_ratio', '–')} | {row['seconds']['median']}\n")
    return md


def _gpu_md(gpu: dict | None) -> list[str]:
    md = ["\n## On a GPU (absolute seconds, `bench/gpu/speed.sh`)\n\n"]
    if gpu is None:
        md.append(
            "Not measured: the one GPU lent so far (2026-11-30) spent its 15 minutes training digits-s2 and "
            "moving-digits (`bench/gpu/train_testbeds.sh`), and no device was lent in the sessions since, so these "
            "rows have no numbers; `bench/gpu/speed.sh` is ready for the next lent device (about 200 s).\n\n"
        )
        md.append("configuration | SD 1.5 UNet 512², s / image | SD 1.5 UNet 1024², s / image | Wan 1.3B, s / forward "
                  "| peak memory\n--- | --- | --- | --- | ---\n")  # fmt: skip
        md += [f"{c} | not measured | not measured | not measured | not measured\n" for c in GPU_CONFIGS]
        return md
    md.append(f"{gpu.get('device', '?')}, torch {gpu.get('torch', '?')}, diffusers {gpu.get('diffusers', '?')}; "
              f"{gpu.get('method', '')}{'' if gpu.get('complete') else ' Incomplete run: the time cap cut it short.'}"
              "\n")  # fmt: skip
    for key, part in gpu.get("runs", {}).items():
        md.append(f"\n### {key}: {part.get('what', '')}\n\n")
        if "plain" in part.get("rows", {}):
            from memctl.speed import _bar

            md += [f"- {check}: {verdict}\n" for check, verdict in _bar(part["rows"]).items()] + ["\n"]
        md.append(f"configuration | {part.get('unit', 's')} (median) | "
                  "ratio to plain: median (range) | ratio of best times | peak memory GiB\n"
                  "--- | --- | --- | --- | ---\n")  # fmt: skip
        for cfg, row in part.get("rows", {}).items():
            v = row.get("per_image_seconds", row["seconds"]["median"] if row.get("seconds") else None)
            md.append(
                f"{cfg} | {v if v is not None else '–'} | {_ratio(row)} | {row.get('best_ratio', '–')} | "
                f"{row.get('peak_memory_gib', '–')}\n"
            )
        if part.get("error"):
            md.append(f"\nNot completed: {part['error']}\n")
    return md


def render(report: dict, gpu: dict | None = None) -> str:
    md = [
        "# memctl bench speed\n\n",
        f"`{report['command']}`: {report['repeats']} interleaved repeats in one process after one warm-up each, "
        f"one CPU thread ({report['machine']['platform']}), {report['seconds']} s in all. Ratios are per forward "
        "of the denoiser, each repeat against the plain model in the same repeat. CPU inputs are small (see each "
        "model), so a hook's fixed cost weighs more than at real sizes; the GPU section has real sizes. The machine "
        "is shared (other processes ran on its 2 cores): the ratio of best times (each configuration's fastest "
        "repeat over plain's fastest) is the estimate least hit by that noise, and the bars use it.\n",
    ]
    for name, m in report["models"].items():
        md += model_md(name, m)
    md += _gpu_md(gpu)
    return "".join(md)


def main(out: str = "bench/results") -> None:
    """Rebuild `speed.md` from `speed.json` and, when present, `speed-gpu.json` (the device run's output)."""
    import json
    from pathlib import Path

    folder = Path(out)
    gpu = folder / "speed-gpu.json"
    report = json.loads((folder / "speed.json").read_text())
    (folder / "speed.md").write_text(render(report, json.loads(gpu.read_text()) if gpu.exists() else None))


if __name__ == "__main__":  # python -m memctl.speed_md [FOLDER]
    import sys

    main(*sys.argv[1:2])
