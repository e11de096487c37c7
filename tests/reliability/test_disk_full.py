"""The disk filling up while a manifest or a checkpoint is written: the write fails with one clear line, the
earlier complete file stays as it was, and no half-written file is left behind under any name.

Two ways to run out of room, each real: a process whose file-size limit (RLIMIT_FSIZE) is reached, which
works anywhere, and a small tmpfs filled to the brim, where this machine allows mounting one."""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

from tlops.data.discovery import build_manifest, read_manifest, write_manifest
from tlops.training.checkpoints import CheckpointStore

LIMIT = 256 * 1024  # bytes: room for the earlier files, not for the new ones

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path

    import pandas as pd
    import torch

    from tlops.training.checkpoints import CheckpointStore
    from tlops.data.discovery import read_manifest, write_manifest
    from tlops.errors import TlopsError

    target, what = Path(sys.argv[1]), sys.argv[2]
    try:
        if what == "manifest":
            rows = read_manifest(target / "manifest.csv")
            write_manifest(pd.concat([rows] * 200, ignore_index=True), target / "manifest.csv")
        else:
            CheckpointStore(target, target / "cache").save("last.pt", {"model": torch.randn(1 << 20),
                                                                        "global_step": 99})
    except TlopsError as exc:
        print(exc, file=sys.stderr)
        sys.exit(3)
""")


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


@contextlib.contextmanager
def _full_tmpfs(root: Path) -> Iterator[Path]:
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={2 * LIMIT}", "tmpfs", str(root)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a tmpfs cannot be mounted here ({mounted.stderr.strip() or 'not permitted'}); "
                    "the file-size-limit case covers the same path")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


def _fill(root: Path) -> None:
    """Leave 16 KB free on the file system of ``root``."""
    st = os.statvfs(root)
    (root / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 16 * 1024))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def manifest(tiny_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return build_manifest(str(tiny_digits), tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("how", ["file-size-limit", "full-filesystem"])
@pytest.mark.parametrize("what", ["manifest", "checkpoint"])
def test_no_room_leaves_the_earlier_file_intact_and_nothing_half_written(
        what: str, how: str, manifest: pd.DataFrame, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        target = stack.enter_context(_full_tmpfs(tmp_path / "disk")) if how == "full-filesystem" else tmp_path
        if what == "manifest":
            earlier = write_manifest(manifest, target / "manifest.csv")
        else:
            earlier = CheckpointStore(target, target / "cache").save("last.pt", {"model": torch.ones(8),
                                                                                  "global_step": 2})
        before = _digest(earlier)
        assert earlier.stat().st_size < LIMIT // 2
        if how == "full-filesystem":
            _fill(target)
        proc = subprocess.run([sys.executable, "-c", WRITER, str(target), what], capture_output=True, text=True,
                              timeout=120, preexec_fn=_limit_file_size if how == "file-size-limit" else None)
        assert proc.returncode == 3, proc.stderr[-2000:]
        message = proc.stderr.strip()
        assert "Traceback" not in message and len(message.splitlines()) == 1, message
        assert f"cannot write {earlier}" in message and "free space" in message, message
        # The earlier file is byte for byte what it was, and still loads.
        assert _digest(earlier) == before
        if what == "manifest":
            assert len(read_manifest(earlier)) == len(manifest)
        else:
            assert torch.load(earlier, map_location="cpu", weights_only=True)["global_step"] == 2
        leftovers = [p.name for p in target.rglob("*.part")]
        assert leftovers == [], leftovers
