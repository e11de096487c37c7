"""The target domain's images (domain adaptation): their manifest, as the validate step hands it on.

One CSV beside the source's manifest (a declared output of the validate step, an input of parity, fine-tune and
evaluate), with the source manifest's columns and ``domain``:

- ``target``: the unlabelled images of ``data.target_uri`` (any labels they came with are dropped), all in the
  ``train`` split: what adaptation reads;
- ``target-labelled``: the labelled target set of ``data.target_labelled_uri``, split as the source is (its own
  split folders or CSV column, else ``data.val_fraction``/``test_fraction`` of a hash of each file's content). Its
  test split is what the candidate is scored on; its train and val splits are never used for gradient steps on
  their labels (the labels only validate).

With no target data the CSV holds the header alone, so every step reads the same declared input either way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from tlops.data.discovery import MANIFEST_COLUMNS, build_manifest, read_manifest, write_manifest
from tlops.data.manifest import split_rows, usable
from tlops.errors import TlopsError

if TYPE_CHECKING:
    from tlops.config.settings import Config, DataConfig, ValidationConfig
    from tlops.data.validation import CheckResult

log = logging.getLogger(__name__)

TARGET = "target"
LABELLED = "target-labelled"
DOMAIN_COLUMN = "domain"
TARGET_COLUMNS = [*MANIFEST_COLUMNS, DOMAIN_COLUMN]


def empty_target_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in TARGET_COLUMNS})


def _manifest(uri: str, field: str, data: DataConfig, validation: ValidationConfig, cache_root: Path) -> pd.DataFrame:
    try:
        return build_manifest(uri, cache_root, data.val_fraction, data.test_fraction, data.split_salt,
                              max_pixels=validation.max_pixels, workers=data.manifest_workers,
                              use_cache=data.manifest_cache, stratified=data.split == "stratified")
    except TlopsError as exc:
        raise TlopsError(f"{field} {uri}: {exc}") from None


def build_target_manifest(cfg: Config, cache_root: str | Path) -> pd.DataFrame:
    """The target rows of a config; empty without target data.

    A target URI with no images, or whose files none decode, is one line (exit 2) naming the field."""
    data, validation = cfg.data, cfg.validation
    parts = []
    if data.target_uri:
        rows = _manifest(data.target_uri, "data.target_uri", data, validation, Path(cache_root))
        if not rows["decodable"].astype(bool).any():
            raise TlopsError(f"data.target_uri {data.target_uri}: none of its {len(rows)} file(s) is a readable "
                             "image; point it at a folder of the new domain's images")
        if data.target_labelled_fraction:
            held, rows = _held_out(rows, data)
            parts.append(held)
        parts.append(rows.assign(label=None, split="train", **{DOMAIN_COLUMN: TARGET}))
    if data.target_labelled_uri:
        rows = _manifest(data.target_labelled_uri, "data.target_labelled_uri", data, validation, Path(cache_root))
        ok = rows[rows["decodable"].astype(bool) & rows["label"].notna()]
        if ok.empty:
            raise TlopsError(f"data.target_labelled_uri {data.target_labelled_uri}: no readable labelled image; "
                             "expected <class>/<image> files with the source's class names")
        if not (ok["split"] == "test").any():
            raise TlopsError(f"data.target_labelled_uri {data.target_labelled_uri}: {len(ok)} labelled image(s) "
                             "leave none for the target test split; add images or raise data.test_fraction")
        parts.append(rows.assign(**{DOMAIN_COLUMN: LABELLED}))
    if not parts:
        return empty_target_manifest()
    out = pd.concat(parts, ignore_index=True)
    return out[TARGET_COLUMNS]


def _held_out(rows: pd.DataFrame, data: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(labelled, the rest) of ``data.target_uri``'s rows: ``target_labelled_fraction`` of each class, chosen in
    the class's salted hash order (stable as data grows), split by ``val_fraction``/``test_fraction``."""
    from tlops.data.discovery import stratified_splits

    ok = rows["decodable"].astype(bool) & rows["label"].notna()
    if not ok.any():
        raise TlopsError(f"data.target_labelled_fraction: data.target_uri {data.target_uri} has no labelled image; "
                         "it needs <class>/<image> folders to hold labelled images out")
    labels = [str(x) if isinstance(x, str) else None for x in rows["label"].where(ok, None)]
    salt = f"{data.split_salt}/target-labelled"
    held = pd.Series(stratified_splits(labels, list(rows["sha256"].fillna("")), 0.0,
                                       data.target_labelled_fraction, salt), index=rows.index).eq("test") & ok
    labelled = rows[held].copy()
    labelled["split"] = stratified_splits(list(labelled["label"].astype(str)), list(labelled["sha256"]),
                                          data.val_fraction, data.test_fraction, data.split_salt)
    rest = rows[~held & ~rows["sha256"].isin(set(labelled["sha256"]))]
    return labelled.assign(**{DOMAIN_COLUMN: LABELLED}), rest


def write_target_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    return write_manifest(df[TARGET_COLUMNS] if len(df.columns) else empty_target_manifest(), path)


def read_target_manifest(path: str | Path | None) -> pd.DataFrame:
    """The target manifest a step was given; an empty frame when there is none (no path, or the header alone)."""
    if not path or not Path(path).is_file() or Path(path).stat().st_size == 0:
        return empty_target_manifest()
    df = read_manifest(path)
    if DOMAIN_COLUMN not in df:
        raise TlopsError(f"{path}: not a target manifest (no {DOMAIN_COLUMN} column)")
    return df


def unlabelled(target: pd.DataFrame) -> pd.DataFrame:
    """The unlabelled target rows (``data.target_uri``), decodable."""
    return target[(target[DOMAIN_COLUMN] == TARGET) & target["decodable"].astype(bool)]


def labelled(target: pd.DataFrame) -> pd.DataFrame:
    """The labelled target rows (``data.target_labelled_uri``), decodable and labelled."""
    return usable(target[target[DOMAIN_COLUMN] == LABELLED])


def labelled_split(target: pd.DataFrame, split: str) -> pd.DataFrame:
    return split_rows(target[target[DOMAIN_COLUMN] == LABELLED], split)


def adaptation_pool(target: pd.DataFrame) -> pd.DataFrame:
    """What adaptation may look at: the unlabelled target images and the labelled set's train and val images,
    without their labels; never a target test image, nor any image whose content is also a target test image."""
    test_sha = set(labelled_split(target, "test")["sha256"])
    pool = pd.concat([unlabelled(target), labelled(target).query("split != 'test'")], ignore_index=True)
    pool = pool[~pool["sha256"].isin(test_sha)]
    return pool.drop_duplicates("sha256").assign(label=None).reset_index(drop=True)


def target_golden_rows(target: pd.DataFrame, count: int = 4) -> pd.DataFrame:
    """Target images among the parity step's golden images (the first ``count`` decodable by content hash): the
    one preprocessing spec is proven on both domains."""
    rows = target[target["decodable"].astype(bool)]
    return rows.sort_values("sha256").drop_duplicates("sha256").head(count).drop(columns=[DOMAIN_COLUMN])


# ---------------------------------------------------------------------------------------------- checks
# Plain pandas (no torch): validation runs them without loading the training code.


def target_pool(target: pd.DataFrame) -> pd.DataFrame:
    """The target rows adaptation may look at: decodable, never the test split."""
    rows = usable(target)
    return rows[rows["split"] != "test"]


def check_target_classes(source_classes: list[str], labelled_target: pd.DataFrame, where: str) -> None:
    """A labelled target set must use the source's classes: one line naming the strangers otherwise."""
    labels = set(labelled_target["label"].dropna().astype(str))
    strangers = sorted(labels - set(source_classes))
    if strangers:
        shown = ", ".join(strangers[:5]) + (f" and {len(strangers) - 5} more" if len(strangers) > 5 else "")
        raise TlopsError(f"{where}: labelled target class(es) {shown} are not among the source's classes "
                         f"({', '.join(source_classes[:10])}{'...' if len(source_classes) > 10 else ''}); "
                         "rename them to the source's class names or leave them out")


def disjoint_or_fail(pool_sha256: list[str], test_sha256: list[str]) -> None:
    shared = set(pool_sha256) & set(test_sha256)
    if shared:
        raise TlopsError(f"{len(shared)} target training image(s) are also in the target test split "
                         f"(sha256 {sorted(shared)[0][:12]}...): pseudo-labels may never see test images")


def cross_domain_leakage(source: pd.DataFrame, target: pd.DataFrame | None,
                         labelled: pd.DataFrame | None) -> CheckResult:
    """The check ``domain_leakage``: no content of a test split (the source's, the labelled target's) is
    in any set that training or adaptation reads (source train/val, the unlabelled target, the labelled
    target's train/val). One line naming the first files and where each copy is."""
    from tlops.data.validation import CheckResult

    roles: list[tuple[str, pd.DataFrame]] = []
    for name, df in (("source", source), ("target", target), ("target-labelled", labelled)):
        if df is None:
            continue
        rows = df[df["sha256"].fillna("").ne("")]
        for split, part in rows.groupby("split"):
            if name == "target":  # unlabelled: every image may be adapted on, whatever its split
                roles.append(("target", part))
            else:
                roles.append((f"{name}/{split}", part))
    tests = [(role, part) for role, part in roles if role.endswith("/test")]
    found: list[str] = []
    files: list[str] = []
    for role, part in tests:
        by_sha = dict(zip(part["sha256"], part["uri"], strict=False))
        for other, rows in roles:
            if other == role:
                continue
            for sha, uri in zip(rows["sha256"], rows["uri"], strict=True):
                if sha in by_sha:
                    files.append(str(by_sha[sha]))
                    found.append(f"{by_sha[sha]} ({role}; also {other}: {uri})")
    if not found:
        names = ", ".join(role for role, _ in roles)
        return CheckResult("domain_leakage", True, "error", f"no test image is in another set ({names})")
    shown = "; ".join(found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
    return CheckResult("domain_leakage", False, "error",
                       f"{len(found)} test image(s) also in a set that trains or adapts: {shown}", files=files)
