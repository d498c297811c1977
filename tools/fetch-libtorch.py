#!/usr/bin/env python3
"""Builds a CPU libtorch for the `tch` feature from PyPI wheels, without installing PyTorch.

burn-tch 0.22 links tch 0.22, which wants libtorch 2.9.0. libtorch's own download site is not
always reachable; PyPI is. The `torch` wheel carries libtorch, but its libtorch.so pulls in the
CUDA libraries (3.8 GB of wheels). For CPU we take only libtorch_cpu (renamed libtorch.so, so
torch_cuda is never linked) plus the two small CUDA runtime libraries libtorch_cpu still loads.
About 910 MB of downloads, 460 MB on disk.

Usage: fetch-libtorch.py DEST     (then LIBTORCH=DEST and LD_LIBRARY_PATH=DEST/lib)
"""

import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

TORCH = "2.9.0"
WHEELS = [f"torch=={TORCH}", "nvidia-cuda-runtime-cu12==12.8.90", "nvidia-cuda-cupti-cu12==12.8.90"]
# What libtorch_cpu needs at load time, and where each wheel keeps it.
LIBRARIES = {
    "torch/lib/libtorch_cpu.so": "libtorch_cpu.so",
    "torch/lib/libc10.so": "libc10.so",
    "torch/lib/libgomp.so.1": "libgomp.so.1",
    "nvidia/cuda_runtime/lib/libcudart.so.12": "libcudart.so.12",
    "nvidia/cuda_cupti/lib/libcupti.so.12": "libcupti.so.12",
}


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    dest = pathlib.Path(sys.argv[1]).resolve()
    stamp = dest / "VERSION"
    if stamp.is_file() and stamp.read_text().strip() == TORCH:
        print(f"libtorch {TORCH} already in {dest}")
        return 0
    # A LIBTORCH this script did not make (a CUDA libtorch, a PyTorch install's torch/) is the
    # user's: used as it is, never replaced.
    if not stamp.is_file() and dest.is_dir() and any(dest.iterdir()):
        if (dest / "lib" / "libtorch_cpu.so").is_file():
            print(f"using the libtorch in {dest} as it is (not one this script fetched)")
            return 0
        print(f"{dest} holds files but no libtorch (no lib/libtorch_cpu.so), and this script "
              "did not put them there: not replacing them. Point LIBTORCH at a libtorch or at "
              "a new directory.", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        wheels = pathlib.Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64",
             "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
             "--python-version", "3.11", "--dest", str(wheels), *WHEELS],
            check=True,
        )
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "lib").mkdir(parents=True)
        found = set()
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as archive:
                for name in archive.namelist():
                    if name.startswith("torch/include/") and not name.endswith("/"):
                        target = staging / "include" / name.removeprefix("torch/include/")
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with archive.open(name) as src, open(target, "wb") as out:
                            shutil.copyfileobj(src, out)
                    elif name in LIBRARIES:
                        with archive.open(name) as src, open(staging / "lib" / LIBRARIES[name], "wb") as out:
                            shutil.copyfileobj(src, out)
                        found.add(name)
        missing = sorted(set(LIBRARIES) - found)
        if missing:
            print(f"the wheels lack {missing}", file=sys.stderr)
            return 1
        (staging / "lib" / "libtorch.so").symlink_to("libtorch_cpu.so")
        (staging / "VERSION").write_text(TORCH + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    print(f"libtorch {TORCH} (CPU) in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
