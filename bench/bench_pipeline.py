"""The demo pipeline cold and warm against its floor, side by side in one run.

    .venv/bin/python bench/bench_pipeline.py [--rounds 3] [--data DIR]

In one fresh work directory: a cold ``tlops run`` (no cache, no champion), then ``--rounds`` rounds of two warm
runs side by side (the manifest and the features from the cache, a champion to compare with), one with the fast
paths and one without (``evaluation.feature_cache=false``: every test image and the monitoring reference's
images through the pyfunc; ``TLOPS_FULL_EXIT=1``: the full interpreter teardown per step;
``TLOPS_STEP_SERVER=0``: every step's process imports what it needs itself; ``TLOPS_ASIDE=0``: the figures drawn
in the step's own process), the order alternating. Each run's
wall time and CPU time (user + system of its whole process tree) are printed.
The floor is measured in the same run, before and after, in a fresh process:
the imports of every library the steps use (kfp, MLflow with its SQL store, pandas, Great Expectations, torch,
timm, scikit-learn, matplotlib; the time of the first five alone is printed too), loading Lite0 with its ImageNet
weights, and one plain feature pass over every image at the demo's 96 px (the backbone as built, under
``torch.no_grad``, batches of 64; tlops' own pass, its inference copy, is timed after it and printed beside it, not
counted in the floor). A cold run is held against imports + load + pass, a warm one (features from the cache)
against imports + load; both also against a stricter floor whose imports are timed with the garbage collector off,
as the step servers import. Prints the per-step seconds of each run (from
the run's summary) and the ratios to the floor. ``--cold-rounds N`` makes N cold runs (fresh work directories),
with ``--before`` side by side with the earlier code's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("validate", "parity", "fine-tune", "evaluate", "compress", "gate")

FLOOR = r"""
import json, sys, time
t0 = time.perf_counter()
import kfp, mlflow, pandas, timm, torch
t_core = time.perf_counter()
import great_expectations, matplotlib.figure, mlflow.store.tracking.sqlalchemy_store, sklearn.linear_model
t1 = time.perf_counter()
from tlops.vision.backbones import feature_extractor, reference_spec
from tlops.data.discovery import build_manifest
from tlops.vision.features import extract_features
from tlops.vision.preprocessing import build_transform, with_resolution
backbone = feature_extractor("efficientnet_lite0", pretrained=True).eval()
t2 = time.perf_counter()
manifest = build_manifest(sys.argv[1], sys.argv[2])
spec = with_resolution(reference_spec("efficientnet_lite0"), 96)
paths, transform = list(manifest["path"]), build_transform(spec)
t3 = time.perf_counter()
with torch.no_grad():  # the plain pass: the backbone as built, batches of 64, decoded as the pipeline decodes
    for start in range(0, len(paths), 64):
        backbone(torch.stack([transform(p) for p in paths[start : start + 64]]))
t4 = time.perf_counter()
extract_features(backbone, paths, spec, 64, torch.device("cpu"))  # tlops' own pass (the inference copy)
t5 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "imports_core": t_core - t0, "load": t2 - t1, "pass": t4 - t3,
                  "pass_tlops": t5 - t4, "images": len(manifest)}))
"""


# The floor's imports again, in a fresh process with the garbage collector off, as the step servers import (they
# collect nothing while they import): a stricter floor, printed beside the plain one.
FLOOR_IMPORTS_NO_GC = ("import gc, json, time\ngc.disable()\nt0 = time.perf_counter()\n"
                       + FLOOR[FLOOR.index("import kfp"):FLOOR.index("backbone = ")]  # the same imports as FLOOR's
                       + 'print(json.dumps({"imports_no_gc": t1 - t0}))\n')  # to t1, as FLOOR's "imports"


def env(extra: dict[str, str] | None = None, code: Path = REPO) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out["PYTHONPATH"] = os.pathsep.join([str(code / "src"), str(code), out.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out.setdefault("GX_ANALYTICS_ENABLED", "false")
    out.update(extra or {})
    return out


def floor(data: Path, work: Path) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", FLOOR, str(data), str(work / "floor-manifest")], env=env(),
                          capture_output=True, text=True, check=True, cwd=REPO)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    proc = subprocess.run([sys.executable, "-c", FLOOR_IMPORTS_NO_GC], env=env(), capture_output=True, text=True,
                          check=True, cwd=REPO)
    return {**out, **json.loads(proc.stdout.strip().splitlines()[-1])}


def tlops_run(data: Path, work: Path, sets: list[str], extra_env: dict[str, str] | None = None,
              code: Path = REPO) -> dict:
    """One ``tlops run`` of the tlops in ``code`` (a checkout): wall seconds, CPU seconds (user + system of the
    whole process tree: the launcher, the step server, every step), the per-step seconds and the headline
    metrics."""
    args = [sys.executable, "-m", "tlops", "run", "--config", str(REPO / "configs/demo.yaml"), "--data", str(data),
            "--set", f"workdir={work}"]
    for s in sets:
        args += ["--set", s]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env(extra_env, code), capture_output=True, text=True, cwd=code)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"tlops run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = next((ln for ln in proc.stdout.splitlines() if ln.strip().startswith("steps ")), "")
    steps = {m.group(1): float(m.group(2)) for m in re.finditer(r"([\w-]+) (\d+(?:\.\d+)?)s", line)}
    log = re.search(r"log\s+(\S+)", proc.stdout)
    if log:  # tenths of a second, from the run log's step events
        steps.update(step_seconds(Path(log.group(1))) or {})
    metrics = re.search(r"test accuracy ([\d.]+), macro-F1 ([\d.]+)", proc.stdout)
    decision = re.search(r"gate\s+(\w+)", proc.stdout)
    return {"wall": wall, "cpu": cpu, "steps": steps, "load": os.getloadavg()[0],
            "result": (metrics.groups() if metrics else None, decision.group(1) if decision else None)}


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
    parser.add_argument("--before", type=Path, help="a checkout of earlier tlops code (e.g. `git archive COMMIT | "
                        "tar -x -C DIR`): the warm runs side by side are this code's against that code's, each with "
                        "its defaults, instead of the fast paths on against off")
    parser.add_argument("--no-floor", action="store_true", help="do not measure the floor")
    parser.add_argument("--no-cold", action="store_true", help="warm the work directory with an untimed first run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of one warm run with, one without the fast "
                        "paths")
    parser.add_argument("--cold-rounds", type=int, default=1, help="cold runs, each in a fresh work directory; "
                        "with --before, that many rounds of a cold run of each code side by side")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        subprocess.run([sys.executable, "-m", "tlops", "demo-data", str(args.data)], env=env(), check=True)
    work = Path(tempfile.mkdtemp(prefix="tlops-bench-pipeline-"))
    print(f"work directory {work}; load average {os.getloadavg()[0]:.1f} at start", flush=True)
    floors = [] if args.no_floor else [floor(args.data, work)]
    if floors:
        print(f"floor: {floors[0]}", flush=True)
    runs: dict[str, list[dict]] = {"cold": [tlops_run(args.data, work / "w", [])]}
    print(f"cold: {runs['cold'][0]}", flush=True)
    if args.no_cold:
        runs["cold"] = []
    cold_before = f"cold, the code of {args.before}"
    if args.before:
        runs[cold_before] = []
    for i in range(1, args.cold_rounds):  # more cold runs (and the earlier code's beside them), order alternating
        kinds = ["cold", cold_before] if args.before else ["cold"]
        for kind in kinds if i % 2 else kinds[::-1]:
            got = tlops_run(args.data, work / f"cold-{i}-{len(runs[kind])}-{kind == 'cold'}", [],
                            code=REPO if kind == "cold" else args.before)
            runs[kind].append(got)
            print(f"{kind}: {got}", flush=True)
    # Side by side: in each round a warm run with the fast paths and one without (the order alternating).
    fast = "warm"
    slow = f"warm, the code of {args.before}" if args.before else "warm, fast paths off"
    runs[fast], runs[slow] = [], []
    off_sets, off_env = ["evaluation.feature_cache=false"], {"TLOPS_FULL_EXIT": "1", "TLOPS_STEP_SERVER": "0",
                                                      "TLOPS_ASIDE": "0"}
    if args.before:  # the earlier code as it was, with its defaults
        off_sets, off_env = [], {}
    for i in range(args.rounds):
        for kind in ((fast, slow) if i % 2 == 0 else (slow, fast)):
            got = tlops_run(args.data, work / "w", off_sets if kind == slow else [], off_env if kind == slow else None,
                            args.before if (kind == slow and args.before) else REPO)
            runs[kind].append(got)
            print(f"{kind}: {got}", flush=True)
    if floors:
        floors.append(floor(args.data, work))
        print(f"floor: {floors[1]}; load average {os.getloadavg()[0]:.1f} at the end", flush=True)
        f = {k: statistics.median(x[k] for x in floors)
             for k in ("imports", "imports_core", "imports_no_gc", "load", "pass", "pass_tlops")}
        floor_cold = f["imports"] + f["load"] + f["pass"]
        floor_warm = f["imports"] + f["load"]
        strict_cold, strict_warm = (f["imports_no_gc"] + f["load"] + f["pass"], f["imports_no_gc"] + f["load"])
        print(f"\nfloor (median of {len(floors)}): imports {f['imports']:.1f} s (every library the steps use; "
              f"kfp, MLflow, pandas, timm and torch alone {f['imports_core']:.1f} s), Lite0 load {f['load']:.1f} s, "
              f"one plain pass over {floors[0]['images']} images {f['pass']:.1f} s (tlops' own pass "
              f"{f['pass_tlops']:.1f} s, not counted); imports + load + pass = "
              f"{floor_cold:.1f} s, imports + load = {floor_warm:.1f} s; the imports with the garbage collector off "
              f"(as the step servers import) {f['imports_no_gc']:.1f} s: {strict_cold:.1f} s and {strict_warm:.1f} s")
    kinds = [k for k in runs if runs[k]]
    print("\n| step | " + " | ".join(f"{k} (median of {len(runs[k])})" for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for s in STEPS:
        cells = [statistics.median(r["steps"].get(s, float("nan")) for r in runs[k]) for k in kinds]
        print(f"| {s} | " + " | ".join(f"{c:.1f} s" for c in cells) + " |")
    walls = {k: statistics.median(r["wall"] for r in runs[k]) for k in kinds}
    print("| **whole `tlops run`** | " + " | ".join(f"**{walls[k]:.1f} s**" for k in kinds) + " |")
    cpus = {k: statistics.median(r["cpu"] for r in runs[k]) for k in kinds}
    print("| CPU (user + sys, process tree) | " + " | ".join(f"{cpus[k]:.1f} s" for k in kinds) + " |")
    print("| load average at the end of the runs | " + " | ".join(
        ", ".join(f"{r['load']:.1f}" for r in runs[k]) for k in kinds) + " |")
    if floors:
        print("| ÷ (imports + load + pass) | " + " | ".join(f"{walls[k] / floor_cold:.2f}×" for k in kinds) + " |")
        print("| ÷ (imports + load) | " + " | ".join(f"{walls[k] / floor_warm:.2f}×" for k in kinds) + " |")
        print("| ÷ the same, imports with the garbage collector off | " + " | ".join(
            f"{walls[k] / strict_cold:.2f}× / {walls[k] / strict_warm:.2f}×" for k in kinds) + " |")
    if runs.get(cold_before) and len(runs["cold"]) > 1:
        pairs = list(zip(runs["cold"][1:], runs[cold_before], strict=False))
        print(f"\n{cold_before} against this code's cold runs, medians of the per-round ratios: wall "
              f"{statistics.median(b['wall'] / a['wall'] for a, b in pairs):.2f}x, CPU "
              f"{statistics.median(b['cpu'] / a['cpu'] for a, b in pairs):.2f}x")
    if runs[fast] and runs[slow]:
        wall_ratio = statistics.median(s_["wall"] / f_["wall"] for f_, s_ in zip(runs[fast], runs[slow], strict=False))
        cpu_ratio = statistics.median(s_["cpu"] / f_["cpu"] for f_, s_ in zip(runs[fast], runs[slow], strict=False))
        print(f"\n{slow} against {fast}, medians of the per-round ratios: wall {wall_ratio:.2f}x, "
              f"CPU {cpu_ratio:.2f}x")
    print("results (accuracy, macro-F1), gate: " + "; ".join(f"{k}: {sorted({str(r['result']) for r in runs[k]})}"
                                                            for k in kinds))


if __name__ == "__main__":
    main()
