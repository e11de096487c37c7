"""Manifest building: all cores against a single-threaded PIL loop, and re-validation from the cache.

    .venv/bin/python bench/bench_manifest.py [--images 2000] [--size 512] [--repeats 5]

Writes N smooth random JPEG photo-like images (10 classes) to a temporary directory, then, in each
repeat and side by side: a plain single-threaded loop (read, sha256, PIL open + full decode) over
them; ``build_manifest`` with no cache on all cores; ``_inspect`` serially on one thread (to tell
what the work saves from what the cores add); the first build with an empty cache; and a re-build of
the unchanged set. Prints each repeat and the medians of the per-repeat ratios. Not a test: figures
depend on the machine and its load (see bench/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tlops.data.discovery import _inspect, build_manifest


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


def serial_inspect(paths: list[Path]) -> None:
    for p in paths:
        _inspect(p)


def timed(fn, *args, **kw) -> float:  # noqa: ANN001, ANN002, ANN003
    t0 = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        paths = make_images(root, args.images, args.size)
        single_threaded_loop(paths)  # warm the page cache so every variant reads from memory
        print(f"{args.images} JPEG images {args.size}x{args.size}, {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.1f}")
        print("  repeat   PIL loop  all cores  speed-up  serial _inspect   cold cache  unchanged  re-build")
        for r in range(args.repeats):
            cache = Path(tmp) / f"cache{r}"
            loop = timed(single_threaded_loop, paths)
            parallel = timed(build_manifest, str(root), cache, use_cache=False)
            serial = timed(serial_inspect, paths)
            cold = timed(build_manifest, str(root), cache)
            warm = timed(build_manifest, str(root), cache)
            rows.append((loop, parallel, serial, cold, warm))
            print(f"  {r + 1:6d} {loop:8.2f}s {parallel:8.2f}s {loop / parallel:8.2f}x {serial:12.2f}s "
                  f"{cold:12.2f}s {warm:9.3f}s {cold / warm:8.1f}x")
    med = statistics.median
    print(f"median speed-up, all cores vs single-threaded PIL loop: {med(r[0] / r[1] for r in rows):.2f}x "
          f"(work saved, serial _inspect vs loop: {med(r[0] / r[2] for r in rows):.2f}x; "
          f"cores, serial _inspect vs all cores: {med(r[2] / r[1] for r in rows):.2f}x)")
    print(f"median re-build of the unchanged set vs the first run: {med(r[3] / r[4] for r in rows):.1f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
