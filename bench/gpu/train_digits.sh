#!/usr/bin/env bash
# Device run: train digits models with the repository's own script on one GPU (several at once), tar each model.
# Usage (on the device machine, repo root): bash bench/gpu/train_digits.sh "SEED:LR:STEPS ..."
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)"
for cfg in $1; do
  IFS=: read -r seed lr steps <<<"$cfg"
  name="s${seed}_lr${lr}_n${steps}"
  python3 -m memctl.zoo.digits train --seed "$seed" --lr "$lr" --steps "$steps" --device cuda --max-minutes 7 \
    --out "/tmp/models/$name" > "$OUT/$name.log" 2>&1 &
done
wait
cd /tmp/models && for d in */; do case "$d" in *.work/|*.tmp/) continue;; esac; tar -cf "$OUT/${d%/}.tar" "${d%/}"; done
ls -la "$OUT"
