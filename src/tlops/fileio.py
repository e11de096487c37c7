"""Atomic file writes: a reader never sees a half-written file under the final name."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tlops.errors import TlopsError

# The disk (or the quota, or the file-size limit) has no room for the file.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` only once it is complete."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
            raise TlopsError(f"cannot write {final}: {os.strerror(exc.errno or 0).lower()}; free space there and "
                             "run again (nothing was replaced: any earlier version of the file is intact)") from None
        raise
    return final


def save_torch(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save`` of plain tensors and values, atomically. The bytes are made in memory and written by
    Python, so a full disk is an OSError (a clear error) rather than an opaque error from torch's writer."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())

    return atomic_write(path, _write)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")

    return atomic_write(path, _write)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    def _write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    return atomic_write(path, _write)


def read_utf8_text(path: str | os.PathLike[str], what: str, save_as: str = "UTF-8") -> str:
    """A text file a person wrote (a config, a CSV manifest): UTF-8 with or without the byte-order mark that
    Excel's "CSV UTF-8" writes. Anything else is one line naming ``what`` and the line, never a traceback."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise TlopsError(f"{what} cannot be read ({exc.strerror or exc})") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise TlopsError(f"{what} is UTF-16 text; save it as {save_as}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise TlopsError(f"{what}, line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save it as "
                         f"{save_as}") from None


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
