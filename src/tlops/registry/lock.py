"""One promotion at a time per registered model: a file lock on a SQLite store, and a lease in the registry
itself (a registered-model tag) that works against an MLflow server too."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlops.errors import TlopsError
from tlops.registry.store import client, current_user

log = logging.getLogger(__name__)

LOCK_TAG = "tlops.lock"




@dataclass(frozen=True)
class LockSettings:
    ttl_s: float = 120.0  # a holder that died frees the lease after this long
    settle_s: float = 1.0  # wait between writing the lease and re-reading it (see promotion_lock)
    timeout_s: float = 300.0  # give up waiting for another holder after this long
    refused_s: float = 30.0  # give up after the store refused every lease write (e.g. "database is locked") this long
    poll_s: float = 0.25


DEFAULT_LOCK = LockSettings()


def _registry_uri() -> str:
    import mlflow

    return str(mlflow.get_registry_uri())


def _sqlite_path() -> Path | None:
    import mlflow

    from tlops.tracking import sqlite_path

    return sqlite_path(mlflow.get_registry_uri())


@contextlib.contextmanager
def _file_lock(path: Path, timeout_s: float) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: the registry lease alone
        yield
        return
    try:
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - closed below, after the lock is released
    except OSError as exc:
        raise TlopsError(f"cannot open the registry lock file {path} ({exc.strerror or exc}): the MLflow store's "
                         "folder must be writable to promote, roll back or register") from None
    with fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TlopsError(f"another tlops process holds the registry lock file {path}; "
                                     "try again when it has finished") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_lease(c: Any, name: str) -> dict[str, Any] | None:
    raw = c.get_registered_model(name).tags.get(LOCK_TAG)
    if not raw:
        return None
    try:
        lease = json.loads(raw)
        float(lease["expires"])
        return dict(lease)
    except (ValueError, KeyError, TypeError):
        return {"token": "", "owner": "unreadable lease", "expires": 0.0}  # garbage: treated as expired


def _require_writable(sqlite: Path) -> None:
    """A store this process may not write fails the lease write; say so before waiting on anything. (The
    superuser passes os.access whatever the mode bits; SQLite's own error is caught by the lease write.)"""
    from tlops.tracking import redact

    for what in (sqlite, sqlite.parent):
        if what.exists() and not os.access(what, os.W_OK):
            raise TlopsError(f"the MLflow store {redact(_registry_uri())} is read-only for this "
                             f"user ({what} is not writable): the file and its folder must be writable to "
                             "promote, roll back or register")


# Over 60 lines: a third is the docstring of the algorithm, and the acquisition loop (read, write, settle,
# re-read, give back, time out) stays in one piece so that its states read top to bottom.
@contextlib.contextmanager
def promotion_lock(name: str, purpose: str, settings: LockSettings = DEFAULT_LOCK) -> Iterator[None]:
    """Hold the right to move ``name``'s aliases and append to its history.

    MLflow has no compare-and-set on aliases, so this is built from what it has:

    1. On a SQLite store (one machine) an OS file lock (``flock``) beside the database serialises every
       tlops process on that host: there the exclusion is strict.
    2. On any store, a lease in the registered-model tag ``tlops.lock`` (token, owner, expiry in UTC
       seconds). It is Fischer's timed mutual exclusion: read the tag; when it is free or expired, write
       our lease; wait ``settle_s``; read again and hold the lock only if our token is still there. Two
       processes that both saw the lease free both write it, and the later write wins: the earlier
       writer sees the other token after its wait and backs off.

    Limits of (2): it is correct only while every process completes its write within ``settle_s`` of
    reading the lease free (1 s against a few milliseconds on loopback; a process that is paused longer
    between the two, e.g. a stalled HTTP request, can break it), while each holder finishes within
    ``ttl_s`` (its work here is a few registry calls), and while host clocks agree to well within
    ``ttl_s``. A crashed holder blocks others until its lease expires. Inside the lock the caller still
    re-reads the champion before moving it, so a broken lease needs a second coincidence to matter.
    """
    from mlflow.exceptions import MlflowException

    from tlops.tracking import redact, store_error

    c = client()
    sqlite = _sqlite_path()
    if sqlite is not None:
        _require_writable(sqlite)
    file_lock = _file_lock(sqlite.with_name(sqlite.name + ".tlops-lock"), settings.timeout_s) if sqlite \
        else contextlib.nullcontext()
    with file_lock:
        token = uuid.uuid4().hex
        refused = "no answer"
        owner = f"{current_user()}@{socket.gethostname()} pid {os.getpid()}: {purpose}"[:400]
        deadline = time.monotonic() + settings.timeout_s
        refused_since: float | None = None
        while True:
            t_read = time.monotonic()
            lease = _read_lease(c, name)
            if lease is None or float(lease["expires"]) < time.time():
                if lease is not None:
                    log.warning("registry lock on %s: taking over the expired lease of %s", name, lease.get("owner"))
                try:
                    c.set_registered_model_tag(name, LOCK_TAG, json.dumps(
                        {"token": token, "owner": owner, "expires": time.time() + settings.ttl_s}))
                    wrote, refused_since = True, None
                except MlflowException as exc:
                    fault = store_error(exc, _registry_uri())
                    if fault is not None and "database is locked" not in str(exc):
                        raise fault from None  # read-only, corrupt, full: waiting changes nothing
                    # A SQL store inserts a new tag after looking for it: two writers inserting at once
                    # make one fail on the unique key. That one lost this round; so does a write that found
                    # the database locked by another writer.
                    refused = str(exc).splitlines()[0][:160]
                    log.info("registry lock on %s: lease write refused (%s); trying again", name, refused)
                    wrote = False
                    refused_since = t_read if refused_since is None else refused_since
                    if time.monotonic() - refused_since > settings.refused_s:
                        raise TlopsError(f"registry lock on {name}: the MLflow store {redact(_registry_uri())} "
                                         f"refused every lease write for {settings.refused_s:.0f}s (last: "
                                         f"{refused}); another program holds the store: try again when it has "
                                         "finished") from None
                if wrote:
                    in_time = time.monotonic() - t_read < settings.settle_s
                    time.sleep(settings.settle_s)
                    lease = _read_lease(c, name)
                    mine = lease is not None and lease.get("token") == token
                    if mine and in_time:
                        break
                    if mine:  # our own write came too late to trust: give the lease back and try again
                        c.delete_registered_model_tag(name, LOCK_TAG)
                        lease = None
                        refused = (f"each lease write took longer than the {settings.settle_s:g}s it may take; the "
                                   "store answers too slowly")
            if time.monotonic() > deadline:
                if lease is None or float(lease["expires"]) < time.time():
                    # Nobody holds it: our own writes kept failing.
                    raise TlopsError(f"registry lock on {name}: the MLflow store {redact(_registry_uri())} refused "
                                     f"the lease write for {settings.timeout_s:.0f}s (last: {refused}); no "
                                     "other process holds the lock")
                raise TlopsError(f"registry lock on {name} is held by {lease.get('owner', '?')}; gave up after "
                                 f"{settings.timeout_s:.0f}s (a lease expires {settings.ttl_s:.0f}s after it was "
                                 "taken)")
            time.sleep(settings.poll_s * (1 + random.random()))
        try:
            yield
        finally:
            try:
                lease = _read_lease(c, name)
                if lease is not None and lease.get("token") == token:
                    c.delete_registered_model_tag(name, LOCK_TAG)
            except Exception as exc:  # the lease expires on its own; never hide the real outcome
                log.warning("registry lock on %s: could not release the lease (%s)", name, exc)
