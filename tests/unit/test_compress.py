"""Compressed serving variants on a real linear probe (EfficientNet-Lite0, ImageNet weights, tiny digits at 32 px):
ONNX round trip, int8, the gate's refusal, parity, the torch-free runtime, serving, bad input."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tlops.config.settings import GateConfig, load_config
from tlops.errors import TlopsError
from tlops.fileio import read_json
from tlops.serving.compress import variants as V
from tlops.serving.compress.runtime import OnnxPredictor
from tlops.serving.pyfunc import Predictor, load_model_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def images(tiny_digits: Path) -> tuple[list[bytes], list[str]]:
    paths = sorted(tiny_digits.glob("*/*.png"))[::3]
    return [p.read_bytes() for p in paths], [p.parent.name for p in paths]


@pytest.fixture(scope="module")
def onnx_dir(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, spec, _classes = load_model_dir(tiny_models["good"])
    return V.build_onnx(model, spec, read_json(tiny_models["good"] / "model.json"),
                        tmp_path_factory.mktemp("variants") / "onnx")


def _golden(images: tuple[list[bytes], list[str]]) -> list[tuple[str, bytes]]:
    from tlops.vision.parity import edge_case_images

    return [(f"digit-{i}.png", b) for i, b in enumerate(images[0][:4])] + edge_case_images()


def test_onnx_round_trip_matches_pytorch(tiny_models: dict[str, Path], onnx_dir: Path,
                                         images: tuple[list[bytes], list[str]]) -> None:
    model, spec, classes = load_model_dir(tiny_models["good"])
    expected = Predictor(model, spec, classes).predict_proba(images[0])
    onnx = OnnxPredictor(onnx_dir)
    got = onnx.predict_proba(images[0])
    assert onnx.classes == classes and onnx.spec.fingerprint == spec.fingerprint
    assert np.abs(expected - got).max() < 1e-4
    assert (expected.argmax(1) == got.argmax(1)).all()
    report = V.parity(onnx_dir, model, spec, _golden(images), "onnx")
    assert report["status"] == "pass", report["errors"]
    assert max(r["max_abs_tensor_diff"] for r in report["images"]) <= V.TENSOR_ATOL  # PIL+numpy == torchvision


def test_parity_catches_a_graph_that_changed_the_preprocessing(tiny_models: dict[str, Path], tmp_path: Path,
                                                               images: tuple[list[bytes], list[str]]) -> None:
    model, spec, _classes = load_model_dir(tiny_models["good"])

    class ChannelsSwapped(torch.nn.Module):  # BGR inside the graph: the spec on file still says RGB
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.head = inner, inner.head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.flip(1) * 1.5)

    target = V.build_onnx(ChannelsSwapped(model), spec, read_json(tiny_models["good"] / "model.json"), tmp_path / "v")
    report = V.parity(target, model, spec, _golden(images), "onnx")
    assert report["status"] == "fail"
    assert "golden images differ from the PyTorch model" in report["errors"][0]


def test_gate_refuses_a_variant_that_breaks_accuracy(tiny_models: dict[str, Path], onnx_dir: Path, tmp_path: Path,
                                                     images: tuple[list[bytes], list[str]]) -> None:
    from tlops.serving.compress.step import gate_variants

    model, spec, classes = load_model_dir(tiny_models["good"])
    labels = [classes[i] for i in Predictor(model, spec, classes).predict_proba(images[0]).argmax(1)]
    correct = [p == t for p, t in zip(labels, images[1], strict=True)]
    candidate = {"accuracy": sum(correct) / len(correct)}
    worse_model, _, _ = load_model_dir(tiny_models["worse"])  # two classes swapped in the head
    broken = V.build_onnx(worse_model, spec, read_json(tiny_models["worse"] / "model.json"), tmp_path / "broken")
    good, bad = (V.measure(d, images[0], images[1], correct, latency_images=3) for d in (onnx_dir, broken))
    for rec, source in ((good, model), (bad, worse_model)):
        rec["parity"] = V.parity(onnx_dir if rec is good else broken, source, spec, _golden(images), "onnx")
    assert good["comparison"]["difference"] == 0.0 and good["size_bytes"] > 0
    assert good["latency"]["p50_ms"] > 0 and good["latency"]["images_per_s"] > 0
    decided = gate_variants({"candidate": candidate, "variants": {"onnx": good, "int8": bad}}, GateConfig())
    assert decided["variants"]["onnx"]["accepted"]
    assert not decided["variants"]["int8"]["accepted"]
    assert any("over gate.max_compression_drop 0.005" in r for r in decided["variants"]["int8"]["reasons"])
    assert decided["serving_variant"] == "onnx"
    # A latency budget no variant meets: none is chosen, each says why.
    strict = gate_variants({"candidate": candidate, "variants": {"onnx": good}},
                           GateConfig(variant_max_latency_p95_ms=1e-6))
    assert strict["serving_variant"] is None
    assert any("gate.variant_max_latency_p95_ms" in r for r in strict["variants"]["onnx"]["reasons"])


def test_int8_is_smaller_and_close(tiny_models: dict[str, Path], onnx_dir: Path, tmp_path: Path,
                                   tiny_digits: Path, images: tuple[list[bytes], list[str]]) -> None:
    model, spec, classes = load_model_dir(tiny_models["good"])
    calibration = [p.read_bytes() for p in sorted(tiny_digits.glob("*/*.png"))[1::3][:24]]
    int8 = V.build_int8(onnx_dir, calibration, tmp_path / "int8")
    assert (int8 / "model.onnx").stat().st_size * 3 < (onnx_dir / "model.onnx").stat().st_size
    assert read_json(int8 / "variant.json")["calibration_images"] == 24
    expected = Predictor(model, spec, classes).predict_proba(images[0])
    got = OnnxPredictor(int8).predict_proba(images[0])
    assert (expected.argmax(1) == got.argmax(1)).mean() >= 0.9
    report = V.parity(int8, model, spec, _golden(images), "int8")
    assert report["fingerprint"] == spec.fingerprint
    assert report["tolerance"]["probability"] == V.PROB_ATOL["int8"]


@pytest.mark.slow  # a recovery epoch: about 40 s under load; `make test-compress` runs it
def test_pruned_is_smaller_recovers_and_matches_its_graph(tiny_models: dict[str, Path], tiny_digits: Path,
                                                          tmp_path: Path,
                                                          images: tuple[list[bytes], list[str]]) -> None:
    """Half the weights by channel pruning, then recovery (BatchNorm re-estimated, head re-fitted, one epoch of
    every layer): far above chance on held-out digits, and the exported graph is the pruned model's."""
    from tlops.vision.preprocessing import build_transform

    model, spec, classes = load_model_dir(tiny_models["good"])
    meta = read_json(tiny_models["good"] / "model.json")
    train = sorted(tiny_digits.glob("*/*.png"))[1::3]
    transform = build_transform(spec)
    tensors = torch.stack([transform(p.read_bytes()) for p in train])
    labels = torch.tensor([classes.index(p.parent.name) for p in train])
    goal = V._weights_bytes(model) // 2
    pruned = V.build_pruned(model, spec, meta, tensors, labels, goal, 1, 1e-3, tmp_path / "pruned")
    assert V._weights_bytes(pruned) <= goal
    size = (tmp_path / "pruned" / "model.onnx").stat().st_size
    assert size < 0.6 * (tiny_models["good"] / "weights.pt").stat().st_size
    recorded = read_json(tmp_path / "pruned" / "variant.json")
    assert recorded["recovery_epochs"] == 1 and len(recorded["recovery_losses"]) == 1
    got = OnnxPredictor(tmp_path / "pruned").predict_proba(images[0])  # the [::3] images: none trained on
    accuracy = float(np.mean([classes[k] == y for k, y in zip(got.argmax(1), images[1], strict=True)]))
    assert accuracy >= 0.6, accuracy  # three classes, 32 px, 30 training images: chance is 0.33
    report = V.parity(tmp_path / "pruned", pruned, spec, _golden(images), "pruned")
    assert report["status"] == "pass", report["errors"]
    # Later (`tlops parity`) the pruned network is gone: the graph is checked against its recorded outputs.
    reference = V.golden_reference(pruned, spec, _golden(images))
    assert V.parity(tmp_path / "pruned", reference, spec, _golden(images), "pruned")["status"] == "pass"
    other = V.golden_reference(model, spec, _golden(images))  # outputs of another network: the check must fail
    report = V.parity(tmp_path / "pruned", other, spec, _golden(images), "pruned")
    assert report["status"] == "fail" and "differ from the PyTorch model" in report["errors"][0], report["errors"]
    unknown = V.parity(tmp_path / "pruned", {"probabilities": {}}, spec, _golden(images), "pruned")
    assert unknown["status"] == "fail" and "none of the golden images" in unknown["errors"][0]


def test_runtime_serves_without_importing_torch(onnx_dir: Path, images: tuple[list[bytes], list[str]],
                                                tmp_path: Path) -> None:
    sample = tmp_path / "x.png"
    sample.write_bytes(images[0][0])
    code = ("import sys, json; from tlops.serving.compress.runtime import OnnxPredictor; "
            f"p = OnnxPredictor({str(onnx_dir)!r}); f = p.predict_frame([open({str(sample)!r}, 'rb').read()]); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'label': f['label'][0]}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": f"{REPO / 'src'}:{REPO}", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["torch"] is False
    assert result["label"] == OnnxPredictor(onnx_dir).predict_frame([images[0][0]])["label"][0]


def _post(app: Any, body: bytes) -> tuple[int, dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/invocations",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_served_variant_answers_as_offline_evaluation(onnx_dir: Path, images: tuple[list[bytes], list[str]],
                                                      tiny_models: dict[str, Path]) -> None:
    from tlops.serving.server import ScoringApp, ServeLimits, variant_model

    model = variant_model(onnx_dir, {"model": "test"})
    assert model.info["runtime"] == "onnxruntime"
    app = ScoringApp(model, ServeLimits())
    sample = images[0][:6]
    body = json.dumps({"instances": [{"image": base64.b64encode(b).decode()} for b in sample]}).encode()
    status, answer = _post(app, body)
    assert status == 200, answer
    offline = V.measure(onnx_dir, sample, images[1][:6], [True] * 6, latency_images=1)
    assert [p["label"] for p in answer["predictions"]] == offline["labels"]


def test_onnx_and_int8_served_log_the_backbone_embedding(onnx_dir: Path, images: tuple[list[bytes], list[str]],
                                                        tiny_models: dict[str, Path], tiny_digits: Path,
                                                        tmp_path: Path) -> None:
    """The graph's second output is the features the head sees: the prediction log of an ONNX-served version
    holds them (the float graph's to rounding, the int8 graph's close), so feature drift and out-of-distribution
    are measured for it too. A graph without the output (exported before, or pruned) logs none and still serves."""
    import hashlib

    from tlops.serving.metrics import ServingMonitor
    from tlops.serving.predlog import PredictionLog, read_log
    from tlops.serving.server import Batcher, ScoringApp, ServeLimits, variant_model

    model, spec, classes = load_model_dir(tiny_models["good"])
    sample = images[0][:12]
    x = Predictor(model, spec, classes).tensors(sample)
    with torch.inference_mode():
        features = model.backbone(x).numpy()
    calibration = [p.read_bytes() for p in sorted(tiny_digits.glob("*/*.png"))[1::3][:24]]
    int8 = V.build_int8(onnx_dir, calibration, tmp_path / "int8")
    no_output = V.build_onnx(model, spec, read_json(tiny_models["good"] / "model.json"), tmp_path / "plain",
                             embedding=False)
    body = json.dumps({"instances": [{"image": base64.b64encode(b).decode()} for b in sample]}).encode()
    logged = {}
    for name, directory in (("onnx", onnx_dir), ("int8", int8), ("plain", no_output)):
        monitor = ServingMonitor(1.0, PredictionLog(str(tmp_path / f"log-{name}"), flush_s=60), seed=0)
        app = ScoringApp(variant_model(directory, {"name": "digits", "version": "3"}), ServeLimits(),
                         Batcher(8, 0.0), monitor)
        status, answer = _post(app, body)
        assert status == 200, answer
        monitor.close()
        frame = read_log(str(tmp_path / f"log-{name}"))
        assert len(frame) == len(sample)
        order = [[hashlib.sha256(b).hexdigest() for b in sample].index(sha) for sha in frame["image_sha256"]]
        logged[name] = (frame, order)
    frame, order = logged["onnx"]
    np.testing.assert_allclose(np.stack(frame["embedding"].to_numpy()), features[order], rtol=1e-4, atol=1e-4)
    frame, order = logged["int8"]
    got = np.stack(frame["embedding"].to_numpy())
    cosine = (got * features[order]).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(features[order], axis=1))
    assert got.shape == features[order].shape and np.median(cosine) > 0.98 and cosine.min() > 0.9, cosine
    assert logged["plain"][0]["embedding"].isna().all()


def test_bad_input_is_one_line(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(TlopsError, match=r"field deploy.variants: .*unknown variant 'tflite'; choose from onnx"):
        load_config(None, ["deploy.variants=onnx,tflite"])
    with pytest.raises(V.CompressError, match="unknown variant 'fp4'"):
        V.check_names(["onnx", "fp4"])

    class Svd(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.svdvals(x.mean(1))

    with pytest.raises(V.CompressError) as err:
        V.export_graph(Svd(), 8, "svdnet")
    assert "backbone svdnet: the ONNX exporter cannot handle it" in str(err.value)
    assert "\n" not in str(err.value)
    model, spec, _classes = load_model_dir(tiny_models["good"])
    with pytest.raises(V.CompressError, match=r"deploy.prune_target_mb 0.001: cannot be reached"):
        V.prune(model, spec.crop_size, 1000, max_ratio=0.5, step=0.5)
    from tlops.serving.server import load_served_model

    with pytest.raises(TlopsError, match=r"--model .*: variant directory .* lacks model.onnx") as served:
        load_served_model(str(tiny_models["good"]))  # a PyTorch model's directory is no ONNX variant
    assert "\n" not in str(served.value)


def test_serve_of_a_version_with_an_onnx_variant_never_imports_torch(onnx_dir: Path, tmp_path: Path,
                                                                     images: tuple[list[bytes], list[str]]) -> None:
    """`tlops serve` as a user runs it, on a registered version whose serving artifact is the ONNX variant: the
    served process has not imported torch (its /version says so) and answers as the variant does offline."""
    import os
    import time
    import urllib.request

    import mlflow

    from tests.helpers.processes import free_port, stop, wait_until_up
    from tests.helpers.registry import restored_mlflow_uris, use_store
    from tlops.serving.compress.step import ARTIFACT_DIR

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with restored_mlflow_uris():
        experiment = use_store(uri, tmp_path / "artifacts")  # artifacts under tmp_path, not ./mlruns
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_artifacts(str(onnx_dir), f"{ARTIFACT_DIR}/onnx")
        client = mlflow.MlflowClient()
        client.create_registered_model("fast")
        source = f"runs:/{run.info.run_id}/{ARTIFACT_DIR}/onnx"
        version = client.create_model_version("fast", source, run.info.run_id).version
        client.set_model_version_tag("fast", version, "serving.variant", "onnx")
        client.set_model_version_tag("fast", version, "serving.artifact", source)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_TRACKING_URI": uri,
           "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "tlops", "serve", "--model", f"models:/fast/{version}",
                             "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert wait_until_up(f"http://127.0.0.1:{port}/ping", proc, 120), proc.stdout.read() if proc.stdout else ""
        ready_s = time.monotonic() - started
        sample = images[0][:5]
        body = json.dumps({"instances": [{"image": base64.b64encode(b).decode()} for b in sample]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        offline = list(OnnxPredictor(onnx_dir).predict_frame(sample)["label"])
        assert [p["label"] for p in answer["predictions"]] == offline
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=30) as resp:
            info = json.loads(resp.read())
        assert info["runtime"] == "onnxruntime" and info["variant"] == "onnx"
        assert info["torch_loaded"] is False  # after a request: nothing on the way imported torch
        print(f"serve ready in {ready_s:.1f} s")
    finally:
        stop(proc, group=True)
    # The variant's files in a local directory (as KServe's storage initializer leaves them): no MLflow either.
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tlops", "serve", "--model", str(onnx_dir), "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        assert wait_until_up(f"http://127.0.0.1:{port}/ping", proc, 120), proc.stdout.read() if proc.stdout else ""
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert [p["label"] for p in json.loads(resp.read())["predictions"]] == offline
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=30) as resp:
            assert json.loads(resp.read())["torch_loaded"] is False
    finally:
        stop(proc, group=True)
