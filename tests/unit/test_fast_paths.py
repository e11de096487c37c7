"""The warm run's fast paths give what the slow paths give.

The evaluate step scores from the feature cache (each backbone's features once, then each model's head) or from
the image bytes through the pyfunc: same predictions, same evaluation record, same gate decision and registry
record. A linear-probe candidate and a champion with the same backbone share one cache file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from tests.helpers.registry import EVIDENCE, gate_lab, step_inputs
from tlops import registry, tracking
from tlops.data.discovery import read_manifest
from tlops.data.manifest import localize, split_rows
from tlops.evaluation import evaluate as evaluation
from tlops.fileio import read_json
from tlops.monitoring.reference import Reference
from tlops.steps import evaluate_step, gate_step
from tlops.vision.features import FeatureCache
from tlops.vision.inference import FOLD_TOLERANCE

# What differs between two evaluations of the same models by design: when, how long a call took, which run.
VOLATILE = {"evaluated_at", "latency", "report", "model_uri"}
# config.hash: the two configs differ in evaluation.feature_cache itself.
VOLATILE_TAGS = {"latency_p50_ms", "latency_p95_ms", "mlflow.run_id", "mlflow.source.run_id", "run_id",
                 "gate.decided_at", "evaluation.report", "git.commit", "config.hash"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, tiny_digits: Path, tiny_models: dict) -> dict:
    return gate_lab(tmp_path_factory.mktemp("fast"), tiny_digits, tiny_models)


def _strip(record: dict) -> dict:
    out = {k: v for k, v in record.items() if k not in VOLATILE}
    for who in ("candidate", "champion"):
        if who in out:
            out[who] = {k: v for k, v in out[who].items() if k not in VOLATILE}
    return out


def _tail(lab: dict, name: str, kind: str, from_features: bool) -> dict:
    """evaluate -> gate for one candidate, as the pipeline calls them, scoring from features or from bytes."""
    cfg = lab["cfg"]
    cfg = cfg.model_copy(update={
        "registry": cfg.registry.model_copy(update={"model_name": name}),
        "gate": cfg.gate.model_validate({**cfg.gate.model_dump(), "min_accuracy": 0.2}),
        "evaluation": cfg.evaluation.model_copy(update={"latency_images": 2, "bootstrap_resamples": 500,
                                                        "feature_cache": from_features}),
        # A sample of the training split for the monitoring reference (the demo's 500 of 1,169).
        "monitoring": cfg.monitoring.model_copy(update={"reference_sample": 10}),
    })
    tracking.setup(cfg)
    with mlflow.start_run(experiment_id=lab["experiment"]) as run:
        mlflow.set_tags(EVIDENCE)
    out = lab["root"] / name / run.info.run_id
    inputs = step_inputs(out, cfg, run.info.run_id)
    model_uri = lab["models"][kind]
    if from_features:  # as the fine-tune step leaves it: the whole training split's features, by backbone name
        predictor = evaluation.load_model(model_uri).unwrap_python_model().predictor
        train = localize(split_rows(read_manifest(lab["manifest"]), "train"), Path(cfg.workdir) / "cache")
        FeatureCache(Path(cfg.workdir) / "cache" / "features").features(
            "efficientnet_lite0", predictor.model.backbone, list(train["path"]), [str(x) for x in train["sha256"]],
            predictor.spec, 8, torch.device("cpu"), "train")
    evaluate_step(inputs["plan"], lab["manifest"], model_uri, str(out / "evaluation.json"))
    summary = json.loads(gate_step(inputs["plan"], model_uri, str(out / "evaluation.json"), inputs["parity"],
                                   inputs["serving"], str(out / "decision.json")))
    reference = Reference.load(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="monitoring/reference.npz", dst_path=str(out / "ref")), "reference")
    return {"record": read_json(out / "evaluation.json"), "summary": summary, "cfg": cfg, "reference": reference}


def test_predictions_from_cached_features_equal_the_pyfunc_on_bytes(lab: dict, tmp_path: Path) -> None:
    rows = localize(split_rows(read_manifest(lab["manifest"]), "test"), tmp_path / "pixels")
    model = evaluation.load_model(lab["models"]["good"])
    slow = evaluation.predict(model, evaluation.read_images(list(rows["path"])), batch=8)
    cache = FeatureCache(tmp_path / "features")
    paths, shas = list(rows["path"]), list(rows["sha256"])
    computed = evaluation.predict_features(model, paths, shas, cache, batch=8)
    cached = evaluation.predict_features(model, paths, shas, cache, batch=8)
    assert (cache.misses, cache.hits) == (1, 1)
    for fast in (computed, cached):
        assert fast.labels == slow.labels and fast.classes == slow.classes
        # the fast path runs the backbone folded (tlops.vision.inference): within its 1e-4 tolerance
        np.testing.assert_allclose(fast.proba, slow.proba, rtol=0, atol=FOLD_TOLERANCE)
    # A model with another head on the same backbone reads the same features: one file, no backbone pass.
    worse = evaluation.predict_features(evaluation.load_model(lab["models"]["worse"]), paths, shas, cache, batch=8)
    assert (cache.misses, cache.hits) == (1, 2) and worse.labels != slow.labels
    assert len(list((tmp_path / "features").glob("*.pt"))) == 1


def test_evaluation_and_gate_from_features_match_those_from_bytes(lab: dict) -> None:
    slow, fast = {}, {}
    for out, from_features, prefix in ((slow, False, "slow"), (fast, True, "fast")):
        # A champion ("good"), then a worse candidate scored against it: both models through each path.
        _tail(lab, f"{prefix}-tail", "good", from_features)
        out.update(_tail(lab, f"{prefix}-tail", "worse", from_features))
    assert "champion" in fast["record"] and fast["record"]["candidate"]["accuracy"] < 0.9
    a, b = _strip(slow["record"]), _strip(fast["record"])
    # the fast path runs the backbone folded (tlops.vision.inference): float32 rounding in the confidences
    np.testing.assert_allclose(a["candidate"].pop("ece"), b["candidate"].pop("ece"), rtol=0, atol=1e-6)
    np.testing.assert_allclose(a["champion"].pop("ece"), b["champion"].pop("ece"), rtol=0, atol=1e-6)
    for who in ("candidate", "champion"):
        for key in ("calibration",):
            for x, y in zip(a[who].pop(key)["bins"], b[who].pop(key)["bins"], strict=True):
                assert x["n"] == y["n"] and x["accuracy"] == y["accuracy"]
                assert abs(x["confidence"] - y["confidence"]) < 1e-6
    assert a == b
    s, f = slow["summary"], fast["summary"]
    assert s["decision"] == f["decision"] == "reject" and s["reasons"] == f["reasons"]
    assert s["compared_with"] == f["compared_with"] == "1"
    client = registry.client()
    tags = [{k: v for k, v in client.get_model_version(f"{p}-tail", "2").tags.items() if k not in VOLATILE_TAGS}
            for p in ("slow", "fast")]
    assert tags[0] == tags[1]
    assert {"gate.decision", "test_accuracy"} <= set(tags[0])
    # The monitoring reference: from the cached features (the training sample out of the whole split's file, the
    # held-out split's computed once) as through the pyfunc on the bytes, to float rounding.
    ref_slow, ref_fast = slow["reference"], fast["reference"]
    assert len(ref_fast.train_embeddings) == 10 and len(ref_fast.val_embeddings) > 0
    for f in dataclasses.fields(Reference):
        x, y = getattr(ref_slow, f.name), getattr(ref_fast, f.name)
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=0, atol=FOLD_TOLERANCE, err_msg=f.name)  # folded backbone
        else:
            np.testing.assert_array_equal(x, y, err_msg=f.name)
    # The fast path found the test split's features once for both models of the second run; the reference's
    # held-out features are one more file, the training sample none (the whole split's file, put there above).
    assert len(list((Path(fast["cfg"].workdir) / "cache" / "features").glob("*.pt"))) == 3


SCRIPT = """
import atexit, sys, types
atexit.register(lambda: print(" teardown", end=""))  # runs last: only a full exit reaches it
sys.modules["__main__"].__spec__ = types.SimpleNamespace(name="kfp.dsl.executor_main")  # as kfp's executor runs
from tlops.steps import step

@step
def ok_step():
    return "done"

print(ok_step(), end="")  # unflushed: the quick exit must still deliver it
with open(sys.argv[1], "w") as fh:
    fh.write("outputs")
if sys.argv[2] == "fail":
    raise RuntimeError("the executor failed after the step")
"""


@pytest.mark.parametrize("after", ["ok", "fail"])
def test_a_step_process_exits_quickly_with_its_outputs_and_its_status(tmp_path: Path, after: str) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "out"), after], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.stdout == ("done" if after == "ok" else "done teardown")
    assert (tmp_path / "out").read_text() == "outputs"
    assert proc.returncode == (0 if after == "ok" else 1), proc.stderr
    if after == "fail":
        assert "the executor failed after the step" in proc.stderr
