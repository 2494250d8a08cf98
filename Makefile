# Every target that needs Python creates .venv first (torch from the CPU wheel on disk
# locally; the Docker image installs the CUDA build instead). Elsewhere, plain PyPI gives
# torch's CUDA build (GBs of nvidia-* packages): `make TORCH_INDEX=https://download.pytorch.org/whl/cpu test`.
PYTHON ?= python3
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=
OPERATIONS := upscale enhance comic remove-background
# pyproject.toml's pin: the venv takes it first, from TORCH_INDEX when set.
TORCH := torch==2.13.0

.PHONY: venv test demo dev bench lock download-models models-tiny clean $(addprefix worker-,$(OPERATIONS))

venv: $(STAMP)

# constraints.txt: the runtime dependencies at the versions the image installs (make lock).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e '.[test]' --constraint constraints.txt
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m scripts.demo

# The local stack left running; prints the exports for gcloud storage and the client libraries.
dev: $(STAMP)
	$(BIN)/imagen dev

# A local pull worker for one operation, e.g. `make worker-upscale` (subscription
# imagen-<operation> unless IMAGEN_SUBSCRIPTION is set; point it at `imagen dev` or GCP).
$(addprefix worker-,$(OPERATIONS)): worker-%: $(STAMP)
	$(BIN)/imagen worker --operations $* --subscription $${IMAGEN_SUBSCRIPTION:-imagen-$*} --metrics-port 0

# Stock diffusers vs imagen, same process (bench/README.md); BENCH_ARGS=--tiny runs on the CPU.
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# Re-pins constraints.txt from pyproject.toml's ranges (scripts/lock_deps.py): after changing a
# dependency, or to take newer releases; then `make test`. Needs only torch and uv, so it runs
# even where the old pins no longer fit pyproject.toml.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH) uv==0.13.9 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(BIN)/python -m scripts.lock_deps

download-models: $(STAMP)
	$(BIN)/imagen models pull

models-tiny: $(STAMP)
	$(BIN)/imagen models pull --tiny

clean:
	rm -rf $(VENV) .demo demo-output .pytest_cache
