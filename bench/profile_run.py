"""Where a `tlops run` spends its time, per step: the import profile of each step's process and its timeline.

    .venv/bin/python bench/profile_run.py [--config configs/demo.yaml] [--set KEY=VALUE ...] [--top 12]

Runs `tlops run` once with ``PYTHONPROFILEIMPORTTIME=1`` (every step's process, a kfp.local subprocess, inherits
it and writes Python's ``-X importtime`` table to its stderr, which the run log keeps), then reads the run log:
per step, the seconds spent importing (the sum of the top-level imports' cumulative times) and, per top-level
package, the sum of its modules' own import times (so torch imported by timm counts as torch); and the step's
timeline from the ``step timing`` line each step logs at its end (process start to the step's body, the body,
the process's CPU time). Profiling imports adds a little to each import: read the shares, not the seconds.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORT = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")
TASK = re.compile(r"(Executing task|Task) '([\w-]+)'")
TIMING = re.compile(r"step timing: (.*)$")


def parse(log: str) -> dict[str, dict]:
    steps: dict[str, dict] = {}
    current = None
    for raw in log.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", raw)
        task = TASK.search(line)
        if task and task.group(1) == "Executing task":
            current = task.group(2)
            steps[current] = {"total": 0.0, "by_package": collections.Counter(), "timing": ""}
            continue
        if current is None:
            continue
        m = IMPORT.search(line)
        if m:
            own, cumulative, indent, name = int(m.group(1)), int(m.group(2)), len(m.group(3)), m.group(4)
            if indent == 1:  # top level: its cumulative time is what the process waited for it
                steps[current]["total"] += cumulative / 1e6
            steps[current]["by_package"][name.split(".")[0]] += own / 1e6
            continue
        t = TIMING.search(line)
        if t:
            steps[current]["timing"] = t.group(1)
    return steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs/demo.yaml"))
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--log", type=Path, help="parse this run log instead of running")
    args = parser.parse_args(argv)
    if args.log is None:
        env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
        cmd = [sys.executable, "-m", "tlops", "run", "--config", args.config]
        for s in args.sets:
            cmd += ["--set", s]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"tlops run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        print("\n".join(ln for ln in proc.stdout.splitlines() if ln.strip().startswith(("steps", "metrics"))))
        found = re.search(r"log\s+(\S+)", proc.stdout)
        if not found:
            raise SystemExit("no run log named in the summary")
        args.log = Path(found.group(1))
    for name, s in parse(args.log.read_text(encoding="utf-8", errors="replace")).items():
        top = ", ".join(f"{p} {t:.2f}" for p, t in s["by_package"].most_common(args.top))
        print(f"\n{name}: imports {s['total']:.2f} s; {s['timing'] or 'no step timing line'}\n  by package (s): {top}")


if __name__ == "__main__":
    main()
