"""The prediction log's cost on serving, and ``tlops monitor``'s time on 10,000 logged records.

    .venv/bin/python -m bench.bench_monitor [--duration 6] [--repeats 3] [--clients 1,4] [--records 10000]

Serving: the demo model (EfficientNet-Lite0 with a linear probe on the demo digits at 96 px, built and registered
in a temporary MLflow store by ``bench.bench_serve``) behind three real ``tlops serve`` processes on 127.0.0.1:
logging off (``--sample-rate 0``), the default share (0.1) and every image (1.0), the log in a local directory.
In each repeat the three are measured one after the other for each number of clients (side by side: the machine's
noise hits all three), one test digit per request; it prints the medians over repeats of p50 and p99 and the
ratios logging-on/off. Monitor: the records the ``1.0`` server logged are repeated (new times) into a log of
``--records`` records, and the reference is built from the demo model's training and validation splits as the
evaluate step does; then the log is read, every statistic computed and the HTML page rendered, timed (median
of 3). Not a test.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_serve import build_demo_model, measure, start_server
from bench.common import digits_manifest, machine

RATES = ("0", "0.1", "1")


def serving(work: Path, model_uri: str, tracking: str, images: list[bytes], levels: list[int], repeats: int,
            duration: float) -> dict[str, Any]:
    # Shuffled: the test split is listed class by class, and a short run would send (and log) the first classes only.
    order = random.Random(0).sample(range(len(images)), len(images))
    bodies = [json.dumps({"inputs": {"image": [base64.b64encode(images[i]).decode()]}}).encode() for i in order]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    servers = {rate: start_server(model_uri, env, work / f"serve-{rate}.log", "--sample-rate", rate,
                                  "--log-uri", str(work / f"log-{rate}")) for rate in RATES}
    results: dict[str, dict[int, list[dict[str, Any]]]] = {r: {c: [] for c in levels} for r in RATES}
    load_start = os.getloadavg()[0]
    try:
        for rep in range(repeats):
            for clients in levels:
                for rate in (RATES if rep % 2 == 0 else tuple(reversed(RATES))):
                    got = measure(servers[rate][1], bodies, clients, duration)
                    results[rate][clients].append(got)
                    print(f"repeat {rep + 1} clients {clients:2d} sample rate {rate:3s}: "
                          f"{got['requests_per_s']:6.1f} req/s, p50 {got['p50_ms']:6.1f} ms, "
                          f"p99 {got['p99_ms']:6.1f} ms, errors {got['errors']}", flush=True)
        paired = interleaved({rate: port for rate, (_proc, port) in servers.items()}, bodies, repeats, duration)
    finally:
        for proc, _port in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    print(f"\nload average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; medians of {repeats} "
          "repeats (the rates interleaved, their order reversed every other repeat)")
    print("| clients | logging off: p50, p99 | 0.1 logged: p50, p99 (ratio p50, p99) | all logged: p50, p99 "
          "(ratio p50, p99) |")
    print("|---|---|---|---|")
    summary: dict[Any, Any] = {}
    for clients in levels:
        row = {r: {k: statistics.median(x[k] for x in results[r][clients]) for k in ("p50_ms", "p99_ms")}
               for r in RATES}
        for r in RATES[1:]:
            pairs = list(zip(results[r][clients], results["0"][clients], strict=True))
            row[r]["p50_ratio"] = statistics.median(a["p50_ms"] / b["p50_ms"] for a, b in pairs)
            row[r]["p99_ratio"] = statistics.median(a["p99_ms"] / b["p99_ms"] for a, b in pairs)
        summary[clients] = row
        cells = [f"{row['0']['p50_ms']:.1f} ms, {row['0']['p99_ms']:.1f} ms"] + [
            f"{row[r]['p50_ms']:.1f} ms, {row[r]['p99_ms']:.1f} ms (**{row[r]['p50_ratio']:.2f}×**, "
            f"**{row[r]['p99_ratio']:.2f}×**)" for r in RATES[1:]]
        print(f"| {clients} | " + " | ".join(cells) + " |")
    print(f"\none client, each image sent to the three servers in turn (a shuffled order each round), "
          f"{repeats} x {duration:g} s: p50 and p99 over {len(paired['0'])} requests each")
    for rate in RATES:
        lat = sorted(paired[rate])
        p50, p99 = lat[len(lat) // 2] * 1e3, lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3
        ratios = [a / b for a, b in zip(paired[rate], paired["0"], strict=True)]
        summary.setdefault("interleaved", {})[rate] = {"p50_ms": p50, "p99_ms": p99,
                                                        "median_pair_ratio": statistics.median(ratios)}
        print(f"  sample rate {rate:3s}: p50 {p50:6.1f} ms, p99 {p99:6.1f} ms; median of the per-image ratios to "
              f"logging off {statistics.median(ratios):.3f}")
    for rate in RATES:
        tail = [line for line in (work / f"serve-{rate}.log").read_text().splitlines() if "prediction log:" in line]
        if tail:
            print(f"sample rate {rate}: {tail[-1].split('INFO ')[-1]}")
    return summary


def interleaved(ports: dict[str, int], bodies: list[bytes], repeats: int, duration: float) -> dict[str, list[float]]:
    """One client on one keep-alive connection per server; each image goes to the three servers one after the
    other, in a shuffled order, so that the machine's noise (other jobs, here) falls on all three alike; the
    latencies per server, in the order sent."""
    import http.client

    rng = random.Random(1)
    conns = {rate: http.client.HTTPConnection("127.0.0.1", port, timeout=60) for rate, port in ports.items()}
    out: dict[str, list[float]] = {rate: [] for rate in ports}
    n = 0
    try:
        for _ in range(repeats):
            stop = time.monotonic() + duration
            while time.monotonic() < stop:
                body = bodies[n % len(bodies)]
                n += 1
                order = list(ports)
                rng.shuffle(order)
                for rate in order:
                    t0 = time.perf_counter()
                    conns[rate].request("POST", "/invocations", body=body,
                                        headers={"Content-Type": "application/json"})
                    resp = conns[rate].getresponse()
                    resp.read()
                    out[rate].append(time.perf_counter() - t0)
                    assert resp.status == 200
    finally:
        for c in conns.values():
            c.close()
    return out


def monitor_time(work: Path, model_dir: Path, records: int) -> dict[str, Any]:
    import datetime as dt

    import pyarrow as pa

    from tlops.monitoring.monitor import assess
    from tlops.monitoring.reference import build_reference
    from tlops.monitoring.report import figures, html
    from tlops.serving.predlog import read_log, schema, write_part
    from tlops.serving.pyfunc import Predictor, load_model_dir

    logged = read_log(str(work / "log-1"))
    if logged.empty:
        raise SystemExit("the all-logged server wrote no records")
    model, spec, classes = load_model_dir(model_dir)
    predictor = Predictor(model, spec, classes)
    manifest = digits_manifest()
    started = time.perf_counter()
    reference = build_reference(predictor, manifest[manifest["split"] == "train"],
                                manifest[manifest["split"] == "val"], "val", sample=500)
    reference_s = time.perf_counter() - started
    big = logged.sample(n=records, replace=True, random_state=0).reset_index(drop=True)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)  # the log keeps milliseconds
    big["time"] = [now - dt.timedelta(seconds=i) for i in range(records)]
    log_dir = work / "log-10k"
    shutil.rmtree(log_dir, ignore_errors=True)
    for start in range(0, records, 2500):
        part = big.iloc[start : start + 2500]
        write_part(str(log_dir), now.strftime("%Y-%m-%d"),
                   pa.Table.from_pandas(part[list(schema().names)], schema=schema(), preserve_index=False))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        frame = read_log(str(log_dir))
        report = assess(reference, frame, 0.9)
        arrays = report.pop("_arrays")
        page = html({"model": "bench", "version": "1", "window": {"log_uri": str(log_dir), "records": len(frame),
                                                                   "first": "", "last": "", "other_records": 0},
                     "checked_at": "", **report}, figures(arrays))
        times.append(time.perf_counter() - t0)
    assert len(frame) == records and page
    print(f"\nmonitor on {records} records (read, every statistic, figures, page): "
          f"median {statistics.median(times):.1f} s of {', '.join(f'{t:.1f}' for t in times)}; "
          f"reference built in {reference_s:.1f} s; verdict "
          f"{report['verdict']} ({'; '.join(report['reasons'])}), estimate {report['estimate']['accuracy']:.3f}")
    variants = served_variants(work, model_dir, manifest, reference)
    return {"seconds": times, "reference_s": reference_s, "records": records, "variants": variants}


def served_variants(work: Path, model_dir: Path, manifest: Any, reference: Any) -> dict[str, Any]:
    """The test split as the float ONNX and the int8 variant serve it, their logged records (with the graph's
    embedding output) judged against the PyTorch model's reference: quiet, as the traffic is, or does the
    variant's own arithmetic look like drift?"""
    import pandas as pd

    from tlops.fileio import read_json
    from tlops.monitoring.monitor import assess
    from tlops.serving.compress import variants as V
    from tlops.serving.compress.runtime import OnnxPredictor
    from tlops.serving.predlog import Served, to_row
    from tlops.serving.pyfunc import load_model_dir

    model, spec, classes = load_model_dir(model_dir)
    meta = read_json(model_dir / "model.json")
    onnx_dir = V.build_onnx(model, spec, meta, work / "variant-onnx")
    train = manifest[manifest["split"] == "train"]
    calibration = [Path(p).read_bytes() for p in train["path"].sample(n=128, random_state=0)]
    int8_dir = V.build_int8(onnx_dir, calibration, work / "variant-int8")
    test = manifest[manifest["split"] == "test"]
    images = [Path(p).read_bytes() for p in test["path"]]
    info = {"name": "bench", "version": "1", "classes": classes, "preprocess_fingerprint": spec.fingerprint}
    out = {}
    for name, directory in (("onnx", onnx_dir), ("int8", int8_dir)):
        predictor = OnnxPredictor(directory)
        proba, emb = predictor.proba_embed(predictor.tensors(images))
        assert emb is not None
        now = time.time()
        frame = pd.DataFrame([to_row(Served(now, info, b, proba[i], emb[i]), 5, False) for i, b in enumerate(images)])
        report = assess(reference, frame, 0.9)
        report.pop("_arrays")
        truth = float((proba.argmax(1) == [classes.index(str(y)) for y in test["label"]]).mean())
        checks = {c["name"]: c for c in report["checks"]}
        out[name] = {"verdict": report["verdict"], "reasons": report["reasons"], "accuracy": truth,
                     "estimate": report["estimate"]["accuracy"], "mmd_p": checks["feature drift (MMD)"]["p_value"],
                     "ood_p": checks["out of distribution"]["p_value"]}
        print(f"the test split served by the {name} variant: verdict {report['verdict']} "
              f"({'; '.join(report['reasons']) or 'nothing flagged'}), MMD p {out[name]['mmd_p']:.3f}, OOD p "
              f"{out[name]['ood_p']:.3f}; accuracy {truth:.4f}, estimate {out[name]['estimate']:.4f}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--output")
    parser.add_argument("--monitor-only", metavar="WORK", help="only the monitor's time, on the work directory "
                        "of an earlier run (its model and all-logged log)")
    args = parser.parse_args(argv)
    print(machine())
    summary: dict[int, Any] = {}
    if args.monitor_only:
        work = Path(args.monitor_only)
    else:
        work = Path(tempfile.mkdtemp(prefix="tlops-bench-monitor-"))
        tracking, model_uri, images = build_demo_model(work)
        summary = serving(work, model_uri, tracking, images, [int(c) for c in args.clients.split(",")],
                          args.repeats, args.duration)
    mon = monitor_time(work, work / "model", args.records)
    if args.output:
        Path(args.output).write_text(json.dumps({"serving": summary, "monitor": mon}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
