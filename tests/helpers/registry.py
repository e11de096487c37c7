"""Small real tlops models in temporary MLflow stores, for the evaluation and registry tests.

``train_tiny_model`` fits the real linear probe on the tiny digits at 32 px (a few seconds);
``degrade`` swaps two rows of its head, so those two classes are always predicted wrong: a model that
is measurably worse through the very same serving path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

MODEL_NAME_ENV = "TLOPS_TEST_MODEL"


def train_tiny_model(data: Path, out: Path) -> Path:
    from tlops.config.settings import TrainConfig
    from tlops.data.discovery import build_manifest, class_names
    from tlops.serving.pyfunc import save_model_dir
    from tlops.training.probe import linear_probe
    from tlops.vision.backbones import reference_spec
    from tlops.vision.preprocessing import with_resolution

    manifest = build_manifest(str(data), out.parent / "manifest-cache")
    classes = class_names(manifest)
    spec = with_resolution(reference_spec("efficientnet_lite0"), 32)
    result = linear_probe("efficientnet_lite0", manifest, classes, spec,
                          TrainConfig(l2_grid=[1e-3], epochs=100, num_threads=2))
    return save_model_dir(out, result.model, "efficientnet_lite0", classes, spec)


def degrade(model_dir: Path, out: Path, swap: tuple[str, str] = ("0", "1")) -> Path:
    """The same model with the head rows of two classes swapped: those classes come out as each other."""
    import shutil

    from tlops.fileio import read_json

    shutil.copytree(model_dir, out)
    classes = read_json(out / "model.json")["classes"]
    i, j = classes.index(swap[0]), classes.index(swap[1])
    state = torch.load(out / "weights.pt", weights_only=True)
    for key in ("head.weight", "head.bias"):
        t = state[key].clone()
        t[[i, j]] = t[[j, i]]
        state[key] = t
    torch.save(state, out / "weights.pt")
    return out


@contextlib.contextmanager
def restored_mlflow_uris() -> Iterator[None]:
    """Put MLflow's process-wide tracking and registry URIs (and the variables it exports for subprocesses)
    back as they were, so that a later test's ``MlflowClient()`` does not talk to this module's store."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri,
             {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")})
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved[0], saved[1]
        for key, value in saved[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def use_store(uri: str, artifact_root: Path | None = None, experiment: str = "tlops") -> str:
    """Point MLflow (tracking and registry) at ``uri``; returns the experiment id."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None
    return mlflow.create_experiment(experiment, artifact_location=location)


EVIDENCE = {"validation": "pass", "parity": "pass", "parity.serving": "pass", "preprocess.fingerprint": "a" * 64,
            "preprocess.reference_fingerprint": "a" * 64, "preprocess.declared": "none",
            "data.manifest_hash": "m" * 12, "config.hash": "c" * 64, "tlops.pipeline_run": "test-run"}


def log_model_run(experiment_id: str, model_dir: Path, tags: dict[str, str] | None = None) -> tuple[str, str]:
    """One MLflow run holding the model as the fine-tune step logs it; returns (run id, model URI)."""
    import mlflow

    from tlops import __version__
    from tlops.steps import log_pyfunc_model

    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.set_tags({**EVIDENCE, **(tags or {})})
        info = log_pyfunc_model(str(model_dir), __version__)
    return run.info.run_id, str(info.model_uri)


def new_version(model_uri: str, name: str, **tags: str) -> str:
    from tlops import registry

    return str(registry.register(model_uri, name, {"test_accuracy": "0.9", **tags}).version)


def race_worker(uri: str, name: str, version: str, compared_with: str, file_lock: bool, barrier: Any,
                results: Any) -> None:
    """One of two pipelines finishing at once: both compared against ``compared_with`` and both promote."""
    os.environ["MLFLOW_TRACKING_URI"] = uri
    import mlflow

    from tlops import registry

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if not file_lock:
        registry.lock._sqlite_path = lambda: None  # the registry lease alone, as against an MLflow server
    decision = registry.Decision("promote", ["every check passed"], compared_with, {"mode": "auto"})
    barrier.wait(timeout=120)
    try:
        out = registry.apply_decision(name, version, decision, who=f"pipeline-{version}", via=f"race {version}",
                                      lock=registry.LockSettings(settle_s=0.5, timeout_s=120))
        results.put((version, out.decision, out.stale))
    except BaseException as exc:  # reported to the parent, which fails the test with it
        results.put((version, f"error {type(exc).__name__}: {exc}", None))


def step_inputs(out: Path, cfg: Any, run_id: str, evidence: dict[str, str] | None = None) -> dict[str, str]:
    """The declared inputs the later pipeline steps take, written as the earlier steps write them: the run plan,
    the parity report and the serving check, carrying ``evidence`` (EVIDENCE by default)."""
    from tlops.config.plan import RunPlan
    from tlops.fileio import write_json

    ev = {**EVIDENCE, **(evidence or {})}
    declared = [] if ev["preprocess.declared"] == "none" else ev["preprocess.declared"].split("; ")
    plan = RunPlan(run_id=run_id, config=cfg, decision="train", reasons=["training"],
                   pipeline_run=ev["tlops.pipeline_run"], manifest_hash=ev["data.manifest_hash"],
                   validation={"status": ev["validation"], "failed": [], "warnings": []})
    paths = {"plan": str(out / "run_plan.json"), "parity": str(out / "parity_report.json"),
             "serving": str(out / "serving_parity.json")}
    plan.write(paths["plan"])
    write_json(paths["parity"], {"status": ev["parity"], "declared": declared,
                                 "candidate": {"fingerprint": ev["preprocess.fingerprint"]},
                                 "reference": {"fingerprint": ev["preprocess.reference_fingerprint"]}})
    write_json(paths["serving"], {"status": ev["parity.serving"], "images": [], "errors": []})
    return paths


def gate_lab(root: Path, tiny_digits: Path, tiny_models: dict) -> dict:
    """A SQLite store under ``root`` with the tiny digits' manifest and the good and worse tiny models logged:
    what the evaluate -> gate tests run on."""
    from tests.conftest import write_config
    from tlops import tracking
    from tlops.config.settings import load_config
    from tlops.data.discovery import build_manifest, write_manifest

    cfg = load_config(write_config(root / "c.yaml", root / ".tlops",
                                   tracking__uri=f"sqlite:///{root / '.tlops' / 'mlflow.db'}"))
    experiment = tracking.setup(cfg)
    manifest = root / "manifest.csv"
    write_manifest(build_manifest(str(tiny_digits), root / "cache"), manifest)
    models = {kind: log_model_run(experiment, tiny_models[kind])[1] for kind in ("good", "worse")}
    return {"root": root, "cfg": cfg, "experiment": experiment, "manifest": str(manifest), "models": models,
            "weights": tiny_models["good"] / "weights.pt", "model_dirs": tiny_models}
