"""``tlops select`` over three candidates on 500 images: wall time, cold feature cache then warm.

    .venv/bin/python -m bench.bench_select [--sample 500] [--candidates A,B,C]

Runs the command as a user does (a separate process, ``configs/demo.yaml``: 96 px) in a fresh work dir, so
the first run computes every candidate's features and the second reads them from the feature cache. The
default candidates are the ImageNet EfficientNet-Lite0 and its two controls (random initialisation, weights
shuffled across layers): torchvision weights cannot be downloaded on this machine. Not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import DEMO_DATA, machine

CANDIDATES = "efficientnet_lite0,efficientnet_lite0:random,efficientnet_lite0:shuffled"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=500)
    parser.add_argument("--candidates", default=CANDIDATES)
    args = parser.parse_args(argv)
    data = DEMO_DATA
    if not data.is_dir():
        from tlops.data.discovery import export_digits

        data = Path(tempfile.mkdtemp(prefix="tlops-bench-")) / "digits"
        export_digits(data)
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="tlops-bench-select-"))
    cmd = [sys.executable, "-m", "tlops", "select", "--data", str(data), "--candidates", args.candidates,
           "--sample", str(args.sample), "--config", "configs/demo.yaml", "--set", f"workdir={work}",
           "--set", "tracking.uri=", "--format", "json"]
    for label in ("cold cache", "warm cache"):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if done.returncode:
            print(done.stderr[-2000:])
            return done.returncode
        report = json.loads(done.stdout)
        print(f"\n{label}: {wall:.1f} s wall for the command ({report['seconds']:.1f} s inside), "
              f"{report['images']} images of {report['classes']} classes")
        for row in report["ranking"]:
            print(f"  {row['name']:<28} LogME {row['logme'] if row['logme'] is None else round(row['logme'], 4)!s:>8}"
                  f"  probe {row['probe_accuracy'] or 0:.3f}  {row['images_per_s'] or 0:6.0f} images/s"
                  f"  {row['latency_ms'] or 0:6.1f} ms/image  {row['size_mb'] or 0:.1f} MB  {row['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
