"""Builds the benchmark photo sets from the real photographs shipped in scikit-image's wheel.

0.4 MP set: each photo resized to ~0.4 MP. 3 MP set: each photo upscaled to ~3.1 MP (the wheel
has no photo that large; upscaled photos carry less fine detail than camera originals, so both
sides decode them somewhat faster than real 3 MP photos). Both sides read the same files.
"""
import glob
import io
import pathlib
import subprocess
import sys
import zipfile

from PIL import Image

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png",
          "ihc.png", "hubble_deep_field.jpg", "retina.jpg", "rocket.jpg", "brick.png", "grass.png", "gravel.png"]


def main(cache: pathlib.Path) -> None:
    wheels = glob.glob(str(cache / "scikit_image-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "scikit-image==0.26.0", "-d", str(cache)], check=True)
        wheels = glob.glob(str(cache / "scikit_image-*.whl"))
    wheel = zipfile.ZipFile(wheels[0])
    for name, pixels in (("photos-0.4mp", 0.4e6), ("photos-3mp", 3.1e6)):
        out = cache / name
        out.mkdir(parents=True, exist_ok=True)
        for photo in PHOTOS:
            image = Image.open(io.BytesIO(wheel.read(f"skimage/data/{photo}"))).convert("RGB")
            scale = (pixels / (image.width * image.height)) ** 0.5
            size = (round(image.width * scale), round(image.height * scale))
            image.resize(size, Image.Resampling.LANCZOS).save(out / (photo.rsplit(".", 1)[0] + ".jpg"), quality=90)
    print(f"photo sets in {cache}")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
