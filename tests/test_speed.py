"""memctl.speed and bench/gpu/speed.py on tiny models: rows, ratios, graph counts, tables, the GPU script on CPU."""

import importlib.util
import json
from pathlib import Path

import torch

from memctl import speed
from memctl.bench import SUITES
from memctl.speed_md import render

ROOT = Path(__file__).resolve().parents[1]


def _unet():
    torch.set_num_threads(1)
    unet = speed.build_unet(tiny=True)
    return unet, speed.unet_inputs(unet, 8), speed.condition_map(unet), speed.residual_map(unet)


def test_interleaved_rows_have_ratios_to_plain():
    unet, inputs, cmap, rmap = _unet()
    cases = speed.unet_cases(unet, inputs, cmap, rmap, speed.baked_unet(unet, cmap))
    rows = speed.time_cases(cases, repeats=2)
    assert rows["plain"]["ratio"] == {"median": 1.0, "min": 1.0, "max": 1.0}
    assert {"FreeU (SD 1.5 setting)", "knob +1, condition map, in-attention guidance",
            "baked (condition map at -1, no hooks)"} <= set(rows)  # fmt: skip
    assert all(r["repeats"] == 2 and r["ratio"]["min"] > 0 for r in rows.values())
    assert not any(n for n, _ in __import__("memctl").list_hooks(unet))  # every setup took its hooks off

    def passes(name: str) -> int:  # whole denoiser passes a case's run makes (each goes through conv_in once)
        (setup, run) = next(c[1:3] for c in cases if c[0] == name)
        calls = []
        handle = unet.conv_in.register_forward_hook(lambda *_: calls.append(1))
        try:
            with setup():
                run()
        finally:
            handle.remove()
        return len(calls)

    # the extra pass costs a second forward; in-attention guidance does not (counted, not timed: wall-clock ratios
    # belong to `memctl bench speed`, and on a shared 2-core machine this one read 1.41 once)
    plain = passes("plain")
    assert passes("knob +1, condition map, extra-pass guidance") == 2 * plain
    assert passes("knob +1, condition map, in-attention guidance") == plain


def test_wan_rows_include_the_baked_condition_map():
    torch.set_num_threads(1)
    wan = speed.build_wan(tiny=True)
    inputs = speed.wan_inputs(wan, frames=1, height=8, width=8, text=32)
    rmap, cmap = speed.residual_map(wan), speed.condition_map(wan, tokens=32)
    baked = speed.baked_unet(wan, cmap)
    edited = [k for k, v in baked.state_dict().items() if not torch.equal(v, wan.state_dict()[k])]
    assert edited and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in edited)
    rows = speed.time_cases(speed.wan_cases(wan, inputs, rmap, cmap, baked), repeats=1)
    assert "baked (condition map at -1, no hooks)" in rows and "baked" not in speed.WAN_NOT_MEASURED


def test_maps_have_realistic_shape():
    unet, _, cmap, rmap = _unet()
    assert cmap.lever == "condition" and cmap.lever_tensors["bank"].shape == (60, 77, 32)
    assert cmap.levels.tolist() == list(torch.tensor(speed.NOISE_LEVELS).tolist())
    assert (cmap.scores > 0).any() and (cmap.scores < 0).any() and rmap.n_blocks > cmap.n_blocks


def test_compile_sweep_counts_graphs():
    unet, inputs, cmap, _ = _unet()
    out = speed.compile_sweep(unet, cmap, inputs, (0.0, -1.0, 0.5, 1.0, 0.0), mode="attention", repeats=1)
    assert out["plain_graphs"] == 1
    assert out["graphs_compiled_after_each_fidelity"] == [1, 1, 2, 2, 2]  # one more graph when fidelity turns > 0
    assert out["graphs_while_timing"] == 0
    assert set(out["rows"]) == {"compiled plain", "compiled knob +0", "compiled knob -1", "compiled knob +0.5",
                                "compiled knob +1"}  # fmt: skip


def test_gpu_script_runs_on_cpu_and_its_json_renders(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_speed", ROOT / "bench" / "gpu" / "speed.py")
    gpu_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_speed)
    out = tmp_path / "speed-gpu.json"
    gpu_speed.main(["--device", "cpu", "--tiny", "--out", str(out), "--repeats", "1", "--budget", "120"])
    gpu = json.loads(out.read_text())
    assert gpu["complete"] and set(gpu["runs"]) == {"sd15-unet 512x512", "sd15-unet 1024x1024",
                                                    "wan-1.3b 2x8x8 latent", "sd15-unet baked"}  # fmt: skip
    assert gpu["runs"]["sd15-unet baked"]["rows"]["baked (condition map at -1, no hooks) 1024x1024"]["ratio"]
    assert gpu["runs"]["sd15-unet 512x512"]["rows"]["plain"]["per_image_seconds"] > 0
    report = {"command": "memctl bench speed", "repeats": 1, "machine": {"platform": "test"}, "seconds": 0,
              "models": {}}  # fmt: skip
    assert "Not measured: the one GPU" in render(report) and "Not measured: the one GPU" not in render(report, gpu)
    assert "sd15-unet 1024x1024" in render(report, gpu)


def test_the_gpu_script_stops_at_its_time_cap(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_speed", ROOT / "bench" / "gpu" / "speed.py")
    gpu_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_speed)
    out = tmp_path / "speed-gpu.json"
    gpu_speed.main(["--device", "cpu", "--tiny", "--out", str(out), "--budget", "1"])
    gpu = json.loads(out.read_text())
    assert not gpu["complete"] and any("time cap" in r.get("error", "") for r in gpu["runs"].values())


def test_speed_is_a_bench_suite():
    assert "speed" in SUITES


def test_docstring_examples():
    import doctest

    import memctl.speed_setup

    for module in (speed, memctl.speed_setup):
        result = doctest.testmod(module)
        assert result.failed == 0
        assert result.attempted > 0
