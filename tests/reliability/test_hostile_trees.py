"""Hostile data trees and sick tracking stores (issue 19): what an attacker or an unlucky operator hands
``tlops``. Every case ends in an exit code with exactly one line on stderr and no traceback; the input tree is
byte-for-byte unchanged (links, FIFOs and sparse files are compared by what they are, never read); nothing
half-written is left; nothing outside the data root is read; nothing hangs; memory stays bounded.

The walk that decides what is read is ``tlops.data.discovery.walk``; a seeded generator builds random trees mixing good
images with hostile entries (``test_random_hostile_trees``). The cases that need an unprivileged user (an
unreadable folder, file, root or store) run as ``nobody`` through setpriv: this suite runs as root here, and
permission bits do not stop root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.helpers.registry import restored_mlflow_uris
from tests.reliability.cli import one_line, partials, run_inline, snapshot
from tlops.data.discovery import build_manifest, printable

NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with restored_mlflow_uris():
        yield


# ---- what is opened: an audit hook records every open and every folder listing ----------------------

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event in ("open", "os.scandir", "os.listdir") and args and \
            isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.abspath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@contextlib.contextmanager
def _recording() -> Iterator[list[str]]:
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def _under(path: str, top: Path | str) -> bool:
    top = os.path.realpath(top)
    real = os.path.realpath(path)
    return real == top or real.startswith(top.rstrip("/") + "/") or path.startswith(str(top).rstrip("/") + "/")


# ---- helpers -----------------------------------------------------------------------------------------


def _png_bytes(value: int, size: tuple[int, int] = (16, 16), seed: int = 0) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.integers(0, 40, (size[1], size[0])) + value, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.fixture(scope="module")
def thin_png() -> bytes:
    """8 x 11,000,000 greyscale pixels in about 100 KB: under max_pixels, but its resize would need tens of GB."""
    width, height, step = 8, 11_000_000, 100_000
    co = zlib.compressobj(9)
    rows = (b"\0" * (1 + width)) * step
    body = b"".join(co.compress(rows) for _ in range(height // step)) + co.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", body) + _chunk(b"IEND", b""))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Good images outside the data root: what a link out of the root would bring in."""
    top = tmp_path / "elsewhere"
    (top / "sub").mkdir(parents=True)
    (top / "x.png").write_bytes(_png_bytes(200, seed=1))
    for i in range(3):
        (top / "sub" / f"y{i}.png").write_bytes(_png_bytes(100, seed=10 + i))
    return top


def _quarantine(out: Path) -> dict[str, str]:
    q = pd.read_csv(out / "quarantine.csv", keep_default_na=False)
    return dict(zip(q["uri"], q["reason"], strict=True))


def _validate_quarantines(capsys: pytest.CaptureFixture[str], data_arg: Path, out: Path,
                          watch: list[Path]) -> tuple[dict[str, str], list[str]]:
    """``tlops validate``: exit 1, one line naming the decodable check; (the quarantine list, every path the
    command opened or listed). Nothing under ``watch`` changed, nothing half-written."""
    before = snapshot(*watch)
    with _recording() as opened:
        code, _, err = run_inline(capsys, "validate", "--data", str(data_arg), "--output", str(out))
    line = one_line(err)
    assert code == 1 and line.startswith("error: data validation failed") and "decodable" in line, line
    assert snapshot(*watch) == before
    assert not partials(out, *watch)
    return _quarantine(out), opened


# ---- 2. links out of the data root -------------------------------------------------------------------


def _link_file(data: Path, outside: Path) -> tuple[Path, str]:
    (data / "0" / "link.png").symlink_to(outside / "x.png")
    return data, f"{data}/0/link.png"


def _link_class(data: Path, outside: Path) -> tuple[Path, str]:
    (data / "linked").symlink_to(outside / "sub", target_is_directory=True)
    return data, f"{data}/linked"


def _csv_through_link(data: Path, outside: Path) -> tuple[Path, str]:
    (data / "via").symlink_to(outside, target_is_directory=True)
    rows = [f"{p.relative_to(data).as_posix()},{p.parent.name}" for p in sorted(data.rglob("*.png"))]
    (data / "m.csv").write_text("path,label\n" + "\n".join([*rows, "via/x.png,0"]) + "\n")
    return data / "m.csv", f"{data}/via/x.png"


@pytest.mark.parametrize("make", [_link_file, _link_class, _csv_through_link],
                         ids=["linked file", "linked class folder", "CSV row through a linked folder"])
def test_links_out_of_the_root_are_quarantined_unread(make: Callable[[Path, Path], tuple[Path, str]], data: Path,
                                                      outside: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    arg, uri = make(data, outside)
    quarantine, opened = _validate_quarantines(capsys, arg, tmp_path / "out", [data, outside])
    assert quarantine == {uri: quarantine[uri]} and "outside the data root" in quarantine[uri], quarantine
    assert quarantine[uri].startswith("not read: a link to"), quarantine[uri]
    assert not [p for p in opened if _under(p, outside)], "read outside the data root"
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv", keep_default_na=False)
    outside_hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in outside.rglob("*.png")}
    assert not outside_hashes & set(manifest["sha256"])


def test_links_inside_the_root_are_read_and_folder_links_not_followed(data: Path, tmp_path: Path) -> None:
    (data / "0" / "again.png").symlink_to(next((data / "1").glob("*.png")))
    (data / "0" / "up").symlink_to(data, target_is_directory=True)  # a loop, were it followed
    df = build_manifest(str(data), tmp_path / "cache")
    row = df[df["uri"].str.endswith("0/again.png")].iloc[0]
    assert row["decodable"] and row["path"].startswith(f"{data.resolve()}/1/")  # read through the target
    assert len(df) == 91 and df["decodable"].all()


# ---- 3./4. FIFOs, devices, huge and elongated files: never opened or decoded, memory bounded --------------


# A small parent for the measured command: the peak RSS (ru_maxrss from wait4) of a child forked from pytest
# itself would count pytest's own pages, copied at the fork, before the exec.
_MEASURE = (
    "import os, sys\n"
    "pid = os.posix_spawn(sys.executable, [sys.executable, *sys.argv[1:]], os.environ)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "print(f'tlops-maxrss-kib {usage.ru_maxrss}', flush=True)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def _peak_rss(argv: list[str], cwd: Path, timeout_s: float) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr, peak RSS in bytes) of ``python ARGV``; killed after ``timeout_s``."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-c", _MEASURE, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail(f"python {' '.join(argv)} still running after {timeout_s:.0f}s: it hangs")
    lines = stdout.splitlines()
    assert lines and lines[-1].startswith("tlops-maxrss-kib "), stdout
    return proc.returncode, "\n".join(lines[:-1]), stderr, int(lines[-1].split()[1]) * 1024


def test_validate_of_a_tree_with_an_8gb_file_a_fifo_and_dev_zero_is_bounded(data: Path, tmp_path: Path) -> None:
    """A child ``tlops validate``: it ends (no hang on the FIFO), in bounded memory (ru_maxrss of the child)."""
    huge = data / "7" / "huge.png"
    with open(huge, "wb") as fh:
        fh.truncate(8 << 30)  # sparse: 8 GB that take no disk
    os.mkfifo(data / "1" / "pipe.png")
    (data / "0" / "zero.png").symlink_to("/dev/zero")
    before = snapshot(data)
    out = tmp_path / "out"
    t0 = time.monotonic()
    code, stdout, stderr, peak = _peak_rss(["-m", "tlops", "validate", "--data", str(data), "--output", str(out)],
                                           tmp_path, 180)
    print(f"tlops validate, tree with an 8 GB sparse .png, a FIFO and a link to /dev/zero: peak RSS "
          f"{peak / 2**20:.0f} MiB, {time.monotonic() - t0:.1f} s")
    assert "Traceback" not in stderr and code == 1, stderr
    assert one_line(stderr).startswith("error: data validation failed"), stderr
    assert peak < 500 * 2**20, f"peak RSS {peak / 2**20:.0f} MiB"
    reasons = _quarantine(out)
    assert reasons[f"{data}/7/huge.png"] == (f"not read: {8 << 30} bytes, over the limit of {128 << 20} "
                                             "(TLOPS_MAX_FILE_BYTES)")
    assert reasons[f"{data}/1/pipe.png"] == "not read: a FIFO, not a regular file"
    assert reasons[f"{data}/0/zero.png"] == "not read: a link to /dev/zero, outside the data root"
    assert len(reasons) == 3 and "3 file(s) do not decode" in stdout
    assert snapshot(data) == before and not partials(out, data)


def test_special_files_are_never_opened(data: Path, tmp_path: Path) -> None:
    os.mkfifo(data / "1" / "pipe.png")
    sock = socket.socket(socket.AF_UNIX)
    old = os.getcwd()
    os.chdir(data / "7")
    try:
        sock.bind("sock.png")  # relative: the absolute path may be over AF_UNIX's 108 bytes
    finally:
        os.chdir(old)
    csv = data / "m.csv"
    csv.write_text("path,label\n1/pipe.png,1\n7/sock.png,7\n0,0\n" + "".join(
        f"{p.relative_to(data).as_posix()},{p.parent.name}\n" for p in sorted(data.rglob("*.png"))[:12]))
    with _recording() as opened:
        tree = build_manifest(str(data), tmp_path / "cache")
        listed = build_manifest(str(csv), tmp_path / "cache")
    sock.close()
    for df in (tree, listed):
        bad = df[~df["decodable"]].set_index("uri")["error"].to_dict()
        assert bad[f"{data}/1/pipe.png"] == "a FIFO, not a regular file"
        assert bad[f"{data}/7/sock.png"] == "a socket, not a regular file"
    assert listed.set_index("uri").at[f"{data}/0", "error"] == "a directory, not a regular file"
    assert not [p for p in opened if p.endswith(("pipe.png", "sock.png"))]


def test_an_elongated_image_is_refused_from_its_header(tmp_path: Path, thin_png: bytes,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tlops.data.discovery import _inspect

    path = tmp_path / "thin.png"
    path.write_bytes(thin_png)
    loads: list[object] = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self))
    info = _inspect(path)
    assert not info["decodable"] and (info["width"], info["height"]) == (8, 11_000_000)
    assert "1375000 times longer than wide, over the limit of 100 (TLOPS_MAX_ASPECT_RATIO)" in str(info["error"])
    assert not loads and len(thin_png) < 200_000  # never decoded; the file itself is small


def test_file_size_limit_is_a_setting(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = int(np.median([p.stat().st_size for p in data.rglob("*.png")]))
    monkeypatch.setenv("TLOPS_MAX_FILE_BYTES", str(limit))
    df = build_manifest(str(data), tmp_path / "cache")
    over = df[df["bytes"] > limit]
    assert len(over) and not over["decodable"].any() and (over["sha256"] == "").all()
    assert over["error"].str.endswith(f"over the limit of {limit} (TLOPS_MAX_FILE_BYTES)").all()
    assert df.loc[df["bytes"] <= limit, "decodable"].all()
    monkeypatch.setenv("TLOPS_MAX_FILE_BYTES", "lots")
    with pytest.raises(Exception, match="TLOPS_MAX_FILE_BYTES='lots': expected a positive number"):
        build_manifest(str(data), tmp_path / "cache")


# ---- a file replaced while it is validated -----------------------------------------------------------


def test_files_replaced_between_the_walk_and_the_read(data: Path, outside: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Swapped after the walk admitted them: a FIFO, a link out, a deleted file, a class folder replaced by a
    link to a folder outside holding files of the same names. None is read; none hangs."""
    from tlops.data import discovery as data_mod

    real = data_mod.inspect_files
    zero, one, seven = (sorted((data / c).glob("*.png")) for c in ("0", "1", "7"))
    (outside / "seven").mkdir()
    for p in seven:
        shutil.copy(outside / "x.png", outside / "seven" / p.name)

    def swap_then_inspect(paths, *args, **kwargs):  # type: ignore[no-untyped-def]
        zero[0].unlink()
        os.mkfifo(zero[0])
        zero[1].unlink()
        zero[1].symlink_to(outside / "x.png")
        one[0].unlink()
        (data / "7").rename(data / "7-moved")
        (data / "7").symlink_to(outside / "seven", target_is_directory=True)
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(data_mod, "inspect_files", swap_then_inspect)
    done: list[pd.DataFrame] = []
    worker = threading.Thread(target=lambda: done.append(build_manifest(str(data), tmp_path / "c")), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "hung on a file swapped for a FIFO"
    df = done[0].set_index("uri")
    assert df.at[f"{data}/0/{zero[0].name}", "error"] == "a FIFO, not a regular file"
    assert df.at[f"{data}/0/{zero[1].name}", "error"] == "a link, not a regular file"
    assert df.at[f"{data}/1/{one[0].name}", "error"].startswith("FileNotFoundError")
    moved = df.loc[[f"{data}/7/{p.name}" for p in seven]]
    assert moved["error"].str.startswith("the path now leads to ").all() and (moved["sha256"] == "").all()
    assert not (set(df["sha256"]) & {hashlib.sha256((outside / "x.png").read_bytes()).hexdigest()})


# ---- 5. data silently lost ---------------------------------------------------------------------------


def test_a_csv_with_only_its_header_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m.csv").write_text("path,label\n")
    code, _, err = run_inline(capsys, "validate", "--data", str(tmp_path / "m.csv"))
    assert code == 2 and "lists no files" in one_line(err)


def test_an_excel_csv_utf8_manifest_with_a_byte_order_mark(data: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    rows = "".join(f"{p.relative_to(data).as_posix()},{p.parent.name}\r\n" for p in sorted(data.rglob("*.png")))
    (data / "m.csv").write_bytes(b"\xef\xbb\xbf" + f"path,label\r\n{rows}".encode())
    code, out, err = run_inline(capsys, "validate", "--data", str(data / "m.csv"), "--output", str(tmp_path / "out"),
                          "--set", "validation.min_images_per_class=1")
    assert code == 0 and not err.strip(), err
    assert "90 files; 0 quarantined" in out


# ---- 6. one line, never a traceback ------------------------------------------------------------------

Case = tuple[str, Callable[[Path, Path], list[str]], int, str]


def _csv_with(data: Path, extra: str, name: str = "m.csv", encoding: str = "utf-8") -> Path:
    """A manifest of the good images (regular files) in ``data``, plus the rows ``extra``."""
    rows = "".join(f"{p.relative_to(data).as_posix()},{p.parent.name}\n" for p in sorted(data.rglob("*.png"))
                   if p.is_file() and not p.is_symlink())
    (data / name).write_bytes(f"path,label\n{rows}{extra}".encode(encoding))
    return data / name


def _config(tmp: Path, text: str, encoding: str) -> Path:
    (tmp / "c.yaml").write_bytes(text.encode(encoding))
    return tmp / "c.yaml"


def _bad_name(data: Path) -> Path:
    with open(os.fsencode(data / "7") + b"/caf\xe9.png", "wb") as fh:
        fh.write(_png_bytes(50))
    return data


def _tracking(uri: str) -> list[str]:
    return ["history", "m", "--set", f"tracking.uri={uri}"]


def _file(path: Path, payload: bytes = b"") -> Path:
    path.write_bytes(payload)
    return path


SET_VALUES = ["@team/model", "%HOME%", "[a, b", "*salt", "!!python/object/apply:os.system [id]", "1" * 5000]

CASES: list[Case] = [
    *[(f"--set value {v[:20]!r}", lambda t, d, v=v: ["validate", "--data", str(d), "--set",
                                                     f"registry.model_name={v}"], 2, "is not a YAML value")
      for v in SET_VALUES],
    ("config file in Latin-1", lambda t, d: ["validate", "--data", str(d), "--config",
                                             str(_config(t, "registry:\n  model_name: café\n", "latin-1"))], 2,
     "not UTF-8 text"),
    ("config file in UTF-16", lambda t, d: ["validate", "--data", str(d), "--config",
                                            str(_config(t, "registry: {}\n", "utf-16"))], 2, "UTF-16"),
    ("CSV in Latin-1", lambda t, d: ["validate", "--data", str(_csv_with(d, "0/x.png,café\n", encoding="latin-1"))],
     2, "not UTF-8 text"),
    ("CSV in UTF-16", lambda t, d: ["validate", "--data", str(_csv_with(d, "", encoding="utf-16"))], 2, "UTF-16"),
    ("CSV field of 200,000 characters", lambda t, d: ["validate", "--data", str(_csv_with(d, "0/a.png," + "x" * 200_000
                                                                                            + "\n"))], 2,
     "field larger than field limit"),
    ("CSV row with a NUL in its path", lambda t, d: ["validate", "--data", str(_csv_with(d, "0/a\0b.png,0\n"))], 1,
     "decodable"),
    ("CSV row naming a folder", lambda t, d: ["validate", "--data", str(_csv_with(d, "0,0\n"))], 1, "decodable"),
    ("CSV row over the system's path limit", lambda t, d: ["validate", "--data", str(_csv_with(
        d, "/".join(["d" * 250] * 20) + "/x.png,0\n"))], 1, "decodable"),
    ("CSV row with a name over 255 bytes", lambda t, d: ["validate", "--data", str(_csv_with(d, "0/" + "n" * 300
                                                                                          + ".png,0\n"))], 1,
     "decodable"),
    ("CSV row naming a FIFO", lambda t, d: (os.mkfifo(d / "0" / "p.png"),
                                            ["validate", "--data", str(_csv_with(d, "0/p.png,0\n"))])[1], 1,
     "decodable"),
    ("CSV row naming a link to /dev/zero", lambda t, d: ((d / "0" / "z.png").symlink_to("/dev/zero"),
                                                         ["validate", "--data", str(_csv_with(d, "0/z.png,0\n"))])[1],
     1, "decodable"),
    ("file name that is not UTF-8", lambda t, d: ["validate", "--data", str(_bad_name(d))], 1, "decodable"),
    ("--output under a file", lambda t, d: ["validate", "--data", str(d), "--output", str(_file(t / "f") / "out")], 2,
     "--output"),
    ("--output in /proc", lambda t, d: ["validate", "--data", str(d), "--output", "/proc/tlops-out"], 2, "--output"),
    ("workdir under a file", lambda t, d: ["validate", "--data", str(d), "--set", f"workdir={_file(t / 'f')}/wd"], 2,
     "workdir"),
    ("workdir in /proc", lambda t, d: ["validate", "--data", str(d), "--set", "workdir=/proc/tlops-wd"], 2, "workdir"),
    ("compile --output naming a folder", lambda t, d: ["compile", "--output", str(d)], 2, "is a directory"),
    ("tracking URI naming a file that is not a database",
     lambda t, d: _tracking(f"sqlite:///{_file(t / 'notes.db', b'hello')}"), 2, "is not an SQLite database"),
    ("tracking URI naming an empty file", lambda t, d: _tracking(f"sqlite:///{_file(t / 'empty.db')}"), 2,
     "an empty file"),
    ("tracking URI naming a folder", lambda t, d: _tracking(f"sqlite:///{d}"), 2, "is not a file"),
]


@pytest.mark.parametrize(("what", "argv", "code", "needle"), CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_and_an_exit_code(what: str, argv: Callable[[Path, Path], list[str]], code: int,
                                                    needle: str, tmp_path: Path, data: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    args = argv(tmp_path, data)
    before = snapshot(tmp_path)
    capsys.readouterr()
    got, out, err = run_inline(capsys, *args)
    line = one_line(err)
    assert got == code and needle in line, (what, got, line)
    if code == 1:  # quarantined: the entry is named on the decodable line, with its reason
        (decodable,) = [x for x in out.splitlines() if x.startswith("FAIL decodable")]
        assert "1 file(s) do not decode" in decodable, decodable
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if "/.tlops" not in k} == \
        {k: v for k, v in before.items() if "/.tlops" not in k}
    assert not partials(tmp_path)


# ---- sick stores -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store() -> Iterator[Path]:
    """A real MLflow SQLite store holding model ``m`` version 1, in a folder every user may read."""
    import mlflow

    top = Path(tempfile.mkdtemp(prefix="tlops-store-", dir="/tmp"))
    top.chmod(0o755)
    db = top / "mlflow.db"
    with restored_mlflow_uris():
        uri = f"sqlite:///{db}"
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.create_registered_model("m")
        client.create_model_version("m", source=str(top / "model"), run_id=None)
    db.chmod(0o644)
    yield db
    shutil.rmtree(top, ignore_errors=True)


def test_a_store_that_is_not_mlflow_and_a_missing_store_are_left_as_they_are(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sqlite3

    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as con:
        con.execute("CREATE TABLE t (x)")
        con.commit()
    before = other.read_bytes()
    code, _, err = run_inline(capsys, *_tracking(f"sqlite:///{other}"))
    assert code == 2 and "not an MLflow store" in one_line(err) and other.read_bytes() == before
    code, _, err = run_inline(capsys, *_tracking(f"sqlite:///{tmp_path}/missing/dir/mlflow.db"))
    assert code == 2 and "no MLflow store at" in one_line(err)
    assert not (tmp_path / "missing").exists()  # a read-only command creates nothing


def test_a_locked_store_is_one_line_within_seconds(store: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "mlflow.db"
    shutil.copy(store, db)
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time\n"
                               f"c = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
                               "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        code, _, err = run_inline(capsys, "promote", "m", "1", "--force", "--reason", "hotfix", "--set",
                            f"tracking.uri=sqlite:///{db}")
        assert code == 2 and f"the MLflow store sqlite:///{db} is locked by another process" in one_line(err)
        assert time.monotonic() - t0 < 30
    finally:
        holder.kill()
        holder.wait()


def test_a_store_refusing_the_lease_write_ends_at_once(store: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """What SQLite says when it may not write (a read-only mount, a file the user may not write): one line
    naming the store, at the first refusal, not 300 s of retries and tracebacks."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    db = tmp_path / "mlflow.db"
    shutil.copy(store, db)
    calls: list[str] = []

    def refuse(self: object, name: str, key: str, value: str) -> None:
        calls.append(key)
        raise MlflowException("(sqlite3.OperationalError) attempt to write a readonly database")

    monkeypatch.setattr(MlflowClient, "set_registered_model_tag", refuse)
    t0 = time.monotonic()
    code, out, err = run_inline(capsys, "promote", "m", "1", "--force", "--reason", "hotfix", "--set",
                          f"tracking.uri=sqlite:///{db}")
    assert code == 2 and one_line(err) == (f"error: the MLflow store sqlite:///{db} is read-only for this user "
                                            "(attempt to write a readonly database): the file and its folder must "
                                            "be writable to promote, roll back or register")
    assert calls == ["tlops.lock"] and time.monotonic() - t0 < 30 and not out


# ---- as an unprivileged user: unreadable folders, files, roots, configs; a read-only store -----------------

_DRIVER = r"""
import contextlib, io, json, sys, time, traceback
from tlops.cli import main
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            code = "raised"
            err.write(traceback.format_exc())
    print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue(), "s": time.monotonic() - t0}))
"""


def _as_nobody(cwd: Path, cases: list[list[str]], timeout_s: float = 240) -> tuple[list[dict], str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["HOME"] = str(cwd / ".tlops" / "home")  # whatever a library keeps in $HOME stays out of the input
    try:
        proc = subprocess.run([*SETPRIV, sys.executable, "-c", _DRIVER, json.dumps(cases)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        pytest.skip("setpriv is not installed: the unreadable-entry cases need an unprivileged user")
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 and not results:
        pytest.skip(f"cannot run tlops as nobody here ({proc.stderr.strip()[-200:]})")
    return results, proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="makes entries unreadable to another user: needs root to do so")
def test_unreadable_entries_and_a_read_only_store_as_an_unprivileged_user(tiny_digits: Path, store: Path) -> None:
    top = Path(tempfile.mkdtemp(prefix="tlops-nobody-", dir="/tmp"))
    try:
        top.chmod(0o755)
        data = top / "d"
        shutil.copytree(tiny_digits, data)
        (top / "noroot" / "a").mkdir(parents=True)
        (top / "secret.csv").write_text("path,label\nx.png,a\n")
        (top / "secret.yaml").write_text("train: {}\n")
        (top / "private").mkdir()
        for p in [top, *top.rglob("*")]:
            os.lchown(p, NOBODY, NOBODY)
        hidden_file = sorted((data / "1").glob("*.png"))[0]
        for p, mode in ((data / "7", 0o700), (hidden_file, 0o600), (top / "noroot", 0o700),
                        (top / "secret.csv", 0o600), (top / "secret.yaml", 0o600), (top / "private", 0o700)):
            os.chown(p, 0, 0)
            p.chmod(mode)
        before = snapshot(top)
        cases = [
            ["validate", "--data", "d", "--output", "out"],
            ["validate", "--data", "noroot"],
            ["validate", "--data", "secret.csv"],
            ["validate", "--data", "d", "--config", "secret.yaml"],
            ["promote", "m", "1", "--force", "--reason", "hotfix", "--set", f"tracking.uri=sqlite:///{store}"],
            ["history", "m", "--set", f"tracking.uri=sqlite:///{top}/private/mlflow.db"],
        ]
        results, stderr = _as_nobody(top, cases)
        assert len(results) == len(cases) and not stderr.strip(), stderr
        for argv, r in zip(cases, results, strict=True):
            assert r["code"] != "raised" and "Traceback" not in r["err"], (argv, r["err"])
            if argv[-1] != "secret.yaml":  # typer's own check of --config: its usage box, exit 2
                one_line(r["err"])
        folder, root, csv, config, promote, history = results
        assert folder["code"] == 1 and "decodable" in folder["err"]
        reasons = _quarantine(top / "out")
        assert reasons == {
            f"{data}/1/{hidden_file.name}": "not read: PermissionError: Permission denied",
            f"{data}/7": "not read: the folder cannot be listed (PermissionError: Permission denied)",
        }
        assert root["code"] == 2 and "data noroot cannot be read: PermissionError" in root["err"]
        assert csv["code"] == 2 and "secret.csv: the CSV manifest cannot be read" in csv["err"]
        assert config["code"] == 2 and "'secret.yaml' is not readable" in config["err"]
        assert promote["code"] == 2 and promote["s"] < 30, promote
        assert f"the MLflow store sqlite:///{store} is read-only for this user" in promote["err"]
        assert history["code"] == 2 and "Permission denied" in history["err"]
        after = snapshot(top)
        assert {k: v for k, v in after.items() if not k.startswith((f"{top}/out", f"{top}/.tlops"))} == before
        assert not partials(top) and not (store.parent / "mlflow.db.tlops-lock").exists()
    finally:
        shutil.rmtree(top, ignore_errors=True)


# ---- property: random trees of good images and hostile entries -----------------------------------------


def _hostile_entries(thin: bytes) -> dict[str, Callable[[Path, Path, random.Random], str | None]]:
    """Each makes one hostile entry in a class folder and returns its path relative to the folder (None when
    this system cannot make it). Every one of them must be quarantined, and none read unless it is a file."""

    def write(p: Path | bytes, payload: bytes) -> None:
        with open(p, "wb") as fh:
            fh.write(payload)

    def sock(d: Path, _o: Path, _r: random.Random) -> str | None:
        s = socket.socket(socket.AF_UNIX)
        old = os.getcwd()
        os.chdir(d)
        try:
            s.bind("sock.png")
        finally:
            os.chdir(old)
            s.close()
        return "sock.png"

    def sparse(d: Path, _o: Path, r: random.Random) -> str:
        with open(d / "huge.png", "wb") as fh:
            fh.truncate(r.choice([200 << 20, 8 << 30]))
        return "huge.png"

    return {
        "link out (file)": lambda d, o, r: ((d / "out.png").symlink_to(o / "x.png"), "out.png")[1],
        "link out (folder)": lambda d, o, r: ((d / "outdir").symlink_to(o / "sub"), "outdir")[1],
        "dangling link": lambda d, o, r: ((d / "gone.png").symlink_to(d / "nothing.png"), "gone.png")[1],
        "link to itself": lambda d, o, r: ((d / "self.png").symlink_to(d / "self.png"), "self.png")[1],
        "link to /dev/zero": lambda d, o, r: ((d / "zero.png").symlink_to("/dev/zero"), "zero.png")[1],
        "FIFO": lambda d, o, r: (os.mkfifo(d / "pipe.png"), "pipe.png")[1],
        "socket": sock,
        "sparse file over the size limit": sparse,
        "name not UTF-8": lambda d, o, r: (write(os.fsencode(d) + b"/bad\xff.png", _png_bytes(9)), "bad\udcff.png")[1],
        "name with a newline": lambda d, o, r: (write(d / "two\nlines.png", _png_bytes(7)), "two\nlines.png")[1],
        "folder name not UTF-8": lambda d, o, r: (os.mkdir(os.fsencode(d) + b"/dir\xfe"), "dir\udcfe")[1],
        "elongated PNG": lambda d, o, r: (write(d / "thin.png", thin), "thin.png")[1],
        "truncated PNG": lambda d, o, r: (write(d / "cut.png", _png_bytes(3)[:60]), "cut.png")[1],
        "zero bytes": lambda d, o, r: (write(d / "empty.jpg", b""), "empty.jpg")[1],
    }


def _benign(d: Path, root: Path, r: random.Random, good: list[Path]) -> list[str]:
    """Harmless oddities: ignored (hidden, not an image, a folder link inside the root) or read (a link to an
    image of the same class folder, a nested folder). Returns the images among them that are read."""
    read: list[str] = []
    (d / ".hidden.png").write_bytes(b"not even an image")
    (d / "notes.txt").write_text("not an image")
    (d / "up").symlink_to(root, target_is_directory=True)
    if good:
        (d / "alias.png").symlink_to(r.choice(good))
        read.append("alias.png")
    (d / "nested").mkdir()
    (d / "nested" / "deep.png").write_bytes(_png_bytes(r.randrange(200), seed=r.randrange(10**9)))
    read.append("nested/deep.png")
    return read


def _random_tree(seed: int, top: Path, outside: Path, thin: bytes) -> tuple[Path, set[str], set[str]]:
    """(root, uris that must be quarantined, uris that must be read and decode)."""
    r = random.Random(seed)
    root = top / f"tree{seed}"
    hostile = _hostile_entries(thin)
    splits = r.choice([[""], ["train", "test"], ["train", "val", "test"]])
    bad: set[str] = set()
    ok: set[str] = set()
    base = os.path.realpath(top) + f"/tree{seed}"
    for split in splits:
        for c in range(r.randint(2, 3)):
            rel_dir = f"{split}/c{c}" if split else f"c{c}"
            d = root / rel_dir
            d.mkdir(parents=True)
            good_files: list[Path] = []
            for i in range(r.randint(2, 5)):
                p = d / f"img{i}.{r.choice(['png', 'jpg'])}"
                # Noise, so no two good images share their bytes (that would be a duplicate, quarantined too).
                pixels = np.random.default_rng(r.randrange(10**9)).integers(0, 256, (12, 12), dtype=np.uint8)
                Image.fromarray(pixels).save(p, format="PNG" if p.suffix == ".png" else "JPEG")
                good_files.append(p)
                ok.add(f"{base}/{rel_dir}/{p.name}")
            for name in r.sample(sorted(hostile), r.randint(1, 4)):
                made = hostile[name](d, outside, r)
                if made is not None:
                    bad.add(f"{base}/{rel_dir}/{printable(made)}")
            if r.random() < 0.5:
                ok |= {f"{base}/{rel_dir}/{x}" for x in _benign(d, root, r, good_files)}
        if r.random() < 0.4:  # a class folder that is a link out of the root
            rel = f"{split}/linked" if split else "linked"
            (root / rel).symlink_to(outside / "sub", target_is_directory=True)
            bad.add(f"{base}/{rel}")
    return root, bad, ok


@pytest.mark.parametrize("seed", range(6))
def test_random_hostile_trees(seed: int, tmp_path: Path, outside: Path, thin_png: bytes,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """Random trees (flat or split, 2-3 classes, good images, 1-4 hostile entries per class, harmless oddities):
    validation never raises, never hangs, opens nothing outside the root and no hostile special file, and
    quarantines exactly the hostile entries."""
    root, bad, ok = _random_tree(seed, tmp_path / "trees", outside, thin_png)
    before = snapshot(root, outside)
    done: list[pd.DataFrame] = []
    failed: list[BaseException] = []

    def build() -> None:
        try:
            done.append(build_manifest(str(root), tmp_path / "cache"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)

    with _recording() as opened:
        worker = threading.Thread(target=build, daemon=True)
        worker.start()
        worker.join(60)
    assert not worker.is_alive(), f"seed {seed}: building the manifest hung"
    assert not failed, f"seed {seed}: {failed[0]!r}"
    df = done[0]
    assert set(df.loc[~df["decodable"], "uri"]) == bad, f"seed {seed}"
    assert set(df.loc[df["decodable"], "uri"]) == ok, f"seed {seed}"
    never = [p for p in opened if _under(p, outside) or p == "/dev/zero"
             or p.endswith(("pipe.png", "sock.png", "huge.png"))]
    assert not never, f"seed {seed}: opened {never}"
    # The whole command: exit 1, one line, the same quarantine.
    code, _, err = run_inline(capsys, "validate", "--data", str(root), "--output", str(tmp_path / "out"))
    assert code == 1 and "decodable" in one_line(err)
    assert set(_quarantine(tmp_path / "out")) == bad
    assert snapshot(root, outside) == before and not partials(tmp_path)
