# parti: from raw image-text data to a served text-to-image model.
#
#   make pipeline            every stage on the embedded default data (tiny preset) into runs/default
#   make pipeline RUN=s3://bucket/prefix   the same, on a bucket (credentials from AWS_* variables)
#   make test                the test suite (installs moto, an S3 server, into .venv for the storage tests)

RUN ?= runs/default
PRESET ?= tiny
FORCE ?=
CARGO ?= cargo
PYTHON ?= python3
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
BIN := $(TARGET_DIR)/release
FORCE_FLAG := $(if $(FORCE),--force,)

.PHONY: pipeline build test smoke venv fmt lint clean-run help bench bench-ingest bench-venv

help:
	@sed -n '3,6p' Makefile

build:
	$(CARGO) build --release --workspace

# Stages hand manifests to each other; each one skips itself when its inputs and config are unchanged.
pipeline: build
	$(BIN)/ingest synth --preset $(PRESET) --out $(RUN)/synth $(FORCE_FLAG)
	$(BIN)/ingest pairs --preset $(PRESET) --input $(RUN)/synth/pairs --out $(RUN)/pairs $(FORCE_FLAG)
	$(BIN)/ingest text --input $(RUN)/synth/text --out $(RUN)/text $(FORCE_FLAG)
	$(BIN)/manifests verify $(RUN)/pairs
	$(BIN)/manifests lineage $(RUN)/pairs
	@echo "pipeline done: manifests under $(RUN)/*/manifest.json"

venv: .venv/bin/moto_server

.venv/bin/moto_server:
	$(PYTHON) -m venv .venv
	.venv/bin/pip install --quiet 'moto[server]==5.2.5'

test: venv
	$(CARGO) test --release --workspace
	$(MAKE) smoke

# The whole chain end to end at smoke size, twice: the second run must skip every stage.
smoke: build
	rm -rf $(TARGET_DIR)/smoke
	$(MAKE) --no-print-directory pipeline RUN=$(TARGET_DIR)/smoke
	$(MAKE) --no-print-directory pipeline RUN=$(TARGET_DIR)/smoke 2>&1 | tee $(TARGET_DIR)/smoke.log
	@test "$$(grep -c 'up to date' $(TARGET_DIR)/smoke.log)" -eq 3 || { echo "second pipeline run did not skip every stage"; exit 1; }
	@echo "smoke: 3 passed, 0 failed"

# Benchmarks (not tests): each prints both sides, measured in the same run, and the ratio.
BENCH_CACHE := bench/.cache

bench-venv: bench/.venv/bin/python

bench/.venv/bin/python: bench/requirements.txt
	$(PYTHON) -m venv bench/.venv
	bench/.venv/bin/pip install --quiet -r bench/requirements.txt
	touch $@

$(BENCH_CACHE)/photos-3mp: bench/.venv/bin/python bench/make_photos.py
	bench/.venv/bin/python bench/make_photos.py $(BENCH_CACHE)

bench-ingest: build $(BENCH_CACHE)/photos-3mp
	$(BIN)/ingest bench --python bench/.venv/bin/python --photos $(BENCH_CACHE)/photos-0.4mp --photos $(BENCH_CACHE)/photos-3mp

bench: bench-ingest

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean-run:
	rm -rf $(RUN)
