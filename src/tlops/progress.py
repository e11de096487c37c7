"""How far a step has got, said while it works: counted work (files, images, batches, fits) and named phases.

A step runs without a terminal (a ``kfp.local`` subprocess, a pod). With ``TLOPS_PROGRESS=json`` in its
environment (``tlops run`` sets it) every update is one line on stderr, ``[tlops-progress] {json}``, which the
launcher (``pipelines/local.py``) draws as a live bar on a terminal or prints as plain lines elsewhere. Without
it (a pod's log, a test) an update is a ``tlops`` log line, at most one every few seconds per counter and always
the last. While a step runs, a heartbeat says what it is doing whenever it has said nothing for
``HEARTBEAT_S`` seconds: no step is ever silent for a minute.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("tlops.progress")
ENV = "TLOPS_PROGRESS"
PREFIX = "[tlops-progress] "
HEARTBEAT_S = 15.0
JSON_EVERY_S = 0.5  # a live bar needs no more
LOG_EVERY_S = 5.0

_lock = threading.Lock()
_state: dict[str, Any] = {"last": time.monotonic(), "phase": "starting", "phase_t0": time.monotonic()}


def structured() -> bool:
    import os

    return os.environ.get(ENV, "") == "json"


def _emit(event: dict[str, Any], text: str) -> None:
    with _lock:
        _state["last"] = time.monotonic()
    if structured():
        sys.stderr.write(PREFIX + json.dumps(event, separators=(",", ":")) + "\n")
        sys.stderr.flush()
    else:
        log.info("%s", text)


def describe(event: dict[str, Any]) -> str:
    """One line a person reads for an event (also what the launcher prints on the plain-lines path)."""
    if event.get("kind") != "count":
        return str(event.get("text", ""))
    done, total, unit = event["done"], event.get("total"), event.get("unit", "")
    text = f"{event['what']}: {done}/{total} {unit}" if total else f"{event['what']}: {done} {unit}"
    extra = []
    if event.get("rate"):
        extra.append(f"{event['rate']:.1f} {unit}/s")
    if event.get("eta_s") is not None and total and done < total:
        extra.append(f"about {format_seconds(event['eta_s'])} left")
    return text + (f" ({', '.join(extra)})" if extra else "")


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def phase(text: str) -> None:
    """A stretch of work starts that has no count of its own (loading a model, measuring latency)."""
    with _lock:
        _state["phase"], _state["phase_t0"] = text, time.monotonic()
    _emit({"kind": "phase", "text": text}, text)


class Counter:
    """``total`` units of work called ``what``: ``advance`` as they are done; rate and time left from the
    elapsed time. Updates are throttled (``every_s``); the first and the last are always said."""

    def __init__(self, what: str, total: int | None, unit: str = "images", every_s: float | None = None) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.every_s = every_s if every_s is not None else (JSON_EVERY_S if structured() else LOG_EVERY_S)
        self.done = 0
        self.t0 = time.monotonic()
        self.said_at: float | None = None
        self._lock = threading.Lock()
        with _lock:
            _state["phase"], _state["phase_t0"] = what, self.t0
        if structured():  # a bar appears at once; a log says nothing until there is progress to report
            self._say(time.monotonic())

    def advance(self, n: int = 1) -> None:
        with self._lock:  # worker threads may share a counter
            self.done += n
            now = time.monotonic()
            finished = self.total is not None and self.done >= self.total
            if finished or self.said_at is None or now - self.said_at >= self.every_s:
                self._say(now)

    def _say(self, now: float) -> None:
        self.said_at = now
        elapsed = now - self.t0
        rate = self.done / elapsed if self.done and elapsed > 0 else None
        eta = (self.total - self.done) / rate if rate and self.total else None
        event = {"kind": "count", "what": self.what, "done": self.done, "total": self.total, "unit": self.unit,
                 "rate": round(rate, 2) if rate else None, "eta_s": round(eta, 1) if eta is not None else None}
        _emit(event, describe(event))


@contextmanager
def heartbeat(step: str, every_s: float = HEARTBEAT_S) -> Iterator[None]:
    """While the block runs: when nothing was said for ``every_s`` seconds, say what the step is doing."""
    stop = threading.Event()
    with _lock:
        _state.update(last=time.monotonic(), phase="starting", phase_t0=time.monotonic())

    def beat() -> None:
        while not stop.wait(min(1.0, every_s / 4)):
            with _lock:
                quiet = time.monotonic() - _state["last"]
                what, since = _state["phase"], time.monotonic() - _state["phase_t0"]
            if quiet >= every_s:
                text = f"{step}: still {what} ({format_seconds(since)})"
                _emit({"kind": "heartbeat", "text": text}, text)

    thread = threading.Thread(target=beat, name=f"tlops-heartbeat-{step}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2)
