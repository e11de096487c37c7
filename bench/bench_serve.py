"""``tlops serve`` throughput and latency at 1, 4 and 20 concurrent clients, dynamic batching on against off.

    .venv/bin/python -m bench.bench_serve [--duration 8] [--repeats 3] [--clients 1,4,20] [--model URI] [--before DIR]

The real demo model: EfficientNet-Lite0 (ImageNet weights) with a linear probe on the demo digits at 96 px, as
``configs/demo.yaml`` trains it (built here into a temporary MLflow store unless ``--model`` names a registered
one on MLFLOW_TRACKING_URI). Two real ``tlops serve`` processes on 127.0.0.1 serve it, one with the defaults
(batching on) and one with ``--max-batch 1`` (batching off: one request per forward pass, as a server with one
lock); both use one torch thread (the default). In each repeat, for each number of clients, the two servers are
measured one after the other (side by side, so machine noise hits both): every client is a coroutine with its
own keep-alive connection sending one test digit per request (MLflow's ``inputs`` format) for ``--duration`` seconds
after a one-second warm-up. It prints each measurement, then per number of clients the medians over repeats of
requests/s, p50 and p99, and the ratios on/off. Every answer is checked (status 200, one prediction). Bounded:
about ``2 x len(clients) x repeats x (duration + 1)`` seconds plus the set-up. Not a test.

``--before DIR``: a checkout of earlier tlops code (``git archive COMMIT | tar -x -C DIR``; the issue's server, one
image at a time behind one lock, is ``87f0647^``) runs as a third server, its own ``tlops serve`` with
``PYTHONPATH=DIR/src`` in the same environment, measured beside the other two at every number of clients in every
repeat (the three take turns going first; the bound above becomes ``3 x ...``); it prints the ratios on/before as
well. It serves the same weights: the model directory built here (state dict, preprocessing
record, ``model.json``: a format both codes read) is logged and registered by that code's own
``log_pyfunc_model``, so its server loads it with its own pyfunc; before measuring, both servers' answers to the
same test digits are checked to agree (labels equal, probabilities within 1e-4).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import digits_manifest, machine

NAME = "bench-serve-digits"
NAMES = {"off": "batching off", "on": "batching on", "before": "before"}


def build_demo_model(work: Path) -> tuple[str, str, list[bytes]]:
    """The demo model registered as NAME@champion in a SQLite store under ``work`` (its files in ``work/model``):
    (tracking URI, model URI, the test split's image files)."""
    import mlflow

    from tlops import __version__, registry
    from tlops.config.settings import TrainConfig
    from tlops.data.discovery import class_names
    from tlops.serving.pyfunc import save_model_dir
    from tlops.steps import log_pyfunc_model
    from tlops.training.probe import linear_probe
    from tlops.vision.backbones import reference_spec
    from tlops.vision.preprocessing import with_resolution

    manifest = digits_manifest()
    classes = class_names(manifest)
    spec = with_resolution(reference_spec("efficientnet_lite0"), 96)
    started = time.perf_counter()
    result = linear_probe("efficientnet_lite0", manifest, classes, spec, TrainConfig(num_threads=1))
    model_dir = save_model_dir(work / "model", result.model, "efficientnet_lite0", classes, spec)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("bench-serve", artifact_location=(work / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log_pyfunc_model(str(model_dir), __version__)
    version = mlflow.register_model(str(info.model_uri), NAME).version
    registry.client().set_registered_model_alias(NAME, "champion", str(version))
    print(f"demo model built and registered in {time.perf_counter() - started:.0f} s "
          f"(test split {len(manifest[manifest['split'] == 'test'])} images)")
    test = manifest[manifest["split"] == "test"]
    return uri, f"models:/{NAME}@champion", [Path(p).read_bytes() for p in test["path"]]


# Run by the earlier code (PYTHONPATH=DIR/src): the model directory logged with that code's own log_pyfunc_model (a
# pyfunc from code whose entry point is that code's), registered as NAME@champion in the same store.
_LOG_BEFORE = """
import sys, mlflow
from tlops import __version__
from tlops.steps import log_pyfunc_model
model_dir, name, artifacts = sys.argv[1:4]
experiment = mlflow.create_experiment(name, artifact_location=artifacts)
with mlflow.start_run(experiment_id=experiment):
    info = log_pyfunc_model(model_dir, __version__)
version = mlflow.register_model(str(info.model_uri), name).version
mlflow.MlflowClient().set_registered_model_alias(name, "champion", str(version))
"""


def log_with_code(code: Path, model_dir: Path, tracking: str, name: str) -> str:
    """``model_dir`` registered as ``name``@champion by the tlops code under ``code/src``; its model URI."""
    env = {**os.environ, "PYTHONPATH": str(code.resolve() / "src"), "MLFLOW_TRACKING_URI": tracking,
           "MLFLOW_REGISTRY_URI": tracking, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    subprocess.run([sys.executable, "-c", _LOG_BEFORE, str(model_dir), name, (model_dir.parent / name).as_uri()],
                   env=env, check=True)
    return f"models:/{name}@champion"


def answers(port: int, bodies: list[bytes]) -> list[dict[str, Any]]:
    """The server's prediction for each body, one request at a time."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out = []
    for body in bodies:
        conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        if response.status != 200:
            raise SystemExit(f"HTTP {response.status} from port {port}: {raw[:300]!r}")
        out.append(json.loads(raw)["predictions"][0])
    conn.close()
    return out


def check_same_answers(ports: dict[str, int], bodies: list[bytes]) -> None:
    """Every server gives the same label to each body, and probabilities within 1e-4 of each other."""
    got = {mode: answers(port, bodies) for mode, port in ports.items()}
    first, *others = got
    for other in others:
        for i, (a, b) in enumerate(zip(got[first], got[other], strict=True)):
            worst = max(abs(x - y) for x, y in zip(a["probabilities"], b["probabilities"], strict=True))
            if a["label"] != b["label"] or worst > 1e-4:
                raise SystemExit(f"servers {first} and {other} disagree on test image {i}: {a['label']} against "
                                 f"{b['label']}, probabilities up to {worst:.2g} apart")
    print(f"servers {', '.join(got)} agree on {len(bodies)} test digits (labels, probabilities within 1e-4)")


def start_server(model_uri: str, env: dict[str, str], log_path: Path, *args: str) -> tuple[subprocess.Popen, int]:
    from tests.conftest import free_port, wait_until_up

    port = free_port()
    log = open(log_path, "w")  # noqa: SIM115 - the server writes to it until it stops
    proc = subprocess.Popen([sys.executable, "-m", "tlops", "serve", "--model", model_uri, "--port", str(port),
                             *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    if not wait_until_up(f"http://127.0.0.1:{port}/ping", proc, 180):
        proc.kill()
        raise SystemExit(f"tlops serve did not start: {log_path.read_text()[-2000:]}")
    return proc, port


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(port: int, bodies: list[bytes], clients: int, duration: float, pid: int | None = None) -> dict[str, Any]:
    """``clients`` concurrent clients, each on its own keep-alive connection, for ``duration`` seconds after a 1 s
    warm-up. The clients are coroutines of one event loop on raw HTTP/1.1, so that the load generator costs far
    less CPU than the server (20 threads of http.client would contend for the GIL). With ``pid`` (the server's),
    also the server's CPU milliseconds per answered request over the whole measurement (warm-up included): what
    a request costs, whatever share of the cores a busy machine left the server."""
    before = cpu_seconds(pid) if pid else 0.0
    out = asyncio.run(_measure(port, bodies, clients, duration))
    if pid:
        out["cpu_ms_per_request"] = 1000 * (cpu_seconds(pid) - before) / max(1, out["answered"])
    return out


async def _measure(port: int, bodies: list[bytes], clients: int, duration: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    answered = [0]
    start_at = time.monotonic() + 1.0
    stop_at = start_at + duration

    async def client(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        n = i
        try:
            while (now := time.monotonic()) < stop_at:
                body = bodies[n % len(bodies)]
                n += clients
                t0 = time.perf_counter()
                writer.write(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                raw = await reader.readexactly(int(found.group(1)) if found else 0)
                took = time.perf_counter() - t0
                answered[0] += 1
                if status != 200 or len(json.loads(raw)["predictions"]) != 1:
                    errors.append(f"HTTP {status}: {raw[:200]!r}")
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                elif now >= start_at:
                    latencies.append(took)
        except (OSError, asyncio.IncompleteReadError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()

    await asyncio.gather(*[client(i) for i in range(clients)])
    flat = sorted(latencies)
    if not flat:
        raise SystemExit(f"no request answered: {errors[:3]}")
    return {"requests_per_s": len(flat) / duration, "p50_ms": 1000 * flat[len(flat) // 2],
            "p99_ms": 1000 * flat[min(len(flat) - 1, int(0.99 * len(flat)))], "requests": len(flat),
            "errors": len(errors), "first_error": errors[0] if errors else "", "answered": answered[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per point")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", default="1,4,20")
    parser.add_argument("--model", help="a registered model on MLFLOW_TRACKING_URI (default: build the demo one)")
    parser.add_argument("--output", help="write the measurements as JSON here")
    parser.add_argument("--on-args", default="", help="more `tlops serve` options for the batching server")
    parser.add_argument("--off-args", default="", help="more `tlops serve` options for the other (--max-batch 1)")
    parser.add_argument("--before", type=Path, help="a checkout of earlier tlops code (`git archive COMMIT | tar -x "
                        "-C DIR`; the issue's one-lock server: 87f0647^), served as a third server with its defaults")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    if args.before and not (args.before / "src" / "tlops").is_dir():
        raise SystemExit(f"--before {args.before}: no src/tlops there; extract a commit with "
                         "`git archive COMMIT | tar -x -C DIR`")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="tlops-bench-serve-"))
    if args.model:
        tracking, model_uri = os.environ.get("MLFLOW_TRACKING_URI", ""), args.model
        manifest = digits_manifest()
        images = [Path(p).read_bytes() for p in manifest[manifest["split"] == "test"]["path"]]
    else:
        tracking, model_uri, images = build_demo_model(work)
    bodies = [json.dumps({"inputs": {"image": [base64.b64encode(im).decode()]}}).encode() for im in images]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    # Both with `tlops serve`'s default prediction log (10% of the images, with their embeddings), written under the
    # work directory (removed at the end) rather than the current directory's .tlops.
    logged = ("--poll-s", "0", "--log-uri", str(work / "prediction-log"))
    modes: dict[str, tuple[str, ...]] = {"off": ("--max-batch", "1", *logged, *args.off_args.split()),
                                         "on": (*logged, *args.on_args.split())}
    uris, envs = {"off": model_uri, "on": model_uri}, {"off": env, "on": env}
    if args.before:
        model_dir = work / "model"
        if args.model:  # the registered version's own files
            import mlflow

            model_dir = Path(mlflow.artifacts.download_artifacts(f"{model_uri}", dst_path=str(work / "registered"),
                                                                 tracking_uri=tracking)) / "artifacts" / "model_dir"
        before_tracking = f"sqlite:///{work / 'before.db'}"
        uris["before"] = log_with_code(args.before, model_dir, before_tracking, NAME + "-before")
        modes["before"] = ()
        envs["before"] = {**os.environ, "MLFLOW_TRACKING_URI": before_tracking,
                          "PYTHONPATH": str(args.before.resolve() / "src")}
    servers = {mode: start_server(uris[mode], envs[mode], work / f"serve-{mode}.log", *extra)
               for mode, extra in modes.items()}
    results: dict[str, dict[int, list[dict[str, Any]]]] = {m: {c: [] for c in levels} for m in modes}
    try:
        check_same_answers({mode: port for mode, (_proc, port) in servers.items()}, bodies[:50])
        for rep in range(args.repeats):
            for clients in levels:
                order = list(modes)[rep % len(modes):] + list(modes)[:rep % len(modes)]  # each first in turn
                for mode in order:
                    got = measure(servers[mode][1], bodies, clients, args.duration, servers[mode][0].pid)
                    results[mode][clients].append(got)
                    print(f"repeat {rep + 1} clients {clients:2d} {NAMES[mode]:12s}: "
                          f"{got['requests_per_s']:6.1f} req/s, p50 {got['p50_ms']:6.1f} ms, "
                          f"p99 {got['p99_ms']:6.1f} ms, server CPU {got['cpu_ms_per_request']:5.1f} ms/request, "
                          f"load {os.getloadavg()[0]:.1f}, errors {got['errors']} {got['first_error']}", flush=True)
    finally:
        for proc, _port in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
        for mode in servers:  # the batcher's own count: how many images a forward pass took on average
            said = re.findall(r"answered \d+ requests in .*", (work / f"serve-{mode}.log").read_text(errors="replace"))
            if said:
                print(f"{NAMES[mode]} server: {said[-1]}")
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; medians of {args.repeats} repeats")
    summary = {}
    for clients in levels:
        row: dict[str, Any] = {}
        for mode in modes:
            runs = results[mode][clients]
            row[mode] = {k: statistics.median(r[k] for r in runs)
                         for k in ("requests_per_s", "p50_ms", "p99_ms", "cpu_ms_per_request")}
        for base in [m for m in modes if m != "on"]:
            pairs = list(zip(results["on"][clients], results[base][clients], strict=True))
            row[f"throughput_on_{base}"] = statistics.median(on["requests_per_s"] / b["requests_per_s"]
                                                             for on, b in pairs)
            row[f"p99_on_{base}"] = statistics.median(on["p99_ms"] / b["p99_ms"] for on, b in pairs)
        summary[clients] = row
    for base in [m for m in modes if m != "on"]:
        print(f"\n| clients | {NAMES[base]}: req/s, p50, p99 | batching on: req/s, p50, p99 | throughput on/{base} | "
              f"p99 on/{base} | server CPU ms/request {base}, on |")
        print("|---|---|---|---|---|---|")
        for clients, row in summary.items():
            b, on = row[base], row["on"]
            print(f"| {clients} | {b['requests_per_s']:.1f}, {b['p50_ms']:.1f} ms, {b['p99_ms']:.1f} ms | "
                  f"{on['requests_per_s']:.1f}, {on['p50_ms']:.1f} ms, {on['p99_ms']:.1f} ms | "
                  f"**{row[f'throughput_on_{base}']:.2f}×** | {row[f'p99_on_{base}']:.2f}× | "
                  f"{b['cpu_ms_per_request']:.1f}, {on['cpu_ms_per_request']:.1f} |")
    errors = sum(r["errors"] for m in results.values() for runs in m.values() for r in runs)
    print(f"failed requests: {errors}")
    if args.output:
        Path(args.output).write_text(json.dumps({"runs": results, "summary": summary}, indent=1))
    return 1 if errors else 0

if __name__ == "__main__":
    raise SystemExit(main())
