"""The manifest files under infra/ as written: every object valid Kubernetes, in the tlops namespace, Secrets as
placeholders only, least-privilege RBAC, and kustomizations that name files that exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.infra.conftest import (
    INFRA,
    KUSTOMIZATION_NAMES,
    MIN_K8S_VERSION,
    PLACEHOLDER,
    is_remote,
    kubernetes_manifests,
    kubernetes_validate,
    kustomization_files,
    latest_k8s_version,
    load_yaml_documents,
    secret_templates,
    validate_manifest,
)

MANIFESTS = kubernetes_manifests()


def test_infra_holds_the_base_objects() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in MANIFESTS}
    assert {
        ("Namespace", "tlops"),
        ("ServiceAccount", "tlops-pipeline-runner"),
        ("Role", "tlops-pipeline-runner"),
        ("RoleBinding", "tlops-pipeline-runner"),
        ("Secret", "tlops-credentials"),
    } <= kinds


@pytest.mark.parametrize("version", [MIN_K8S_VERSION, "latest"])
@pytest.mark.parametrize("doc", [doc for _, doc in MANIFESTS], ids=[name for name, _ in MANIFESTS])
def test_manifest_is_valid_kubernetes(doc: dict[str, Any], version: str) -> None:
    validate_manifest(doc, latest_k8s_version() if version == "latest" else version)


def test_validation_rejects_a_broken_manifest() -> None:
    """The check above can fail: an unknown field, a wrong type and a misspelt kind are all caught."""
    kv = kubernetes_validate()
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "r"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}
    validate_manifest(role, MIN_K8S_VERSION)
    with pytest.raises(kv.ValidationError):
        validate_manifest({**role, "rulez": []}, MIN_K8S_VERSION)
    with pytest.raises(kv.ValidationError):
        validate_manifest({**role, "rules": [{"verbs": "get"}]}, MIN_K8S_VERSION)
    with pytest.raises(AssertionError, match="Couldn't find schema"):
        validate_manifest({**role, "kind": "Rolle"}, MIN_K8S_VERSION)


def test_namespaced_objects_live_in_the_tlops_namespace() -> None:
    for name, doc in MANIFESTS:
        if doc["kind"] != "Namespace" and doc["kind"] not in {"ClusterRole", "ClusterRoleBinding"}:
            assert doc["metadata"].get("namespace") == "tlops", name


def test_secrets_in_the_repository_hold_placeholders_only() -> None:
    secrets = [(name, doc) for name, doc in MANIFESTS if doc["kind"] == "Secret"]
    assert secrets
    for name, doc in secrets:
        assert "data" not in doc, f"{name}: use stringData with {PLACEHOLDER} placeholders, never encoded values"
        for k, value in doc.get("stringData", {}).items():
            assert PLACEHOLDER in str(value), f"{name}: {k} must be a {PLACEHOLDER} placeholder"


def test_secret_template_has_the_expected_keys() -> None:
    assert secret_templates() == {
        "tlops-credentials": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"},
        "tlops-postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD"},
    }


def test_runner_role_is_bound_to_the_runner_service_account() -> None:
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in MANIFESTS}
    binding = objects[("RoleBinding", "tlops-pipeline-runner")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "tlops-pipeline-runner"}
    assert {"kind": "ServiceAccount", "name": "tlops-pipeline-runner", "namespace": "tlops"} in binding["subjects"]
    rules = objects[("Role", "tlops-pipeline-runner")]["rules"]
    granted = {(r, v) for rule in rules if "" in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert {("pods", v) for v in ("get", "list", "watch")} <= granted
    assert {("pods/log", v) for v in ("get", "list", "watch")} <= granted
    assert {("secrets", "get"), ("configmaps", "get")} <= granted
    assert not {("secrets", "list"), ("secrets", "watch")} & granted, "reading one secret must not mean all"
    assert all("*" not in rule["verbs"] and "*" not in rule["resources"] for rule in rules)


@pytest.mark.parametrize("kfile", kustomization_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_kustomization_refers_to_files_that_exist(kfile: Path) -> None:
    (kust,) = load_yaml_documents(kfile)
    assert kust.get("apiVersion") == "kustomize.config.k8s.io/v1beta1" and kust.get("kind") == "Kustomization"
    entries = list(kust.get("resources", [])) + list(kust.get("components", []))
    assert entries, f"{kfile} lists no resources"
    entries += list(kust.get("patchesStrategicMerge", []))
    entries += [p["path"] for p in kust.get("patches", []) if isinstance(p, dict) and "path" in p]
    for entry in entries:
        if is_remote(entry):
            continue
        target = (kfile.parent / entry).resolve()
        assert target.exists(), f"{kfile.relative_to(INFRA)} lists {entry}, which does not exist"
        if target.is_dir():
            assert any((target / n).is_file() for n in KUSTOMIZATION_NAMES), f"{entry} is not a kustomization"


def test_there_are_kustomizations_for_the_base_and_the_local_overlay() -> None:
    found = {str(p.relative_to(INFRA)) for p in kustomization_files()}
    assert {"base/kustomization.yaml", "overlays/local/kustomization.yaml"} <= found
