#!/usr/bin/env bash
# Issue 7's GPU figures in one device call (about 8 minutes on an H100 or H200):
#
#   .venv/bin/pip download --no-deps -d bench/.cache/wheels \
#       diffusers==0.42.1 transformers==5.24.0 importlib_metadata==8.7.0 regex   # once, here
#   run(command="bash bench/gpu_session.sh", carry=["bench/.cache/wheels"], timeout_s=560)
#
# The device image has torch and transformers but no diffusers, and no network: the wheels
# travel with the call. Steps run most important first, each under its own limit and all
# under one deadline (SESSION_SECONDS), so a slow step cannot starve the rest or the call.
# After every step bench/results/ and the log are packed into $OUT/bench-results.tgz: unpack
# it into bench/results/ and commit the JSON and .md files (they name the card).
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/bench-out}
TINY=()  # BENCH_TINY=1: a dry run of this script on the CPU, tiny models
[ -n "${BENCH_TINY:-}" ] && TINY=(--tiny)
DEADLINE=$((SECONDS + ${SESSION_SECONDS:-480}))
mkdir -p "$OUT"
LOG="$OUT/gpu-session.log"
export PYTHONUNBUFFERED=1

step() {
  local limit=$1
  shift
  local left=$((DEADLINE - SECONDS - 5))
  if ((left < 20)); then
    echo "== skipped (deadline): $*" | tee -a "$LOG"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== [$SECONDS s] $* (at most ${limit} s)" | tee -a "$LOG"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== exit ${PIPESTATUS[0]} at $SECONDS s" | tee -a "$LOG"
  tar czf "$OUT/bench-results.tgz" bench/results
}

if ls bench/.cache/wheels/*.whl >/dev/null 2>&1 && [ ${#TINY[@]} -eq 0 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site bench/.cache/wheels/*.whl 2>&1 | tail -3 | tee -a "$LOG"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
$PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"

# 1. img2img: stock vs imagen (CUDA defaults), and what channels_last and cuDNN's search each do.
step 120 "$PY" -m bench "${TINY[@]}" --cases comic,enhance \
  --variant "cl: channels_last=on" --variant "no-cudnn: cudnn_benchmark=off"
# 2. upscale at 256 and 512 (one tile each with the 256/512 buckets), and 256 tiles only.
step 130 "$PY" -m bench "${TINY[@]}" --cases upscale-256,upscale-512 --variant "tiles256: upscale_tile=256"
# 3. Cold start: a fresh process until ready, stock vs imagen, whole page cache dropped.
step 80 "$PY" -m bench "${TINY[@]}" --cold-only --cases comic
# 4. Any size in bounded memory: 1024 -> 4096, imagen only.
step 70 "$PY" -m bench "${TINY[@]}" --no-stock --cases upscale-1024
# 5. Cold start with the libraries cached and only the weights evicted (a warm node).
step 60 "$PY" -m bench "${TINY[@]}" --cold-only --cases comic --drop-caches weights
# 6. The CUDA-graph equivalence tests on the tiny models (skipped on a CPU).
step 60 "$PY" -m pytest -q -p no:cacheprovider tests/bench/test_cuda_graphs.py
# 7. torch.compile with its artefacts: compile once (writes the cache), then a fresh
#    process with an empty Inductor cache that loads the artefacts instead of compiling.
CC=/tmp/imagen-compile/comic.bin
step 150 env TORCHDYNAMO_VERBOSE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-1 "$PY" -m bench "${TINY[@]}" \
  --no-stock --cases comic --switch compile=on --switch compile_cache=$CC
step 90 env TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-2 "$PY" -m bench "${TINY[@]}" --no-stock --cases comic \
  --switch compile=on --switch compile_cache=$CC
find "$OUT" /tmp/imagen-compile -type f -printf "%s %p\n" 2>&1 | tee -a "$LOG"
