"""Each step's start-up in a container of the project image, as ``tlops run --image`` and a cluster start it: from
``podman run`` to the step's first line of work, images side by side.

Every step is the command kfp compiles for it (``pipelines.transfer_learning.compile_pipeline``): ``sh -ec`` writes
the component's source to ``ephemeral_component.py`` in a fresh temporary directory and runs
``_KFP_RUNTIME=true python3 -m kfp.dsl.executor_main``. Here the last part is a driver that does what the executor
does up to the step's work, timing each part, and stops there (the step itself would need the stores and its
inputs):

  engine   ``podman run`` to the Python process's start (container set-up; the process's start from /proc)
  kfp      the interpreter and kfp's executor imported (``kfp.dsl.executor_main``), the component module loaded
           with kfp's own loader, as the executor loads it
  steps    the component body's import (``from tlops.steps import validate_step``)
  head     the imports at the head of the step function in ``tlops.steps`` (``import mlflow``, ``tlops.*``), the
           image's own ``tlops/steps.py`` parsed: what the step loads before its first line of work
  total    ``podman run`` to the end of the head: the step's start-up in a container

The container runs as the runner starts it (``pipelines/local.py``): read-only root, uid 10001, a tmpfs on /tmp,
here without a network (nothing is reached before the first line of work). Rounds interleave the images and the
steps; medians of ``--rounds``. ``--profile`` adds one run per step and image under ``-X importtime`` and prints
where the head's import time goes (self time summed by top-level package; that run is slower and not in the
medians).

``--pipeline N`` then runs the whole pipeline N times per image, interleaved: ``tlops run --image`` (kfp's DockerRunner
on a podman API socket of its own) on tiny digits (3 classes x 30) in S3, against the stores in containers
(infra/containers/stores.py, instance ``bench``; the container tests' config), and reads each step's own log line
``step timing: start-up S, body B``: S is the process's start to the step's entry (kfp's executor and
``tlops.steps``; the head's imports are in B). Slow (a minute or two a run on two cores) and noisy: B is mostly
the step's work.

    python bench/bench_container_startup.py [--image localhost/tlops:0.1.0 --image localhost/tlops:new]
        [--rounds 3] [--steps validate,gate] [--profile] [--pipeline 3]
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
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("validate", "parity", "fine_tune", "evaluate", "compress", "gate")
PHASES = ("engine", "kfp", "steps", "head", "total")
WATCHED = ("mlflow", "torch", "timm", "torchvision", "kubernetes", "great_expectations", "matplotlib", "onnxruntime",
           "sklearn", "mlflow.genai")
EXECUTOR = "python3 -m kfp.dsl.executor_main"

# Runs in the container in place of kfp's executor, with its arguments (--component_module_path, --function_to_execute).
DRIVER = r'''
import ast, json, os, sys, time
t_start = time.time()
with open("/proc/self/stat", "rb") as fh:
    ticks = int(fh.read().rsplit(b")", 1)[1].split()[19])
with open("/proc/uptime", "rb") as fh:
    uptime = float(fh.read().split()[0])
t_process = t_start - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
module_path = sys.argv[sys.argv.index("--component_module_path") + 1]
function = sys.argv[sys.argv.index("--function_to_execute") + 1]

def head_imports(source, name):
    fn = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == name)
    body = fn.body[1:] if fn.body and isinstance(fn.body[0], ast.Expr) else fn.body  # the docstring
    nodes = []
    for node in body:
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            break
        nodes.append(node)
    return compile(ast.Module(nodes, []), f"<head of {name}>", "exec")

import kfp.dsl.executor_main  # noqa: F401  (what `python -m kfp.dsl.executor_main` imports)
from kfp.dsl import utils
component = utils.load_module(module_name=os.path.basename(module_path)[:-3],
                              module_directory=os.path.dirname(module_path))
t_kfp = time.time()
with open(module_path) as fh:
    exec(head_imports(fh.read(), function), {})
t_steps = time.time()
with open(sys.modules["tlops.steps"].__file__) as fh:
    exec(head_imports(fh.read(), function + "_step"), {})
t_head = time.time()
print("BENCH " + json.dumps({"process": t_process, "kfp": t_kfp, "steps": t_steps, "head": t_head,
                             "modules": len(sys.modules), "loaded": [m for m in WATCHED if m in sys.modules]}))
sys.stdout.flush()
os._exit(0)  # as a step that succeeded ends (tlops.steps._exit_quickly_once_done)
'''.replace("WATCHED", repr(WATCHED))


def with_driver(command: list[str], args: list[str], driver: str = "/bench/driver.py") -> list[str]:
    """A step's container command and args (as compiled), kfp's executor swapped for the driver at ``driver``."""
    command = list(command)
    script = next(i for i, part in enumerate(command) if EXECUTOR in part)
    command[script] = command[script].replace(EXECUTOR, f"python3 {driver}")
    return command + [a for a in args if a not in ("--executor_input", "{{$}}")]


def step_commands(yaml_path: Path) -> dict[str, list[str]]:
    """Each step's container command from the compiled pipeline, with the driver."""
    import yaml

    executors = yaml.safe_load(yaml_path.read_text())["deploymentSpec"]["executors"]
    return {step: with_driver(executors[f"exec-{step.replace('_', '-')}"]["container"]["command"],
                              executors[f"exec-{step.replace('_', '-')}"]["container"]["args"]) for step in STEPS}


def run_once(image: str, command: list[str], bench_dir: Path, profile: bool = False) -> dict:
    args = ["podman", "run", "--rm", "--pull=never", "--read-only", "--user", "10001:10001", "--network", "none",
            "--tmpfs", "/tmp:rw,size=4g", "-v", f"{bench_dir}:/bench:ro", "-e", "_KFP_RUNTIME=true"]
    if profile:
        args += ["-e", "PYTHONPROFILEIMPORTTIME=1"]
    args += ["--entrypoint", command[0], image, *command[1:]]
    started = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    ended = time.time()
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{image}: {' '.join(command[:2])}... failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    marks = json.loads(line[len("BENCH "):])
    out = {"engine": marks["process"] - started, "kfp": marks["kfp"] - marks["process"],
           "steps": marks["steps"] - marks["kfp"], "head": marks["head"] - marks["steps"],
           "total": marks["head"] - started, "wall": ended - started, "modules": marks["modules"],
           "loaded": marks["loaded"]}
    if profile:
        out["profile"] = import_profile(proc.stderr)
    return out


def import_profile(stderr: str, top: int = 8) -> list[tuple[str, float]]:
    """Self time of every import, summed by top-level package (``mlflow.genai`` kept apart from ``mlflow``)."""
    totals: Counter[str] = Counter()
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            parts = m.group(2).split(".")
            key = ".".join(parts[:2]) if parts[:2] == ["mlflow", "genai"] else parts[0]
            totals[key] += int(m.group(1))
    return [(name, us / 1e6) for name, us in totals.most_common(top)]


def bytecode_missing(image: str) -> str:
    """How many source modules of the interpreter's standard library and of site-packages lack bytecode."""
    code = ("import sys, sysconfig, pathlib, importlib.util as u\n"
            "for key in ('stdlib', 'purelib'):\n"
            "    root = pathlib.Path(sysconfig.get_path(key)); files = [p for p in root.rglob('*.py')]\n"
            "    missing = sum(not pathlib.Path(u.cache_from_source(str(p))).exists() for p in files)\n"
            "    print(f'{key} {missing}/{len(files)}', end='; ')")
    proc = subprocess.run(["podman", "run", "--rm", "--pull=never", "--network", "none", "--read-only", image,
                           "python3", "-c", code], capture_output=True, text=True, timeout=600)
    return proc.stdout.strip() or proc.stderr.strip()[-300:]


def pipeline_rounds(images: list[str], rounds: int) -> dict[str, list[dict]]:
    """``rounds`` whole runs per image in containers; per image, each run's {step: (start-up, body)}, wall, load."""
    sys.path.insert(0, str(REPO))
    import boto3

    from tests.conftest import write_config
    from tests.containers.conftest import load_stores_module
    from tests.containers.test_pipeline import TRAIN, container_args
    from tlops.data.discovery import export_digits

    stores_module = load_stores_module()
    out: dict[str, list[dict]] = {image: [] for image in images}
    with tempfile.TemporaryDirectory(prefix="tlops-bench-pipeline-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        sock = work / "podman.sock"
        service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        state = work / "stores"
        try:
            stores = stores_module.up(image=images[-1], state_dir=state, timeout=600, instance="bench")
            export_digits(work / "digits", classes=[0, 1, 7], per_class=30)
            s3 = boto3.client("s3", endpoint_url=stores.s3_endpoint, aws_access_key_id=stores.aws_access_key_id,
                              aws_secret_access_key=stores.aws_secret_access_key, region_name="us-east-1")
            if stores.data_bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
                s3.create_bucket(Bucket=stores.data_bucket)
            for path in sorted((work / "digits").rglob("*.png")):
                s3.upload_file(str(path), stores.data_bucket, f"bench/{path.relative_to(work / 'digits').as_posix()}")
            data = f"s3://{stores.data_bucket}/bench"
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
            env.update({**stores.host_env(), "DOCKER_HOST": f"unix://{sock}"})
            for i, image in enumerate(images * rounds):
                root = work / f"run{i}"
                root.mkdir()
                cfg = write_config(root / "config.yaml", root / ".tlops", registry__model_name=f"bench-start-{i}",
                                   state_uri=f"{data}-state/{i}", **TRAIN)
                started = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "tlops", "run", "--config", str(cfg), "--data", data,
                                       *container_args(stores, image)], cwd=root, env=env, capture_output=True,
                                      text=True, timeout=1800)
                wall = time.perf_counter() - started
                if proc.returncode != 0:
                    raise SystemExit(f"tlops run --image {image} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
                text = "\n".join(p.read_text() for p in sorted((root / ".tlops" / "logs").glob("*.log")))
                steps = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in re.finditer(
                    r"([\w-]+): step timing: start-up ([\d.]+) s, body ([\d.]+) s", text)}
                out[image].append({"steps": steps, "wall": wall, "load": os.getloadavg()[0]})
                print(f"pipeline run {i + 1}: {image} {wall:.1f} s, load {os.getloadavg()[0]:.1f}: "
                      + ", ".join(f"{n} {a:.2f}+{b:.2f}" for n, (a, b) in steps.items()), flush=True)
        finally:
            stores_module.down(state, volumes=True)
            service.terminate()
            service.wait(timeout=30)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", action="append", help="an image (repeat for side by side); default "
                        "localhost/tlops:0.1.0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--profile", action="store_true", help="one more run per step under -X importtime")
    parser.add_argument("--pipeline", type=int, default=0, metavar="N",
                        help="also N whole `tlops run --image` per image against the stores in containers")
    args = parser.parse_args()
    images = args.image or ["localhost/tlops:0.1.0"]
    steps = [s.strip().replace("-", "_") for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"--steps: no step {', '.join(unknown)} (steps: {', '.join(STEPS)})")

    sys.path.insert(0, str(REPO))
    from pipelines.transfer_learning import compile_pipeline

    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores")
    for image in images:
        print(f"{image}: source modules without bytecode: {bytecode_missing(image)}")
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="tlops-bench-start-") as tmp:
        bench_dir = Path(tmp)
        bench_dir.chmod(0o755)
        (bench_dir / "driver.py").write_text(DRIVER)
        (bench_dir / "driver.py").chmod(0o644)
        yaml_path = bench_dir / "pipeline.yaml"
        compile_pipeline(str(yaml_path))
        commands = step_commands(yaml_path)
        for image in images:  # a first start of each image (page cache, overlay set-up), not counted
            run_once(image, commands[steps[0]], bench_dir)
        for r in range(args.rounds):
            order = images if r % 2 == 0 else list(reversed(images))
            for step in steps:
                for image in order:
                    results.setdefault((step, image), []).append(run_once(image, commands[step], bench_dir))
        profiles = {}
        if args.profile:
            for step in steps:
                for image in images:
                    profiles[(step, image)] = run_once(image, commands[step], bench_dir, profile=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    print(f"\nstart-up per step, medians of {args.rounds} rounds (seconds; total = podman run to the step's first "
          "line of work)")
    print(f"{'step':10s} {'image':28s} " + " ".join(f"{p:>7s}" for p in PHASES) + "   rounds (total)   modules")
    for step in steps:
        for image in images:
            runs = results[(step, image)]
            med = {p: statistics.median(r[p] for r in runs) for p in PHASES}
            print(f"{step:10s} {image:28s} " + " ".join(f"{med[p]:7.2f}" for p in PHASES)
                  + "   " + " ".join(f"{r['total']:.2f}" for r in runs) + f"   {runs[0]['modules']}"
                  + (f"  loads {','.join(runs[0]['loaded'])}" if runs[0]["loaded"] else ""))
        if len(images) > 1:
            base = statistics.median(r["total"] for r in results[(step, images[0])])
            others = ", ".join(f"{statistics.median(r['total'] for r in results[(step, im)]) / base:.2f}"
                               for im in images[1:])
            print(f"{'':10s} ratio total {images[1:]} / {images[0]}: {others}")
    for (step, image), run in profiles.items():
        spent = run["kfp"] + run["steps"] + run["head"]
        print(f"\n{step} in {image} under -X importtime: kfp+steps+head {spent:.2f} s; self time by package: "
              + ", ".join(f"{name} {s:.2f}" for name, s in run["profile"]))
    if args.pipeline:
        print(f"\nwhole runs in containers, {args.pipeline} per image: each step's logged start-up (process start to "
              "the step's entry), medians; a step whose line the run log lacks is left out of its median")
        runs = pipeline_rounds(images, args.pipeline)
        names = ("validate", "parity", "fine-tune", "evaluate", "compress", "gate")
        for image in images:
            medians = {n: statistics.median(r["steps"][n][0] for r in runs[image] if n in r["steps"])
                       for n in names if any(n in r["steps"] for r in runs[image])}
            wall = statistics.median(r["wall"] for r in runs[image])
            print(f"{image:28s} " + ", ".join(f"{n} {v:.2f}" for n, v in medians.items())
                  + f"; sum {sum(medians.values()):.2f} s; run {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
