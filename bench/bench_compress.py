"""PyTorch eager against each compressed variant, side by side in one run on the demo model.

For each: p50/p95 latency at batch size 1 on one thread (decode, preprocessing, forward: one call per image),
images/s at batch 32, size on disk, test accuracy, and the paired test against the uncompressed model
(McNemar's exact p, paired bootstrap interval). Timings are interleaved over ``--rounds`` rounds and the
medians reported, so machine noise hits every row alike.

    python bench/bench_compress.py [--model-dir DIR] [--variants onnx,int8,pruned] [--rounds 3]

Without ``--model-dir`` the demo model is trained first (the linear probe on the demo digits at 96 px).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import digits_manifest, machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="")
    ap.add_argument("--variants", default="onnx,int8,pruned")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-images", type=int, default=30)
    ap.add_argument("--prune-epochs", type=int, default=2)
    args = ap.parse_args()

    import torch

    from tlops.evaluation.evaluate import mcnemar_p, paired_bootstrap
    from tlops.fileio import read_json
    from tlops.serving.compress import variants as V
    from tlops.serving.compress.runtime import OnnxPredictor
    from tlops.serving.pyfunc import Predictor, load_model_dir

    print(machine())
    manifest = digits_manifest()
    work = Path(tempfile.mkdtemp(prefix="tlops-bench-compress-"))
    model_dir = Path(args.model_dir) if args.model_dir else _train(manifest, work / "model")
    model, spec, classes = load_model_dir(model_dir)
    meta = read_json(model_dir / "model.json")
    test = manifest[(manifest["split"] == "test") & manifest["decodable"].astype(bool)]
    train = manifest[(manifest["split"] == "train") & manifest["decodable"].astype(bool)]
    images = [Path(p).read_bytes() for p in test["path"]]
    y = [str(x) for x in test["label"]]
    torch.set_num_threads(1)
    eager = Predictor(model, spec, classes)
    runners = {"pytorch eager": (eager.predict_proba, (model_dir / "weights.pt").stat().st_size)}
    built: dict[str, float] = {}
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        target = work / name
        if name == "onnx":
            V.build_onnx(model, spec, meta, target)
        elif name == "int8":
            if not (work / "onnx").is_dir():
                V.build_onnx(model, spec, meta, work / "onnx")
            calib = [Path(p).read_bytes() for p in train.sort_values("sha256")["path"].head(200)]
            V.build_int8(work / "onnx", calib, target)
        elif name == "pruned":
            pruned = V.prune(model, spec.crop_size, V._weights_bytes(model) // 2)
            if args.prune_epochs:
                from tlops.vision.preprocessing import build_transform

                transform = build_transform(spec)
                tensors = torch.stack([transform(Path(p).read_bytes()) for p in train["path"]])
                torch.set_num_threads(2)
                V.recover(pruned, model, tensors, args.prune_epochs)
                torch.set_num_threads(1)
            V.build_onnx(pruned, spec, meta, target, name="pruned")
        built[name] = time.perf_counter() - t0
        runner = OnnxPredictor(target, threads=1)
        runners[name] = (runner.predict_proba, (target / "model.onnx").stat().st_size)
    rows: dict[str, dict] = {}
    base_correct = None
    for name, (predict, size) in runners.items():
        proba = predict(images)
        correct = [classes[i] == t for i, t in zip(proba.argmax(1), y, strict=True)]
        base_correct = base_correct or correct
        boot = paired_bootstrap(correct, base_correct)
        p = mcnemar_p(correct, base_correct)
        verdict = ("same predictions" if correct == base_correct else
                   "worse (p<0.05)" if boot["difference"] < 0 and p < 0.05 else "no significant difference")
        rows[name] = {"accuracy": sum(correct) / len(correct), "size": size, "p50": [], "p95": [], "ips": [],
                      "diff": boot["difference"], "ci": (boot["ci_low"], boot["ci_high"]), "p": p,
                      "verdict": verdict}
    for _ in range(args.rounds):  # interleaved: each round times every runner once
        for name, (predict, _size) in runners.items():
            t = V.timing(predict, images, count=args.latency_images)
            rows[name]["p50"].append(t.p50_ms)
            rows[name]["p95"].append(t.p95_ms)
            rows[name]["ips"].append(t.images_per_s)
    base = rows["pytorch eager"]
    b50, bips = statistics.median(base["p50"]), statistics.median(base["ips"])
    print(f"demo model {model_dir}, {len(images)} test images, {spec.crop_size} px, medians of {args.rounds} "
          f"interleaved rounds; build seconds {json.dumps({k: round(v, 1) for k, v in built.items()})}")
    print("| model | p50 ms (batch 1, 1 thread) | p95 ms | speed-up | images/s (batch 32) | size bytes | size ratio "
          "| test accuracy | difference [95% CI] | McNemar p | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        p50, p95, ips = (statistics.median(r[k]) for k in ("p50", "p95", "ips"))
        print(f"| {name} | {p50:.2f} | {p95:.2f} | {b50 / p50:.2f}x | {ips:.0f} ({ips / bips:.2f}x) | {r['size']:,} | "
              f"{r['size'] / base['size']:.2f} | {r['accuracy']:.4f} | {r['diff']:+.4f} [{r['ci'][0]:+.4f}, "
              f"{r['ci'][1]:+.4f}] | {r['p']:.3f} | {r['verdict']} |")


def _train(manifest, out: Path) -> Path:  # noqa: ANN001
    from tlops.config.settings import TrainConfig
    from tlops.data.discovery import class_names
    from tlops.serving.pyfunc import save_model_dir
    from tlops.training.probe import linear_probe
    from tlops.vision.backbones import reference_spec
    from tlops.vision.preprocessing import with_resolution

    classes = class_names(manifest)
    spec = with_resolution(reference_spec("efficientnet_lite0"), 96)
    result = linear_probe("efficientnet_lite0", manifest, classes, spec, TrainConfig())
    return save_model_dir(out, result.model, "efficientnet_lite0", classes, spec)


if __name__ == "__main__":
    main()
