"""A user's mistakes end in one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli, write_config


def _one_line_error(result) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_data_directory(tmp_path: Path) -> None:
    line = _one_line_error(run_cli("run", "--data", str(tmp_path / "nope"), cwd=tmp_path))
    assert "does not exist" in line and "nope" in line


def test_empty_data_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    line = _one_line_error(run_cli("run", "--data", str(tmp_path / "empty"), cwd=tmp_path))
    assert "no images found" in line


def test_unknown_backbone(tmp_path: Path, tiny_digits: Path) -> None:
    line = _one_line_error(run_cli("run", "--data", str(tiny_digits), "--backbone", "vgg99", cwd=tmp_path))
    assert "unknown backbone 'vgg99'" in line and "efficientnet_lite0" in line


def test_unreachable_s3_endpoint(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "TLOPS_S3_MAX_ATTEMPTS": "2"}
    line = _one_line_error(run_cli("run", "--data", "s3://bucket/digits", cwd=tmp_path, env=env, timeout=120))
    assert "cannot reach the S3 endpoint" in line and str(port) in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--set", "train.epochs=zero"], "train.epochs"),
        (["run", "--config", "missing.yaml"], "does not exist"),
        (["run", "--set", "gate.min_accuracy=2"], "gate.min_accuracy"),
    ],
)
def test_bad_config_arguments(tmp_path: Path, args: list[str], needle: str) -> None:
    assert needle in _one_line_error(run_cli(*args, cwd=tmp_path))


def test_unknown_option_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("run", "--no-such-flag", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_data_that_fails_validation_stops_the_pipeline(tmp_path: Path, tiny_digits: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_digits, data)
    (data / "7" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    cfg = write_config(tmp_path / "c.yaml", tmp_path / ".tlops")
    result = run_cli("run", "--config", str(cfg), "--data", str(data), cwd=tmp_path)
    line = _one_line_error(result)
    assert result.returncode == 1
    assert line.startswith("error: validate: data validation failed") and "broken.png" in line
    assert before == {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}  # input untouched


@pytest.mark.slow  # a pipeline run; the same mismatch (mean) runs end to end in test_parity_gate.py
def test_imagenet_statistics_on_lite0_are_stopped_at_parity(tmp_path: Path, tiny_digits: Path) -> None:
    import mlflow

    cfg = write_config(tmp_path / "c.yaml", tmp_path / ".tlops")
    result = run_cli("run", "--config", str(cfg), "--data", str(tiny_digits),
                     "--set", "preprocess.mean=0.485,0.456,0.406", cwd=tmp_path)
    line = _one_line_error(result)
    assert result.returncode == 1
    assert line.startswith("error: parity: preprocessing parity failed: mean is")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / '.tlops' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tlops"], output_format="list")
    assert len(runs) == 1 and runs[0].data.tags["parity"] == "fail" and runs[0].info.status == "FAILED"
    assert not mlflow.MlflowClient().search_registered_models()  # nothing was registered
