"""The compress step in the whole pipeline (`tlops run` with deploy.variants): the gate registers the candidate
and the variant it accepts as the version's serving artifact; `tlops audit` and `tlops parity` show it; `tlops
serve` serves it without torch and answers as the offline evaluation; a pruning target that cannot be reached
is one line and the candidate is still registered."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, run_cli, stop, wait_until_up, write_config

pytestmark = pytest.mark.slow
NAME = "compress-digits"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_digits: Path) -> dict:
    cwd = tmp_path_factory.mktemp("compress-run")
    cfg = write_config(cwd / "c.yaml", cwd / ".tlops", registry__model_name=NAME,
                       deploy__variants=["onnx", "int8"], deploy__calibration_images=24,
                       evaluation__latency_images=5, evaluation__bootstrap_resamples=200)
    run = run_cli("run", "--config", str(cfg), "--data", str(tiny_digits), cwd=cwd, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    return {"cwd": cwd, "cfg": cfg, "run": run, "uri": f"sqlite:///{cwd / '.tlops' / 'mlflow.db'}"}


def _tags(store: dict, version: str = "1") -> dict[str, str]:
    import mlflow

    c = mlflow.MlflowClient(tracking_uri=store["uri"], registry_uri=store["uri"])
    return dict(c.get_model_version(NAME, version).tags)


def test_the_gate_registers_the_accepted_variant_as_the_serving_artifact(store: dict) -> None:
    tags = _tags(store)
    assert tags["variant.onnx"] == "accepted"  # the float graph: the candidate's predictions exactly
    assert tags["serving.variant"] in ("onnx", "int8")
    assert tags["serving.artifact"].endswith(f"/variants/{tags['serving.variant']}")
    assert tags["serving.fingerprint"] == tags["preprocess.fingerprint"]
    assert tags["serving.parity"] == "pass"
    assert "variant.int8" in tags
    assert f"serving        variant {tags['serving.variant']}" in store["run"].stdout
    assert "onnx: parity passed" in store["run"].stdout
    audit = run_cli("audit", "--model", NAME, "--config", str(store["cfg"]), cwd=store["cwd"])
    assert audit.returncode == 0, audit.stderr
    assert tags["serving.variant"] in audit.stdout.splitlines()[-1]
    parity = run_cli("parity", "--model", f"models:/{NAME}/1", "--config", str(store["cfg"]), cwd=store["cwd"])
    assert parity.returncode == 0, parity.stdout + parity.stderr
    assert f"serving variant {tags['serving.variant']}: pass" in parity.stdout


def test_serve_answers_with_the_variant_as_offline(store: dict, tiny_digits: Path) -> None:
    from tests.helpers.registry import restored_mlflow_uris, use_store
    from tlops.serving.compress.runtime import OnnxPredictor
    from tlops.serving.compress.step import serving_variant_dir

    images = [p.read_bytes() for p in sorted(tiny_digits.glob("*/*.png"))[:6]]
    with restored_mlflow_uris():
        use_store(store["uri"])
        offline = list(OnnxPredictor(serving_variant_dir(NAME, "1")).predict_frame(images)["label"])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_TRACKING_URI"] = store["uri"]
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "tlops", "serve", "--model", f"models:/{NAME}@champion",
                             "--port", str(port), "--sample-rate", "1", "--log-uri", str(store["cwd"] / "served-log")],
                            cwd=store["cwd"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert wait_until_up(f"http://127.0.0.1:{port}/ping", proc, 120)
        ready_s = time.monotonic() - started
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=30) as resp:
            info = json.loads(resp.read())
        assert info["runtime"] == "onnxruntime" and info["version"] == "1"
        body = json.dumps({"instances": [{"image": base64.b64encode(b).decode()} for b in images]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        assert [p["label"] for p in answer["predictions"]] == offline
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=30) as resp:
            assert json.loads(resp.read())["torch_loaded"] is False
        print(f"serve ready in {ready_s:.1f} s")
    finally:
        stop(proc, group=True)
    # The variant's graph gives the backbone's features: the prediction log of an ONNX-served version has them.
    from tlops.serving.predlog import read_log

    logged = read_log(str(store["cwd"] / "served-log"))
    assert len(logged) == len(images) and all(len(e) == 1280 for e in logged["embedding"])


def test_an_unreachable_pruning_target_is_one_line_and_the_candidate_is_registered(store: dict,
                                                                                   tiny_digits: Path) -> None:
    run = run_cli("run", "--config", str(store["cfg"]), "--data", str(tiny_digits), "--set",
                  "deploy.variants=[pruned]", "--set", "deploy.prune_target_mb=0.001", cwd=store["cwd"], timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    tags = _tags(store, "2")
    assert tags["serving.variant"] == "none"
    assert tags["variant.pruned"] == "refused"
    assert "deploy.prune_target_mb 0.001: cannot be reached" in tags["variant.pruned.reason"]
    assert "\n" not in tags["variant.pruned.reason"]


def test_a_pruned_serving_variant_is_checked_against_its_recorded_outputs(store: dict, tiny_digits: Path) -> None:
    """`tlops parity` on a version served by its pruned graph: the pruned network is not kept, so the graph is
    checked against the outputs that network gave on the golden images at build time; altered, they fail it."""
    import mlflow

    run = run_cli("run", "--config", str(store["cfg"]), "--data", str(tiny_digits), "--set",
                  "deploy.variants=[pruned]", "--set", "deploy.prune_epochs=1", "--set",
                  "gate.max_compression_drop=1.0", "--set", "evaluation.confidence=0.9999",
                  cwd=store["cwd"], timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    c = mlflow.MlflowClient(tracking_uri=store["uri"], registry_uri=store["uri"])
    version = str(max(int(v.version) for v in c.search_model_versions(f"name='{NAME}'")))
    tags = _tags(store, version)
    assert tags["serving.variant"] == "pruned", tags.get("variant.pruned.reason")
    parity = run_cli("parity", "--model", f"models:/{NAME}/{version}", "--config", str(store["cfg"]),
                     cwd=store["cwd"])
    assert parity.returncode == 0, parity.stdout + parity.stderr
    assert "serving variant pruned: pass" in parity.stdout
    run_id = tags["serving.artifact"].split("/")[1]  # runs:/<id>/variants/pruned
    stored = [p for p in (store["cwd"] / ".tlops").rglob("variants/pruned/golden_reference.json")
              if run_id in p.parts]  # the artifact store's own copy, which `tlops parity` downloads
    assert len(stored) == 1, stored
    stored = stored[0]
    record = json.loads(stored.read_text())
    record["probabilities"] = {k: list(reversed(v)) for k, v in record["probabilities"].items()}
    stored.write_text(json.dumps(record))
    parity = run_cli("parity", "--model", f"models:/{NAME}/{version}", "--config", str(store["cfg"]),
                     cwd=store["cwd"])
    assert parity.returncode != 0
    assert "golden images differ from the PyTorch model" in parity.stdout + parity.stderr
