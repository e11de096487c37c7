"""Drawing beside a step's own work: a forked child computes the figures (a function returning PNG bytes by
name) while the step goes on with its store calls and files, on the machine's other core.

Why a process and not a thread: matplotlib's drawing is Python and holds the GIL, so a drawing thread only
takes turns with the step's own thread (measured: no faster). A forked child has the data already (the pages
of the step's memory, copied only when written) and needs nothing imported.

What the child may do: compute and write its bytes to a pipe, nothing else. It touches no file, store,
connection or torch op of the parent's, and leaves with ``os._exit`` (no ``atexit``, no finaliser closing the
parent's SQLite or HTTP connections, no flush of the parent's buffered output). matplotlib drops the fonts it
holds open in a forked child itself. A child that fails, or a platform without ``fork``, costs nothing but the
time: :meth:`Aside.result` then computes the figures in this process, where any error is raised as usual.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import signal
import struct
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

ENV = "TLOPS_ASIDE"  # "0": compute in the step's own process (the measurements of the bench's slow path)

_HEAD = struct.Struct("<II")  # name length, data length; then the name (UTF-8) and the data


def enabled() -> bool:
    return hasattr(os, "fork") and os.environ.get(ENV, "1") not in ("0", "false", "no", "off")


def _encode(out: dict[str, bytes]) -> bytes:
    parts = []
    for name, data in out.items():
        raw = name.encode()
        parts += [_HEAD.pack(len(raw), len(data)), raw, bytes(data)]
    return b"".join(parts)


def _decode(blob: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    at = 0
    while at < len(blob):
        n_name, n_data = _HEAD.unpack_from(blob, at)
        at += _HEAD.size
        name = blob[at : at + n_name].decode()
        at += n_name
        if at + n_data > len(blob):
            raise ValueError("truncated")
        out[name] = blob[at : at + n_data]
        at += n_data
    return out


class Aside:
    """``fn(*args)``, a dict of bytes by name, started in a forked child at once; :meth:`result` waits for it.

    Use it for pure computations on data the step already holds (figures): the child sees the memory as it was
    at the fork, so what the step changes afterwards is not seen, and what the child changes is lost."""

    def __init__(self, fn: Callable[..., dict[str, bytes]], *args: Any) -> None:
        self.fn, self.args = fn, args
        self.pid: int | None = None
        self.fd: int | None = None
        if not enabled():
            return
        read, write = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(read)
            os.close(write)
            log.debug("aside: no fork (%s); computed in this process", exc)
            return
        if pid == 0:  # the child: compute, write, leave without any of the parent's clean-up
            code = 1
            try:
                gc.disable()  # a short life: no collection to walk (and copy the pages of) the step's objects
                os.close(read)
                blob = _encode(fn(*args))
                view = memoryview(blob)
                while view:
                    view = view[os.write(write, view):]
                code = 0
            except BaseException:  # noqa: BLE001 - the parent computes it again and raises the error there
                code = 1
            finally:
                os._exit(code)
        os.close(write)
        self.pid, self.fd = pid, read

    def result(self, timeout_s: float = 300.0) -> dict[str, bytes]:
        """The child's result; computed here instead when there is no child, it failed, or it gave nothing for
        ``timeout_s`` seconds (then it is killed)."""
        if self.pid is None or self.fd is None:
            return self.fn(*self.args)
        chunks = []
        deadline = time.monotonic() + timeout_s
        with os.fdopen(self.fd, "rb", buffering=0) as fh:
            self.fd = None
            while True:
                ready, _, _ = select.select([fh], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    os.kill(self.pid, signal.SIGKILL)
                    break
                chunk = fh.read(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        if os.waitstatus_to_exitcode(status) == 0:
            with contextlib.suppress(ValueError, struct.error, UnicodeDecodeError):
                return _decode(b"".join(chunks))
        log.debug("aside: the child failed or took too long (status %s); computed in this process", status)
        return self.fn(*self.args)

    def __del__(self) -> None:  # a result never asked for: reap the child, leave no zombie
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        if self.pid is not None:
            with contextlib.suppress(OSError):
                os.waitpid(self.pid, 0)
