"""What the reliability suites share: running the CLI in this process, and watching a tree for changes."""

from __future__ import annotations

import faulthandler
import hashlib
import os
import stat
import sys
from pathlib import Path

import pytest

from tlops.cli import main


def snapshot(*roots: Path) -> dict[str, object]:
    """What each entry is, without following links or opening special files: a link by its target, a file by
    its content (a large one, e.g. sparse, by size and mtime), anything else by its type."""
    out: dict[str, object] = {}
    for root in roots:
        for top, dirs, files in os.walk(os.fsencode(root)):
            for name in dirs + files:
                p = os.path.join(top, name)
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    what: object = ("link", os.readlink(p))
                elif stat.S_ISREG(st.st_mode) and st.st_size <= 1 << 20:
                    with open(p, "rb") as fh:
                        what = ("file", hashlib.sha256(fh.read()).hexdigest())
                elif stat.S_ISREG(st.st_mode):
                    what = ("file", st.st_size, st.st_mtime_ns)
                else:
                    what = (stat.S_IFMT(st.st_mode), st.st_mode)
                out[os.fsdecode(p)] = what
    return out


def partials(*roots: Path) -> list[str]:
    """Files an interrupted atomic write would leave (``.NAME.XXXX.part``)."""
    return [str(p) for root in roots if root.exists() for p in root.rglob("*.part")]


def run_inline(capsys: pytest.CaptureFixture[str], *argv: str, timeout_s: float = 120) -> tuple[int, str, str]:
    """``tlops ARGV`` in this process; a hang dumps every thread's stack and ends the test run."""
    faulthandler.dump_traceback_later(timeout_s, exit=True, file=sys.__stderr__)
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        faulthandler.cancel_dump_traceback_later()
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    return code, out, err


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]
