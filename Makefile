# Every target that needs Python creates .venv first (torch from the CPU wheel on disk
# locally; the Docker image installs the CUDA build instead).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test demo dev download-models models-tiny worker-upscale worker-enhance worker-comic worker-remove-background clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m scripts.demo

download-models: $(STAMP)
	$(BIN)/imagen models pull

models-tiny: $(STAMP)
	$(BIN)/imagen models pull --tiny

clean:
	rm -rf $(VENV) .demo demo-output .pytest_cache
