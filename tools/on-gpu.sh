#!/usr/bin/env bash
# On a GPU machine with PyTorch, GNU make and this repository's checkout, and no Rust toolchain:
# unpacks the binaries that tools/build-for-gpu.sh made (against this PyTorch's version) and runs
# Makefile targets with them, on this PyTorch's own libtorch and CUDA libraries, with this Python
# as the benchmarks' peer. Nothing is built here.
#
# Usage: [PYTHON=/path/to/python] tools/on-gpu.sh ARCHIVE TARGET... [VAR=VALUE...]
#   TARGET: test-gpu, bench-gpu, profile-gpu, smoke, pipeline or status (the others build or
#   install)
#   e.g. tools/on-gpu.sh dist/parti-gpu-torch-2.11.0.tar.xz test-gpu bench-gpu profile-gpu
#        tools/on-gpu.sh dist/parti-gpu-torch-2.11.0.tar.xz smoke DEVICE=cuda
set -euo pipefail

usage() {
  sed -n '2,11p' "$0" >&2
  exit 2
}
[ $# -ge 2 ] || usage
archive=$(realpath "$1")
shift
for argument in "$@"; do
  case $argument in
    test-gpu | bench-gpu | profile-gpu | smoke | pipeline | status) ;;
    PYTHON=* | PEER=* | BIN=* | TARGET_DIR=* | LIBTORCH=* | BACKEND=* | PREBUILT=*)
      echo "$argument: set by this script (PYTHON goes before it, in the environment)" >&2
      exit 2 ;;
    *=*) ;;
    *)
      echo "$argument: not a target this script runs (test-gpu, bench-gpu, profile-gpu," \
        "smoke, pipeline, status; the others build or install)" >&2
      exit 2 ;;
  esac
done
command -v make >/dev/null || { echo "this script needs GNU make" >&2; exit 1; }
# The Python with PyTorch, as an absolute path (not resolved through links: a virtual
# environment's python is a link out of it) before the working folder changes.
python=$(command -v "${PYTHON:-python3}") || { echo "no Python at ${PYTHON:-python3}" >&2; exit 1; }
case $python in /*) ;; *) python=$PWD/$python ;; esac
cd "$(dirname "$0")/.."

found=$("$python" -c 'import glob, os, torch
folder = os.path.dirname(torch.__file__)
# The CUDA libraries of the nvidia-* wheels beside this torch, should its own run path miss them.
nvidia = glob.glob(os.path.join(os.path.dirname(folder), "nvidia", "*", "lib"))
print(folder, torch.__version__.split("+")[0], ":".join(sorted(nvidia)), sep="\n")') ||
  { echo "$python cannot import torch" >&2; exit 1; }
{ read -r torch_dir; read -r torch_version; read -r nvidia || true; } <<<"$found"
built_for=$("$python" -c 'import sys, tarfile
with tarfile.open(sys.argv[1]) as archive:
    print(archive.extractfile("./TORCH_VERSION").read().decode().strip())' "$archive")
if [ "$built_for" != "$torch_version" ]; then
  echo "$archive was built against torch $built_for, this machine has $torch_version:" \
    "build again with tools/build-for-gpu.sh $torch_version (PyPI's builds only)" >&2
  exit 1
fi

bins=target/gpu/release
rm -rf "$bins"
mkdir -p "$bins"
# Python's tarfile, as a GPU image need not have xz; its safe filter where this Python has one.
"$python" -c 'import sys, tarfile
with tarfile.open(sys.argv[1]) as archive:
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    archive.extractall(sys.argv[2], **safe)' "$archive" "$bins"
if [ -d .git ] && command -v git >/dev/null; then
  here=$(git describe --always --dirty 2>/dev/null || echo unknown)
  built_from=$(cat "$bins/BUILT_FROM" 2>/dev/null || echo unknown)
  [ "$here" = "$built_from" ] || echo "warning: the binaries were built from $built_from," \
    "this checkout is $here (the Makefile and the peer's script come from the checkout)" >&2
fi

# This PyTorch's libtorch first (its real libtorch_cuda.so, not the build's stand-in).
export LD_LIBRARY_PATH=$torch_dir/lib${nvidia:+:$nvidia}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
"$bins/train" --help >/dev/null || {
  echo "$bins/train does not load here: built against a newer glibc than this machine's, or" \
    "this PyTorch has no CUDA libtorch (libtorch_cuda.so in $torch_dir/lib)" >&2
  exit 1
}

# The binaries are taken as built (PREBUILT), and this Python, which has PyTorch, is the peer in
# place of the virtual environment `make bench` would install.
exec make -o bench/.venv/bin/python PREBUILT=1 BACKEND=tch LIBTORCH="$torch_dir" \
  BIN="$bins" TARGET_DIR=target/gpu PYTHON="$python" PEER="--python $python" "$@"
