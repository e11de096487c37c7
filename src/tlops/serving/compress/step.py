"""The compress step's work and the gate's part of it: build each variant of ``deploy.variants``, check its
parity, measure it on the candidate's test split against the uncompressed candidate, log it to the run; then
(at the gate) accept or refuse each by the gate's policy and record the chosen one on the registered version as
its serving artifact. The uncompressed weights stay the version's model either way."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from tlops.config.settings import Config, GateConfig
from tlops.serving.compress import variants as V

log = logging.getLogger("tlops.compress")
ARTIFACT_DIR = "variants"
RECORD = "tlops-compression/1"


def _model_dir(model_uri: str) -> Path:
    import mlflow

    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    found = sorted(root.glob("artifacts/*/model.json"))
    if not found:
        raise V.CompressError(f"{model_uri} is not a tlops model (no artifacts/*/model.json)")
    return found[0].parent


def _labels(proba: Any, classes: list[str]) -> list[str]:
    return [classes[i] for i in proba.argmax(axis=1)]


def compress(cfg: Config, model_uri: str, test_rows: pd.DataFrame, train_rows: pd.DataFrame,
             golden: list[tuple[str, bytes]], evaluation: dict[str, Any], out: Path) -> dict[str, Any]:
    """Build and measure every variant of ``cfg.deploy.variants`` under ``out/<name>``. A variant that cannot be
    built is recorded with its reason (one line) and the others go on."""
    import torch

    from tlops.fileio import read_json, write_json
    from tlops.serving.pyfunc import Predictor, load_model_dir

    names = V.check_names(list(cfg.deploy.variants))
    files = _model_dir(model_uri)
    model, spec, classes = load_model_dir(files)
    meta = read_json(files / "model.json")
    images = [Path(p).read_bytes() for p in test_rows["path"]]
    y_true = [str(x) for x in test_rows["label"]]
    torch.set_num_threads(max(1, cfg.evaluation.latency_threads or 1))
    predictor = Predictor(model, spec, classes)
    cand_labels = _labels(predictor.predict_proba(images), classes)
    cand_correct = [p == t for p, t in zip(cand_labels, y_true, strict=True)]
    cand_acc = sum(cand_correct) / len(cand_correct)
    speed = V.torch_timing(predictor, images, count=cfg.evaluation.latency_images or 30)
    candidate = {"accuracy": cand_acc, "evaluated_accuracy": evaluation.get("candidate", {}).get("accuracy"),
                 "size_bytes": (files / "weights.pt").stat().st_size, "latency": speed.to_dict(),
                 "fingerprint": spec.fingerprint, "runtime": "pytorch eager"}
    record: dict[str, Any] = {"format": RECORD, "requested": names, "candidate": candidate, "variants": {},
                              "test_images": len(images)}
    calibration = [Path(p).read_bytes() for p in
                   train_rows.sort_values("sha256")["path"].head(cfg.deploy.calibration_images)]
    sources: dict[str, Any] = {}
    for name in names:
        target = out / name
        try:
            if name == "onnx":
                V.build_onnx(model, spec, meta, target)
                sources[name] = model
            elif name == "int8":
                float_dir = out / "onnx" if "onnx" in sources else out / ".int8-float"
                if "onnx" not in sources:
                    V.build_onnx(model, spec, meta, float_dir)
                V.build_int8(float_dir, calibration, target)
                sources[name] = model
            else:
                sources[name] = _pruned(cfg, model, spec, meta, train_rows, target)
                write_json(target / V.REFERENCE, V.golden_reference(sources[name], spec, golden))
            measured = V.measure(target, images, y_true, cand_correct, cfg.evaluation.confidence,
                                 cfg.evaluation.bootstrap_resamples, cfg.evaluation.seed,
                                 cfg.evaluation.latency_images or 30)
            measured.pop("labels")
            measured["parity"] = V.parity(target, sources[name], spec, golden, name)
            measured["variant"] = read_json(target / "variant.json")
            record["variants"][name] = measured
            log.info("compress %s: accuracy %.4f (candidate %.4f), p50 %.2f ms, %.0f images/s at batch 32, %d bytes, "
                     "parity %s", name, measured["accuracy"], cand_acc, measured["latency"]["p50_ms"],
                     measured["latency"]["images_per_s"], measured["size_bytes"], measured["parity"]["status"])
        except V.CompressError as exc:
            log.warning("compress %s: %s", name, exc)
            record["variants"][name] = {"error": str(exc)}
        except Exception as exc:  # a library's failure on one variant: recorded, the others and the gate go on
            log.exception("compress %s: unexpected failure", name)
            first = (str(exc).strip().splitlines() or [""])[0]
            record["variants"][name] = {"error": f"unexpected {type(exc).__name__}: {first[:300]}"}
    return record


def _pruned(cfg: Config, model: Any, spec: Any, meta: dict[str, Any], train_rows: pd.DataFrame, target: Path) -> Any:
    """Prune to the target, then recover: BatchNorm statistics re-estimated and the classifier fitted again on the
    pruned features of the training images, then ``deploy.prune_epochs`` epochs of every layer (distillation
    from the candidate and the labels), then export."""
    import torch

    from tlops.vision.preprocessing import build_transform

    goal = V.target_bytes(V._weights_bytes(model), cfg.deploy.prune_target_mb, cfg.deploy.prune_target_fraction)
    V.prune(model, spec.crop_size, goal, dry_run=True)  # an unreachable target: refused before the images are read
    transform = build_transform(spec)
    tensors = torch.stack([transform(Path(p).read_bytes()) for p in train_rows["path"]])
    classes = [str(c) for c in meta["classes"]]
    labels = torch.tensor([classes.index(str(y)) for y in train_rows["label"]])
    return V.build_pruned(model, spec, meta, tensors, labels, goal, cfg.deploy.prune_epochs, cfg.deploy.prune_lr,
                          target, seed=cfg.evaluation.seed)


def log_to_run(record: dict[str, Any], out: Path) -> None:
    """Variant files under ``variants/<name>/`` of the active run, the record and headline metrics."""
    import mlflow

    for name, rec in record["variants"].items():
        if "error" not in rec and (out / name).is_dir():
            mlflow.log_artifacts(str(out / name), f"{ARTIFACT_DIR}/{name}")
            mlflow.log_metrics({f"variant.{name}.accuracy": rec["accuracy"],
                                f"variant.{name}.accuracy_difference": rec["comparison"]["difference"],
                                f"variant.{name}.latency_p50_ms": rec["latency"]["p50_ms"],
                                f"variant.{name}.latency_p95_ms": rec["latency"]["p95_ms"],
                                f"variant.{name}.images_per_s": rec["latency"]["images_per_s"],
                                f"variant.{name}.size_bytes": rec["size_bytes"]})
    mlflow.log_dict(record, f"{ARTIFACT_DIR}/compression.json")


def run_step(cfg: Config, run_id: str, model_uri: str, manifest: pd.DataFrame, pixels: Any,
             evaluation: dict[str, Any]) -> dict[str, Any]:
    """The step, inside the pipeline's active MLflow run: nothing to do without ``deploy.variants``; else build,
    measure, log."""
    if not cfg.deploy.variants:
        return {"format": RECORD, "requested": [], "variants": {}}
    from tlops.data.manifest import golden_rows, split_rows, usable
    from tlops.vision.parity import golden_set

    test_rows = pixels(split_rows(manifest, "test"))
    train_rows = pixels(split_rows(usable(manifest), "train"))
    golden = golden_set(list(pixels(golden_rows(manifest))["path"]))
    with tempfile.TemporaryDirectory(prefix="tlops-compress-") as tmp:
        record = compress(cfg, model_uri, test_rows, train_rows, golden, evaluation, Path(tmp))
        record["run_id"] = run_id
        log_to_run(record, Path(tmp))
    return record


# ------------------------------------------------------------------------------------------- the gate's part


def gate_variants(record: dict[str, Any], gate: GateConfig) -> dict[str, Any]:
    """Each variant accepted or refused by the gate's policy, with its reasons, and the serving variant."""
    decisions: dict[str, Any] = {}
    for name, rec in record.get("variants", {}).items():
        ok, reasons = V.decide(name, rec, record.get("candidate", {}), gate)
        decisions[name] = {**rec, "accepted": ok, "reasons": reasons}
    chosen = V.choose(decisions)
    return {"variants": decisions, "serving_variant": chosen}


def version_tags(decided: dict[str, Any], run_id: str) -> dict[str, str]:
    """Tags of the registered version: the serving variant and where its files are, each variant's verdict."""
    chosen = decided["serving_variant"]
    tags = {"serving.variant": chosen or "none"}
    if chosen:
        rec = decided["variants"][chosen]
        tags.update({"serving.artifact": f"runs:/{run_id}/{ARTIFACT_DIR}/{chosen}", "serving.runtime": "onnxruntime",
                     "serving.size_bytes": str(rec["size_bytes"]),
                     "serving.latency_p50_ms": f"{rec['latency']['p50_ms']:.3f}",
                     "serving.parity": rec["parity"]["status"],
                     "serving.fingerprint": rec["parity"]["fingerprint"]})
    for name, rec in decided["variants"].items():
        tags[f"variant.{name}"] = "accepted" if rec["accepted"] else "refused"
        if "accuracy" in rec:
            tags[f"variant.{name}.accuracy"] = f"{rec['accuracy']:.6f}"
        if not rec["accepted"]:
            failing = [r for r in rec["reasons"] if "passed" not in r and "within" not in r]
            tags[f"variant.{name}.reason"] = (failing or rec["reasons"])[0][:500]
    return tags


def record_on_version(name: str, version: str, record: dict[str, Any], gate: GateConfig) -> dict[str, Any]:
    """The gate's decision on the variants, set as tags on the registered version. Returns the decision."""
    import mlflow

    from tlops.registry import client

    decided = gate_variants(record, gate)
    if not record.get("variants"):
        return decided
    c = client()
    for key, value in version_tags(decided, str(record.get("run_id", ""))).items():
        c.set_model_version_tag(name, version, key, value)
    mlflow.log_dict({k: v for k, v in decided.items()}, f"{ARTIFACT_DIR}/gate.json")
    for vname, rec in decided["variants"].items():
        log.info("gate: variant %s %s: %s", vname, "accepted" if rec["accepted"] else "refused",
                 "; ".join(rec["reasons"]))
    return decided


def serving_variant_dir(name: str, version: str) -> Path | None:
    """The files of a version's serving variant (downloaded), or None when it has none."""
    import mlflow

    from tlops.registry import client

    tags = client().get_model_version(name, version).tags
    uri = tags.get("serving.artifact")
    if not uri or tags.get("serving.variant", "none") == "none":
        return None
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))


def variant_parity(name: str, version: str, model: Any, spec: Any,
                   golden: list[tuple[str, bytes]]) -> dict[str, Any] | None:
    """``tlops parity`` on a version's serving variant: its files against the version's PyTorch model on the
    golden images, and its spec against the version's. None when the version has no serving variant. A pruned
    variant's graph is not the version's weights: it is checked against the outputs its pruned PyTorch network
    gave on the golden images when it was built (``golden_reference.json``); one built before that record
    existed, for its spec only."""
    from tlops.fileio import read_json
    from tlops.registry import client

    found = serving_variant_dir(name, version)
    if found is None:
        return None
    variant = client().get_model_version(name, version).tags.get("serving.variant", "onnx")
    if variant == "pruned" and (found / V.REFERENCE).is_file():
        return {"name": variant, **V.parity(found, read_json(found / V.REFERENCE), spec, golden, variant)}
    if variant == "pruned":
        from tlops.serving.compress.runtime import SPEC, SpecView

        fp = SpecView.from_record(read_json(found / SPEC)).fingerprint
        errors = [] if fp == spec.fingerprint else [f"pruned: its spec {fp[:12]} is not the version's"]
        return {"name": variant, "status": "fail" if errors else "pass", "fingerprint": fp, "errors": errors}
    return {"name": variant, **V.parity(found, model, spec, golden, variant)}
