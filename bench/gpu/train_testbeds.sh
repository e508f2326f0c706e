#!/usr/bin/env bash
# Device run: train embedded testbeds with the repository's own scripts on one GPU, side by side; tar each model.
# Usage (device machine, repo root): bash bench/gpu/train_testbeds.sh MINUTES "RUN ..."
#   RUN = digits:SEED:STEPS  or  video:SEED:STEPS:BATCH[:WIDTH:LAYERS:SHIFT:LR]  (e.g. "digits:2:3600 video:0:6000:64")
set -u
minutes=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)"
for run in $2; do
  IFS=: read -r kind seed steps batch width layers shift lr <<<"$run"
  if [ "$kind" = digits ]; then
    name="digits-s${seed}"
    python3 -m memctl.zoo.digits train --seed "$seed" --steps "$steps" --device cuda --max-minutes "$minutes" \
      --out "/tmp/models/$name" > "$OUT/$name.log" 2>&1 &
  else
    name="moving-digits-s${seed}-n${steps}-w${width:-64}-l${layers:-4}-sh${shift:-3}-lr${lr:-0.0005}"
    python3 -m memctl.zoo.video train --seed "$seed" --steps "$steps" --batch-size "$batch" --device cuda \
      --width "${width:-64}" --layers "${layers:-4}" --sigma-shift "${shift:-3}" --lr "${lr:-0.0005}" \
      --max-minutes "$minutes" --out "/tmp/models/$name" > "$OUT/$name.log" 2>&1 &
  fi
done
wait
cd /tmp/models && for d in */; do case "$d" in *.work/|*.tmp/) continue;; esac; tar -cf "$OUT/${d%/}.tar" "${d%/}"; done
ls -la "$OUT"
