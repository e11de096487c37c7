"""A Great Expectations suite over the image manifest: the data checks of the validate step.

The manifest (a row per file) and three small tables derived from it (images per class and split,
per-split class statistics, drift against a reference manifest) are written as Parquet files; a GX
pandas filesystem data source holds one asset per table, each asset has its own expectation suite and
validation definition, and one Checkpoint runs them all and builds the Data Docs. Every expectation
carries the name of its check (``meta.check``) and its severity (GX ``critical`` for an error,
``warning`` for a warning), so the GX result alone says what failed and how much it matters.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tlops.config.settings import ValidationConfig
from tlops.data.discovery import SPLITS, write_manifest
from tlops.fileio import write_json, write_text

log = logging.getLogger(__name__)

# Checks over single files: a failure names the files, which can be quarantined.
FILE_CHECKS = ("decodable", "labels_not_null", "labels_in_class_list", "min_size", "allowed_modes",
               "exact_duplicates_across_splits", "same_content_two_labels", "near_duplicates_across_splits")
_SPLIT_ORDER = {s: i for i, s in enumerate(SPLITS)}
_SHOW = 5  # files named per line; the full lists are in the report and the quarantine list


@dataclass
class CheckResult:
    name: str
    success: bool
    severity: str
    detail: str
    files: list[str] = field(default_factory=list)  # the files that failed a per-file check
    skipped: bool = False  # not applicable: no class list, no reference manifest
    excluded: bool = False  # failed, but its files are quarantined and left out of training

    @property
    def status(self) -> str:
        if self.skipped:
            return "SKIP"
        if self.success:
            return "PASS"
        return "FAIL" if self.severity == "error" and not self.excluded else "WARN"


@dataclass
class ValidationReport:
    success: bool
    checks: list[CheckResult]
    gx_result: dict[str, Any] = field(default_factory=dict)
    quarantine: list[dict[str, str]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # uris left out of training (exclude_quarantined)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == "FAIL"]

    def warnings(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == "WARN"]

    def summary_lines(self) -> list[str]:
        return [f"{c.status} {c.name} [{c.severity}]: {c.detail}" for c in self.checks]

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "checks": [{**asdict(c), "status": c.status} for c in self.checks],
            "quarantine": self.quarantine,
            "excluded": self.excluded,
            "tables": self.tables,
        }

    def to_markdown(self) -> str:
        """A short summary for a person: the verdict, one row per check, the quarantine count."""
        lines = [f"# Data validation: {'PASS' if self.success else 'FAIL'}", "",
                 "| status | check | severity | detail |", "|---|---|---|---|"]
        lines += [f"| {c.status} | {c.name} | {c.severity} | {c.detail.replace('|', '/')} |" for c in self.checks]
        lines += ["", f"Quarantined files: {len(self.quarantine)}"
                  + (f" ({len(self.excluded)} left out of training)" if self.excluded else "")]
        return "\n".join(lines) + "\n"

    def to_html(self, title: str = "tlops data validation") -> str:
        """One self-contained page (no scripts, no network): what the Kubeflow UI shows for the step."""
        from markupsafe import Markup

        from tlops.reports import render

        counts = pd.DataFrame(self.tables.get("class_counts", []))
        pivot = (counts.pivot(index="label", columns="split", values="count").to_html(border=0)
                 if not counts.empty else "")
        return render("validation.html.j2", title=title, verdict="PASS" if self.success else "FAIL",
                      checks=self.checks, quarantine=self.quarantine[:500], quarantine_count=len(self.quarantine),
                      excluded=len(self.excluded), per_class_table=Markup(pivot))  # pandas escapes its cells


# ---- tables derived from the manifest ---------------------------------------------------------------


def class_counts(manifest: pd.DataFrame, classes: list[str] | None = None) -> pd.DataFrame:
    """Images per (split, label); every split that exists is checked for every class (configured ones too)."""
    labelled = manifest.dropna(subset=["label"])
    labels = sorted(set(labelled["label"].unique()) | set(classes or []))
    splits = sorted(manifest["split"].dropna().unique(), key=lambda s: _SPLIT_ORDER.get(s, 99))
    counts = labelled.groupby(["split", "label"]).size()
    rows = [{"split": s, "label": lab, "count": int(counts.get((s, lab), 0))} for s in splits for lab in labels]
    return pd.DataFrame(rows, columns=["split", "label", "count"])


def class_floors(counts: pd.DataFrame, cfg: ValidationConfig) -> pd.DataFrame:
    """``counts`` with each (split, class)'s floor, the images it is expected to hold, and count - floor.

    Train needs ``min_images_per_class``. A held-out split's floor scales with the data: the class's
    expected share of it (the split's share of all images times the class's images) halved, at least
    ``min_held_out_per_class`` and at most ``min_images_per_class``.
    """
    out = counts.copy()
    total = int(out["count"].sum())
    per_split = out.groupby("split")["count"].transform("sum")
    per_class = out.groupby("label")["count"].transform("sum")
    out["expected"] = (per_split / total * per_class) if total else 0.0
    held = np.minimum(cfg.min_images_per_class,
                      np.maximum(cfg.min_held_out_per_class, np.floor(out["expected"] / 2))).astype(int)
    out["floor"] = np.where(out["split"].eq("train"), cfg.min_images_per_class, held).astype(int)
    out["margin"] = (out["count"] - out["floor"]).astype(int)
    return out


def _floor_detail(counts: pd.DataFrame, cfg: ValidationConfig) -> str:
    """One line for the min_images_per_class check: the floors met, or what is short and what to do."""
    short = counts[counts["margin"] < 0]
    if short.empty:
        ranges = []
        for split, group in counts.groupby("split", sort=False):
            lo, hi = int(group["floor"].min()), int(group["floor"].max())
            ranges.append(f"{split} >= {lo}" if lo == hi else f"{split} >= {lo}-{hi}")
        return "every class has its floor in each split: " + ", ".join(ranges)
    held = ~short["split"].eq("train")
    tiny = short[held & (short["expected"] < cfg.min_held_out_per_class)]
    parts = []
    if not tiny.empty:
        totals = counts.groupby("label")["count"].sum()
        shares = counts.groupby("split")["count"].sum() / max(int(counts["count"].sum()), 1)
        labels = sorted(set(tiny["label"]))
        smallest = min(float(shares[s]) for s in set(tiny["split"]))
        need = int(np.ceil(cfg.min_held_out_per_class / smallest)) if smallest > 0 else 0
        parts.append(
            "too small for a held-out test: "
            + _names([f"class {lab} has {int(totals[lab])} images" for lab in labels])
            + f"; val and test need at least {cfg.min_held_out_per_class} images of each class"
            + (f", about {need} images per class at these split fractions" if need else "")
            + "; add images, or lower validation.min_held_out_per_class")
    rest = short.drop(tiny.index)
    for floor, group in rest.groupby("floor", sort=True):
        parts.append(f"fewer than {int(floor)} images: "
                     + _names([f"{r.label}/{r.split}={r.count}" for r in group.itertuples()]))
    return "; ".join(parts)


def split_stats(counts: pd.DataFrame) -> pd.DataFrame:
    """Per split: how many classes have images, the largest and smallest class, and their ratio."""
    rows = []
    for split, group in counts.groupby("split", sort=False):
        largest, smallest = int(group["count"].max()), int(group["count"].min())
        rows.append({"split": split, "classes": int((group["count"] > 0).sum()), "largest": largest,
                     "smallest": smallest, "imbalance_ratio": largest / smallest if smallest else float("inf")})
    return pd.DataFrame(rows, columns=["split", "classes", "largest", "smallest", "imbalance_ratio"])


def _hash_ints(hexes: pd.Series) -> np.ndarray:
    return np.array([int(h, 16) for h in hexes], dtype=np.uint64)


def near_duplicates(manifest: pd.DataFrame, max_distance: int, min_side: int) -> pd.DataFrame:
    """Pairs (a file, its closest lookalike in an earlier split) within ``max_distance`` bits of dHash.

    Splits are ordered train < val < test, so a test image resembling a training image is the one
    reported (and quarantined, at error severity). Identical bytes are left to the exact check.
    Brute force in blocks: O(later files x earlier files) 64-bit XORs, about a second per 10^8 pairs.
    """
    cols = ["uri", "near_duplicate_of", "distance"]
    ok = (manifest["decodable"].astype(bool) & manifest["dhash"].fillna("").str.len().eq(16)
          & (manifest["width"].fillna(0) >= min_side) & (manifest["height"].fillna(0) >= min_side))
    usable = manifest[ok]
    out: list[dict[str, Any]] = []
    for later in SPLITS[1:]:
        earlier_splits = SPLITS[: SPLITS.index(later)]
        a = usable[usable["split"] == later]
        b = usable[usable["split"].isin(earlier_splits)]
        if a.empty or b.empty:
            continue
        ha, hb = _hash_ints(a["dhash"]), _hash_ints(b["dhash"])
        sha_b = b["sha256"].to_numpy()
        for start in range(0, len(ha), 1024):
            dist = np.bitwise_count(ha[start : start + 1024, None] ^ hb[None, :])
            same = a["sha256"].to_numpy()[start : start + 1024, None] == sha_b[None, :]
            dist = np.where(same, 255, dist)
            best = dist.argmin(axis=1)
            for i, j in enumerate(best):
                d = int(dist[i, j])
                if d <= max_distance:
                    out.append({"uri": a["uri"].iloc[start + i], "near_duplicate_of": b["uri"].iloc[j],
                                "distance": d})
    return pd.DataFrame(out, columns=cols)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(a, b).statistic)


def drift(manifest: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Class-share and image-size drift against a previously accepted manifest (one row)."""
    from tlops.data.manifest import usable

    cur, ref = usable(manifest), usable(reference)
    p = cur["label"].astype(str).value_counts(normalize=True)
    q = ref["label"].astype(str).value_counts(normalize=True)
    labels = sorted(set(p.index) | set(q.index))
    tvd = 0.5 * float(sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in labels))
    row = {"current_files": len(cur), "reference_files": len(ref), "class_tvd": tvd,
           "width_ks": ks_statistic(cur["width"].to_numpy(float), ref["width"].to_numpy(float)),
           "height_ks": ks_statistic(cur["height"].to_numpy(float), ref["height"].to_numpy(float))}
    return pd.DataFrame([row])


def file_table(manifest: pd.DataFrame, cfg: ValidationConfig) -> pd.DataFrame:
    """The manifest plus the columns the cross-file checks need, one row per file."""
    df = manifest.copy()
    df["label"] = df["label"].astype(object).where(df["label"].notna(), None)
    has_sha = df["sha256"].fillna("").str.len() == 64
    # Exact copies: a file whose bytes are also in an earlier split (train < val < test).
    order = df["split"].map(_SPLIT_ORDER).fillna(99)
    first_split = order[has_sha].groupby(df.loc[has_sha, "sha256"]).transform("min")
    later = has_sha & (order > first_split.reindex(df.index).fillna(99))
    first_uri = (df[has_sha].assign(_o=order).sort_values(["_o", "uri"]).groupby("sha256")["uri"].first())
    df["also_in_earlier_split"] = np.where(later, df["sha256"].map(first_uri), None)
    # One content under two labels: every copy gets the list of the other labels.
    labelled = df[has_sha & df["label"].notna()]
    labels_of = labelled.groupby("sha256")["label"].agg(lambda s: sorted(set(s)))
    conflict = has_sha & df["label"].notna() & df["sha256"].map(lambda h: len(labels_of.get(h, [])) > 1)
    df["other_labels"] = [",".join(x for x in labels_of[h] if x != lab) if c else None
                          for h, lab, c in zip(df["sha256"], df["label"], conflict, strict=True)]
    near = near_duplicates(df, cfg.near_duplicate_max_distance, cfg.near_duplicate_min_side)
    near_of = dict(zip(near["uri"], near["near_duplicate_of"], strict=True))
    df["near_duplicate_of"] = df["uri"].map(near_of).astype(object).where(df["uri"].isin(near_of.keys()), None)
    df["near_duplicate_distance"] = df["uri"].map(dict(zip(near["uri"], near["distance"], strict=True)))
    for col in ("also_in_earlier_split", "other_labels", "near_duplicate_of"):
        df[col] = df[col].astype(object)
    return df


def _file_masks(files: pd.DataFrame, cfg: ValidationConfig) -> dict[str, pd.Series]:
    """The rows each per-file check fails: the same rules as the GX expectations, used to decide which
    files training may keep before the data-set-level tables are built."""
    masks = {
        "decodable": ~files["decodable"].astype(bool),
        "labels_not_null": files["label"].isna(),
        "min_size": (files["width"] < cfg.min_width) | (files["height"] < cfg.min_height),
        "allowed_modes": files["mode"].notna() & ~files["mode"].isin(cfg.allowed_modes),
        "exact_duplicates_across_splits": files["also_in_earlier_split"].notna(),
        "same_content_two_labels": files["other_labels"].notna(),
        "near_duplicates_across_splits": files["near_duplicate_of"].notna(),
    }
    if cfg.classes is not None:
        masks["labels_in_class_list"] = files["label"].notna() & ~files["label"].isin(cfg.classes)
    return masks


# ---- the GX suite ----------------------------------------------------------------------------------


def _severity(cfg: ValidationConfig, check: str) -> str:
    return "critical" if cfg.severity_of(check) == "error" else "warning"


def _suites(cfg: ValidationConfig, tables: dict[str, pd.DataFrame]) -> dict[str, list[Any]]:
    """The expectations per table, each tagged with its check and severity."""
    import great_expectations.expectations as gxe

    def tag(check: str, exp: Any) -> Any:
        exp.severity = _severity(cfg, check)
        exp.meta = {"check": check}
        return exp

    files = [
        tag("decodable", gxe.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True])),
        tag("labels_not_null", gxe.ExpectColumnValuesToNotBeNull(column="label")),
        tag("min_size", gxe.ExpectColumnValuesToBeBetween(column="width", min_value=cfg.min_width)),
        tag("min_size", gxe.ExpectColumnValuesToBeBetween(column="height", min_value=cfg.min_height)),
        tag("allowed_modes", gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=cfg.allowed_modes)),
        tag("exact_duplicates_across_splits", gxe.ExpectColumnValuesToBeNull(
            column="also_in_earlier_split")),
        tag("same_content_two_labels", gxe.ExpectColumnValuesToBeNull(column="other_labels")),
        tag("near_duplicates_across_splits", gxe.ExpectColumnValuesToBeNull(column="near_duplicate_of")),
    ]
    if cfg.classes is not None:
        files.insert(2, tag("labels_in_class_list", gxe.ExpectColumnValuesToBeInSet(
            column="label", value_set=cfg.classes)))
    suites: dict[str, list[Any]] = {
        "files": files,
        "class_counts": [tag("min_images_per_class", gxe.ExpectColumnValuesToBeBetween(
            column="margin", min_value=0))],
        "splits": [
            tag("single_class_split", gxe.ExpectColumnValuesToBeBetween(column="classes", min_value=2)),
            tag("class_imbalance", gxe.ExpectColumnValuesToBeBetween(
                column="imbalance_ratio", max_value=cfg.max_imbalance_ratio)),
        ],
    }
    if "drift" in tables:
        suites["drift"] = [
            tag("class_drift", gxe.ExpectColumnValuesToBeBetween(column="class_tvd", max_value=cfg.max_class_drift)),
            tag("size_drift", gxe.ExpectColumnValuesToBeBetween(column="width_ks", max_value=cfg.max_size_drift)),
            tag("size_drift", gxe.ExpectColumnValuesToBeBetween(column="height_ks", max_value=cfg.max_size_drift)),
        ]
    return suites


def run_checkpoint(tables: dict[str, pd.DataFrame], suites: dict[str, list[Any]],
                   docs_dir: str | Path | None = None) -> dict[str, Any]:
    """Validate each table with its suite through one GX Checkpoint; returns the result per table.

    With ``docs_dir``, the Checkpoint's UpdateDataDocsAction builds the Data Docs site there.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    if docs_dir is not None:
        context.add_data_docs_site("tlops", {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(Path(docs_dir).resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    with tempfile.TemporaryDirectory(prefix="tlops-gx-") as tmp:
        source = context.data_sources.add_pandas_filesystem("manifest_tables", base_directory=Path(tmp))
        definitions = []
        for name, df in tables.items():
            df.to_parquet(Path(tmp) / f"{name}.parquet", index=False)
            batch = source.add_parquet_asset(name).add_batch_definition_path(name, path=f"{name}.parquet")
            suite = context.suites.add(gx.ExpectationSuite(name=f"tlops_{name}", expectations=suites[name]))
            definitions.append(context.validation_definitions.add(
                gx.ValidationDefinition(name=f"validate_{name}", data=batch, suite=suite)))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name="tlops_data_validation", validation_definitions=definitions, actions=[],
            # Every table has a ``key`` column (file uri, split/label, split) naming its failing rows.
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["key"]}))
        result = checkpoint.run()
        if docs_dir is not None:
            # The site once, every table's page and the index together (GX's UpdateDataDocsAction rebuilds the
            # index, its templates compiled anew, once per table).
            idents: list[Any] = [ident for key, vr in result.run_results.items()
                                 for ident in (key, ExpectationSuiteIdentifier(name=vr.suite_name))]
            context.build_data_docs(site_names=["tlops"], resource_identifiers=idents)
    by_table = {}
    for vr in result.run_results.values():
        by_table[vr.meta["active_batch_definition"]["data_asset_name"]] = vr
    if docs_dir is not None:
        # The site copies 4 MB of logos and fonts the pages do not need; what they do need comes with tlops.
        for heavy in ("images", "fonts"):
            shutil.rmtree(Path(docs_dir) / "static" / heavy, ignore_errors=True)
        offline_data_docs(docs_dir)
    return by_table


VENDOR_DIR = Path(__file__).with_name("datadocs_static")
# GX's CDN files by name (".min" dropped) -> the vendored files that stand for them (see datadocs_static/README.md).
_VENDORED = {
    "bootstrap.css": ["css/bootstrap.min.css"], "bootstrap.js": ["js/bootstrap.min.js"],
    "jquery-3.7.1.js": ["js/jquery.min.js"], "popper.js": ["js/popper.min.js"],
    "bootstrap-table.css": ["css/bootstrap-table.min.css"], "bootstrap-table.js": ["js/bootstrap-table.min.js"],
    "bootstrap-table-filter-control.css": ["css/bootstrap-table-filter-control.min.css"],
    "bootstrap-table-filter-control.js": ["js/bootstrap-table-filter-control.min.js"],
    "bootstrap-datepicker.css": ["css/bootstrap-datepicker.min.css"],
    "bootstrap-datepicker.js": ["js/bootstrap-datepicker.min.js"],
    "all.css": ["css/fontawesome.min.css", "css/solid.min.css"],
}
_REMOTE_TAG = re.compile(r"""<script\b[^>]*?\bsrc=["'](https?://[^"']+)["'][^>]*>\s*</script>"""
                         r"""|<link\b[^>]*?\bhref=["'](https?://[^"']+)["'][^>]*>"""
                         r"""|<img\b[^>]*?\bsrc=["'](https?://[^"']+)["'][^>]*>""", re.I)


def offline_data_docs(docs_dir: str | Path) -> list[str]:
    """Make a Data Docs site render with no network: the vendored styles, scripts and icon font are copied to
    ``static/vendor/`` and every page loads them from there (relative paths, so the site works wherever it is
    copied); remote scripts, styles and images with no vendored copy (charts, dark theme, logo) are dropped.
    Returns the remote URLs dropped."""
    root = Path(docs_dir)
    vendor = root / "static" / "vendor"
    shutil.copytree(VENDOR_DIR, vendor, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.md", "licenses"))
    dropped: set[str] = set()
    for page in root.rglob("*.html"):
        prefix = "../" * (len(page.relative_to(root).parts) - 1) + "static/vendor/"

        def local(match: re.Match[str], prefix: str = prefix) -> str:
            url = next(g for g in match.groups() if g)
            key = url.split("?", 1)[0].rsplit("/", 1)[-1].replace(".min.", ".")
            files = _VENDORED.get(key) if not match.group(0).lower().startswith("<img") else None
            if not files:
                dropped.add(url.split("?", 1)[0])
                return ""
            if match.group(0).lower().startswith("<script"):
                return "".join(f'<script src="{prefix}{f}"></script>' for f in files)
            return "".join(f'<link rel="stylesheet" href="{prefix}{f}">' for f in files)

        text = page.read_text(encoding="utf-8")
        page.write_text(_REMOTE_TAG.sub(local, text), encoding="utf-8")
    return sorted(dropped)


def _expectation_results(by_table: dict[str, Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for vr in by_table.values():
        for r in vr.results:
            out.setdefault(r.expectation_config.meta["check"], []).append(r)
    return out


def _unexpected_keys(results: list[Any], key: str) -> list[str]:
    seen: dict[str, None] = {}
    for r in results:
        for item in (r.result or {}).get("unexpected_index_list") or []:
            seen[str(item[key])] = None
    return list(seen)


def _names(items: list[str]) -> str:
    return ", ".join(items[:_SHOW]) + (f" and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def _describe(check: str, uris: list[str], files: pd.DataFrame, cfg: ValidationConfig) -> tuple[str, str]:
    """(detail line, quarantine reason) for a per-file check: what is wrong and with which files."""
    row = files.set_index("uri")
    n = len(uris)
    if check == "decodable":
        return ("every file decodes" if not n else
                f"{n} file(s) do not decode: " + _names([f"{u} ({row.at[u, 'error']})" for u in uris]),
                "not decodable")
    if check == "labels_not_null":
        return ("every file has a label" if not n else f"{n} file(s) without a label: {_names(uris)}", "no label")
    if check == "labels_in_class_list":
        return ("every label is in validation.classes" if not n else
                f"{n} file(s) with a label outside validation.classes: "
                + _names([f"{u} ({row.at[u, 'label']})" for u in uris]), "label not in validation.classes")
    if check == "min_size":
        return (f"every image is at least {cfg.min_width}x{cfg.min_height}" if not n else
                f"{n} image(s) smaller than {cfg.min_width}x{cfg.min_height}: "
                + _names([f"{u} ({row.at[u, 'width']:.0f}x{row.at[u, 'height']:.0f})" for u in uris]),
                f"smaller than {cfg.min_width}x{cfg.min_height}")
    if check == "allowed_modes":
        return (f"every image mode is one of {', '.join(cfg.allowed_modes)}" if not n else
                f"{n} image(s) in a mode outside {', '.join(cfg.allowed_modes)}: "
                + _names([f"{u} ({row.at[u, 'mode']})" for u in uris]), "image mode not allowed")
    if check == "exact_duplicates_across_splits":
        return ("no file content is in two splits" if not n else
                f"{n} file(s) repeat the bytes of a file in an earlier split (leakage): "
                + _names([f"{u} ({row.at[u, 'split']}) = {row.at[u, 'also_in_earlier_split']}" for u in uris]),
                "same bytes as a file in an earlier split")
    if check == "same_content_two_labels":
        return ("no file content has two labels" if not n else
                f"{n} file(s) whose content also appears under another label: "
                + _names([f"{u} ({row.at[u, 'label']}; also {row.at[u, 'other_labels']})" for u in uris]),
                "same content under two labels")
    if check == "near_duplicates_across_splits":
        side = cfg.near_duplicate_min_side
        compared = int(((files["width"] >= side) & (files["height"] >= side) & files["decodable"]).sum())
        if not n:
            return (f"no near duplicates across splits (dHash distance <= {cfg.near_duplicate_max_distance}; "
                    f"{compared} of {len(files)} images are at least {side} px and compared)", "")
        return (f"{n} image(s) look like an image in an earlier split (dHash distance <= "
                f"{cfg.near_duplicate_max_distance}): " + _names([f"{u} ~ {row.at[u, 'near_duplicate_of']} "
                                                                   f"(d={row.at[u, 'near_duplicate_distance']:.0f})"
                                                                   for u in uris]),
                "near duplicate of a file in an earlier split")
    raise KeyError(check)


def _file_checks(results: dict[str, list[Any]], files: pd.DataFrame,
                 cfg: ValidationConfig) -> tuple[list[CheckResult], dict[str, list[str]]]:
    """One line per per-file check, and why each quarantined file is quarantined."""
    checks: list[CheckResult] = []
    quarantine: dict[str, list[str]] = {}
    error_of = dict(zip(files["uri"], files["error"].fillna(""), strict=True))
    # Entries the data walk refused (a link out of the root, a FIFO, an oversize file...) were never read.
    unread = set(files.loc[files["sha256"].fillna("").eq("") & files["error"].fillna("").ne(""), "uri"])
    for check in FILE_CHECKS:
        if check not in results:
            checks.append(CheckResult(check, True, cfg.severity_of(check), "no class list configured "
                                      "(validation.classes)", skipped=True))
            continue
        uris = _unexpected_keys(results[check], "key")
        detail, reason = _describe(check, uris, files, cfg)
        ok = all(r.success for r in results[check])
        severity = cfg.severity_of(check)
        if severity == "error":
            for u in uris:
                error = error_of[u] if check == "decodable" else ""
                why = "not read" if check == "decodable" and u in unread else reason
                quarantine.setdefault(u, []).append(f"{why}: {error}" if error else why)
        excluded = bool(cfg.exclude_quarantined and not ok and severity == "error")
        if excluded:
            detail += " (quarantined, left out of training)"
        checks.append(CheckResult(check, ok, severity, detail, files=uris, excluded=excluded))
    return checks, quarantine


def _set_checks(results: dict[str, list[Any]], tables: dict[str, pd.DataFrame],
                cfg: ValidationConfig) -> list[CheckResult]:
    """One line per data-set check: class floors, classes per split, imbalance, drift against the reference."""
    def passed(check: str) -> bool:
        return all(r.success for r in results[check])

    counts, stats = tables["class_counts"], tables["splits"]
    single = stats[stats["classes"] < 2]
    ratios = ", ".join(f"{r.split} {r.imbalance_ratio:.1f} ({r.largest}/{r.smallest})" for r in stats.itertuples())
    checks = [
        CheckResult("min_images_per_class", passed("min_images_per_class"), cfg.severity_of("min_images_per_class"),
                    _floor_detail(counts, cfg)),
        CheckResult("single_class_split", passed("single_class_split"), cfg.severity_of("single_class_split"),
                    "every split has at least two classes" if single.empty else
                    "split(s) with fewer than two classes: "
                    + _names([f"{r.split} ({r.classes})" for r in single.itertuples()])),
        CheckResult("class_imbalance", passed("class_imbalance"), cfg.severity_of("class_imbalance"),
                    f"largest/smallest class per split, at most {cfg.max_imbalance_ratio:g}: {ratios}"),
    ]
    if "drift" not in tables:
        return checks + [CheckResult(check, True, cfg.severity_of(check),
                                     "no reference manifest (validation.reference_manifest)", skipped=True)
                         for check in ("class_drift", "size_drift")]
    d = tables["drift"].iloc[0]
    return checks + [
        CheckResult("class_drift", passed("class_drift"), cfg.severity_of("class_drift"),
                    f"total-variation distance of class shares {d['class_tvd']:.3f} (at most "
                    f"{cfg.max_class_drift:g}) against the reference manifest ({int(d['reference_files'])} files)"),
        CheckResult("size_drift", passed("size_drift"), cfg.severity_of("size_drift"),
                    f"KS statistic of widths {d['width_ks']:.3f}, of heights {d['height_ks']:.3f} "
                    f"(at most {cfg.max_size_drift:g}) against the reference manifest"),
    ]


def validate_manifest(manifest: pd.DataFrame, cfg: ValidationConfig, reference: pd.DataFrame | None = None,
                      docs_dir: str | Path | None = None) -> ValidationReport:
    """Run the suite; every check becomes one line with what failed and where.

    ``reference`` is a previously accepted manifest (drift checks); ``docs_dir`` receives the Data Docs.
    With ``cfg.exclude_quarantined``, files failing an error-level per-file check are left out before
    the data-set-level checks (counts, imbalance, drift) and do not fail the report themselves.
    """
    files = file_table(manifest, cfg)
    drop = pd.Series(False, index=files.index)
    if cfg.exclude_quarantined:
        for check, mask in _file_masks(files, cfg).items():
            if cfg.severity_of(check) == "error":
                drop |= mask
    kept = files[~drop]
    counts = class_floors(class_counts(kept, cfg.classes), cfg)
    tables = {"files": files.assign(key=files["uri"]),
              "class_counts": counts.assign(key=counts["split"] + "/" + counts["label"]),
              "splits": split_stats(counts)}
    tables["splits"]["key"] = tables["splits"]["split"]
    if reference is not None:
        tables["drift"] = drift(kept, reference).assign(key="reference")
    by_table = run_checkpoint(tables, _suites(cfg, tables), docs_dir)
    results = _expectation_results(by_table)
    checks, quarantine = _file_checks(results, files, cfg)
    checks += _set_checks(results, {**tables, "class_counts": counts}, cfg)
    stats = tables["splits"]
    return ValidationReport(
        success=not any(c.status == "FAIL" for c in checks),
        checks=checks,
        gx_result={name: vr.to_json_dict() for name, vr in by_table.items()},
        quarantine=[{"uri": u, "reason": "; ".join(r)} for u, r in quarantine.items()],
        excluded=list(files.loc[drop, "uri"]),
        tables={"class_counts": counts.to_dict("records"), "splits": stats.to_dict("records"),
                **({"drift": tables["drift"].to_dict("records")} if "drift" in tables else {})},
    )


def training_manifest(manifest: pd.DataFrame, report: ValidationReport) -> pd.DataFrame:
    """The manifest training sees: without the files the report excluded (the input files stay as they are)."""
    if not report.excluded:
        return manifest
    return manifest[~manifest["uri"].isin(report.excluded)].reset_index(drop=True)


# ---- the validate step's work, shared by the pipeline step and ``tlops validate`` --------------------

MANIFEST_ARTIFACT = "validation/manifest.csv"  # the manifest training used, in the MLflow run


def write_outputs(out_dir: str | Path, manifest: pd.DataFrame, report: ValidationReport) -> dict[str, Path]:
    """Every result file of a validation, each written atomically, under ``out_dir``."""
    out = Path(out_dir)
    paths = {
        "manifest": write_manifest(training_manifest(manifest, report), out / "manifest.csv"),
        "report": write_json(out / "report.json", report.to_dict()),
        "gx_result": write_json(out / "gx_result.json", report.gx_result),
        "summary": write_text(out / "summary.md", report.to_markdown()),
        "html": write_text(out / "report.html", report.to_html()),
        "quarantine": write_text(out / "quarantine.csv", pd.DataFrame(
            report.quarantine, columns=["uri", "reason"]).to_csv(index=False)),
    }
    if report.excluded:
        paths["manifest_full"] = write_manifest(manifest, out / "manifest_full.csv")
    return paths
