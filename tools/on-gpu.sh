#!/usr/bin/env bash
# On a GPU machine with PyTorch installed and no Rust toolchain: unpacks the binaries that
# tools/build-for-gpu.sh made (against this PyTorch's version) and runs Makefile targets with
# them, on this PyTorch's own libtorch and CUDA libraries, with this Python as the benchmarks'
# peer. Nothing is built here.
#
# Usage: tools/on-gpu.sh ARCHIVE TARGET... [VAR=VALUE...]
#   e.g. tools/on-gpu.sh dist/parti-gpu-torch-2.11.0.tar.xz bench-gpu profile-gpu
#        tools/on-gpu.sh dist/parti-gpu-torch-2.11.0.tar.xz smoke DEVICE=cuda
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,9p' "$0" >&2
  exit 2
fi
archive=$(realpath "$1")
shift
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
torch_dir=$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
torch_version=$("$python" -c 'import torch; print(torch.__version__.split("+")[0])')
bins=target/gpu/release
rm -rf "$bins"
mkdir -p "$bins"
# Python's tarfile, as a GPU image need not have xz.
"$python" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
  "$archive" "$bins"
built_for=$(cat "$bins/TORCH_VERSION")
if [ "$built_for" != "$torch_version" ]; then
  echo "$archive was built against torch $built_for, this machine has $torch_version:" \
    "build again with tools/build-for-gpu.sh $torch_version" >&2
  exit 1
fi

# This PyTorch's libtorch first (its real libtorch_cuda.so, not the build's stand-in), then the
# CUDA libraries of its nvidia-* wheels, should its own run path not reach them.
nvidia=$("$python" -c 'import glob, os
try:
    import nvidia
    print(":".join(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], "*", "lib")))))
except ImportError:
    print("")')
export LD_LIBRARY_PATH=$torch_dir/lib${nvidia:+:$nvidia}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# The binaries are taken as built (PREBUILT), and this Python, which has PyTorch, is the peer in
# place of the virtual environment `make bench` would install.
exec make -o bench/.venv/bin/python PREBUILT=1 BACKEND=tch LIBTORCH="$torch_dir" \
  BIN="$bins" TARGET_DIR=target/gpu PYTHON="$python" PEER="--python $python" "$@"
