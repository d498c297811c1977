#!/usr/bin/env bash
# Builds parti's binaries for a GPU machine on a machine with no GPU and no CUDA (a CI runner, a
# laptop), against the libtorch of the PyTorch installed on the GPU machine.
#
# The headers and libtorch_cpu come from that PyTorch's PyPI wheel. burn-tch allows GPUs only when
# its build finds libtorch_cuda.so, and nn links it so that its kernels register at start-up; its
# real copy needs CUDA's libraries, so the link takes a stand-in that carries the two symbols
# burn-tch refers to. On the GPU machine `tools/on-gpu.sh` puts that PyTorch's own torch/lib
# first on the library path, so the real libraries load. burn-tch 0.22 expects libtorch 2.9.0;
# other versions build with LIBTORCH_BYPASS_VERSION_CHECK=1, as the GPU tables were measured.
#
# Usage: tools/build-for-gpu.sh [TORCH_VERSION]     (default 2.11.0; PyPI's builds, 2.7 or later)
# Writes dist/parti-gpu-torch-VERSION.tar.xz (stripped binaries, ~40 MB). The first build takes
# about 11 minutes on 2 cores, in its own target directory (the link flags differ). Needs Rust,
# g++, binutils' strip, xz, and python3 with pip and PyPI access. The binaries need the glibc and
# libstdc++ of this machine or newer on the GPU machine: build on the oldest system they will run
# on (or in a manylinux_2_28 container), as PyTorch's wheels need only glibc 2.28.
set -euo pipefail

version=${1:-2.11.0}
# libtorch before 2.7 used the old C++ string ABI, which nn/build.rs does not compile for.
if ! printf '%s\n2.7\n' "$version" | sort -V -C -r 2>/dev/null; then
  echo "torch $version: builds need 2.7 or later (the C++11 string ABI)" >&2
  exit 2
fi
cache=$(realpath -m "${PARTI_CACHE:-$HOME/.cache/parti}")
libtorch=$cache/libtorch-gpu-$version
target=$cache/target-gpu-$version
archive=dist/parti-gpu-torch-$version.tar.xz
binaries=(ingest vqgan train infer manifests)
cd "$(dirname "$0")/.."

wheels=$cache/wheels-$version
staging=
cleanup() {
  rm -rf "$wheels" "$libtorch.partial" "$archive.partial" ${staging:+"$staging"}
}
trap cleanup EXIT

if [ "$(cat "$libtorch/VERSION" 2>/dev/null)" != "$version" ]; then
  mkdir -p "$wheels"
  echo "fetching torch==$version's wheel (headers and libtorch_cpu; ~900 MB)"
  python3 -m pip download --quiet --no-deps --only-binary :all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --python-version 3.12 --dest "$wheels" "torch==$version"
  rm -rf "$libtorch.partial"
  mkdir -p "$libtorch.partial/lib"
  python3 - "$wheels" "$libtorch.partial" <<'PY'
import pathlib, shutil, sys, zipfile
wheels, dest = map(pathlib.Path, sys.argv[1:])
# What the link reads; libgomp because libtorch_cpu names it (the rest of what the libraries
# name, CUDA's runtime and libtorch_cuda's own, is left to the loader on the GPU machine).
wanted = {f"torch/lib/{name}" for name in
          ("libtorch_cpu.so", "libc10.so", "libtorch.so", "libgomp.so.1")}
found = set()
for wheel in wheels.glob("torch-*.whl"):
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.endswith("/"):
                continue
            if name.startswith("torch/include/"):
                target = dest / "include" / name.removeprefix("torch/include/")
            elif name in wanted:
                target = dest / "lib" / pathlib.Path(name).name
                found.add(name)
            else:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
missing = sorted(wanted - found)
if missing:
    sys.exit(f"the torch wheel lacks {missing}")
PY
  # The stand-in: the two functions burn-tch's C++ refers to, so the link records
  # libtorch_cuda.so as needed; the GPU machine's real one replaces it at run time.
  cat > "$libtorch.partial/stand-in.cpp" <<'CPP'
namespace at { namespace cuda {
void* getCurrentCUDABlasHandle() { return nullptr; }
int warp_size() { return 32; }
} }
CPP
  g++ -shared -fPIC -Wl,-soname,libtorch_cuda.so -o "$libtorch.partial/lib/libtorch_cuda.so" \
    "$libtorch.partial/stand-in.cpp"
  echo "$version" > "$libtorch.partial/VERSION"
  rm -rf "$libtorch"
  mv "$libtorch.partial" "$libtorch"
fi

# libtorch_cpu refers to CUDA's runtime and the other libraries the GPU machine has: the link
# leaves those to the loader there.
export LIBTORCH=$libtorch LIBTORCH_BYPASS_VERSION_CHECK=1 CARGO_TARGET_DIR=$target \
  RUSTFLAGS="-C link-arg=-Wl,--allow-shlib-undefined"
cargo build --release --features nn/tch "${binaries[@]/#/--bin=}"

# The fused kernels' tests too, for `make test-gpu` there (nn/tests/fused.rs on the GPU).
fused_tests=$(cargo test --release -p nn --features tch --test fused --no-run --message-format=json |
  python3 -c 'import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") \
            and message["target"]["name"] == "fused":
        print(message["executable"])')
[ -x "$fused_tests" ] || { echo "cargo test --no-run named no fused test binary" >&2; exit 1; }

staging=$(mktemp -d)
chmod 755 "$staging"
mkdir "$staging/tests"
for binary in "${binaries[@]}"; do
  strip -o "$staging/$binary" "$target/release/$binary"
done
strip -o "$staging/tests/fused" "$fused_tests"
echo "$version" > "$staging/TORCH_VERSION"
# The commit built, which tools/on-gpu.sh compares with the checkout it runs the Makefile from.
git describe --always --dirty 2>/dev/null > "$staging/BUILT_FROM" || echo unknown > "$staging/BUILT_FROM"
mkdir -p dist
tar -C "$staging" -cJf "$archive.partial" .
mv "$archive.partial" "$archive"
echo "wrote $archive: on the GPU machine, tools/on-gpu.sh $archive test-gpu bench-gpu profile-gpu"
