# syntax=docker/dockerfile:1.7
#
# imagen's GPU image: the CUDA build of torch, the project, and the models of the chosen
# operations baked in. Build with BuildKit; the Hugging Face token is a build secret, never
# an ARG or ENV, so it is in no layer and no image history:
#
#   DOCKER_BUILDKIT=1 docker build --secret id=hf_token,env=HF_TOKEN \
#       --build-arg OPERATIONS=upscale -t imagen-upscale .
#
# OPERATIONS picks the models (default: all four, the all-in-one image); per-worker images
# carry only their own. MODEL_SOURCE=tiny bakes random-weight models (no token, no Hub:
# smoke-test images); MODEL_SOURCE=none bakes none, for workers that mount a model volume
# or restore a GCS mirror at start. docs/deploy.md has the sizes and when to use which.
#
# The install and model steps are scripts/docker_steps.sh; tests/infra/test_docker_steps.py
# runs the same script (tiny models, a temporary prefix), since CI has no Docker engine.

# A CUDA 12 image for the NVIDIA container environment (NVIDIA_* variables, driver library
# paths). Its `base` flavour on purpose: torch's CUDA wheels bring their own CUDA runtime,
# cuBLAS and cuDNN as pip packages, so a `runtime`/`cudnn-runtime` base would hold a second
# copy (several GB) of the same libraries. CUDA 12.x wheels also run on Cloud Run's L4
# driver (535, CUDA 12.2) through CUDA minor-version compatibility; CUDA 13 wheels would not.
# Keep its CUDA version and TORCH_INDEX_URL's (cu126) in step. CUDA 12.6 because PyTorch
# publishes no other CUDA 12 build of 2.12 and later (their CUDA lines: 12.6, 13.0, 13.2; 12.8
# was dropped), and none at all from 2.15: a torch past 2.14 means CUDA 13 wheels and drivers
# 580 or newer. 12.6's kernels cover Volta to Hopper (sm_70-sm_90; the L4's sm_89 runs sm_86
# code); Blackwell GPUs need a CUDA 13 build (this base at 13.0, TORCH_INDEX_URL .../cu130).

# --- python: the CUDA base plus Python 3.12; the build and runtime stages both start here.
# gcc, libc6-dev and python3.12-dev are for torch.compile, on by default on CUDA (comic,
# enhance, upscale): Triton compiles its CUDA launcher (a C extension) at run time, and
# without a C compiler and Python.h every compile fails ("Failed to find C compiler") and the
# models stay uncompiled. The runtime user, here once, so that every later layer is shared.
FROM nvidia/cuda:12.6.3-base-ubuntu24.04 AS python
ARG DEBIAN_FRONTEND=noninteractive
# Versions are not pinned (DL3008): Ubuntu's archive keeps only the current, security-
# patched build of each package, so a pin would break the build at its next update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3.12 python3.12-venv \
        gcc libc6-dev python3.12-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin imagen
# The base image sets NVIDIA_REQUIRE_CUDA=cuda>=12.6, which the NVIDIA container runtime
# checks against the driver's own CUDA version: a 535 driver (12.2) would refuse to start the
# container although minor-version compatibility (above) runs it. A driver really too old
# still fails, at CUDA's initialisation, with CUDA's error.
ENV NVIDIA_DISABLE_REQUIRE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    IMAGEN_VENV=/opt/imagen \
    PATH=/opt/imagen/bin:$PATH

# --- deps: the virtual environment with torch (CUDA build) and the other dependencies, at
# the versions constraints.txt pins. Only pyproject.toml and constraints.txt come in, so this
# multi-GB layer is rebuilt only when they change.
FROM python AS deps
# The PyTorch index of the CUDA build; the torch version itself comes from pyproject.toml.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
COPY scripts/docker_steps.sh /usr/local/bin/docker_steps.sh
COPY pyproject.toml constraints.txt /src/
RUN PYTHON=python3.12 docker_steps.sh venv \
    && TORCH_INDEX_URL=${TORCH_INDEX_URL} docker_steps.sh deps /src

# --- app: the project itself.
FROM deps AS app
COPY README.md /src/README.md
COPY handlers /src/handlers
COPY image /src/image
RUN docker_steps.sh app /src

# --- models: `imagen models pull` for OPERATIONS into /models, then `imagen models verify`.
FROM app AS models
ARG OPERATIONS=upscale,enhance,comic,remove-background
ARG MODEL_SOURCE=hub
ENV MODEL_CACHE_DIR=/models
# required=false: builds of ungated or tiny models (or none) need no token.
RUN --mount=type=secret,id=hf_token,required=false \
    OPERATIONS=${OPERATIONS} MODEL_SOURCE=${MODEL_SOURCE} docker_steps.sh models

# --- runtime: the interpreter, the virtual environment and the models; nothing else.
FROM python AS runtime
LABEL org.opencontainers.image.title="imagen" \
      org.opencontainers.image.description="Hugging Face image models on Cloud Storage events" \
      org.opencontainers.image.licenses="Apache-2.0"
# The venv from the app stage, not the models stage (where the pull rewrote the packaged
# lock): the same ~6 GB layer in every operation's image, stored and pulled once, as long as
# nothing before it depends on OPERATIONS (BuildKit puts a declared ARG in the environment
# of every later RUN: declared after it). The models are found by their pins, or by the
# cache's refs/<branch> where the lock has none.
COPY --from=app /opt/imagen /opt/imagen
ARG OPERATIONS=upscale,enhance,comic,remove-background
ARG MODEL_SOURCE=hub
# Owned by root and read-only to the runtime user: nothing at run time may change a model.
COPY --from=models /models /models
# MALLOC_ARENA_MAX: glibc gives each thread that allocates its own arena and keeps each
# arena's high-water mark; jobs rotate over gunicorn's request threads and the worker's
# executor, so resident memory ratcheted up to threads x a job's peak (eight threads of
# decode, tiles and encode: 590 MB against 155 MB with two arenas, on the CPU).
ENV MODEL_CACHE_DIR=/models \
    HF_HUB_OFFLINE=1 \
    IMAGEN_OPERATIONS=${OPERATIONS} \
    MALLOC_ARENA_MAX=2 \
    PORT=8080
USER 10001:10001
# As the runtime user, offline: the copied cache is complete and readable.
RUN if [ "$MODEL_SOURCE" != none ]; then imagen models verify; fi
EXPOSE 8080
# No HEALTHCHECK: Cloud Run and GKE ignore it and probe themselves (the Cloud Run startup
# probe on /readyz, the GKE readiness probe); and `imagen worker` serves no /healthz.
CMD ["imagen", "serve"]
