"""Which effect-bench verdicts survive a change of noise draws: every record's bar checks and headline measures with
the noise shared by all prompts (the records at git revision REV) beside the same bench with every prompt its own
noises (the records in `bench/results/effect/` now, `memctl bench effect --noise per-prompt`).

    python bench/effect_noise_compare.py REV   # -> bench/results/effect_noise_compare.{json,md}; no sampling

A check that flips between the two rests on the draws, not on the lever; one that holds in both is the finding.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from memctl.effect_video import clip_readout

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
MEASURES = ("most_copy", "novel_valid", "compositional", "ordinary_valid")
VIDEO = ("nearest_bound", "canary_motion_valid")  # memctl.effect_video.clip_readout


def _old(rev: str, name: str) -> dict:
    path = f"bench/results/effect/{name}.json"
    text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
    if text.returncode != 0:
        raise SystemExit(f"Expected {path} at revision {rev}, but git said: {text.stderr.strip()}")
    return json.loads(text.stdout)


def _noise(record: dict) -> str:
    return record["eval"].get("noise", "shared")


def _checks(record: dict) -> dict[str, bool]:
    """Every bar check of a record, keyed "group: check" (the main bars under "bars")."""
    out = {f"bars: {k}": v for k, v in record["bars"]["checks"].items()}
    for group, checks in record["bars"].items():
        if group.endswith("_checks") and isinstance(checks, dict):
            out.update({f"{group.removesuffix('_checks')}: {k}": v for k, v in checks.items()})
    return out


def compare(rev: str, models: list[str]) -> dict:
    result = {"command": f"python bench/effect_noise_compare.py {rev}", "shared_records_at": rev, "models": {}}
    for name in models:
        old, new = _old(rev, name), json.loads((OUT / "effect" / f"{name}.json").read_text())
        if (_noise(old), _noise(new)) != ("shared", "per-prompt"):
            raise SystemExit(f"Expected {name}'s record shared at {rev} and per-prompt now, but got "
                             f"{_noise(old)} and {_noise(new)}.")  # fmt: skip
        a, b = _checks(old), _checks(new)
        rows = {}
        for family, by in new["bars"]["headline"].items():
            for setting, h in by.items():
                before = old["bars"]["headline"].get(family, {}).get(setting)
                if before is not None:
                    cells = {m: [before.get(m), h.get(m)] for m in MEASURES}
                    if "frame_valid" in new["rows"][family][setting]["canary"]["all"]:  # clips: nearest bound, motion
                        a_clip, b_clip = (clip_readout(r["rows"][family][setting]) for r in (old, new))
                        cells.update({k: [a_clip[k], b_clip[k]] for k in VIDEO})
                    rows[f"{family} {setting}"] = cells
        setups = []  # rows whose setup changed too, not only the noise (the window rule's copy test)
        for family, by in new["rows"].items():
            for setting, row in by.items():
                was = old["rows"].get(family, {}).get(setting, {}).get("calibration", {}).get("copy_test", "strict")
                if "calibration" in row and row["calibration"].get("copy_test", "strict") != was:
                    setups.append(f"{family} {setting}: copy test {was} → {row['calibration']['copy_test']}")
        result["models"][name] = {
            "setup_changed": setups,
            "checks": {k: [a.get(k), b[k]] for k in b},
            "flipped": sorted(k for k in b if k in a and a[k] != b[k]),
            "rows": rows,
        }
    return result


def markdown(result: dict) -> str:
    md = [f"# Effect bench: shared noise (records at {result['shared_records_at']}) against per-prompt noise\n\n",
          f"`{result['command']}`. Cells: shared → per-prompt.\n"]  # fmt: skip
    for name, r in result["models"].items():
        md.append(f"\n## {name}: {len(r['flipped'])} of {len(r['checks'])} checks flip\n\n")
        md += [f"Setup changed as well as the noise: {c}.\n\n" for c in r["setup_changed"]]
        md.append("check | shared | per-prompt\n--- | --- | ---\n")
        for k, (x, y) in r["checks"].items():
            word = {True: "PASS", False: "FAIL", None: "–"}
            md.append(f"{k} | {word[x]} | {word[y]}{' (flipped)' if x is not None and x != y else ''}\n")
        columns = list(next(iter(r["rows"].values()), {}))
        md.append("\nrow | " + " | ".join(columns) + "\n---" + " | ---" * len(columns) + "\n")
        for row, cells in r["rows"].items():
            md.append(row + " | " + " | ".join(
                f"{x:.0%} → {y:.0%}" if x is not None and y is not None else "–" for x, y in cells.values()
            ) + "\n")  # fmt: skip
    return "".join(md)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: python bench/effect_noise_compare.py REV [MODEL...], but got {sys.argv[1:]}")
    names = sys.argv[2:] or sorted(p.stem for p in (OUT / "effect").glob("*.json") if ".partial" not in p.name)
    res = compare(sys.argv[1], names)
    if sys.argv[2:]:
        res["command"] += " " + " ".join(sys.argv[2:])
    (OUT / "effect_noise_compare.json").write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    (OUT / "effect_noise_compare.md").write_text(markdown(res))
    print(markdown(res))
