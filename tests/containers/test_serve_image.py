"""The serving-only image (`docker build --target serve`, `TLOPS_TARGET=serve infra/containers/build-image.sh`):
no torch in it, uid 10001 on a read-only root, `tlops serve` of an ONNX variant's directory answering as the
variant does offline, and smaller than the full image."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.containers.conftest import DEFAULT_IMAGE, podman
from tests.helpers.processes import free_port

pytestmark = pytest.mark.containers
SERVE_IMAGE = os.environ.get("TLOPS_SERVE_IMAGE", "localhost/tlops-serve:0.1.0")


@pytest.fixture(scope="module")
def serve_image(podman_ready: str) -> str:
    if podman("image", "exists", SERVE_IMAGE).returncode != 0:
        pytest.skip(f"the serving image {SERVE_IMAGE} is not built: `make test-containers` builds it "
                    "(or TLOPS_TARGET=serve infra/containers/build-image.sh)")
    return SERVE_IMAGE


def _size(image: str) -> int | None:
    out = podman("image", "inspect", "--format", "{{.Size}}", image)
    return int(out.stdout.strip()) if out.returncode == 0 else None


def test_serve_image_has_no_torch_and_runs_read_only_as_10001(serve_image: str) -> None:
    proc = podman("run", "--rm", "--pull=never", "--read-only", "--network=none", serve_image, "sh", "-c",
                  "id -u; python -c \"import importlib.util as u; print(u.find_spec('torch') is None, "
                  "u.find_spec('onnxruntime') is not None)\"; tlops serve --help | head -3")
    assert proc.returncode == 0, proc.stderr
    uid, found, *help_text = proc.stdout.splitlines()
    assert uid == "10001"
    assert found == "True True", "no torch, ONNX Runtime present"
    assert "Usage: tlops serve" in "\n".join(help_text)
    full = _size(os.environ.get("TLOPS_IMAGE", DEFAULT_IMAGE))
    served = _size(serve_image)
    assert served is not None
    if full is not None:
        assert served < full / 2, f"serving image {served} bytes against the full image's {full}"
        print(f"serving image {served / 1e6:.0f} MB, full image {full / 1e6:.0f} MB")


def test_serve_image_serves_a_variant_directory_as_offline(serve_image: str, tiny_models: dict[str, Path],
                                                           tiny_digits: Path, tmp_path: Path) -> None:
    from tlops.fileio import read_json
    from tlops.serving.compress import variants as V
    from tlops.serving.compress.runtime import OnnxPredictor
    from tlops.serving.pyfunc import load_model_dir

    model, spec, _classes = load_model_dir(tiny_models["good"])
    variant = V.build_onnx(model, spec, read_json(tiny_models["good"] / "model.json"), tmp_path / "onnx")
    for f in variant.iterdir():
        f.chmod(0o644)
    variant.chmod(0o755)
    images = [p.read_bytes() for p in sorted(tiny_digits.glob("*/*.png"))[:5]]
    offline = list(OnnxPredictor(variant).predict_frame(images)["label"])
    port, name = free_port(), f"tlops-serve-test-{uuid.uuid4().hex[:8]}"
    run = podman("run", "-d", "--rm", "--pull=never", "--read-only", "--name", name, "-p", f"127.0.0.1:{port}:8080",
                 "-v", f"{variant}:/models:ro", serve_image, "tlops", "serve", "--model", "/models", "--host",
                 "0.0.0.0", "--port", "8080")
    assert run.returncode == 0, run.stderr
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, podman("logs", name).stderr[-2000:]
                time.sleep(0.5)
        body = json.dumps({"instances": [{"image": base64.b64encode(b).decode()} for b in images]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert [p["label"] for p in json.loads(resp.read())["predictions"]] == offline
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=10) as resp:
            info = json.loads(resp.read())
        assert info["runtime"] == "onnxruntime" and info["torch_loaded"] is False
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, timeout=60)
