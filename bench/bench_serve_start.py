"""`tlops serve` start-up: the same registered version served through PyTorch (``--pytorch``), through its
ONNX serving variant (the default when the version has one), and that variant's files served from a local
directory (as KServe's storage initializer leaves them: no MLflow, no torch), side by side.

The demo model is logged as the fine-tune step logs it (an MLflow pyfunc) in a fresh SQLite store, its ONNX
variant logged beside it and tagged as the version's serving artifact, as the gate does. Each round starts
both servers one after the other (the order alternating) as a user does (``python -m tlops serve --model
models:/NAME/1``), and times from the process's start to the first 200 from ``/ping``; ``/version`` then says
whether the process imported torch. Medians over ``--rounds``.

    python bench/bench_serve_start.py --model-dir DIR [--rounds 5] [--http] [--serve-python VENV/bin/python]

``--http``: the servers reach the registry through an ``mlflow server`` on the store (as in a cluster) rather
than the SQLite file. ``--serve-python``: also start the variant with that interpreter, e.g. a virtual environment
of the serving-only install (``requirements-serve.lock`` and ``pip install --no-deps .``: no torch, mlflow-skinny).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402

NAME = "bench-serve-start"
REPO = Path(__file__).resolve().parents[1]


def _store(model_dir: Path, root: Path) -> str:
    import mlflow

    from tlops import __version__
    from tlops.fileio import read_json
    from tlops.registry import register
    from tlops.serving.compress import variants as V
    from tlops.serving.compress.step import ARTIFACT_DIR
    from tlops.serving.pyfunc import load_model_dir
    from tlops.steps import log_pyfunc_model

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.create_experiment("bench", artifact_location=(root / "artifacts").as_uri())
    model, spec, _classes = load_model_dir(model_dir)
    onnx_dir = V.build_onnx(model, spec, read_json(model_dir / "model.json"), root / "onnx")
    with mlflow.start_run(experiment_id=exp) as run:
        info = log_pyfunc_model(str(model_dir), __version__, name=NAME)
        mlflow.log_artifacts(str(onnx_dir), f"{ARTIFACT_DIR}/onnx")
    version = register(str(info.model_uri), NAME, {}).version
    client = mlflow.MlflowClient()
    client.set_model_version_tag(NAME, version, "serving.variant", "onnx")
    client.set_model_version_tag(NAME, version, "serving.artifact", f"runs:/{run.info.run_id}/{ARTIFACT_DIR}/onnx")
    return uri


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


KINDS = {"pytorch": ["--model", f"models:/{NAME}/1", "--pytorch"], "onnx": ["--model", f"models:/{NAME}/1"]}


def start_once(uri: str, cwd: Path, kind: str, python: str = sys.executable,
               timeout: float = 300.0) -> tuple[float, dict]:
    """Seconds from the process's start to the first answer of /ping, and what /version says."""
    port = _free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_TRACKING_URI": uri,
           "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}
    args = KINDS.get(kind.removesuffix(" (serving-only)")) or ["--model", str(cwd / "onnx")]
    cmd = [python, "-m", "tlops", "serve", *args, "--port", str(port)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as resp:
                    if resp.status == 200:
                        ready = time.perf_counter() - t0
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.perf_counter() - t0 > timeout:
                raise SystemExit(f"serve ({kind}) did not start")
            time.sleep(0.02)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=30) as resp:
            info = json.loads(resp.read())
        return ready, info
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--http", action="store_true")
    ap.add_argument("--serve-python", default="")
    args = ap.parse_args()
    print(machine())
    root = Path(tempfile.mkdtemp(prefix="tlops-bench-serve-start-"))
    uri = _store(Path(args.model_dir), root)
    server = None
    if args.http:
        port = _free_port()
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                                   "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        uri = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
    kinds = ["pytorch", "onnx", "onnx-dir"]
    if args.serve_python:
        kinds += ["onnx (serving-only)", "onnx-dir (serving-only)"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    seen: dict[str, dict] = {}
    for r in range(args.rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            python = args.serve_python if kind.endswith("(serving-only)") else sys.executable
            ready, info = start_once(uri, root, kind, python)
            times[kind].append(ready)
            seen[kind] = info
            print(f"round {r + 1}: {kind:24s} ready in {ready:.2f} s (runtime {info.get('runtime', 'pytorch')}, "
                  f"torch imported: {info['torch_loaded']})", flush=True)
    if server is not None:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    print(f"load average at the end {os.getloadavg()[0]:.1f}; registry through {'HTTP' if args.http else 'SQLite'}")
    print("| served through | ready, median (s) | rounds (s) | torch imported |")
    print("|---|---|---|---|")
    for kind in kinds:
        print(f"| {kind} | {statistics.median(times[kind]):.2f} | {', '.join(f'{t:.2f}' for t in times[kind])} | "
              f"{seen[kind]['torch_loaded']} |")
    for kind in kinds[1:]:
        ratios = [p / o for p, o in zip(times["pytorch"], times[kind], strict=True)]
        print(f"pytorch / {kind}: {statistics.median(ratios):.2f}x (median of per-round ratios)")


if __name__ == "__main__":
    main()
