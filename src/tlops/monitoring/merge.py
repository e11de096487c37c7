"""``tlops data merge``: a labelled queue (``tlops monitor --export-queue``) into a CSV manifest of the data.

The labels come as the queue's ``manifest.csv`` with its ``label`` column filled, or as Label Studio's JSON
export of the imported tasks (the last annotation that was not cancelled). Each labelled image is checked
against the sha256 the prediction log recorded, copied beside the manifest under ``served/`` and appended as a
row with provenance columns (``source``, ``served_at``, ``model_name``, ``model_version``, ``labelled_by``,
``merged_at``); an image whose content the manifest already holds is skipped. Everything is checked before
anything is written; the manifest is replaced atomically; the queue is never modified. The next run validates
the new rows like any others (leakage and duplicate checks included).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from tlops.errors import TlopsError

PROVENANCE = ["sha256", "source", "served_at", "model_name", "model_version", "labelled_by", "merged_at"]


def _from_csv(path: Path) -> list[dict[str, Any]]:
    import io

    import pandas as pd

    from tlops.fileio import read_utf8_text

    frame = pd.read_csv(io.StringIO(read_utf8_text(path, f"{path}: the labelled queue manifest")), dtype=str,
                        keep_default_na=False)
    missing = {"path", "label", "sha256"} - set(frame.columns)
    if missing:
        raise TlopsError(f"{path}: lacks column(s) {', '.join(sorted(missing))}; give the manifest.csv that "
                         "tlops monitor --export-queue wrote, with its label column filled")
    return [{**row, "labelled_by": row.get("labelled_by", "")} for row in frame.to_dict("records")
            if row["label"].strip()]


def _from_label_studio(path: Path) -> list[dict[str, Any]]:
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TlopsError(f"{path}: not a Label Studio JSON export ({exc})") from None
    if not isinstance(tasks, list):
        raise TlopsError(f"{path}: not a Label Studio JSON export (expected a list of tasks)")
    out = []
    for i, task in enumerate(tasks):
        data = task.get("data", {}) if isinstance(task, dict) else {}
        if "sha256" not in data:
            raise TlopsError(f"{path}: task {i} has no data.sha256; export the tasks imported from tlops's "
                             "labelstudio.json")
        done = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
        choices = [c for a in done[-1:] for r in a.get("result", []) for c in r.get("value", {}).get("choices", [])]
        if not choices:
            continue  # not labelled (yet)
        who = done[-1].get("completed_by", "")
        out.append({"path": str(data.get("image", "")), "label": str(choices[0]), "sha256": str(data["sha256"]),
                    "served_at": str(data.get("served_at", "")), "model_name": str(data.get("model_name", "")),
                    "model_version": str(data.get("model_version", "")),
                    "labelled_by": str(who.get("email", who.get("id", "")) if isinstance(who, dict) else who)})
    return out


def _contents(existing: Any, root: Path) -> set[str]:
    """The sha256 of every file the manifest lists: its own column where a row has one (merged rows), else the
    file's bytes (the data's own rows), so that a served image that is already in the data is not added again."""
    from tlops.data.storage import safe_relpath

    sums = list(existing["sha256"]) if "sha256" in existing.columns else [""] * len(existing)
    known = set()
    for rel, sha in zip(existing["path"], sums, strict=True):
        if sha:
            known.add(sha)
            continue
        try:
            path = root / safe_relpath(str(rel).strip(), str(root))
            known.add(hashlib.sha256(path.read_bytes()).hexdigest())
        except (OSError, TlopsError):
            continue  # a row the data reader will report (missing, outside the folder); nothing to compare
    return known


def _copy(source: Path, tmp: str) -> None:
    shutil.copyfile(source, tmp)


def merge(labels: str | Path, into: str | Path, queue: str | Path | None = None) -> dict[str, int]:
    """Merge; returns counts: added, already present, unlabelled."""
    import pandas as pd

    from tlops.data.storage import safe_relpath
    from tlops.fileio import atomic_write

    labels, into = Path(labels), Path(into)
    root = Path(queue) if queue else labels.parent
    if not labels.is_file():
        raise TlopsError(f"--labels {labels} does not exist")
    if into.suffix.lower() != ".csv" or into.is_dir():
        raise TlopsError(f"--into {into}: expected a CSV manifest (path,label[,split]) to add the rows to; "
                         "it is made when absent")
    rows = _from_label_studio(labels) if labels.suffix.lower() == ".json" else _from_csv(labels)
    total = len(json.loads(labels.read_text(encoding="utf-8"))) if labels.suffix.lower() == ".json" else len(
        pd.read_csv(labels, dtype=str, keep_default_na=False))
    if not rows:
        raise TlopsError(f"{labels}: no image is labelled; fill the label column (or label the tasks in Label "
                         "Studio and export them)")
    existing = pd.read_csv(into, dtype=str, keep_default_na=False) if into.is_file() else pd.DataFrame(
        columns=["path", "label"])
    if into.is_file() and not {"path", "label"} <= set(existing.columns):
        raise TlopsError(f"--into {into}: not a CSV manifest (needs path and label columns)")
    known = _contents(existing, into.parent)
    staged: list[tuple[Path, str, dict[str, Any]]] = []
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    for row in rows:
        sha = row["sha256"]
        source = root / safe_relpath(row["path"], str(root)) if row["path"] else None
        if source is None or not source.is_file():
            matches = sorted((root / "images").glob(f"{sha[:16]}.*"))
            source = matches[0] if matches else None
        if source is None:
            raise TlopsError(f"{labels}: the image of {sha[:16]} ({row['path']}) is not in the queue {root}; "
                             "give --queue the directory tlops monitor --export-queue wrote")
        if hashlib.sha256(source.read_bytes()).hexdigest() != sha:
            raise TlopsError(f"{source}: its content does not match the sha256 the prediction log recorded; the "
                             "queue was changed after export: export it again")
        if sha in known:
            continue
        known.add(sha)
        rel = f"served/{sha[:16]}{source.suffix}"
        staged.append((source, rel, {"path": rel, "label": row["label"].strip(), "sha256": sha,
                                     "source": "served", "served_at": row.get("served_at", ""),
                                     "model_name": row.get("model_name", ""),
                                     "model_version": row.get("model_version", ""),
                                     "labelled_by": row.get("labelled_by", ""), "merged_at": now}))
    for source, rel, _ in staged:
        atomic_write(into.parent / rel, functools.partial(_copy, source))
    added = pd.DataFrame([r for _, _, r in staged])
    merged = pd.concat([existing, added], ignore_index=True).fillna("") if len(added) else existing
    atomic_write(into, lambda tmp: merged.to_csv(tmp, index=False))
    return {"added": len(staged), "present": len(rows) - len(staged), "unlabelled": total - len(rows)}
