"""Audits of preprocessing consistency across registered model versions, and parity re-runs on one version."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlops.errors import TlopsError
from tlops.fileio import read_json

if TYPE_CHECKING:  # imported where used: `tlops serve` reads model URIs here, and an ONNX variant needs no torch
    from tlops.vision.preprocessing import PreprocessSpec


def model_files(name: str, version: str) -> Path:
    """The directory with weights.pt, preprocess.json and model.json of a registered version (read only)."""
    import mlflow

    try:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}"))
    except Exception as exc:  # any store error: the version's files cannot be had
        raise TlopsError(f"model {name} version {version}: its files cannot be read ({type(exc).__name__}: "
                         f"{str(exc)[:200]})") from None
    found = sorted(root.glob("artifacts/*/model.json"))
    if not found:
        raise TlopsError(f"model {name} version {version} is not a tlops model (no artifacts/*/model.json)")
    return found[0].parent


def reference_for(files: Path) -> tuple[PreprocessSpec, str]:
    """The backbone's reference as resolved now, or the copy saved with the model when it cannot be.

    Returns the spec and where it came from ("current" or "stored").
    """
    from tlops.vision.backbones import reference_spec
    from tlops.vision.preprocessing import PreprocessSpec

    meta = read_json(files / "model.json")
    try:
        return reference_spec(meta["backbone"]), "current"
    except TlopsError:
        if "reference_preprocess" not in meta:
            raise
        return PreprocessSpec.from_record(meta["reference_preprocess"]), "stored"


def parity_for_version(name: str, version: str) -> dict[str, Any]:
    """Re-run the parity checks on a logged model: spec vs reference, golden images, serving path."""

    from tlops import tracking
    from tlops.registry import PreprocessEvidence, client
    from tlops.serving.pyfunc import load_model_dir
    from tlops.vision.parity import GOLDEN_ATOL, edge_case_images, golden_check, serving_check
    from tlops.vision.preprocessing import spec_diff

    mv = client().get_model_version(name, version)
    files = model_files(name, version)
    model, spec, _classes = load_model_dir(files)
    backbone = read_json(files / "model.json")["backbone"]
    reference, reference_origin = reference_for(files)
    declared = mv.tags.get("preprocess.declared", "none")
    diff = spec_diff(reference, spec)
    errors = []
    allowed = {"crop_size", "resize_size"} if declared not in ("", "none") else set()
    errors += [f"{k} is {c}, the backbone's reference is {r}" for k, (r, c) in diff.items() if k not in allowed]
    if mv.tags.get("preprocess.fingerprint") != spec.fingerprint:
        errors.append(f"the version's fingerprint tag {mv.tags.get('preprocess.fingerprint', '')[:12]} does not "
                      f"match its stored spec {spec.fingerprint[:12]}")
    evidence = PreprocessEvidence(spec.fingerprint, reference.fingerprint, declared).problem()
    if evidence:
        errors.append(evidence)
    golden = edge_case_images()
    numbers = golden_check(backbone, spec, golden, reference)
    errors += [f"golden image {g['image']}: max difference {g['max_abs_diff']:.2e} > {GOLDEN_ATOL:g}"
               for g in numbers if not g["ok"]]
    serving = serving_check(model, spec, tracking.load_pyfunc(f"models:/{name}/{version}"), golden)
    errors += serving["errors"]
    from tlops.serving.compress.step import variant_parity

    variant = variant_parity(name, version, model, spec, golden)  # the serving variant, when the version has one
    errors += variant["errors"] if variant else []
    return {"model": name, "version": version, "backbone": backbone, "status": "fail" if errors else "pass",
            "serving_variant": variant,
            "reference_origin": reference_origin,
            "fingerprint": spec.fingerprint, "reference_fingerprint": reference.fingerprint, "declared": declared,
            "errors": errors, "golden": numbers, "serving": serving}


@dataclass
class VersionAudit:
    version: str
    created: str
    aliases: list[str]
    fingerprint: str
    stored_fingerprint: str
    reference_fingerprint: str
    current_reference: str
    declared: str
    parity: str
    validation: str
    gate: str
    problems: list[str]
    serving_variant: str = "none"

    @property
    def consistent(self) -> bool:
        return not self.problems


def audit_model(name: str) -> list[VersionAudit]:
    """Every version of ``name`` with its preprocessing evidence, and what is inconsistent about it."""

    from tlops.registry import PreprocessEvidence, client, require_model

    c = client()
    registered = require_model(name)
    by_version: dict[str, list[str]] = {}
    for alias, v in (registered.aliases or {}).items():
        by_version.setdefault(str(v), []).append(alias)
    out = []
    versions = sorted(c.search_model_versions(f"name='{name}'"), key=lambda m: int(m.version))
    for mv in versions:
        tags = mv.tags
        problems: list[str] = []
        stored = ""
        current_ref = ""
        try:
            files = model_files(name, str(mv.version))
            from tlops.vision.preprocessing import PreprocessSpec

            stored = PreprocessSpec.from_record(read_json(files / "preprocess.json")).fingerprint
            current_ref = reference_for(files)[0].fingerprint
        except TlopsError as exc:
            problems.append(str(exc))
        fingerprint = tags.get("preprocess.fingerprint", "")
        if stored and fingerprint != stored:
            problems.append("fingerprint tag does not match the stored spec")
        recorded_ref = tags.get("preprocess.reference_fingerprint", "")
        if current_ref and recorded_ref and recorded_ref != current_ref:
            problems.append("the backbone's reference preprocessing changed since this version was trained")
        evidence = PreprocessEvidence(fingerprint, recorded_ref, tags.get("preprocess.declared", "none")).problem()
        if evidence:
            problems.append(evidence)
        if tags.get("parity") != "pass":
            problems.append(f"parity {tags.get('parity', 'not recorded')}")
        if tags.get("parity.serving") != "pass":
            problems.append(f"serving parity {tags.get('parity.serving', 'not recorded')}")
        variant = tags.get("serving.variant", "none")
        if variant != "none" and tags.get("serving.fingerprint") != fingerprint:
            problems.append(f"serving variant {variant}: its fingerprint {tags.get('serving.fingerprint', '')[:12]} "
                            f"is not the version's")
        if variant != "none" and tags.get("serving.parity") != "pass":
            problems.append(f"serving variant {variant}: parity {tags.get('serving.parity', 'not recorded')}")
        created = dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=dt.UTC).isoformat(timespec="seconds")
        out.append(VersionAudit(
            version=str(mv.version), created=created, aliases=sorted(by_version.get(str(mv.version), [])),
            fingerprint=fingerprint, stored_fingerprint=stored, reference_fingerprint=recorded_ref,
            current_reference=current_ref, declared=tags.get("preprocess.declared", "none"),
            parity=tags.get("parity", "unknown"), validation=tags.get("validation", "unknown"),
            gate=tags.get("gate.decision", "unknown"), problems=problems, serving_variant=variant,
        ))
    return out


def format_audit(name: str, rows: list[VersionAudit], fmt: str) -> str:
    if fmt == "json":
        return json.dumps({"model": name, "versions": [{**asdict(r), "consistent": r.consistent} for r in rows]},
                          indent=2)
    header = f"{'version':>7}  {'created (UTC)':<25} {'aliases':<20} {'fingerprint':<12}  {'reference':<12}  " \
             f"{'parity':<6} {'data':<6} {'gate':<8} {'serving':<8} status"
    lines = [f"model {name}", header]
    for r in rows:
        lines.append(f"{r.version:>7}  {r.created:<25} {','.join(r.aliases) or '-':<20} {r.fingerprint[:12]:<12}  "
                     f"{r.reference_fingerprint[:12]:<12}  {r.parity:<6} {r.validation:<6} {r.gate:<8} "
                     f"{r.serving_variant:<8} "
                     + ("ok" if r.consistent else "INCONSISTENT: " + "; ".join(r.problems)))
    return "\n".join(lines)
