"""Pillow doing ingest's per-image work on one core: decode -> EXIF transpose -> centre crop ->
resize (Lanczos) -> JPEG q95. Prints one JSON line: images per second.

--draft uses Pillow's decode-time JPEG downscaling (the fastest Pillow path).
"""
import argparse
import io
import json
import pathlib
import time

from PIL import Image, ImageOps


def process(data: bytes, size: int, draft: bool) -> bytes:
    image = Image.open(io.BytesIO(data))
    if draft:
        image.draft("RGB", (size, size))
    image = ImageOps.exif_transpose(image).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("photos")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--draft", action="store_true")
    args = parser.parse_args()
    files = [p.read_bytes() for p in sorted(pathlib.Path(args.photos).glob("*.jpg"))]
    done, start = 0, time.process_time()
    while time.process_time() - start < args.seconds:
        for data in files:
            process(data, args.size, args.draft)
        done += len(files)
    elapsed = time.process_time() - start
    print(json.dumps({"images": done, "cpu_seconds": elapsed, "images_per_second": done / elapsed}))


if __name__ == "__main__":
    main()
