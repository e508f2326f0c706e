#!/usr/bin/env bash
# Device run: absolute seconds per image / forward and peak memory of the knob (bench/gpu/speed.py), <= 150 s in all.
# Usage (on the device machine, repo root, wheels in .whl/): bash bench/gpu/speed.sh   -> "$OUT/speed-gpu.json"
# Checked on CPU with: python bench/gpu/speed.py --device cpu --tiny --out /tmp/speed-gpu.json
set -u
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
left=$((150 - ($(date +%s) - start) - 8))  # seconds left of the 150, less a margin for start-up and the kill
[ "$left" -gt 20 ] || { echo "no time left after the install ($left s)"; exit 1; }
timeout -k 3 "$left" python3 bench/gpu/speed.py --device cuda --repeats 3 --out "$OUT/speed-gpu.json" --budget $((left - 12))
echo "exit $? after $(($(date +%s) - start)) s"
