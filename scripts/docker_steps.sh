#!/usr/bin/env bash
# The Dockerfile's install and model steps, one subcommand each.
#
# They live here, not inline in the Dockerfile, so that the very commands the image runs
# are also run by tests/infra/test_docker_steps.py (CI has no Docker engine): that test
# runs `venv`, `deps`, `app` and `models` into a temporary prefix with tiny models.
#
#   docker_steps.sh venv          create the virtual environment at $IMAGEN_VENV
#   docker_steps.sh deps SRC      torch (the CUDA build, from $TORCH_INDEX_URL), then the
#                                 other dependencies listed in SRC/pyproject.toml, at the
#                                 versions SRC/constraints.txt pins (`make lock` writes it)
#   docker_steps.sh app SRC       the project itself (no dependencies: `deps` did them)
#   docker_steps.sh models        the models of $OPERATIONS into $MODEL_CACHE_DIR, then
#                                 `imagen models verify`
#
# Environment:
#   IMAGEN_VENV       the virtual environment (default /opt/imagen)
#   PYTHON            the interpreter that creates it (default python3)
#   TORCH_INDEX_URL   where torch comes from, e.g. https://download.pytorch.org/whl/cu126;
#                     empty: the default index (PyPI or the local pip configuration)
#   OPERATIONS        comma-separated operations whose models the image carries
#   MODEL_SOURCE      hub (Hugging Face; default), tiny (random weights, offline: smoke
#                     images and tests) or none (no models in the image: they come from a
#                     volume or a GCS mirror at run time; see docs/deploy.md)
#   HF_TOKEN_FILE     a file holding the Hugging Face token (default /run/secrets/hf_token,
#                     where `RUN --mount=type=secret,id=hf_token` puts it); read only by
#                     `models`, exported to that one process, never printed or stored
#   MODEL_CACHE_DIR   where the models go (the Dockerfile sets /models)
set -euo pipefail

IMAGEN_VENV=${IMAGEN_VENV:-/opt/imagen}
PYTHON=${PYTHON:-python3}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
MODEL_SOURCE=${MODEL_SOURCE:-hub}
HF_TOKEN_FILE=${HF_TOKEN_FILE:-/run/secrets/hf_token}

pip() {
    "$IMAGEN_VENV/bin/python" -m pip --no-input --disable-pip-version-check "$@"
}

log() {
    printf 'docker_steps: %s\n' "$*" >&2
}

# The project's runtime requirements from SRC/pyproject.toml, one per line. Read with the
# standard library so that this step needs nothing installed; the versions installed are
# SRC/constraints.txt's pins of them (the torch pin is pyproject.toml's too).
requirements() {
    "$IMAGEN_VENV/bin/python" - "$1/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as handle:
    print("\n".join(tomllib.load(handle)["project"]["dependencies"]))
PY
}

step_venv() {
    "$PYTHON" -m venv "$IMAGEN_VENV"
}

step_deps() {
    local src=${1:?usage: docker_steps.sh deps SRC}
    local requirements_file torch
    requirements_file=$(mktemp)
    requirements "$src" >"$requirements_file"
    torch=$(grep -E '^torch[ =<>!~]' "$requirements_file") || {
        log "pyproject.toml pins no torch"
        exit 1
    }
    # torch first, alone, from the PyTorch index: the CUDA build of the very release
    # pyproject.toml pins (2.13.0 there; 2.13.0+cu126 here, which `torch==2.13.0` accepts,
    # so the second install keeps it instead of fetching PyPI's build).
    log "installing $torch${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
    pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$torch"
    # The rest at constraints.txt's versions, the same CI tests; this also moves torch's own
    # requirements (sympy, filelock, ...) from whatever the PyTorch index offered to the pins.
    [[ -s $src/constraints.txt ]] || {
        log "$src/constraints.txt is missing: it pins every dependency (make lock)"
        exit 1
    }
    log "installing the other dependencies"
    pip install --no-cache-dir --requirement "$requirements_file" --constraint "$src/constraints.txt"
    rm -f "$requirements_file"
    # Everything the image holds, in the build log: torch's own CUDA libraries and Triton too,
    # which constraints.txt leaves to torch.
    log "installed:"
    pip freeze >&2
    "$IMAGEN_VENV/bin/python" - "$TORCH_INDEX_URL" <<'PY'
import re, sys
import torch
print(f"docker_steps: torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}", file=sys.stderr)
if re.search(r"/cu\d+/?$", sys.argv[1]) and not torch.version.cuda:
    sys.exit(f"docker_steps: asked {sys.argv[1]} for a CUDA build, got {torch.__version__}")
PY
}

step_app() {
    local src=${1:?usage: docker_steps.sh app SRC}
    pip install --no-cache-dir --no-deps "$src"
    pip check
    "$IMAGEN_VENV/bin/imagen" --version
}

step_models() {
    : "${OPERATIONS:?set OPERATIONS, e.g. upscale or upscale,enhance}"
    local imagen="$IMAGEN_VENV/bin/imagen"
    local pull=("$imagen" models pull --operations "$OPERATIONS" --quiet)
    case $MODEL_SOURCE in
        hub) ;;
        tiny) pull+=(--tiny) ;;
        none)
            log "MODEL_SOURCE=none: no models in the image"
            mkdir -p "${MODEL_CACHE_DIR:?}"
            return
            ;;
        *)
            log "MODEL_SOURCE must be hub, tiny or none, not '$MODEL_SOURCE'"
            exit 2
            ;;
    esac
    log "pulling the models of $OPERATIONS (source: $MODEL_SOURCE) into ${MODEL_CACHE_DIR:?}"
    if [[ $MODEL_SOURCE == hub && -s $HF_TOKEN_FILE ]]; then
        # Exported to the pull alone; the secret mount is gone once this RUN ends.
        HF_TOKEN=$(<"$HF_TOKEN_FILE") "${pull[@]}"
    else
        [[ $MODEL_SOURCE == hub ]] && log "no Hugging Face token at $HF_TOKEN_FILE: gated models will fail"
        "${pull[@]}"
    fi
    # Every file read whole against its checksum, once, where it was downloaded.
    "$imagen" models verify --checksums --operations "$OPERATIONS"
    "$imagen" models list --operations "$OPERATIONS"
    # The commits this image carries: copy them into image/models.lock.json to pin them.
    log "model lock:"
    "$IMAGEN_VENV/bin/python" -c \
        'from image.models.lock import packaged_lock_path; print(packaged_lock_path().read_text())' >&2
}

case ${1:-} in
    venv) step_venv ;;
    deps) step_deps "${2:-}" ;;
    app) step_app "${2:-}" ;;
    models) step_models ;;
    *)
        sed -n '2,28p' "$0" >&2
        exit 2
        ;;
esac
