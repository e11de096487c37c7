"""Data sets: discovery (ImageFolder, split folders, CSV manifest), the image manifest, stable splits."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import re
import stat
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from tlops.data.listing import (  # noqa: F401 - the walk's names, re-exported where they were
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_FILE_BYTES,
    IMAGE_EXTENSIONS,
    MAX_ASPECT_RATIO_ENV,
    MAX_FILE_BYTES_ENV,
    SPLITS,
    Entry,
    Found,
    _kind,
    _os_reason,
    discover,
    max_aspect_ratio,
    max_file_bytes,
    printable,
    walk,
)
from tlops.data.storage import is_s3, materialize
from tlops.errors import TlopsError
from tlops.fileio import atomic_write, read_json, write_json

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "uri", "path", "label", "split", "width", "height", "mode", "channels", "format",
    "bytes", "sha256", "dhash", "exif_orientation", "decodable", "error",
]
_TEXT_COLUMNS = ("uri", "path", "label", "split", "mode", "format", "sha256", "dhash", "error")
# Bump when _inspect changes what it records: cached rows of an older version are not reused.
INSPECT_VERSION = 5
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (about 0.25 GB of RGBA)
DHASH_DRAFT_SIZE = 64  # a JPEG is decoded at the smallest scale that keeps at least 64 px a side
_IN_MEMORY = 16 * 1024 * 1024  # a file up to this size is read whole, then decoded from memory
_CHUNK = 1 << 20


def _hash_unit(sha256: str, salt: str) -> float:
    """The file's place in [0, 1): the first 60 bits of sha256(salt:content hash) as a fraction of 2**60."""
    return (int.from_bytes(hashlib.sha256(f"{salt}:{sha256}".encode()).digest()[:8], "big") >> 4) / float(1 << 60)


def hash_split(sha256: str, val_fraction: float, test_fraction: float, salt: str) -> str:
    """A split from the file's content alone: adding files never moves an existing one."""
    u = _hash_unit(sha256, salt)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def split_quotas(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(test, val) images of a class of ``n`` distinct images: each fraction of n rounded half up, with at
    least one image left for training."""
    n_test = int(np.floor(n * test_fraction + 0.5))
    n_val = int(np.floor(n * val_fraction + 0.5))
    while n_test + n_val >= n and n_test + n_val > 0:  # keep one for training
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_test, n_val


def stratified_splits(labels: Sequence[str | None], sha256s: Sequence[str], val_fraction: float,
                      test_fraction: float, salt: str) -> list[str]:
    """Splits in each class's hash order: every class gets its share of test and val images.

    Within a class the distinct contents are ordered by a salted hash of their sha256; the first
    ``round(n * test_fraction)`` go to test, the next ``round(n * val_fraction)`` to val, the rest to
    train. The order does not depend on the other files, so a split stays stable as data grows: one
    image added to a class moves at most two of its others (one across each boundary). Copies of one
    content share its split (an exact duplicate never crosses splits); a file without a content hash
    (never read) falls back to ``hash_split``.
    """
    by_class: dict[str | None, set[str]] = {}
    for label, sha in zip(labels, sha256s, strict=True):
        if sha:
            by_class.setdefault(label, set()).add(sha)
    where: dict[tuple[str | None, str], str] = {}
    for label, contents in by_class.items():
        order = sorted(contents, key=lambda c: (_hash_unit(c, salt), c))
        n_test, n_val = split_quotas(len(order), val_fraction, test_fraction)
        for rank, sha in enumerate(order):
            where[(label, sha)] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return [where[(label, sha)] if sha else hash_split(sha, val_fraction, test_fraction, salt)
            for label, sha in zip(labels, sha256s, strict=True)]


def dhash(img: Image.Image) -> str:
    """64-bit difference hash: is each pixel of a 9x8 greyscale thumbnail brighter than its left neighbour.

    Survives re-encoding, resizing and a uniform change of brightness; 16 hex digits.
    """
    src = img if img.mode in ("L", "RGB") else img.convert("RGB")
    # reducing_gap: shrink by whole factors first (fast, in C), then resample; 3x faster on photos.
    grey = src.resize((9, 8), Image.Resampling.BILINEAR, reducing_gap=2.0).convert("L")
    a = np.frombuffer(grey.tobytes(), dtype=np.uint8).reshape(8, 9).astype(np.int16)
    return np.packbits((a[:, 1:] > a[:, :-1]).ravel()).tobytes().hex()


# What the extensions above name; Pillow is not asked to try any other format (EPS would start Ghostscript).
DECODE_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "DIB", "GIF", "WEBP", "TIFF")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@functools.cache
def _decode_formats() -> tuple[str, ...]:
    Image.init()  # every plugin registered, so each name below is known
    return tuple(f for f in DECODE_FORMATS if f in Image.OPEN)


class _NotRead(Exception):
    """A file that is not read after all: it changed into something else since the walk admitted it."""


def _open_admitted(path: str) -> Any:
    """The regular file at ``path`` (a real path: no link in it), opened for reading, or ``_NotRead``.

    What is opened must be what was checked: a FIFO or a device is never opened (it is refused from its
    lstat; O_NONBLOCK besides, so one swapped in at the last moment cannot block), the final component is
    not followed if it became a link, and the opened file must be the lstat's inode at the same path (a
    folder on the way swapped for a link out of the root is caught by the kernel's name for the file).
    """
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise _NotRead(f"{_kind(st.st_mode)}, not a regular file")
    limit = max_file_bytes()
    if st.st_size > limit:
        raise _NotRead(f"{st.st_size} bytes, over the limit of {limit} ({MAX_FILE_BYTES_ENV})")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | _NOFOLLOW)
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(opened.st_mode):
            raise _NotRead("the file was replaced while it was validated")
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # no /proc: the inode check above is what there is
            name = None
        if name is not None and name != os.path.abspath(path):
            raise _NotRead(f"the path now leads to {printable(name)}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _inspect(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, object]:
    """What the decoder sees in one file. Never raises for a bad file: the reason goes in ``error``.

    A file up to 16 MiB is read whole and decoded from memory; a larger one (up to ``max_file_bytes()``) is
    hashed in 1 MiB chunks, then decoded from the open file: memory grows with the image's pixels, bounded by
    ``max_pixels``, not with the file's size.
    """
    row: dict[str, object] = {"bytes": 0, "sha256": "", "dhash": "", "decodable": False}
    try:
        fh = _open_admitted(str(path))
    except _NotRead as why:
        return {**row, "error": str(why)}
    except OSError as exc:  # vanished, unreadable: a bad file, not a crash
        return {**row, "error": _os_reason(exc)}
    with fh:
        try:
            before = os.fstat(fh.fileno())
            # One byte more than its size: a file that grew since is caught by the check at the end.
            payload = fh.read(before.st_size + 1) if before.st_size <= _IN_MEMORY else b""
            if payload and len(payload) <= _IN_MEMORY:  # small (most images): one read, decoded from memory
                size, source = len(payload), io.BytesIO(payload)
                digest = hashlib.sha256(payload)
            else:  # large: hashed in chunks, then decoded from the file; memory is the pixels', not the file's
                payload = b""
                size, source, limit, digest = 0, fh, max_file_bytes(), hashlib.sha256()
                fh.seek(0)
                view = memoryview(bytearray(_CHUNK))
                while n := fh.readinto(view):
                    size += n
                    if size > limit:
                        return {**row, "error": f"grew past {limit} bytes ({MAX_FILE_BYTES_ENV}) while it was read"}
                    digest.update(view[:n])
                fh.seek(0)
            row.update(bytes=size, sha256=digest.hexdigest())
        except OSError as exc:
            return {**row, "error": _os_reason(exc)}
        try:
            _decode(source, row, max_pixels)
            row.update(decodable=True, error="")
        except Exception as exc:  # any decoder failure makes the file undecodable, with the reason kept
            # No memory addresses or file objects in a reason a person reads: "cannot identify image file <...>".
            message = re.sub(r"\s*<_io\.\w+ (object at 0x[0-9a-f]+|name=[^>]*)>", "", str(exc))
            row.update(decodable=False, error=f"{type(exc).__name__}: {message}"[:300])
        try:
            after = os.fstat(fh.fileno())
        except OSError:
            after = before
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or size != before.st_size:
            row.update(decodable=False, error="the file changed while it was read; run again")
    return row


def _decode(fh: Any, row: dict[str, object], max_pixels: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
        img = Image.open(fh, formats=_decode_formats())
    with img:
        row.update(width=img.width, height=img.height, mode=img.mode, channels=len(img.getbands()),
                   format=img.format or "")
        if img.width * img.height > max_pixels:
            # Refused from the header alone: the pixels of a decompression bomb are never decoded.
            raise Image.DecompressionBombError(
                f"{img.width}x{img.height} = {img.width * img.height} pixels exceeds the limit of "
                f"{max_pixels} (validation.max_pixels); not decoded")
        ratio = max(img.width, img.height) / max(1, min(img.width, img.height))
        if ratio > max_aspect_ratio():
            # Its resize to the model's input would be as elongated: the work grows with the ratio.
            raise Image.DecompressionBombError(
                f"{img.width}x{img.height} is {ratio:.0f} times longer than wide, over the limit of "
                f"{max_aspect_ratio():g} ({MAX_ASPECT_RATIO_ENV}); not decoded")
        # Trap: PNG's getexif() decodes the whole image to find a trailing eXIf chunk; only after the check.
        row["exif_orientation"] = int(img.getexif().get(0x0112, 1))
        # JPEG: one decode, at 1/2-1/8 scale in greyscale (libjpeg's scaled IDCT), is all the dHash needs.
        # It still entropy-decodes every scan, so a truncated or corrupt file fails at load() all the same;
        # width, height and mode above are the file's own. Other formats decode once at full size.
        img.draft("L", (DHASH_DRAFT_SIZE, DHASH_DRAFT_SIZE))
        img.load()  # a truncated or corrupt file fails here, not at open()
        row["dhash"] = dhash(img)


class InspectCache:
    """What ``_inspect`` found per file, keyed by (path, size, mtime): unchanged files are not read again.

    One JSON file per data root under the work dir's cache, replaced atomically; entries for files that
    are gone are dropped on save. A file rewritten with the same size within the same mtime tick would
    be missed; every file system here records mtime in nanoseconds or microseconds.
    """

    def __init__(self, cache_root: str | Path, base: Path, max_pixels: int) -> None:
        ident = json.dumps([str(base.resolve()), max_pixels, max_aspect_ratio(), INSPECT_VERSION])
        self.path = Path(cache_root) / "manifest" / f"{hashlib.sha256(ident.encode()).hexdigest()[:20]}.json"
        self.old: dict[str, dict[str, object]] = {}
        self.new: dict[str, dict[str, object]] = {}
        if self.path.is_file():
            try:
                self.old = read_json(self.path)["entries"]
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("manifest cache %s is unreadable; rebuilding it", self.path)

    @staticmethod
    def key(path: str | Path) -> str:
        """``path`` is absolute under a resolved root (build_manifest), so no per-file resolve()."""
        st = os.stat(path)
        return f"{path}|{st.st_size}|{st.st_mtime_ns}"

    def get(self, key: str) -> dict[str, object] | None:
        return self.old.get(key)

    def put(self, key: str, info: dict[str, object]) -> None:
        self.new[key] = info

    def save(self) -> None:
        if self.new != self.old:
            write_json(self.path, {"version": INSPECT_VERSION, "entries": self.new})


class Progress:
    """A progress bar on a terminal; elsewhere (a kfp log, a CI log) ``tlops`` log lines: at most one every
    few seconds, and the last one always."""

    def __init__(self, total: int, what: str, every_s: float = 2.0) -> None:
        from tlops import progress

        self.total, self.what = total, what
        self.done = 0
        self.bar: Any = None
        self.counter: Any = None
        if total and sys.stderr.isatty() and not progress.structured():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit="file", file=sys.stderr, leave=False)
        elif total:
            self.counter = progress.Counter(what, total, "files", every_s=None if progress.structured() else every_s)

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if self.done == self.total:
                self.bar.close()
        elif self.counter is not None:
            self.counter.advance(n)


def inspect_files(paths: Sequence[str | Path], cache: InspectCache | None, max_pixels: int = DEFAULT_MAX_PIXELS,
                  workers: int = 0,
                  inspect: Callable[[Path, int], dict[str, object]] | None = None) -> list[dict[str, object]]:
    """``_inspect`` for every path, in parallel, skipping files the cache already knows."""
    inspect = inspect or _inspect
    keys: list[str | None] = []
    out: list[dict[str, object] | None] = []
    for p in paths:
        try:
            key = InspectCache.key(p)
        except (OSError, ValueError) as exc:  # gone since the walk, or unreadable: a bad file, not a crash
            keys.append(None)
            out.append({"bytes": 0, "sha256": "", "dhash": "", "decodable": False,
                        "error": _os_reason(exc) if isinstance(exc, OSError) else f"ValueError: {exc}"})
        else:
            keys.append(key)
            out.append(cache.get(key) if cache else None)
    todo = [i for i, info in enumerate(out) if info is None]
    if cache is not None:
        log.info("manifest: %d files, %d from the cache, %d to read", len(paths), len(paths) - len(todo), len(todo))
    if todo:
        progress = Progress(len(todo), "manifest")
        # Threads suffice: Pillow's decoders, resampling and hashlib release the GIL on real-size images.
        # The cores this process may run on (a container or taskset may allow fewer than the machine has).
        n = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        chunk = max(1, min(64, len(todo) // (n * 4) or 1))
        groups = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]

        def run(group: list[int]) -> list[tuple[int, dict[str, object]]]:
            return [(i, inspect(Path(paths[i]), max_pixels)) for i in group]

        with ThreadPoolExecutor(max_workers=n) as pool:
            for fut in as_completed([pool.submit(run, g) for g in groups]):
                done = fut.result()
                for i, found in done:
                    out[i] = found
                progress.advance(len(done))
    if cache is not None:
        for k, info in zip(keys, out, strict=True):
            # A file that could not be read (permissions, a race) is looked at again next time.
            if k is not None and info is not None and info.get("sha256"):
                cache.put(k, info)
        cache.save()
    return [info for info in out if info is not None]


def build_manifest(uri: str, cache_root: str | Path, val_fraction: float = 0.15,
                   test_fraction: float = 0.2, salt: str = "tlops", max_pixels: int = DEFAULT_MAX_PIXELS,
                   workers: int = 0, use_cache: bool = True, stratified: bool = True) -> pd.DataFrame:
    """One row per file: where it is, its label and split, and what the decoder saw.

    A file without a split of its own (folder or CSV column) gets one from its content: in its class's
    hash order (``stratified_splits``, the default), or from its hash alone (``hash_split``).

    Entries the walk refuses (``walk``: links out of the root, special or oversize files, names that
    cannot be used) are rows too, never read, with the reason in ``error``: validation quarantines them.
    """
    root = materialize(uri, cache_root, max_bytes=max_file_bytes())
    if is_s3(uri) and not root.exists():
        raise TlopsError(f"no objects found under {uri}: expected {uri}/<class>/<image>")
    found = walk(root, uri)
    base = (root.parent if root.is_file() else root).resolve()
    admitted = [f for f in found if not f.reason]
    cache = InspectCache(cache_root, base, max_pixels) if use_cache else None
    t0 = time.perf_counter()
    infos = iter(inspect_files([f.real for f in admitted], cache, max_pixels, workers))
    rows = []
    # A local URI is made absolute: every step resolves it the same way, whatever its working directory.
    uri_base = (uri.rsplit("/", 1)[0] if root.is_file() else uri.rstrip("/")) if is_s3(uri) else base.as_posix()
    for f in found:
        info = next(infos) if not f.reason else {"bytes": f.size, "sha256": "", "dhash": "", "decodable": False,
                                                  "error": f.reason}
        entry = f.entry
        split = entry.split or ("" if stratified else
                                hash_split(str(info["sha256"]), val_fraction, test_fraction, salt))
        rows.append({"uri": f"{uri_base}/{entry.rel}", "path": f.real or None,
                     "label": entry.label or None, "split": split, **info})
    unsplit = [i for i, r in enumerate(rows) if not r["split"]]
    if unsplit:
        labels = [str(rows[i]["label"]) if rows[i]["label"] else None for i in unsplit]
        assigned = stratified_splits(labels, [str(rows[i]["sha256"]) for i in unsplit], val_fraction, test_fraction,
                                     salt)
        for i, split in zip(unsplit, assigned, strict=True):
            rows[i]["split"] = split
    df = pd.DataFrame(rows)
    for col in MANIFEST_COLUMNS:
        if col not in df:
            df[col] = None
    log.info("manifest: %d files (%d not read), %d classes, from %s in %.2fs", len(df), len(found) - len(admitted),
             df["label"].nunique(), uri, time.perf_counter() - t0)
    return df[MANIFEST_COLUMNS]


def manifest_hash(df: pd.DataFrame) -> str:
    """Identity of a data set: which contents, under which labels, in which split (``manifest.content_hash``)."""
    from tlops.data.manifest import content_hash

    return content_hash(df)


def write_manifest(df: pd.DataFrame, path: str | Path, local_paths: bool = False) -> Path:
    """CSV, replaced atomically: a reader sees the old manifest or the new one, never half of one.

    The ``path`` column (where this process found each file) is left out unless ``local_paths``: a manifest
    that leaves the process names its files by ``uri`` only, and a reader localizes them (tlops.data.manifest).
    """
    out = df if local_paths else df.assign(path=None)
    return atomic_write(path, lambda tmp: out.to_csv(tmp, index=False))


def read_manifest(path: str | Path) -> pd.DataFrame:
    # Hashes are text: a hex digest made only of digits and one 'e' would otherwise read as a float.
    present = pd.read_csv(path, nrows=0).columns
    dtypes: dict[str, Any] = {c: str for c in _TEXT_COLUMNS if c in present}
    df = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=dtypes)
    df["decodable"] = df["decodable"].astype(bool)
    if "error" in df:
        df["error"] = df["error"].fillna("")
    if "dhash" in df:
        df["dhash"] = df["dhash"].fillna("")
    if "path" not in df:
        df["path"] = None
    return df


def class_names(df: pd.DataFrame) -> list[str]:
    return sorted(str(x) for x in df["label"].dropna().unique())


def _save_png(pixels: object, dest: str) -> None:
    Image.fromarray(pixels).save(dest, format="PNG")  # type: ignore[arg-type]


def export_digits(out_dir: str | Path, classes: list[int] | None = None, per_class: int | None = None) -> int:
    """scikit-learn's real 8x8 digits as an ImageFolder of greyscale PNG files (``out/<digit>/``).

    The values are ink intensities (0-16) of scanned handwriting; they are drawn as dark ink on white
    paper, as the forms were written, which is also closer to the photos the backbone learnt from.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = Path(out_dir)
    taken: dict[int, int] = {}
    for i, (img, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        t = int(target)
        if (classes is not None and t not in classes) or (per_class is not None and taken.get(t, 0) >= per_class):
            continue
        taken[t] = taken.get(t, 0) + 1
        pixels = (255.0 - np.asarray(img) * (255.0 / 16.0)).round().astype("uint8")
        dest = out / str(t) / f"digit_{i:04d}.png"
        if not dest.exists():
            atomic_write(dest, functools.partial(_save_png, pixels))
    return sum(taken.values())
