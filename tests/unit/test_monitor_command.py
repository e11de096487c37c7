"""`tlops monitor` end to end on a real registry (SQLite store), a real model whose run holds the reference the
evaluate step records, and prediction logs written by the log writer: quiet traffic exits 0, shifted traffic
exits 1, and bad input is one line, exit 2, with no report written."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from tests.conftest import write_config
from tests.helpers.registry import log_model_run, new_version, restored_mlflow_uris, use_store

NAME = "monitored-digits"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, tiny_digits: Path, tiny_models: dict[str, Path]) -> Iterator[dict]:
    import io

    import mlflow
    from sklearn.datasets import load_digits

    from tlops import registry
    from tlops.config.settings import load_config
    from tlops.data.discovery import build_manifest
    from tlops.monitoring.reference import log_reference
    from tlops.serving.predlog import PredictionLog, Served
    from tlops.serving.pyfunc import Predictor, load_model_dir

    root = tmp_path_factory.mktemp("monitor-lab")
    with restored_mlflow_uris():
        db = f"sqlite:///{root / 'mlflow.db'}"
        cfg_path = write_config(root / "config.yaml", root / "work", tracking__uri=db,
                                monitoring__bootstrap_resamples=200)
        cfg = load_config(cfg_path)
        experiment = use_store(db, root / "artifacts")
        run_id, model_uri = log_model_run(experiment, tiny_models["good"])
        seen = {int(p.stem.split("_")[1]) for p in tiny_digits.rglob("*.png")}
        d = load_digits()
        unseen = [(Image.fromarray((255.0 - d.images[i] * (255.0 / 16.0)).round().astype("uint8")), str(t))
                  for i, t in enumerate(d.target) if int(t) in (0, 1, 7) and i not in seen]
        # sklearn orders the scans by writer: shuffled, the held-out split and the traffic share their writers.
        unseen = [unseen[i] for i in np.random.default_rng(0).permutation(len(unseen))]
        # The run's manifest as the pipeline sees it: the tiny set to train on, 150 unseen digits held out.
        val_dir = root / "val"
        for i, (img, label) in enumerate(unseen[120:270]):
            (val_dir / label).mkdir(parents=True, exist_ok=True)
            img.save(val_dir / label / f"v{i}.png")
        manifest = build_manifest(str(tiny_digits), root / "cache")
        manifest["split"] = "train"
        held_rows = build_manifest(str(val_dir), root / "cache")
        held_rows["split"] = "val"
        manifest = pd.concat([manifest, held_rows], ignore_index=True)
        with mlflow.start_run(run_id=run_id):
            mlflow.log_dict(cfg.model_dump(mode="json"), "config/config.json")
            assert log_reference(cfg, model_uri, manifest, lambda rows: rows) is not None
        version = new_version(model_uri, NAME)
        registry.client().set_registered_model_alias(NAME, "champion", version)
        bare_run, bare_uri = log_model_run(experiment, tiny_models["good"])  # no reference: evaluated before
        bare = new_version(bare_uri, "unreferenced-digits")

        model, spec, classes = load_model_dir(tiny_models["good"])
        predictor = Predictor(model, spec, classes)
        held = [img for img, _ in unseen[:120]]
        info = {"name": NAME, "version": version, "classes": classes, "preprocess_fingerprint": spec.fingerprint}

        def serve_to(log_dir: Path, images: list[Image.Image], keep_images: bool = False) -> list[bytes]:
            files = []
            for img in images:
                out = io.BytesIO()
                img.save(out, format="PNG")
                files.append(out.getvalue())
            proba, emb = predictor.proba_embed(predictor.tensors(files))
            log = PredictionLog(str(log_dir), batch_records=50, flush_s=60, keep_images=keep_images)
            for i, f in enumerate(files):
                log.offer(Served(time.time(), info, f, proba[i], emb[i]))
            log.close()
            assert log.written == len(files)
            return files

        serve_to(root / "quiet-log", held)
        shifted = [img.resize((24, 24)).rotate(90) for img in held[:60]] + [ImageOps.invert(img) for img in held[60:]]
        serve_to(root / "shifted-log", shifted)
        import hashlib

        sent = serve_to(root / "bytes-log", shifted, keep_images=True)
        truth = {hashlib.sha256(f).hexdigest(): label for f, (_img, label) in zip(sent, unseen[:120], strict=True)}
        yield {"root": root, "config": cfg_path, "version": version, "bare": bare, "bare_run": bare_run,
               "truth": truth}


def _tlops(*args: str) -> int:
    from tlops.cli import main

    with restored_mlflow_uris():
        try:
            return main(list(args))
        except SystemExit as exc:
            return int(exc.code or 0)


def test_quiet_traffic_exits_0_with_a_report_and_a_run(lab: dict, capsys: pytest.CaptureFixture[str]) -> None:
    out = lab["root"] / "quiet-report"
    code = _tlops("monitor", "--model", f"{NAME}@champion", "--log-uri", str(lab["root"] / "quiet-log"),
                  "--output", str(out), "--config", str(lab["config"]))
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "QUIET" in printed and "estimated accuracy" in printed
    result = json.loads((out / "monitor.json").read_text())
    assert result["verdict"] == "quiet" and result["window"]["records"] == 120
    assert result["estimate"]["floor"] == 0.5
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and f"{NAME} version {lab['version']}" in page

    import mlflow

    with restored_mlflow_uris():
        mlflow.set_tracking_uri(f"sqlite:///{lab['root'] / 'mlflow.db'}")
        run = mlflow.get_run(result["mlflow_run_id"])
        assert mlflow.get_experiment(run.info.experiment_id).name == "tlops-monitor"
    assert run.data.tags["monitor.verdict"] == "quiet" and run.data.tags["monitor.version"] == lab["version"]
    assert run.data.metrics["records"] == 120


def test_shifted_traffic_exits_1(lab: dict, capsys: pytest.CaptureFixture[str]) -> None:
    out = lab["root"] / "shifted-report"
    code = _tlops("monitor", "--model", f"models:/{NAME}@champion", "--log-uri", str(lab["root"] / "shifted-log"),
                  "--output", str(out), "--config", str(lab["config"]), "--format", "json")
    assert code == 1
    result = json.loads(capsys.readouterr().out)
    assert result["verdict"] == "drift"
    assert {"feature drift (MMD)", "image sizes"} <= {c["name"] for c in result["checks"] if c["flagged"]}


@pytest.mark.parametrize("case", ["empty window", "no reference", "corrupt file", "foreign file", "no log",
                                  "bad time"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(lab: dict, case: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    log_dir = tmp_path / "log"
    shutil.copytree(lab["root"] / "quiet-log", log_dir)
    model, extra = f"{NAME}@champion", []
    if case == "empty window":
        extra = ["--since", "2020-01-01", "--until", "2020-01-02"]
        expected = "0 records of"
    elif case == "no reference":
        model, expected = f"unreferenced-digits/{lab['bare']}", "has no monitoring reference"
    elif case == "corrupt file":
        day = next(log_dir.iterdir())
        (day / "part-20261201T000000-broken.parquet").write_bytes(b"PAR1 truncated")
        expected = "cannot be read as Parquet"
    elif case == "foreign file":
        (next(log_dir.iterdir()) / "export.csv").write_text("a,b\n")
        expected = "is not a prediction log file"
    elif case == "no log":
        log_dir, expected = tmp_path / "nowhere", "does not exist"
    else:
        extra, expected = ["--since", "last tuesday"], "not a time"
    out = tmp_path / "report"
    code = _tlops("monitor", "--model", model, "--log-uri", str(log_dir), "--output", str(out),
                  "--config", str(lab["config"]), *extra)
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_scheduled_run_skips_only_when_the_latest_verdict_is_quiet(lab: dict, capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path) -> None:
    import mlflow

    from tlops.config.settings import load_config
    from tlops.selection.drift import SKIP_REASON_TAG, SKIP_TAG, decide_skip

    cfg = load_config(lab["config"], [f"registry.model_name={NAME}", "selection.skip_when=no-served-drift"])
    manifest = pd.DataFrame({"path": [], "label": [], "split": [], "sha256": [], "decodable": []})

    def decide() -> tuple[dict, str | None, dict[str, str]]:
        with restored_mlflow_uris():
            from tlops import tracking

            experiment = tracking.setup(cfg)
            with mlflow.start_run(experiment_id=experiment) as run:
                out = decide_skip(cfg, manifest)
            tags = mlflow.get_run(run.info.run_id).data.tags
            return out, (tags.get(SKIP_REASON_TAG) if tags.get(SKIP_TAG) == "true" else None), tags

    for kind, expected_exit in (("shifted", 1), ("quiet", 0)):
        assert _tlops("monitor", "--model", f"{NAME}@champion", "--log-uri", str(lab["root"] / f"{kind}-log"),
                      "--output", str(tmp_path / kind), "--config", str(lab["config"])) == expected_exit
        result = json.loads((tmp_path / kind / "monitor.json").read_text())
        out, why, tags = decide()
        assert out["served"].get("monitor_run") == result["mlflow_run_id"], (out, result["mlflow_run_id"])
        assert tags["served.monitor_run"] == result["mlflow_run_id"]
        assert result["window"]["first"] in tags["served.window"]
        if kind == "quiet":
            assert out["skipped"] and why is not None and "no served drift" in why and result["window"]["first"] in why
        else:
            assert not out["skipped"] and why is None and "served drift" in out["skip_reason"]
    capsys.readouterr()


def test_export_queue_spreads_uncertain_and_novel_images_over_classes(lab: dict, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from tlops.serving.predlog import read_log

    # Without image bytes: one line, exit 2, nothing written.
    assert _tlops("monitor", "--model", f"{NAME}@champion", "--log-uri", str(lab["root"] / "shifted-log"),
                  "--export-queue", "5", "--output", str(tmp_path / "none"), "--config", str(lab["config"])) == 2
    assert "monitoring.log_images" in capsys.readouterr().err and not (tmp_path / "none").exists()
    # The same traffic logged as a server with monitoring.log_images logs it: each served image's bytes kept.
    assert read_log(str(lab["root"] / "bytes-log"))["image"].notna().all()
    out = tmp_path / "queue"
    assert _tlops("monitor", "--model", f"{NAME}@champion", "--log-uri", str(lab["root"] / "bytes-log"),
                  "--export-queue", "12", "--output", str(out), "--config", str(lab["config"])) == 0, \
        capsys.readouterr().err
    tasks = json.loads((out / "labelstudio.json").read_text())
    manifest = pd.read_csv(out / "manifest.csv")
    assert len(tasks) == len(manifest) == 12 and manifest["label"].isna().all()
    assert all((out / t["data"]["image"]).is_file() for t in tasks)
    assert manifest["sha256"].is_unique
    # Spread over the predicted classes, and the least sure of each class first.
    counts = manifest["predicted"].astype(str).value_counts()
    assert len(counts) == 3 and counts.max() - counts.min() <= 1
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"][0] == str(manifest["predicted"][0])
    assert (out / "labeling_config.xml").read_text().count("<Choice ") == 3


def test_a_labelled_queue_merges_into_the_data_with_provenance(lab: dict, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from tlops.data.discovery import build_manifest

    queue = tmp_path / "queue"
    assert _tlops("monitor", "--model", f"{NAME}@champion", "--log-uri", str(lab["root"] / "bytes-log"),
                  "--export-queue", "9", "--output", str(queue), "--config", str(lab["config"])) == 0
    template = pd.read_csv(queue / "manifest.csv", dtype=str, keep_default_na=False)
    # A person labels them from the known answers: 8 in the CSV template, 9 in Label Studio.
    template["label"] = [lab["truth"][sha] for sha in template["sha256"]]
    template.loc[0, "label"] = ""
    template.to_csv(tmp_path / "labelled.csv", index=False)
    tasks = json.loads((queue / "labelstudio.json").read_text())
    for task in tasks:
        task["annotations"] = [{"was_cancelled": False, "completed_by": {"email": "ann@example.org"},
                                "result": [{"value": {"choices": [lab["truth"][task["data"]["sha256"]]]}}]}]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    before = {p: p.read_bytes() for p in queue.rglob("*") if p.is_file()}

    data = tmp_path / "data" / "manifest.csv"
    assert _tlops("data", "merge", "--labels", str(tmp_path / "labelled.csv"), "--queue", str(queue),
                  "--into", str(data)) == 0
    assert "8 images added, 0 already there, 1 left unlabelled" in capsys.readouterr().out
    assert _tlops("data", "merge", "--labels", str(tmp_path / "export.json"), "--queue", str(queue),
                  "--into", str(data)) == 0
    assert "1 images added, 8 already there, 0 left unlabelled" in capsys.readouterr().out
    merged = pd.read_csv(data, dtype=str, keep_default_na=False)
    assert len(merged) == 9 and set(merged["source"]) == {"served"}
    assert set(merged["model_version"]) == {lab["version"]} and "ann@example.org" in set(merged["labelled_by"])
    assert all(lab["truth"][sha] == label for sha, label in zip(merged["sha256"], merged["label"], strict=True))
    rows = build_manifest(str(data), tmp_path / "cache")  # the next run reads it as data like any other
    assert len(rows) == 9 and rows["decodable"].astype(bool).all()
    assert before == {p: p.read_bytes() for p in queue.rglob("*") if p.is_file()}  # the queue is untouched

    # A changed image: one line, exit 2, nothing written.
    victim = next((queue / "images").iterdir())
    tampered = tmp_path / "tampered"
    import shutil

    shutil.copytree(queue, tampered)
    (tampered / "images" / victim.name).write_bytes(b"not the served image")
    elsewhere = tmp_path / "other" / "manifest.csv"
    assert _tlops("data", "merge", "--labels", str(tmp_path / "export.json"), "--queue", str(tampered),
                  "--into", str(elsewhere)) == 2
    assert "does not match the sha256" in capsys.readouterr().err and not elsewhere.parent.exists()
