# edgeflow — two commands matter on a fresh machine:
#   make demo   set everything up and run the main job end to end
#   make test   set everything up and run every test
SHELL := /bin/bash
ARCH := $(shell uname -m)
ORT_LIB := $(CURDIR)/.ort/$(ARCH)/libonnxruntime.so
export ORT_DYLIB_PATH := $(ORT_LIB)
CARGO ?= cargo
PYTHON ?= python3
TINY := tests/fixtures/models/phi3-tiny-gqa
VENV_BENCH := .venv/bench
# The registry tests' real peer: an MLflow server and client from PyPI (tests/mlflow/); the
# local API tests' real clients: the openai SDK and prometheus_client (tests/serve/).
VENV_TEST := .venv/test

.PHONY: all build ort venv test demo bench models clean

all: build

ort: $(ORT_LIB)
$(ORT_LIB): cross/fetch-ort.sh
	cross/fetch-ort.sh $(ARCH)

build: ort
	$(CARGO) build --release --locked

# Rebuilt when the pinned requirements change; the stamp marks a complete install.
venv: $(VENV_TEST)/.stamp
$(VENV_TEST)/.stamp: tests/mlflow/requirements.txt tests/serve/requirements.txt
	rm -rf $(VENV_TEST)
	$(PYTHON) -m venv $(VENV_TEST)
	$(VENV_TEST)/bin/python -m pip install --quiet --disable-pip-version-check -r tests/mlflow/requirements.txt -r tests/serve/requirements.txt
	touch $@

test: ort venv
	$(CARGO) test --release --locked

demo: build
	@echo "== edgeflow generate: streaming a chat answer from the bundled tiny Phi-3 (random weights) =="
	./target/release/edgeflow generate --model-dir $(TINY) --chat tests/fixtures/chat-demo.json --max-tokens 32
	@echo "== the same, as JSON =="
	./target/release/edgeflow generate --model-dir $(TINY) --chat tests/fixtures/chat-demo.json --max-tokens 32 --json

# Side-by-side with onnxruntime-genai; see BENCHMARKS.md. Builds the Phi-3-mini-shaped model on first use.
bench: build
	benches/run.sh

# Regenerate the committed fixtures (needs torch; several GB, never part of `make test`).
models:
	tests/gen/make_all.sh

clean:
	$(CARGO) clean
	rm -rf .ort
