"""Every kind of bad input in one place: files, manifests, configs, CLI arguments (HTTP requests to
``tlops serve`` are in tests/integration/test_serve.py). Each ends in exit 1 (a check said no) or 2 (unusable
input) with one line on stderr naming the file or field, never a traceback, and the input data is unchanged.
README's "input, outcome" table lists the same cases."""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.registry import restored_mlflow_uris
from tests.reliability.cli import one_line, run_inline
from tests.unit.test_data import _bad_files


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with restored_mlflow_uris():
        yield


def _png_bomb() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(
        b"IEND", b"")


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_files_all_named_in_one_failed_validation(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = {**_bad_files(), "bomb.png": _png_bomb()}
    for name, payload in bad.items():
        (data / "7" / name).write_bytes(payload)
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).convert("I;16").save(
        data / "1" / "sixteen-bit.png")
    before = _snapshot(data)
    code, out, err = run_inline(capsys, "validate", "--data", str(data))
    line = one_line(err)
    assert code == 1 and line.startswith("error: data validation failed") and "decodable" in line, line
    # One line per failed check on stdout, naming the files.
    (decodable,) = [x for x in out.splitlines() if "FAIL" in x and "decodable" in x]
    assert f"{len(bad)} file(s) do not decode" in decodable, decodable
    (modes,) = [x for x in out.splitlines() if "FAIL" in x and "allowed_modes" in x]
    assert "sixteen-bit.png" in modes or "I;16" in modes, modes
    assert _snapshot(data) == before


Case = tuple[str, Callable[[Path], list[str]], int, str]

CASES: list[Case] = [
    # data locations and manifests
    ("missing data directory", lambda t: ["validate", "--data", str(t / "nope")], 2, "does not exist"),
    ("directory with no images", lambda t: ["validate", "--data", str(_mkdir(t / "empty" / "cls").parent)], 2,
     "no images found"),
    ("CSV path escaping its root (../)", lambda t: ["validate", "--data", str(_csv(t, "../outside.png,cat"))], 2,
     "escapes"),
    ("CSV absolute path outside its root", lambda t: ["validate", "--data", str(_csv(t, "/etc/hostname,cat"))], 2,
     "escapes"),
    ("CSV without a label column", lambda t: ["validate", "--data", str(_csv(t, "a.png", header="path"))], 2,
     "label"),
    # configs
    ("config file missing", lambda t: ["validate", "--data", str(t), "--config", str(t / "nope.yaml")], 2,
     "does not exist"),
    ("config not YAML", lambda t: ["validate", "--data", str(t), "--config", str(_text(t / "c.yaml", "a: [b"))], 2,
     "c.yaml"),
    ("unknown config field", lambda t: ["run", "--set", "train.epocs=3"], 2, "train.epocs"),
    ("config value of the wrong type", lambda t: ["run", "--set", "train.epochs=zero"], 2, "train.epochs"),
    ("config value out of range", lambda t: ["run", "--set", "gate.min_accuracy=2"], 2, "gate.min_accuracy"),
    ("unknown validation check", lambda t: ["validate", "--data", str(t), "--set",
                                            "validation.severity.nonsense=error"], 2, "nonsense"),
    ("unknown backbone", lambda t: ["run", "--backbone", "vgg99"], 2, "unknown backbone 'vgg99'"),
    # CLI arguments
    ("unknown format", lambda t: ["history", "m", "--format", "xml"], 2, "--format 'xml'"),
    ("registry command before any run", lambda t: ["history", "m"], 2, "no MLflow store"),
    ("registry command on a model that does not exist", lambda t: ["history", "no-such-model", *_store(t)], 2,
     "does not exist"),
    ("--force without --reason", lambda t: ["promote", "m", "1", "--force"], 2, "--force needs --reason"),
    ("model URI that is not models:/", lambda t: ["parity", "--model", "runs:/abc/model", *_store(t)], 2,
     "models:/"),
    ("serve on a port out of range", lambda t: ["serve", "--model", "models:/m@champion", "--port", "70000",
                                                *_store(t)], 2, "port"),
    ("unknown option", lambda t: ["run", "--no-such-flag"], 2, "No such option"),
]


def _store(tmp: Path) -> list[str]:
    """An empty MLflow store (no model yet) for registry commands; returns the option that selects it."""
    import mlflow

    uri = f"sqlite:///{tmp / 'store' / 'mlflow.db'}"
    _mkdir(tmp / "store")
    mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()
    return ["--set", f"tracking.uri={uri}"]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _csv(tmp: Path, row: str, header: str = "path,label") -> Path:
    root = _mkdir(tmp / "csvroot")
    Image.new("RGB", (16, 16)).save(root / "a.png")
    return _text(root / "manifest.csv", f"{header}\n{row}\n")


@pytest.mark.parametrize(("what", "argv", "code", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_an_exit_code(what: str, argv: Callable[[Path], list[str]], code: int,
                                                needle: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    args = argv(tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()  # what setting the case up printed
    got, _, err = run_inline(capsys, *args)
    assert got == code, (what, got, err)
    if what == "unknown option":  # typer's usage box: several lines, still no traceback
        assert needle in err
        return
    line = one_line(err)
    assert line.startswith("error: ") and needle in line, (what, line)
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith((".tlops", "store"))} == \
        {k: v for k, v in before.items() if not k.startswith((".tlops", "store"))}


@pytest.mark.parametrize("argv", [["history", "m"], ["parity", "--model", "models:/m@champion"],
                                  ["audit", "--model", "m"], ["promote", "m", "1"]])
def test_registry_commands_with_the_tracking_server_down(argv: list[str], capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port
    from tlops.tracking import RETRY_ENV

    for name in RETRY_ENV:
        monkeypatch.delenv(name, raising=False)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, _, err = run_inline(capsys, *argv, "--set", f"tracking.uri={url}", "--set", "tracking.retries=0")
    assert code == 2
    assert one_line(err).startswith(f"error: the MLflow tracking server at {url} did not answer after 0 retries")
