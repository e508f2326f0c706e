"""How long does `memctl --help` (and each subcommand's `--help`) take? The CLI must answer help in under 1 s.

`python bench/cli_help.py` → bench/results/cli_help.json: wall time of a fresh `memctl [COMMAND] --help` process
(the installed console script, as a user runs it), median of 5 runs each, and the load of the machine meanwhile.
"""

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNS = 5
COMMANDS = ("", "demo", "bench", "blocks", "render", "ui", "probe", "detect")
BAR_S = 1.0


def wall_time(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    exe = shutil.which("memctl", path=str(Path(sys.executable).parent)) or shutil.which("memctl")
    if exe is None:
        raise SystemExit("Expected the `memctl` console script beside this Python or on PATH, but found none.")
    wall_time([exe, "--help"])  # warm the file cache once, not counted
    results = {}
    for command in COMMANDS:
        argv = [exe, *([command] if command else []), "--help"]
        times = [wall_time(argv) for _ in range(RUNS)]
        results[" ".join(argv[1:])] = {"median_s": round(statistics.median(times), 3),
                                       "runs_s": [round(t, 3) for t in times]}  # fmt: skip
        print(f"memctl {' '.join(argv[1:]):<16} median {statistics.median(times):.3f} s", flush=True)
    worst = max(r["median_s"] for r in results.values())
    out = {
        "command": "python bench/cli_help.py",
        "bar": f"every median < {BAR_S} s",
        "pass": worst < BAR_S,
        "worst_median_s": worst,
        "results": results,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
        },  # fmt: skip
    }
    path = Path(__file__).resolve().parent / "results" / "cli_help.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"worst median {worst:.3f} s ({'pass' if out['pass'] else 'FAIL'}); wrote {path}")


if __name__ == "__main__":
    main()
