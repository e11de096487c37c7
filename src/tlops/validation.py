"""A Great Expectations suite over the image manifest: the data checks of the validate step."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from tlops.config import ValidationConfig


@dataclass
class CheckResult:
    name: str
    success: bool
    severity: str
    detail: str


@dataclass
class ValidationReport:
    success: bool
    checks: list[CheckResult]
    gx_result: dict[str, Any] = field(default_factory=dict)
    quarantine: list[dict[str, str]] = field(default_factory=list)

    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success and c.severity == "error"]

    def summary_lines(self) -> list[str]:
        return [f"{'PASS' if c.success else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "checks": [c.__dict__ for c in self.checks],
            "quarantine": self.quarantine,
        }


def class_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images per (split, label); every split that exists is checked for every class."""
    labelled = manifest.dropna(subset=["label"])
    labels = sorted(labelled["label"].unique())
    splits = sorted(labelled["split"].unique())
    counts = labelled.groupby(["split", "label"]).size()
    rows = [{"split": s, "label": lab, "count": int(counts.get((s, lab), 0))} for s in splits for lab in labels]
    return pd.DataFrame(rows, columns=["split", "label", "count"])


def _run_suite(name: str, df: pd.DataFrame, expectations: list[Any]) -> Any:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas(f"{name}_source")
    asset = source.add_dataframe_asset(name=name)
    batch_def = asset.add_batch_definition_whole_dataframe(f"{name}_batch")
    suite = context.suites.add(gx.ExpectationSuite(name=f"tlops_{name}"))
    for exp in expectations:
        suite.add_expectation(exp)
    vd = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{name}_validation", data=batch_def, suite=suite)
    )
    return vd.run(batch_parameters={"dataframe": df})


def _unexpected(result: Any) -> list[Any]:
    return list((result.result or {}).get("partial_unexpected_list") or [])


def validate_manifest(manifest: pd.DataFrame, cfg: ValidationConfig) -> ValidationReport:
    """Run the suite; every check becomes one line with what failed and where."""
    import great_expectations.expectations as gxe
    from great_expectations.core.result_format import ResultFormat

    files = _run_suite(
        "manifest",
        manifest,
        [
            gxe.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True], result_format=ResultFormat.COMPLETE),
            gxe.ExpectColumnValuesToNotBeNull(column="label", result_format=ResultFormat.COMPLETE),
        ],
    )
    counts_df = class_counts(manifest)
    counts = _run_suite(
        "class_counts",
        counts_df,
        [gxe.ExpectColumnValuesToBeBetween(column="count", min_value=cfg.min_images_per_class,
                                           result_format=ResultFormat.COMPLETE)],
    )
    by_type = {r.expectation_config.type: r for r in files.results}
    checks: list[CheckResult] = []

    bad = manifest[~manifest["decodable"].astype(bool)]
    checks.append(CheckResult(
        "decodable", bool(by_type["expect_column_values_to_be_in_set"].success), "error",
        "every file decodes" if bad.empty else
        f"{len(bad)} file(s) do not decode: " + ", ".join(bad["uri"].head(5)) + (" ..." if len(bad) > 5 else ""),
    ))
    unlabelled = manifest[manifest["label"].isna()]
    checks.append(CheckResult(
        "labels_not_null", bool(by_type["expect_column_values_to_not_be_null"].success), "error",
        "every file has a label" if unlabelled.empty else
        f"{len(unlabelled)} file(s) without a label: " + ", ".join(unlabelled["uri"].head(5)),
    ))
    short = counts_df[counts_df["count"] < cfg.min_images_per_class]
    checks.append(CheckResult(
        "min_images_per_class", bool(counts.results[0].success), "error",
        f"every class has at least {cfg.min_images_per_class} images in each split" if short.empty else
        f"fewer than {cfg.min_images_per_class} images: "
        + ", ".join(f"{r.label}/{r.split}={r.count}" for r in short.head(8).itertuples()),
    ))
    quarantine = [{"uri": r.uri, "reason": f"not decodable: {r.error}"} for r in bad.itertuples()]
    quarantine += [{"uri": r.uri, "reason": "no label"} for r in unlabelled.itertuples()]
    return ValidationReport(
        success=not any(not c.success and c.severity == "error" for c in checks),
        checks=checks,
        gx_result={"manifest": files.to_json_dict(), "class_counts": counts.to_json_dict()},
        quarantine=quarantine,
    )
