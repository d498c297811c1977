# parti: from raw image-text data to a served text-to-image model.
#
#   make pipeline            every stage on the embedded default data (tiny preset) into runs/default
#   make pipeline RUN=s3://bucket/prefix   the same, on a bucket (credentials from AWS_* variables)
#   make status              which stages under RUN are up to date, and why the others are not
#   make test                the test suite (installs moto and Azurite, S3 and Azure servers, into .venv for the storage tests)
#   make pipeline BACKEND=tch   the same on libtorch (fetches a CPU libtorch from PyPI once, ~910 MB)
#   make pipeline BACKEND=tch DEVICE=cuda   every stage that computes on the GPU (a CUDA libtorch in LIBTORCH)
#   make bench               benchmarks against PyTorch and Pillow on this machine (installs them into bench/.venv)
#   make bench-gpu BACKEND=tch   the model benchmarks' GPU table (f32, bf16, MFU) on a CUDA machine
#   make profile-gpu BACKEND=tch where a bf16 350M step's GPU time goes, ours and PyTorch's side by side
#   make test-gpu BACKEND=tch    the fused kernels' tests on the GPU (each against its composition)

RUN ?= runs/default
PRESET ?= tiny
FORCE ?=
CARGO ?= cargo
PYTHON ?= python3
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
# flex: Burn's pure-Rust CPU backend. tch: libtorch (CPU here; CUDA with a CUDA libtorch in LIBTORCH).
BACKEND ?= flex
LIBTORCH ?= $(HOME)/.cache/parti/libtorch
ifeq ($(BACKEND),tch)
FEATURES := --features nn/tch
BACKEND_SETUP := $(LIBTORCH)/VERSION
export LIBTORCH
export LD_LIBRARY_PATH := $(LIBTORCH)/lib$(if $(LD_LIBRARY_PATH),:$(LD_LIBRARY_PATH),)
else ifeq ($(BACKEND),flex)
FEATURES :=
BACKEND_SETUP :=
else
$(error BACKEND must be flex or tch, not '$(BACKEND)')
endif
BIN := $(TARGET_DIR)/release
FORCE_FLAG := $(if $(FORCE),--force,)
# STEPS=N sets every training stage's step count to N (the smoke run uses it); empty: the preset's.
STEPS ?=
STEPS_FLAG := $(if $(STEPS),--steps $(STEPS),)
# DEVICE=cuda (or cuda:N; BACKEND=tch with a CUDA libtorch): the stages that compute on a device
# run there; empty: the CPU.
DEVICE ?=
DEVICE_FLAG := $(if $(DEVICE),--device $(DEVICE),)
# EVAL_PROMPTS=N: fewer evaluation prompts and held-out captions (the smoke run uses it).
EVAL_PROMPTS ?=
EVAL_FLAGS := $(if $(EVAL_PROMPTS),--prompts $(EVAL_PROMPTS) --captions $(EVAL_PROMPTS) --samples 2,)
# Your own data (README, "Train on your own data"): PAIRS is anything `ingest pairs` reads (a
# folder of images with .txt captions, a COCO captions file, CSV/TSV/JSONL, img2dataset parquet,
# webdataset tars; local or a bucket), PAIRS_FLAGS its options (e.g. --image-root DIR); TEXT
# anything `ingest text` reads, else the captions of PAIRS' training rows. Without PAIRS: the
# shapes data that `ingest synth` makes.
PAIRS ?=
PAIRS_FLAGS ?=
TEXT ?=
PAIRS_INPUT := $(or $(PAIRS),$(RUN)/synth/pairs)
# The super-resolution stage's targets: the same pictures at its output size (a second pairs
# stage of the same source: both hold out the same rows, by their files' digests). The shapes
# data is drawn again at that size from another seed, so its pictures are none the tokenizer
# trained on: drawn at both sizes from one seed, the same scene's two files would be held out
# apart, and super-resolution scored on scenes the tokenizer had trained on.
SUPERRES_SIZE := $(if $(filter tiny,$(PRESET)),256,512)
LARGE_INPUT := $(or $(PAIRS),$(RUN)/synth-large/pairs)
# Drawn shapes are stored losslessly: JPEG's ringing at their edges is noise the model could
# not learn and would be scored against.
LARGE_FLAGS := $(if $(PAIRS),$(PAIRS_FLAGS),--output-format png)
TEXT_INPUT := $(or $(TEXT),$(if $(PAIRS),$(RUN)/pairs,$(RUN)/synth/text))
# Both pairs stages read PAIRS; when it is a URL list, the second takes the images the first
# downloaded from this local folder (DOWNLOADS= to go without; not for a bucket RUN).
DOWNLOADS ?= $(if $(findstring ://,$(RUN)),,$(RUN)/downloads)
DOWNLOAD_FLAGS := $(if $(and $(PAIRS),$(DOWNLOADS)),--download-cache $(DOWNLOADS),)

.PHONY: pipeline status build test test-tch test-backend smoke venv fmt lint clean-run help bench bench-ingest bench-urls bench-models bench-gpu profile-gpu test-gpu bench-venv bench-distributed bench-serve nccl

help:
	@sed -n '3,13p' Makefile

ifeq ($(PREBUILT),)
build: $(BACKEND_SETUP)
	$(CARGO) build --release --workspace $(FEATURES)
else
# PREBUILT=1: the binaries already in BIN, as they are (tools/on-gpu.sh, on a GPU machine
# without Rust, runs those tools/build-for-gpu.sh made).
build:
	@test -x $(BIN)/train || { echo "PREBUILT=1, but $(BIN) holds no binaries"; exit 1; }
endif

$(LIBTORCH)/VERSION: tools/fetch-libtorch.py
	$(PYTHON) tools/fetch-libtorch.py $(LIBTORCH)

# Stages hand manifests to each other; each one skips itself when its inputs and config are unchanged.
pipeline: build
ifeq ($(PAIRS),)
	$(BIN)/ingest synth --preset $(PRESET) --out $(RUN)/synth $(FORCE_FLAG)
	$(BIN)/ingest synth --preset $(PRESET) --size $(SUPERRES_SIZE) --seed 1 --out $(RUN)/synth-large $(FORCE_FLAG)
endif
	$(BIN)/ingest pairs --preset $(PRESET) --input $(PAIRS_INPUT) $(PAIRS_FLAGS) $(DOWNLOAD_FLAGS) --out $(RUN)/pairs $(FORCE_FLAG)
	$(BIN)/ingest pairs --preset $(PRESET) --size $(SUPERRES_SIZE) --input $(LARGE_INPUT) $(LARGE_FLAGS) $(DOWNLOAD_FLAGS) --out $(RUN)/pairs-large $(FORCE_FLAG)
	$(BIN)/ingest text --input $(TEXT_INPUT) --out $(RUN)/text $(FORCE_FLAG)
	$(BIN)/vqgan train --preset $(PRESET) --pairs $(RUN)/pairs --out $(RUN)/vqgan $(STEPS_FLAG) $(DEVICE_FLAG) $(FORCE_FLAG)
	$(BIN)/vqgan finetune-decoder --preset $(PRESET) --vqgan $(RUN)/vqgan --pairs $(RUN)/pairs --out $(RUN)/vqgan-decoder $(STEPS_FLAG) $(DEVICE_FLAG) $(FORCE_FLAG)
	$(BIN)/vqgan superres --preset $(PRESET) --pairs $(RUN)/pairs-large --vqgan $(RUN)/vqgan-decoder --out $(RUN)/superres $(STEPS_FLAG) $(DEVICE_FLAG) $(FORCE_FLAG)
	$(BIN)/vqgan reconstruct --vqgan $(RUN)/vqgan-decoder --pairs $(RUN)/pairs --out $(RUN)/vqgan-reconstruct $(DEVICE_FLAG) $(FORCE_FLAG)
	$(BIN)/vqgan encode --vqgan $(RUN)/vqgan-decoder --pairs $(RUN)/pairs --out $(RUN)/tokens $(DEVICE_FLAG) $(FORCE_FLAG)
	$(BIN)/train tokenizer --preset $(PRESET) --text $(RUN)/text --captions $(RUN)/pairs --out $(RUN)/tokenizer $(FORCE_FLAG)
	$(BIN)/train text-encoder --preset $(PRESET) --tokenizer $(RUN)/tokenizer --text $(RUN)/text --pairs $(RUN)/pairs --out $(RUN)/text-encoder $(STEPS_FLAG) $(DEVICE_FLAG) $(FORCE_FLAG)
	$(BIN)/train parti --preset $(PRESET) --tokens $(RUN)/tokens --tokenizer $(RUN)/tokenizer --text-encoder $(RUN)/text-encoder --out $(RUN)/parti $(STEPS_FLAG) $(DEVICE_FLAG) $(FORCE_FLAG)
	$(BIN)/infer eval --parti $(RUN)/parti --out $(RUN)/eval $(EVAL_FLAGS) $(DEVICE_FLAG) $(FORCE_FLAG)
	$(BIN)/manifests verify $(RUN)/eval
	$(BIN)/manifests lineage $(RUN)/eval
	@echo "pipeline done: manifests under $(RUN)/*/manifest.json"

# Exit 0 when every stage under RUN is up to date; 1 (naming why) otherwise. Runs nothing.
status: build
	$(BIN)/manifests status $(RUN)

# Real photographs for the own-data test (infer/tests/own_data.rs): the ones scikit-image ships
# in its wheel (the same as `make bench` uses), taken from the pinned wheel, nothing else of it.
PHOTOS := .venv/skimage-data/astronaut.png

AZURITE := .venv/azurite/node_modules/.bin/azurite-blob

venv: .venv/bin/moto_server $(AZURITE) $(PHOTOS)

.venv/bin/moto_server:
	$(PYTHON) -m venv .venv
	.venv/bin/pip install --quiet 'moto[server]==5.2.5'

# Azurite, Microsoft's Azure Storage emulator, at the versions tools/azurite's lock file pins.
$(AZURITE): tools/azurite/package.json tools/azurite/package-lock.json | .venv/bin/moto_server
	mkdir -p .venv/azurite
	cp tools/azurite/package.json tools/azurite/package-lock.json .venv/azurite/
	cd .venv/azurite && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(PHOTOS): .venv/bin/moto_server
	.venv/bin/pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
		--platform manylinux_2_28_x86_64 scikit-image==0.26.0 -d .venv/wheels
	.venv/bin/python -c 'import glob, pathlib, zipfile; \
		wheel = zipfile.ZipFile(glob.glob(".venv/wheels/scikit_image-0.26.0-*.whl")[0]); \
		out = pathlib.Path(".venv/skimage-data"); out.mkdir(exist_ok=True); \
		[(out / pathlib.Path(n).name).write_bytes(wheel.read(n)) for n in wheel.namelist() \
		 if n.startswith("skimage/data/") and n.endswith((".png", ".jpg"))]'

test: venv
	$(CARGO) test --release --workspace
	$(MAKE) smoke

# The suite on libtorch, so the tch backend cannot rot (the whole workspace, so the build shares
# every artifact that does not depend on the backend with the flex one).
test-tch: venv
	$(MAKE) --no-print-directory BACKEND=tch test-backend

test-backend: $(BACKEND_SETUP)
	$(CARGO) test --release --workspace $(FEATURES)

SMOKE_STEPS := 5
# Stage commands in `pipeline` (each says "up to date" when rerun unchanged).
PIPELINE_STAGES := 14

# The whole chain end to end at smoke size, twice: the second run, on the same folder spelled
# another way (absolute, through a symlink), must skip every stage, and `manifests status` agree.
smoke: build
	rm -rf $(TARGET_DIR)/smoke $(TARGET_DIR)/smoke-link
	$(MAKE) --no-print-directory pipeline RUN=$(TARGET_DIR)/smoke STEPS=$(SMOKE_STEPS) EVAL_PROMPTS=4
	ln -s $(abspath $(TARGET_DIR))/smoke $(TARGET_DIR)/smoke-link
	$(MAKE) --no-print-directory pipeline RUN=$(abspath $(TARGET_DIR))/smoke-link STEPS=$(SMOKE_STEPS) EVAL_PROMPTS=4 2>&1 | tee $(TARGET_DIR)/smoke.log
	@test "$$(grep -c 'up to date' $(TARGET_DIR)/smoke.log)" -eq $(PIPELINE_STAGES) || { echo "second pipeline run did not skip every stage"; exit 1; }
	$(BIN)/manifests status $(TARGET_DIR)/smoke
	$(BIN)/manifests diff $(TARGET_DIR)/smoke $(TARGET_DIR)/smoke-link > /dev/null
	@echo "smoke: $(PIPELINE_STAGES) passed, 0 failed"

# NCCL for training on GPUs (README, "Training across processes and machines"): nn/csrc/nccl.cpp
# against a CUDA libtorch's headers and CUDA's and NCCL's, into libparti_nccl.so beside the
# binaries, where a rank on a GPU loads it (or PARTI_NCCL_LIBRARY). On a machine with CUDA.
CUDA_HOME ?= /usr/local/cuda
NCCL_INCLUDE ?= $(CUDA_HOME)/include
CXX ?= g++
nccl:
	@test -f $(LIBTORCH)/include/torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp || { echo "LIBTORCH=$(LIBTORCH) has no c10d headers: point it at a CUDA libtorch"; exit 1; }
	@test -f $(NCCL_INCLUDE)/nccl.h || { echo "no nccl.h in NCCL_INCLUDE=$(NCCL_INCLUDE)"; exit 1; }
	mkdir -p $(BIN)
	$(CXX) -std=c++17 -O2 -shared -fPIC -DUSE_C10D_NCCL -D_GLIBCXX_USE_CXX11_ABI=1 \
		-isystem $(LIBTORCH)/include -isystem $(LIBTORCH)/include/torch/csrc/api/include \
		-isystem $(CUDA_HOME)/include -isystem $(NCCL_INCLUDE) -Inn/csrc \
		nn/csrc/nccl.cpp -o $(BIN)/libparti_nccl.so

# `train parti` as jobs of 1 and 2 processes (c10d + Gloo on loopback; tch only) on the tokens of
# a pipeline run ($(RUN): run `make pipeline BACKEND=tch` first).
bench-distributed: build
	@test "$(BACKEND)" = tch || { echo "bench-distributed needs BACKEND=tch (c10d comes with libtorch)"; exit 1; }
	$(BIN)/train bench-distributed --tokens $(RUN)/tokens --tokenizer $(RUN)/tokenizer --out $(TARGET_DIR)/bench-distributed

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

# `ingest pairs` and img2dataset over one list of 2000 URLs served from loopback, same run.
bench-urls: build $(BENCH_CACHE)/photos-3mp
	$(BIN)/ingest bench-urls --python bench/.venv/bin/python --photos $(BENCH_CACHE)/photos-0.4mp --count 2000 --work $(BENCH_CACHE)/urls

# Each model benchmark prints ours (on BACKEND) and PyTorch's figure, measured in the same run.
# 350m-ops runs the 350M slice's ops on tensors too small to compute: what issuing them costs.
PEER := --python bench/.venv/bin/python
bench-models: build bench/.venv/bin/python
	$(BIN)/vqgan bench --preset tiny --batch 16 $(PEER)
	$(BIN)/vqgan bench --preset small --batch 1 $(PEER)
	$(BIN)/train bench --preset tiny --batch 32 $(PEER)
	$(BIN)/train bench --preset 350m-slice --batch 1 $(PEER)
	$(BIN)/train bench --preset 350m-ops --batch 1 --rounds 21 $(PEER)
	$(BIN)/infer bench $(PEER)

# The GPU table of BENCHMARKS.md on this machine's first GPU (DEVICE=cuda:N for another), each
# row against PyTorch on the same GPU: f32 and bf16 train steps, the Parti 350M slice's model
# FLOPs utilisation against PEAK_TFLOPS (the GPU's dense bf16 peak from its datasheet: 989 for an
# H100 or H200 SXM), and sampling. Needs BACKEND=tch and a CUDA libtorch in LIBTORCH (README, "Backends").
PEAK_TFLOPS ?= 989
ON_GPU := --device $(or $(DEVICE),cuda) $(PEER)
bench-gpu: build bench/.venv/bin/python
	@test "$(BACKEND)" = tch || { echo "bench-gpu needs BACKEND=tch and a CUDA libtorch in LIBTORCH"; exit 1; }
	$(BIN)/vqgan bench --preset tiny --batch 16 --rounds 5 $(ON_GPU)
	$(BIN)/vqgan bench --preset small --batch 8 --rounds 5 $(ON_GPU)
	$(BIN)/train bench --preset tiny --batch 32 --rounds 5 $(ON_GPU)
	$(BIN)/train bench --preset 350m-slice --batch 8 --rounds 5 $(ON_GPU)
	$(BIN)/train bench --preset 350m-slice --batch 64 --rounds 5 --peak-tflops $(PEAK_TFLOPS) $(ON_GPU)
	$(BIN)/vqgan bench --preset small --batch 8 --rounds 5 --precision bf16 $(ON_GPU)
	$(BIN)/train bench --preset 350m-slice --batch 8 --rounds 5 --precision bf16 $(ON_GPU)
	$(BIN)/train bench --preset 350m-slice --batch 64 --rounds 5 --precision bf16 --peak-tflops $(PEAK_TFLOPS) $(ON_GPU)
	$(BIN)/train bench --preset 350m-slice --batch 128 --rounds 5 --precision bf16 --peak-tflops $(PEAK_TFLOPS) $(ON_GPU)
	$(BIN)/train bench --preset 350m-ops --batch 1 --rounds 21 $(ON_GPU)
	$(BIN)/train bench --preset 350m-ops --batch 1 --rounds 21 --precision bf16 $(ON_GPU)
	$(BIN)/infer bench $(ON_GPU)

# Where a bf16 step's time goes on the GPU: the Parti 350M slice at batch 64, its last step
# recorded on both sides (libtorch's profiler, torch.profiler) into $(TARGET_DIR)/profile, the
# GPU kernels summed by kind, then both sides' ops lined up by name and dtypes.
PROFILE_TRACE := $(TARGET_DIR)/profile/parti-350m-bf16-b64.json
profile-gpu: build bench/.venv/bin/python
	@test "$(BACKEND)" = tch || { echo "profile-gpu needs BACKEND=tch and a CUDA libtorch in LIBTORCH"; exit 1; }
	mkdir -p $(TARGET_DIR)/profile
	$(BIN)/train bench --preset 350m-slice --batch 64 --rounds 5 --precision bf16 --peak-tflops $(PEAK_TFLOPS) --profile $(PROFILE_TRACE) $(ON_GPU)
	$(PYTHON) bench/trace_summary.py $(PROFILE_TRACE) $(PROFILE_TRACE).torch.json
	$(PYTHON) bench/trace_ops.py $(PROFILE_TRACE) $(PROFILE_TRACE).torch.json 60

# The fused kernels' tests (nn/tests/fused.rs) on DEVICE (cuda unless set): each fused operation
# against its composition, forward and every gradient, for every mask kind, and under bf16
# autocast, on the kernels libtorch picks there. With PREBUILT=1, the test binary that
# tools/build-for-gpu.sh packed beside the others (BIN/tests/fused).
test-gpu: $(if $(PREBUILT),build,$(BACKEND_SETUP))
	@test "$(BACKEND)" = tch || { echo "test-gpu needs BACKEND=tch and a CUDA libtorch in LIBTORCH"; exit 1; }
ifeq ($(PREBUILT),)
	PARTI_TEST_DEVICE=$(or $(DEVICE),cuda) $(CARGO) test --release -p nn $(FEATURES) --test fused
else
	PARTI_TEST_DEVICE=$(or $(DEVICE),cuda) $(BIN)/tests/fused
endif

# `infer serve` under 64 concurrent single-sample requests, with cross-request batching and one
# request at a time, on the tiny model of $(RUN) (made by `make pipeline` if it is not there).
bench-serve: pipeline
	$(BIN)/infer bench-serve --parti $(RUN)/parti --clients 64

# Both backends, each against the same PyTorch runs' shapes (tch fetches libtorch once).
bench: bench-ingest bench-urls
	$(MAKE) --no-print-directory bench-models BACKEND=flex
	$(MAKE) --no-print-directory bench-models BACKEND=tch
	$(MAKE) --no-print-directory bench-serve

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean-run:
	rm -rf $(RUN)
