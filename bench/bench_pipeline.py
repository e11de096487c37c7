"""The demo pipeline cold and warm against its floor, side by side in one run.

    .venv/bin/python bench/bench_pipeline.py [--warm 2] [--slow 1] [--data DIR]

In one fresh work directory: a cold ``tlops run`` (no cache, no champion), then ``--warm`` warm runs (the
manifest and the features from the cache, a champion to compare with), then ``--slow`` warm runs with the fast
paths off (``evaluation.feature_cache=false``, ``TLOPS_FULL_EXIT=1``: every test image through the pyfunc, the
full interpreter teardown per step). The floor is measured in the same run, before and after, in a fresh process:
the imports a run needs (torch, timm, MLflow, pandas, kfp), loading Lite0 with its ImageNet weights, and one
feature pass over every image at the demo's 96 px. Prints the per-step seconds of each run (from the run's
summary) and the ratios to the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("validate", "parity", "fine-tune", "evaluate", "gate")

FLOOR = r"""
import json, sys, time
t0 = time.perf_counter()
import kfp, mlflow, pandas, timm, torch
t1 = time.perf_counter()
from tlops.vision.backbones import feature_extractor, reference_spec
from tlops.data.discovery import build_manifest
from tlops.vision.features import extract_features
from tlops.vision.preprocessing import with_resolution
backbone = feature_extractor("efficientnet_lite0", pretrained=True)
t2 = time.perf_counter()
manifest = build_manifest(sys.argv[1], sys.argv[2])
spec = with_resolution(reference_spec("efficientnet_lite0"), 96)
t3 = time.perf_counter()
extract_features(backbone, list(manifest["path"]), spec, 64, torch.device("cpu"))
t4 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "load": t2 - t1, "pass": t4 - t3, "images": len(manifest)}))
"""


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), out.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out.setdefault("GX_ANALYTICS_ENABLED", "false")
    out.update(extra or {})
    return out


def floor(data: Path, work: Path) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", FLOOR, str(data), str(work / "floor-manifest")], env=env(),
                          capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tlops_run(data: Path, work: Path, sets: list[str], extra_env: dict[str, str] | None = None) -> dict:
    args = [sys.executable, "-m", "tlops", "run", "--config", str(REPO / "configs/demo.yaml"), "--data", str(data),
            "--set", f"workdir={work}"]
    for s in sets:
        args += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env(extra_env), capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"tlops run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = next((ln for ln in proc.stdout.splitlines() if ln.strip().startswith("steps ")), "")
    steps = {m.group(1): float(m.group(2)) for m in re.finditer(r"([\w-]+) (\d+(?:\.\d+)?)s", line)}
    log = re.search(r"log\s+(\S+)", proc.stdout)
    if log:  # tenths of a second, from the run log's step events
        steps.update(step_seconds(Path(log.group(1))) or {})
    return {"wall": wall, "steps": steps}


def step_seconds(log: Path) -> dict[str, float]:
    """Each step's wall time from kfp.local's 'Executing task' / 'finished with status' lines."""
    started: dict[str, float] = {}
    out: dict[str, float] = {}
    stamp = re.compile(r"^(\d\d):(\d\d):(\d\d\.\d+) - INFO - (Executing task|Task) \W*'?(?:\x1b\[\d+m)?'?([\w-]+)")
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        plain = re.sub(r"\x1b\[[0-9;]*m", "", line)
        m = stamp.match(plain.replace("'", ""))
        if not m:
            continue
        t = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
        if m.group(4) == "Executing task":
            started[m.group(5)] = t
        elif "finished with status" in plain and m.group(5) in started:
            out[m.group(5)] = round((t - started.pop(m.group(5))) % 86400, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / ".tlops/data/digits")
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--slow", type=int, default=1)
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        subprocess.run([sys.executable, "-m", "tlops", "demo-data", str(args.data)], env=env(), check=True)
    work = Path(tempfile.mkdtemp(prefix="tlops-bench-pipeline-"))
    print(f"work directory {work}; load average {os.getloadavg()[0]:.1f} at start", flush=True)
    floors = [floor(args.data, work)]
    print(f"floor: {floors[0]}", flush=True)
    runs: dict[str, list[dict]] = {"cold": [tlops_run(args.data, work / "w", [])]}
    print(f"cold: {runs['cold'][0]}", flush=True)
    runs["warm"] = []
    for _ in range(args.warm):
        runs["warm"].append(tlops_run(args.data, work / "w", []))
        print(f"warm: {runs['warm'][-1]}", flush=True)
    runs["warm, fast paths off"] = []
    for _ in range(args.slow):
        runs["warm, fast paths off"].append(tlops_run(args.data, work / "w", ["evaluation.feature_cache=false"],
                                                      {"TLOPS_FULL_EXIT": "1"}))
        print(f"warm, fast paths off: {runs['warm, fast paths off'][-1]}", flush=True)
    floors.append(floor(args.data, work))
    print(f"floor: {floors[1]}; load average {os.getloadavg()[0]:.1f} at the end", flush=True)

    f = {k: statistics.median(x[k] for x in floors) for k in ("imports", "load", "pass")}
    floor_cold = f["imports"] + f["load"] + f["pass"]
    floor_warm = f["imports"] + f["load"]
    print(f"\nfloor (median of {len(floors)}): imports {f['imports']:.1f} s, Lite0 load {f['load']:.1f} s, "
          f"one pass over {floors[0]['images']} images {f['pass']:.1f} s; imports + load + pass = {floor_cold:.1f} s, "
          f"imports + load = {floor_warm:.1f} s")
    kinds = [k for k in runs if runs[k]]
    print("\n| step | " + " | ".join(f"{k} (median of {len(runs[k])})" for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for s in STEPS:
        cells = [statistics.median(r["steps"].get(s, float("nan")) for r in runs[k]) for k in kinds]
        print(f"| {s} | " + " | ".join(f"{c:.1f} s" for c in cells) + " |")
    walls = {k: statistics.median(r["wall"] for r in runs[k]) for k in kinds}
    print("| **whole `tlops run`** | " + " | ".join(f"**{walls[k]:.1f} s**" for k in kinds) + " |")
    print("| ÷ (imports + load + pass) | " + " | ".join(f"{walls[k] / floor_cold:.2f}×" for k in kinds) + " |")
    print("| ÷ (imports + load) | " + " | ".join(f"{walls[k] / floor_warm:.2f}×" for k in kinds) + " |")


if __name__ == "__main__":
    main()
