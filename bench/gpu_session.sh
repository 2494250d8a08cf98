#!/usr/bin/env bash
# Issue 7's GPU figures in one device call (SESSION_SECONDS, 480 by default, on an H100 or H200):
#
#   (once, here: download the wheels as bench/README.md, "On a device machine", says)
#   run(command="bash bench/gpu_session.sh", carry=["bench/.cache/wheels"], timeout_s=540)
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

# 1. Issue 7's cases, stock vs imagen with the CUDA defaults (builds the full-size models
#    once, into bench/.cache/full); channels_last on everywhere as a variant.
step 240 "$PY" -m bench "${TINY[@]}" --cases comic,enhance,upscale-256,upscale-512 \
  --variant "cl: channels_last=on"
step 60 "$PY" -m bench "${TINY[@]}" --no-stock --cases upscale-1024
# 1b. Where the time goes: one profiled run per path (top operators by GPU time).
step 90 "$PY" -m bench "${TINY[@]}" --cases comic,enhance,upscale-256 --repeats 1 --profile
# 2. Cold start, whole page cache dropped: the defaults, then without each cold-start switch
#    (neither has yet been shown to pay: imagen's cold start was slower than stock's).
step 60 "$PY" -m bench "${TINY[@]}" --cold-only --cases comic
step 40 "$PY" -m bench "${TINY[@]}" --cold-only --cases comic --switch read_ahead=off
step 40 "$PY" -m bench "${TINY[@]}" --cold-only --cases comic --switch direct_to_device=off
# 3. The CUDA-graph equivalence tests on the tiny models (skipped on a CPU).
step 60 "$PY" -m pytest -q -p no:cacheprovider tests/bench/test_cuda_graphs.py
# 4. torch.compile with its artefacts: compile once (writes the cache), then a fresh
#    process with an empty Inductor cache that loads the artefacts instead of compiling.
CC=/tmp/imagen-compile/comic.bin
step 150 env TORCHDYNAMO_VERBOSE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-1 "$PY" -m bench "${TINY[@]}" \
  --no-stock --cases comic --switch compile=on --switch compile_cache=$CC
step 90 env TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-2 "$PY" -m bench "${TINY[@]}" --no-stock --cases comic \
  --switch compile=on --switch compile_cache=$CC
find "$OUT" /tmp/imagen-compile -type f -printf "%s %p\n" 2>&1 | tee -a "$LOG"
