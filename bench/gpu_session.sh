#!/usr/bin/env bash
# Issue 7's GPU figures in one device call (about 8 minutes on an H100 or H200):
#
#   .venv/bin/pip download --no-deps -d bench/.cache/wheels \
#       diffusers==0.42.1 transformers==5.24.0 importlib_metadata==8.7.0     # once, here
#   run(command="bash bench/gpu_session.sh", carry=["bench/.cache/wheels"], timeout_s=590)
#
# The device image has torch and transformers but no diffusers, and no network: the wheels
# travel with the call. Each step has its own time limit, most important first, so a slow
# one cannot starve the rest. Everything lands in bench/results/ there and comes back packed
# in $OUT/bench-results.tgz, with the log; unpack it into bench/results/ and commit it.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
LOG="$OUT/gpu-session.log"

step() {
  local limit=$1
  shift
  echo "== $* (at most ${limit} s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

if ls bench/.cache/wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install --quiet --no-deps --no-index bench/.cache/wheels/*.whl 2>&1 | tail -3 | tee -a "$LOG"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
$PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"

# 1. Issue 7's cases: stock diffusers vs imagen with the CUDA defaults (builds the
#    full-size models once, into bench/.cache/full).
step 300 $PY -m bench
# 2. The upscale candidates, imagen only: 256/512 tile buckets with a bfloat16 VAE and
#    cuDNN's algorithm search (compare with step 1's stock seconds and peaks).
step 120 $PY -m bench --no-stock --cases upscale-256,upscale-512,upscale-1024 \
  --switch upscale_tile=256,512 --switch vae_bf16=on --switch cudnn_benchmark=on
# 3. Cold start: a fresh process until ready, stock vs imagen, page cache dropped.
step 120 $PY -m bench --cold-only --cases comic,upscale-256

tar czf "$OUT/bench-results.tgz" bench/results
ls -la "$OUT"
