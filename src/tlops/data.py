"""Data sets: discovery (ImageFolder, split folders, CSV manifest), the image manifest, stable splits."""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from tlops.errors import TlopsError
from tlops.fileio import atomic_write, read_json, write_json
from tlops.storage import is_s3, materialize, safe_relpath

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = [
    "uri", "path", "label", "split", "width", "height", "mode", "channels", "format",
    "bytes", "sha256", "dhash", "exif_orientation", "decodable", "error",
]
_TEXT_COLUMNS = ("uri", "path", "label", "split", "mode", "format", "sha256", "dhash", "error")
# Bump when _inspect changes what it records: cached rows of an older version are not reused.
INSPECT_VERSION = 4
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (about 0.25 GB of RGBA)
DHASH_DRAFT_SIZE = 64  # a JPEG is decoded at the smallest scale that keeps at least 64 px a side


@dataclass(frozen=True)
class Entry:
    rel: str  # path relative to the data root, POSIX separators
    label: str
    split: str | None


def _images_under(top: Path) -> list[str]:
    """Image files below ``top``, relative to it (POSIX), in path order; hidden files are skipped.

    One scandir per directory, whose entries already say file or directory: no stat per regular file.
    Symlinked directories are not followed, so a symlink loop cannot recurse forever; a symlinked file
    is taken, and a link that dangles or points at itself is skipped.
    """
    found: list[str] = []
    pending = [""]
    while pending:
        rel = pending.pop()
        try:
            with os.scandir(top / rel if rel else top) as it:
                entries = list(it)
        except PermissionError:
            continue
        for e in entries:
            r = f"{rel}/{e.name}" if rel else e.name
            try:
                if e.is_dir(follow_symlinks=False):
                    pending.append(r)
                elif (not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
                      and e.is_file()):
                    found.append(r)
            except OSError:  # a link to itself: ELOOP
                continue
    return sorted(found, key=lambda r: r.split("/"))


def _from_csv(csv_path: Path) -> list[Entry]:
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise TlopsError(f"{csv_path}: CSV manifest lacks column(s) {', '.join(sorted(missing))}; "
                             "expected a header path,label[,split]")
        out = []
        for lineno, row in enumerate(reader, start=2):
            split = (row.get("split") or "").strip() or None
            if split is not None and split not in SPLITS:
                raise TlopsError(f"{csv_path}:{lineno}: split {split!r} is not one of {', '.join(SPLITS)}")
            rel = str(safe_relpath((row["path"] or "").strip(), str(csv_path.parent)))
            out.append(Entry(rel, (row["label"] or "").strip(), split))
    return out


def discover(root: Path, uri: str) -> list[Entry]:
    """The labelled files under ``root``: a CSV manifest, split folders, or an ImageFolder."""
    if root.is_file() and root.suffix.lower() == ".csv":
        return _from_csv(root)
    if not root.exists():
        raise TlopsError(f"data {uri} does not exist: pass --data DIR with DIR/<class>/<image> files, "
                         "or run 'tlops demo-data DIR' to create the demo set")
    if not root.is_dir():
        raise TlopsError(f"data {uri} is neither a directory nor a .csv manifest")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_layout = bool(subdirs) and {p.name for p in subdirs} <= set(SPLITS)
    entries: list[Entry] = []
    empty: list[str] = []
    for split_dir in subdirs if split_layout else [root]:
        split = split_dir.name if split_layout else None
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found = _images_under(class_dir)
            rel_dir = class_dir.relative_to(root).as_posix()
            if not found:
                empty.append(rel_dir)
            entries += [Entry(f"{rel_dir}/{f}", class_dir.name, split) for f in found]
    if not entries:
        raise TlopsError(f"no images found in {uri}: expected {uri}/<class>/<image> "
                         f"(extensions {', '.join(sorted(IMAGE_EXTENSIONS))})")
    for name in empty:
        # Such a class is not in the data set at all; list it in validation.classes to make it an error.
        log.warning("class folder %s holds no images", name)
    return entries


def hash_split(sha256: str, val_fraction: float, test_fraction: float, salt: str) -> str:
    """A split from the file's content alone: adding files never moves an existing one."""
    # The first 60 bits of the digest (its first 15 hex digits), as a fraction of 2**60.
    u = (int.from_bytes(hashlib.sha256(f"{salt}:{sha256}".encode()).digest()[:8], "big") >> 4) / float(1 << 60)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def dhash(img: Image.Image) -> str:
    """64-bit difference hash: is each pixel of a 9x8 greyscale thumbnail brighter than its left neighbour.

    Survives re-encoding, resizing and a uniform change of brightness; 16 hex digits.
    """
    src = img if img.mode in ("L", "RGB") else img.convert("RGB")
    # reducing_gap: shrink by whole factors first (fast, in C), then resample; 3x faster on photos.
    grey = src.resize((9, 8), Image.Resampling.BILINEAR, reducing_gap=2.0).convert("L")
    a = np.frombuffer(grey.tobytes(), dtype=np.uint8).reshape(8, 9).astype(np.int16)
    return np.packbits((a[:, 1:] > a[:, :-1]).ravel()).tobytes().hex()


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _inspect(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, object]:
    """What the decoder sees in one file. Never raises for a bad file: the reason goes in ``error``."""
    data = path.read_bytes()
    row: dict[str, object] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "dhash": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            img = Image.open(io.BytesIO(data))
        with img:
            row.update(width=img.width, height=img.height, mode=img.mode, channels=len(img.getbands()),
                       format=img.format or "")
            if img.width * img.height > max_pixels:
                # Refused from the header alone: the pixels of a decompression bomb are never decoded.
                raise Image.DecompressionBombError(
                    f"{img.width}x{img.height} = {img.width * img.height} pixels exceeds the limit of "
                    f"{max_pixels} (validation.max_pixels); not decoded")
            # Trap: PNG's getexif() decodes the whole image to find a trailing eXIf chunk; only after the check.
            row["exif_orientation"] = int(img.getexif().get(0x0112, 1))
            # JPEG: one decode, at 1/2-1/8 scale in greyscale (libjpeg's scaled IDCT), is all the dHash needs.
            # It still entropy-decodes every scan, so a truncated or corrupt file fails at load() all the same;
            # width, height and mode above are the file's own. Other formats decode once at full size.
            img.draft("L", (DHASH_DRAFT_SIZE, DHASH_DRAFT_SIZE))
            img.load()  # a truncated or corrupt file fails here, not at open()
            row["dhash"] = dhash(img)
        row.update(decodable=True, error="")
    except Exception as exc:  # any decoder failure makes the file undecodable, with the reason kept
        # No memory addresses in a reason a person reads: "cannot identify image file <_io.BytesIO ...>".
        message = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
        row.update(decodable=False, error=f"{type(exc).__name__}: {message}"[:300])
    return row


class InspectCache:
    """What ``_inspect`` found per file, keyed by (path, size, mtime): unchanged files are not read again.

    One JSON file per data root under the work dir's cache, replaced atomically; entries for files that
    are gone are dropped on save. A file rewritten with the same size within the same mtime tick would
    be missed; every file system here records mtime in nanoseconds or microseconds.
    """

    def __init__(self, cache_root: str | Path, base: Path, max_pixels: int) -> None:
        ident = json.dumps([str(base.resolve()), max_pixels, INSPECT_VERSION])
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
        self.total, self.what, self.every_s = total, what, every_s
        self.done, self.t0 = 0, time.perf_counter()
        self.last = self.t0
        self.bar: Any = None
        if total and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit="file", file=sys.stderr, leave=False)

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(n)
            if self.done == self.total:
                self.bar.close()
        elif now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            log.info("%s: %d/%d files (%.0f%%), %.0f files/s", self.what, self.done, self.total,
                     100.0 * self.done / max(self.total, 1), rate)


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
        except OSError as exc:  # listed in a CSV manifest but missing, or unreadable: a bad file, not a crash
            keys.append(None)
            out.append({"bytes": 0, "sha256": "", "dhash": "", "decodable": False,
                        "error": f"{type(exc).__name__}: {exc.strerror or exc}"})
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
            if k is not None and info is not None:
                cache.put(k, info)
        cache.save()
    return [info for info in out if info is not None]


def build_manifest(uri: str, cache_root: str | Path, val_fraction: float = 0.15,
                   test_fraction: float = 0.2, salt: str = "tlops", max_pixels: int = DEFAULT_MAX_PIXELS,
                   workers: int = 0, use_cache: bool = True) -> pd.DataFrame:
    """One row per file: where it is, its label and split, and what the decoder saw."""
    root = materialize(uri, cache_root)
    if is_s3(uri) and not root.exists():
        raise TlopsError(f"no objects found under {uri}: expected {uri}/<class>/<image>")
    entries = discover(root, uri)
    base = (root.parent if root.is_file() else root).resolve()
    paths = [f"{base}/{e.rel}" for e in entries]  # strings: a Path per file costs more than the cache check
    cache = InspectCache(cache_root, base, max_pixels) if use_cache else None
    t0 = time.perf_counter()
    infos = inspect_files(paths, cache, max_pixels, workers)
    rows = []
    # A local URI is made absolute: every step resolves it the same way, whatever its working directory.
    uri_base = (uri.rsplit("/", 1)[0] if root.is_file() else uri.rstrip("/")) if is_s3(uri) else base.as_posix()
    for entry, path, info in zip(entries, paths, infos, strict=True):
        split = entry.split or hash_split(str(info["sha256"]), val_fraction, test_fraction, salt)
        rows.append({"uri": f"{uri_base}/{entry.rel}", "path": path,
                     "label": entry.label or None, "split": split, **info})
    df = pd.DataFrame(rows)
    for col in MANIFEST_COLUMNS:
        if col not in df:
            df[col] = None
    log.info("manifest: %d files, %d classes, from %s in %.2fs", len(df), df["label"].nunique(), uri,
             time.perf_counter() - t0)
    return df[MANIFEST_COLUMNS]


def manifest_hash(df: pd.DataFrame) -> str:
    """Identity of a data set: which contents, under which labels, in which split (``manifest.content_hash``)."""
    from tlops.manifest import content_hash

    return content_hash(df)


def write_manifest(df: pd.DataFrame, path: str | Path, local_paths: bool = False) -> Path:
    """CSV, replaced atomically: a reader sees the old manifest or the new one, never half of one.

    The ``path`` column (where this process found each file) is left out unless ``local_paths``: a manifest
    that leaves the process names its files by ``uri`` only, and a reader localizes them (tlops.manifest).
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
