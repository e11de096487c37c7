"""Data sets: discovery (ImageFolder, split folders, CSV manifest), the image manifest, stable splits."""

from __future__ import annotations

import csv
import functools
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from tlops.errors import TlopsError
from tlops.fileio import atomic_write
from tlops.storage import materialize, safe_relpath

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = [
    "uri", "path", "label", "split", "width", "height", "mode", "channels", "format",
    "bytes", "sha256", "exif_orientation", "decodable", "error",
]


@dataclass(frozen=True)
class Entry:
    rel: str  # path relative to the data root, POSIX separators
    label: str
    split: str | None


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


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
    for split_dir in subdirs if split_layout else [root]:
        split = split_dir.name if split_layout else None
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for f in sorted(class_dir.rglob("*")):
                if _is_image(f):
                    entries.append(Entry(f.relative_to(root).as_posix(), class_dir.name, split))
    if not entries:
        raise TlopsError(f"no images found in {uri}: expected {uri}/<class>/<image> "
                         f"(extensions {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return entries


def hash_split(sha256: str, val_fraction: float, test_fraction: float, salt: str) -> str:
    """A split from the file's content alone: adding files never moves an existing one."""
    u = int(hashlib.sha256(f"{salt}:{sha256}".encode()).hexdigest()[:15], 16) / float(1 << 60)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _inspect(path: Path) -> dict[str, object]:
    data = path.read_bytes()
    row: dict[str, object] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    try:
        with Image.open(path) as img:
            row.update(width=img.width, height=img.height, mode=img.mode, channels=len(img.getbands()),
                       format=img.format or "", exif_orientation=int(img.getexif().get(0x0112, 1)))
            img.load()  # a truncated or corrupt file fails here, not at open()
        row.update(decodable=True, error="")
    except Exception as exc:  # any decoder failure makes the file undecodable, with the reason kept
        row.update(decodable=False, error=f"{type(exc).__name__}: {exc}"[:300])
    return row


def build_manifest(uri: str, cache_root: str | Path, val_fraction: float = 0.15,
                   test_fraction: float = 0.2, salt: str = "tlops") -> pd.DataFrame:
    """One row per file: where it is, its label and split, and what the decoder saw."""
    root = materialize(uri, cache_root)
    entries = discover(root, uri)
    base = root.parent if root.is_file() else root
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        infos = list(pool.map(lambda e: _inspect(base / e.rel), entries))
    rows = []
    uri_base = uri.rsplit("/", 1)[0] if root.is_file() else uri.rstrip("/")
    for entry, info in zip(entries, infos, strict=True):
        split = entry.split or hash_split(str(info["sha256"]), val_fraction, test_fraction, salt)
        rows.append({"uri": f"{uri_base}/{entry.rel}", "path": str((base / entry.rel).resolve()),
                     "label": entry.label or None, "split": split, **info})
    df = pd.DataFrame(rows)
    for col in MANIFEST_COLUMNS:
        if col not in df:
            df[col] = None
    log.info("manifest: %d files, %d classes, from %s", len(df), df["label"].nunique(), uri)
    return df[MANIFEST_COLUMNS]


def manifest_hash(df: pd.DataFrame) -> str:
    """Identity of a data set: which contents, under which labels, in which split."""
    lines = sorted(f"{r.uri}\t{r.sha256}\t{r.label}\t{r.split}" for r in df.itertuples())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def read_manifest(path: str | Path) -> pd.DataFrame:
    df = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"label": str, "error": str})
    df["decodable"] = df["decodable"].astype(bool)
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
    import numpy as np
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

