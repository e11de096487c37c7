"""The walk over a data set: which files under a root (a tree of class folders, split folders, or a CSV manifest)
may be read, and why any other is not. Standard library only, so that ``tlops run`` checks its input before the
steps start without importing pandas, NumPy or Pillow (``tlops.data.discovery`` reads and inspects the files)."""

from __future__ import annotations

import csv
import errno
import functools
import io
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from tlops.data.storage import safe_relpath
from tlops.errors import TlopsError
from tlops.fileio import read_utf8_text

log = logging.getLogger("tlops.data.discovery")  # the name its messages have always had

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Entry:
    rel: str  # path relative to the data root, POSIX separators
    label: str
    split: str | None


@dataclass(frozen=True)
class Found:
    """One entry of a data set and what the walk decided about it: read ``real`` (a path under the data
    root, with no link left in it), or not, for ``reason``. A refused entry's ``rel`` is printable."""

    entry: Entry
    real: str = ""
    reason: str = ""
    size: int = 0


# ---- what is read: the one walk over a tree or a manifest ------------------------------------------

MAX_FILE_BYTES_ENV = "TLOPS_MAX_FILE_BYTES"
MAX_ASPECT_RATIO_ENV = "TLOPS_MAX_ASPECT_RATIO"
DEFAULT_MAX_FILE_BYTES = 128 * 1024 * 1024  # a larger file is not read (an 8 GB file named .png, a link to a disk)
# Longest side / shortest side. The preprocessing resizes the shorter side to about 256 px, so an image's work
# grows with this ratio (8 x 11,000,000 px would be 256 x 352,000,000 px): beyond it, refused from the header.
DEFAULT_MAX_ASPECT_RATIO = 100.0
_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFLNK: "a link"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ODD = re.compile(r"[\x00-\x1f\x7f\udc80-\udcff]")  # a control character, or a byte that was not UTF-8


def _limit_from_env(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise TlopsError(f"{name}={raw!r}: expected a positive number")
    return value


def max_file_bytes() -> int:
    """The largest file the manifest reads (``TLOPS_MAX_FILE_BYTES``, default 128 MiB)."""
    return int(_limit_from_env(MAX_FILE_BYTES_ENV, DEFAULT_MAX_FILE_BYTES))


def max_aspect_ratio() -> float:
    """The most elongated image decoded, longest side over shortest (``TLOPS_MAX_ASPECT_RATIO``, default 100)."""
    return _limit_from_env(MAX_ASPECT_RATIO_ENV, DEFAULT_MAX_ASPECT_RATIO)


@functools.cache
def _path_max() -> int:
    try:
        return int(os.pathconf("/", "PC_PATH_MAX"))
    except (OSError, ValueError, AttributeError):
        return 4096


def printable(text: str) -> str:
    """``text`` fit for one line of a report: bytes that are not UTF-8 and control characters as escapes."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    out = raw.decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", out)


def _name_problem(rel: str) -> str:
    """Why a path's text cannot be used as it is, or ""."""
    if not _ODD.search(rel):
        return ""
    if "\0" in rel:
        return "the path holds a NUL character"
    if any("\udc80" <= ch <= "\udcff" for ch in rel):
        return "the name is not valid UTF-8"
    if _CONTROL.search(rel):
        return "the name holds a control character"
    return ""


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ENAMETOOLONG:
        return "the path is longer than the system allows (ENAMETOOLONG)"
    if exc.errno == errno.ELOOP:
        return "a link that loops (ELOOP)"
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _inside(real: str, root_real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip("/") + "/")


def _admit(real: str, rel: str, limit: int) -> tuple[str, int]:
    """(reason, size) for a file at ``real`` (a path under the root with no link in it): reason "" when it
    may be read. Nothing is opened here: a FIFO, a device or a socket is refused from its lstat."""
    problem = _name_problem(rel)
    if problem:
        return problem, 0
    if len(os.fsencode(real)) >= _path_max():
        return "the path is longer than the system allows", 0
    try:
        st = os.lstat(real)
    except OSError as exc:
        return _os_reason(exc), 0
    if not stat.S_ISREG(st.st_mode):
        return f"{_kind(st.st_mode)}, not a regular file", 0
    if st.st_size > limit:
        return f"{st.st_size} bytes, over the limit of {limit} ({MAX_FILE_BYTES_ENV})", st.st_size
    return "", st.st_size


def _resolve(path: str, root_real: str) -> tuple[str, str]:
    """(real path, "") for ``path`` when it resolves under ``root_real``; ("", reason) otherwise."""
    try:
        real = os.path.realpath(path, strict=True)
    except OSError as exc:
        if exc.errno == errno.ENOENT and os.path.islink(path):
            return "", f"a link to {printable(os.readlink(path))}, which does not exist"
        return "", _os_reason(exc)
    if not _inside(real, root_real):
        return "", f"a link to {printable(real)}, outside the data root"
    return real, ""


def _found(rel: str, label: str, split: str | None, real: str, limit: int) -> Found:
    reason, size = _admit(real, rel, limit)
    entry = Entry(printable(rel) if reason else rel, label, split)
    return Found(entry, "" if reason else real, reason, size)


def _refused(rel: str, label: str | None, split: str | None, reason: str) -> Found:
    return Found(Entry(printable(rel), printable(label) if label else "", split), reason=reason)


def _listdir(real_dir: str) -> list[os.DirEntry[str]]:
    with os.scandir(real_dir) as it:
        return sorted(it, key=lambda e: e.name)


def _subdir(parent_real: str, e: os.DirEntry[str], root_real: str) -> tuple[str, str] | None:
    """A folder entry as (its real path, "") or ("", why it is not walked); None when it is no folder."""
    if e.is_symlink():
        path = f"{parent_real}/{e.name}"
        try:
            target = os.path.realpath(path, strict=True)
        except OSError:
            return None  # dangling or looping: not a folder (a file entry reports it)
        if not os.path.isdir(target):
            return None
        if not _inside(target, root_real):
            return "", f"a link to the folder {printable(target)}, outside the data root"
        return target, ""
    if e.is_dir(follow_symlinks=False):
        problem = _name_problem(e.name)
        return ("", problem) if problem else (f"{parent_real}/{e.name}", "")
    return None


def _class_files(rel_dir: str, real_dir: str, label: str, split: str | None, root_real: str,
                 limit: int) -> list[Found]:
    """Every image file below one class folder, in path order; hidden files are skipped.

    One scandir per folder. Links to folders are not followed (a loop cannot recurse forever); a link to a
    file is read when its target is a regular file under the data root. Links that leave the root, that
    dangle or loop, special files, oversize files, undecodable or too-long names are refused with a reason.
    """
    out: list[Found] = []
    pending = [(rel_dir, real_dir)]
    while pending:
        rel, real = pending.pop()
        try:
            entries = _listdir(real)
        except OSError as exc:
            out.append(_refused(rel, label, split, f"the folder cannot be listed ({_os_reason(exc)})"))
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            r = f"{rel}/{e.name}"
            image = os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
            try:
                if e.is_symlink():
                    target, why = _resolve(f"{real}/{e.name}", root_real)
                    if why:
                        sub = _subdir(real, e, root_real)
                        if image or (sub is not None and sub[1]):
                            out.append(_refused(r, label, split, why))
                        continue
                    if os.path.isdir(target) or not image:
                        continue  # a link to a folder under the root: not followed
                    out.append(_found(r, label, split, target, limit))
                elif e.is_dir(follow_symlinks=False):
                    problem = _name_problem(e.name)
                    if problem:
                        out.append(_refused(r, label, split, problem))
                    else:
                        pending.append((r, f"{real}/{e.name}"))
                elif image:
                    out.append(_found(r, label, split, f"{real}/{e.name}", limit))
            except OSError as exc:  # the entry vanished or changed while it was looked at
                if image:
                    out.append(_refused(r, label, split, _os_reason(exc)))
    return sorted(out, key=lambda f: f.entry.rel.split("/"))


def _walk_tree(root: Path, uri: str) -> list[Found]:
    root_real, limit = os.path.realpath(root), max_file_bytes()
    try:
        top = _listdir(root_real)
    except OSError as exc:
        raise TlopsError(f"data {uri} cannot be read: {_os_reason(exc)}") from None

    def folders(real: str, entries: list[os.DirEntry[str]]) -> list[tuple[str, str, str]]:
        """(name, real path, reason) of the visible folders among ``entries``."""
        out = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                sub = _subdir(real, e, root_real)
            except OSError:
                continue
            if sub is not None:
                out.append((e.name, *sub))
        return out

    subdirs = folders(root_real, top)
    split_layout = bool(subdirs) and {name for name, _, _ in subdirs} <= set(SPLITS)
    found: list[Found] = []
    empty: list[str] = []
    groups = [(name, real, why) for name, real, why in subdirs] if split_layout else [("", root_real, "")]
    for split_name, split_real, split_why in groups:
        split = split_name or None
        if split_why:
            found.append(_refused(split_name, None, split, split_why))
            continue
        try:
            classes = folders(split_real, _listdir(split_real)) if split_layout else subdirs
        except OSError as exc:
            found.append(_refused(split_name, None, split, f"the folder cannot be listed ({_os_reason(exc)})"))
            continue
        for name, real, why in classes:
            rel_dir = f"{split_name}/{name}" if split_name else name
            if why:
                found.append(_refused(rel_dir, name, split, why))
                continue
            files = _class_files(rel_dir, real, name, split, root_real, limit)
            if not files:
                empty.append(rel_dir)
            found += files
    if not found:
        raise TlopsError(f"no images found in {uri}: expected {uri}/<class>/<image> "
                         f"(extensions {', '.join(sorted(IMAGE_EXTENSIONS))})")
    for name in empty:
        # Such a class is not in the data set at all; list it in validation.classes to make it an error.
        log.warning("class folder %s holds no images", printable(name))
    return found


def _csv_text(csv_path: Path) -> str:
    """The manifest's text: UTF-8, with or without the byte-order mark Excel's "CSV UTF-8" writes."""
    return read_utf8_text(csv_path, f"{csv_path}: the CSV manifest", save_as="UTF-8 (Excel: CSV UTF-8)")


def _from_csv(csv_path: Path) -> list[Entry]:
    reader = csv.DictReader(io.StringIO(_csv_text(csv_path), newline=""))
    try:
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise TlopsError(f"{csv_path}: CSV manifest lacks column(s) {', '.join(sorted(missing))}; "
                             "expected a header path,label[,split]")
        out = []
        for row in reader:
            split = (row.get("split") or "").strip() or None
            if split is not None and split not in SPLITS:
                raise TlopsError(f"{csv_path}:{reader.line_num}: split {printable(split)[:80]!r} is not one of "
                                 f"{', '.join(SPLITS)}")
            rel = str(safe_relpath((row["path"] or "").strip(), str(csv_path.parent)))
            out.append(Entry(rel, (row["label"] or "").strip(), split))
    except csv.Error as exc:
        raise TlopsError(f"{csv_path}:{reader.line_num + 1}: not a readable CSV manifest ({exc})") from None
    if not out:
        raise TlopsError(f"{csv_path}: the CSV manifest lists no files (a header and no rows)")
    return out


def _walk_csv(csv_path: Path) -> list[Found]:
    """Every row of a CSV manifest, held to the rules of a tree: a path is read only when it resolves, links
    included, to a regular file under the manifest's folder."""
    root_real, limit = os.path.realpath(csv_path.parent), max_file_bytes()
    found = []
    for e in _from_csv(csv_path):
        problem = _name_problem(e.rel)
        if not problem and len(os.fsencode(f"{root_real}/{e.rel}")) >= _path_max():
            problem = "the path is longer than the system allows"
        real = ""
        if not problem:
            real, problem = _resolve(f"{root_real}/{e.rel}", root_real)
        found.append(_refused(e.rel, e.label, e.split, problem) if problem else
                     _found(e.rel, e.label, e.split, real, limit))
    return found


def walk(root: Path, uri: str) -> list[Found]:
    """What a data set holds, entry by entry, and which entries may be read: a CSV manifest, split
    folders, or an ImageFolder (an S3 prefix is walked as its local mirror). The one place that decides
    what is read."""
    if root.is_file() and root.suffix.lower() == ".csv":
        return _walk_csv(root)
    if not root.exists():
        raise TlopsError(f"data {uri} does not exist: pass --data DIR with DIR/<class>/<image> files, "
                         "or run 'tlops demo-data DIR' to create the demo set")
    if not root.is_dir():
        raise TlopsError(f"data {uri} is neither a directory nor a .csv manifest")
    return _walk_tree(root, uri)


def discover(root: Path, uri: str) -> list[Entry]:
    """The labelled files under ``root`` that may be read: a CSV manifest, split folders, or an ImageFolder."""
    return [f.entry for f in walk(root, uri) if not f.reason]
