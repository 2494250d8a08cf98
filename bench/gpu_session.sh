#!/usr/bin/env bash
# Issue 7's GPU figures in one device call (SESSION_SECONDS, 480 by default, on an H100 or H200):
#
#   (once, here: download the wheels as bench/README.md, "On a device machine", says)
#   run(command="PHASE=explore bash bench/gpu_session.sh", carry=["bench/.cache/wheels"], timeout_s=540)
#
# PHASE=final (the default): the VAE attention probe, the import probe, upscale 256 and 512
# compiled and profiled, upscale with vae_matmul_attention (1024 too), enhance autotuned, the
# compile-cache probe for upscale and enhance, the graph tests: more than one session's 15
# minutes of device time. First call SESSION_SECONDS=580 (steps 1-4, under their limits:
# 60 + 70 + 330 + 150 s), timeout_s=595; what `status` leaves after it (~3 min, the machine's
# start counts) fits step 7 at most: STEPS=7, SESSION_SECONDS = that less a minute. Steps 5 and
# 6 wait for another session. PHASE=explore: comic, enhance, upscale profiled.
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
TINY=()  # BENCH_TINY=1: a dry run of this script on the CPU, tiny models (their own case names)
UP256=upscale-256
UP512=upscale-512
UP1024=upscale-1024
[ -n "${BENCH_TINY:-}" ] && TINY=(--tiny) && UP256=upscale-64 && UP512=upscale-96 && UP1024=upscale-128
DEADLINE=$((SECONDS + ${SESSION_SECONDS:-480}))
mkdir -p "$OUT"
LOG="$OUT/gpu-session.log"
export PYTHONUNBUFFERED=1

want() { [[ " ${STEPS:-1 2 3 4 5 6 7} " == *" $1 "* ]]; }  # STEPS: which numbered steps run

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

case "${PHASE:-final}" in
explore)
  # comic, enhance and upscale-256: stock, the defaults and torch.compile on top of them,
  # each path profiled once (top kernels by GPU time; builds the full-size models once).
  step 230 "$PY" -m bench "${TINY[@]}" --cases comic,enhance,$UP256 --repeats 2 --profile \
    --variant "compiled: compile=on"
  [ ${#TINY[@]} -eq 0 ] && step 90 "$PY" -m bench.coldprobe comic
  step 50 "$PY" -m pytest -q -p no:cacheprovider tests/bench/test_cuda_graphs.py
  ;;
final)
  # What is left (sessions 4 and 5 ran the rest): upscale's VAE attention, where a cold start's
  # import goes, enhance autotuned, the compile cache for upscale and enhance, the GPU tests.
  # 1. The VAE's one-head, 512-wide attention alone (seconds): scaled_dot_product_attention
  #    against the chunked matrix products of the vae_matmul_attention switch, at the
  #    latent sizes the operations decode (512^2 for an upscale 512 tile: ~140 TFLOP).
  want 1 && step 60 "$PY" -m bench.attnprobe "${TINY[@]}"
  # 2. The import alone under -X importtime, page cache dropped then warm (root): is a cold
  #    start's 19 s of import the disk or the work?
  want 2 && [ ${#TINY[@]} -eq 0 ] && step 70 "$PY" -m bench.coldprobe --imports
  # 3. upscale 256 -> 1024 and 512 -> 2048: stock, today's defaults (compiled: both tile
  #    buckets, ~130-170 s) and the VAE attention as matrix products (mm: Inductor's on-disk
  #    cache shortens its compile), in one process, profiled: how much of 512's 4.3 s (4 s
  #    target) is the VAE's decode, which is not compiled, and what the switch saves of it.
  want 3 && step 330 "$PY" -m bench "${TINY[@]}" --cases $UP256,$UP512 --profile \
    --variant "mm: vae_matmul_attention=on"
  # 4. 1024 -> 4096 compiled with the switch: does the 16 GiB bound hold.
  want 4 && step 150 "$PY" -m bench "${TINY[@]}" --cases $UP1024 --no-stock --switch vae_matmul_attention=on
  # 5. enhance under imagen's graphs with Inductor's autotuned kernels (what its 0.55 s target
  #    needs; minutes of compiling, paid once per GPU model through the compile cache).
  want 5 && step 330 "$PY" -m bench "${TINY[@]}" --cases enhance --switch compile_mode=max-autotune-no-cudagraphs
  # 6. How soon a new instance runs compiled, from scratch then with the compile cache.
  want 6 && step 300 "$PY" -m bench.compileprobe "${TINY[@]}" upscale enhance
  # 7. The GPU tests again (background swap, compile-cache round trip, graphed = eager).
  want 7 && step 240 "$PY" -m pytest -q -p no:cacheprovider tests/bench/test_cuda_graphs.py
  ;;
esac
find "$OUT" -type f -printf "%s %p\n" 2>&1 | tee -a "$LOG"
