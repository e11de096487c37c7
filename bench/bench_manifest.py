"""Manifest building: all cores against a single-threaded PIL loop, and re-validation from the cache.

    .venv/bin/python bench/bench_manifest.py [--images 2000] [--size 256]

Writes N smooth random JPEG photos-like images (10 classes) to a temporary directory, then times, in
one run: a plain single-threaded loop (read, sha256, PIL open + load) over them; ``build_manifest``
with no cache on all cores; the first cached build; and a re-build of the unchanged set. Prints the
ratios. Not a test: figures depend on the machine (see bench/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tlops.data import build_manifest


def make_images(root: Path, n: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        img = small.resize((size, size), Image.Resampling.BICUBIC)
        path = root / f"class{i % 10}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def single_threaded_loop(paths: list[Path]) -> None:
    for p in paths:
        data = p.read_bytes()
        hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as img:
            img.load()


def timed(fn, *args, **kw) -> float:  # noqa: ANN001, ANN002, ANN003
    t0 = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "data", Path(tmp) / "cache"
        paths = make_images(root, args.images, args.size)
        single_threaded_loop(paths)  # warm the page cache so both sides read from memory
        loop = timed(single_threaded_loop, paths)
        parallel = timed(build_manifest, str(root), cache, use_cache=False)
        cold = timed(build_manifest, str(root), cache)
        warm = timed(build_manifest, str(root), cache)
    print(f"{args.images} JPEG images {args.size}x{args.size}, {os.cpu_count()} cores")
    print(f"  single-threaded PIL loop (read, sha256, decode)      {loop:7.2f} s")
    print(f"  build_manifest, all cores, no cache (+ dHash, EXIF)  {parallel:7.2f} s   "
          f"speed-up {loop / parallel:.2f}x")
    print(f"  build_manifest, first run with the cache            {cold:7.2f} s")
    print(f"  build_manifest, unchanged set, from the cache       {warm:7.2f} s   "
          f"{cold / warm:.1f}x faster than the first run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
