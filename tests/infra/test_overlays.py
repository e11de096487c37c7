"""Every kustomization under infra/ (the base, postgres, minio and each overlay) rendered by the real kustomize
(`kubectl kustomize`), and the rendered objects checked: valid Kubernetes (the InferenceService against a minimal
schema and its predictor as a PodSpec), references that resolve, pinned images, unprivileged pods, and command
lines that parse with the CLIs they run."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.infra.conftest import (
    CLUSTER_SCOPED,
    INFRA,
    MIN_K8S_VERSION,
    KustomizeError,
    Objects,
    containers,
    expand_args,
    kubernetes_validate,
    kustomization_dirs,
    latest_k8s_version,
    load_yaml_documents,
    overlay_dirs,
    pod_spec,
    render,
    render_objects,
    resolve_env,
    secret_templates,
    validate_inference_service,
    validate_manifest,
)
from tests.infra.conftest import key as obj_key


def test_there_are_overlays_and_kubectl_renders_them() -> None:
    assert {p.name for p in overlay_dirs()} >= {"local", "aws"}
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the rendering checks below skip too")


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=lambda p: str(p.relative_to(INFRA)))
def test_kustomization_renders_to_valid_kubernetes(directory: Path) -> None:
    """Every object `kubectl kustomize` builds, against the oldest targeted and the newest Kubernetes schemas."""
    objects = render_objects(directory)
    assert objects, f"{directory} renders nothing"
    for doc in objects.values():
        for version in (MIN_K8S_VERSION, latest_k8s_version()):
            validate_manifest(doc, version)  # the InferenceService against its minimal schema, pod fields too
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == "tlops", obj_key(doc)


def test_overlay_objects_carry_the_environment_label(overlay: tuple[str, Objects]) -> None:
    name, objects = overlay
    for doc in objects.values():
        assert doc["metadata"]["labels"]["environment"] == name, obj_key(doc)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tlops", obj_key(doc)


# --------------------------------------------------------------------------------------------- can fail


def write_overlay(root: Path, kustomization: str, **files: str) -> Path:
    """An overlay of the real base in a temporary directory (kustomize wants the base as a relative path)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "kustomization.yaml").write_text(kustomization.replace("BASE", os.path.relpath(INFRA / "base", root)))
    for name, text in files.items():
        (root / f"{name}.yaml").write_text(text)
    return root


def isvc_json_patch(op: str, path: str, value: str) -> str:
    """A kustomization of the real base with one JSON 6902 patch on the InferenceService (as overlays/local)."""
    patch = json.dumps([{"op": op, "path": path, "value": value}])
    return ("resources: [BASE]\npatches:\n  - target: {group: serving.kserve.io, version: v1beta1, "
            f"kind: InferenceService, name: tlops-champion}}\n    patch: '{patch}'\n")


def test_kustomize_rejects_a_patch_without_target(tmp_path: Path) -> None:
    """The rendering can fail: a patch naming an object the resources do not hold stops the build."""
    overlay = write_overlay(tmp_path / "o", "resources: [BASE]\npatches: [{path: patch.yaml}]\n", patch=(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: tlops-mlflw, namespace: tlops}\n"
        "spec: {replicas: 2}\n"))
    with pytest.raises(KustomizeError, match="tlops-mlflw"):
        render(overlay)
    (overlay / "patch.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\n"
                                        "metadata: {name: tlops-mlflow, namespace: tlops}\nspec: {replicas: 2}\n")
    assert render_objects(overlay)[("Deployment", "tlops-mlflow")]["spec"]["replicas"] == 2


def test_kustomize_rejects_a_json_patch_on_a_missing_path(tmp_path: Path) -> None:
    overlay = write_overlay(tmp_path / "o", isvc_json_patch("replace", "/spec/predictor/containers/3/image", "x:1"))
    with pytest.raises(KustomizeError, match="replace operation does not apply"):
        render(overlay)
    overlay = write_overlay(tmp_path / "p", isvc_json_patch("replace", "/spec/predictor/containers/0/image", "x:1"))
    assert containers(render_objects(overlay)[("InferenceService", "tlops-champion")])[0]["image"] == "x:1"


def test_validation_rejects_an_invalid_field_a_patch_brings_in(tmp_path: Path) -> None:
    """A patch kustomize applies happily but the result is not valid Kubernetes: the schema check catches it."""
    kv = kubernetes_validate()
    overlay = write_overlay(tmp_path / "o", "resources: [BASE]\npatches: [{path: patch.yaml}]\n", patch=(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: tlops-mlflow, namespace: tlops}\n"
        "spec:\n  template:\n    spec:\n      containers:\n        - name: mlflow\n          imagePullPolicy: 3\n"
        "          readinessProbe: {periodSecond: 10}\n"))
    mlflow = render_objects(overlay)[("Deployment", "tlops-mlflow")]
    with pytest.raises(kv.ValidationError):
        validate_manifest(mlflow, MIN_K8S_VERSION)
    (overlay / "patch.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\n"
                                        "metadata: {name: tlops-mlflow, namespace: tlops}\nspec: {replicaz: 2}\n")
    with pytest.raises(kv.ValidationError):
        validate_manifest(render_objects(overlay)[("Deployment", "tlops-mlflow")], MIN_K8S_VERSION)


def test_inference_service_validation_can_fail(tmp_path: Path) -> None:
    import jsonschema

    kv = kubernetes_validate()
    (isvc,) = load_yaml_documents(INFRA / "base" / "serving.yaml")
    validate_inference_service(isvc, MIN_K8S_VERSION)
    with pytest.raises(jsonschema.ValidationError):
        validate_inference_service({**isvc, "spec": {"predictor": {**isvc["spec"]["predictor"], "minReplica": 1}}},
                                   MIN_K8S_VERSION)
    bad_container = {**isvc["spec"]["predictor"]["containers"][0], "imagePullPolicy": 3}
    with pytest.raises(kv.ValidationError):
        validate_inference_service({**isvc, "spec": {"predictor": {**isvc["spec"]["predictor"],
                                                                   "containers": [bad_container]}}}, MIN_K8S_VERSION)
    # Through kustomize: a JSON patch that renames the predictor's container renders, and the schema refuses it.
    overlay = write_overlay(tmp_path / "o", isvc_json_patch("replace", "/spec/predictor/containers/0/name", "main"))
    with pytest.raises(jsonschema.ValidationError, match="kserve-container"):
        validate_manifest(render_objects(overlay)[("InferenceService", "tlops-champion")], MIN_K8S_VERSION)


# --------------------------------------------------------------------------------------------- the overlays


def test_overlays_hold_the_right_stores(overlay: tuple[str, Objects]) -> None:
    """In-cluster stores (PostgreSQL, MinIO) come all together or not at all; without them the database is
    outside the cluster."""
    name, objects = overlay
    assert {("Deployment", "tlops-mlflow"), ("Service", "tlops-mlflow"), ("InferenceService", "tlops-champion"),
            ("CronJob", "tlops-retrain"), ("ConfigMap", "tlops-settings"), ("Role", "tlops-pipeline-runner")} <= set(
        objects)
    on_premises = {("StatefulSet", "tlops-postgres"), ("Service", "tlops-postgres"), ("Deployment", "tlops-minio"),
                   ("Service", "tlops-minio"), ("PersistentVolumeClaim", "tlops-minio"),
                   ("Job", "tlops-minio-buckets")}
    settings = objects[("ConfigMap", "tlops-settings")]["data"]
    if ("Deployment", "tlops-minio") in objects:
        assert on_premises <= set(objects)
        assert ("Service", settings["MLFLOW_DB_HOST"]) in objects  # MLflow's database is the one in the cluster
    else:
        assert not on_premises & set(objects), f"{name}: S3 and an external database, not MinIO and an in-cluster one"
        assert ("Service", settings["MLFLOW_DB_HOST"]) not in objects
    if name == "local":
        assert on_premises <= set(objects)
        assert objects[("PersistentVolumeClaim", "tlops-minio")]["spec"]["resources"]["requests"]["storage"] == "5Gi"
    if name == "aws":
        assert settings["MLFLOW_DB_HOST"].endswith(".rds.amazonaws.com")
    for uri in (settings["TLOPS_DATA_URI"], settings["MLFLOW_ARTIFACTS_DESTINATION"]):
        assert uri.startswith("s3://"), uri


def unset_references(container: dict[str, Any]) -> list[str]:
    """`$(VAR)`s the kubelet would leave as they are: in an env value, VAR must be set by an entry ABOVE it (a
    strategic-merge patch may reorder the list); in the command and arguments, anywhere in env."""
    defined: set[str] = set()
    problems = []
    for entry in container.get("env", []):
        problems += [f"{entry['name']} uses $({v}) before it is set"
                     for v in re.findall(r"\$\((\w+)\)", entry.get("value", "")) if v not in defined]
        defined.add(entry["name"])
    for arg in [*container.get("command", []), *container.get("args", [])]:
        problems += [f"{arg!r} uses $({v}), which is not set" for v in re.findall(r"\$\((\w+)\)", arg)
                     if v not in defined]
    return problems


def test_every_reference_resolves(overlay: tuple[str, Objects]) -> None:
    """Secrets and keys exist in the templates; config maps, keys, volumes, service accounts and the services'
    pods and named ports exist in the rendered overlay."""
    name, objects = overlay
    templates = secret_templates()
    pods = [(doc, pod_spec(doc)) for doc in objects.values() if pod_spec(doc) is not None]
    for doc, spec in pods:
        where = f"{name}: {obj_key(doc)}"
        assert spec is not None
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in objects, where
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in objects, where
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in objects, where
        for container in containers(doc):
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            claim_templates = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])} | claim_templates, where
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    s = ref["secretKeyRef"]
                    assert s["key"] in templates.get(s["name"], set()), f"{where}: secret {s['name']}/{s['key']}"
                elif "configMapKeyRef" in ref:
                    c = ref["configMapKeyRef"]
                    assert c["key"] in objects[("ConfigMap", c["name"])]["data"], f"{where}: {c['name']}/{c['key']}"
                else:
                    assert "value" in entry, where
            assert unset_references(container) == [], where
    for (kind, svc_name), svc in objects.items():
        if kind != "Service":
            continue
        selector = svc["spec"]["selector"]
        backends = [doc for doc, _ in pods if doc["kind"] != "InferenceService" and selector.items() <= (
            (doc["spec"].get("template") or {}).get("metadata", {}).get("labels", {}).items())]
        assert len(backends) == 1, f"{name}: service {svc_name} selects {len(backends)} workloads"
        port_names = {p.get("name") for c in containers(backends[0]) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{name}: service {svc_name} port {port['targetPort']}"


def test_images_are_pinned_and_the_pipeline_image_matches(overlay: tuple[str, Objects]) -> None:
    name, objects = overlay
    tlops_images = set()
    for doc in objects.values():
        for container in containers(doc):
            image = container["image"]
            assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"{obj_key(doc)}: {image}"
            if image.rpartition(":")[0].rsplit("/", 1)[-1] == "tlops":
                tlops_images.add(image)
    assert len(tlops_images) == 1, tlops_images  # kustomize's images: reached the InferenceService too
    assert objects[("ConfigMap", "tlops-settings")]["data"]["TLOPS_IMAGE"] in tlops_images, \
        "the compiled pipeline's steps must run in the image the overlay deploys"
    if name == "aws":
        assert tlops_images.pop().startswith("REPLACE_ME.dkr.ecr.")


def test_workloads_run_unprivileged(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    for doc in objects.values():
        spec = pod_spec(doc)
        if spec is None:
            continue
        assert spec["securityContext"]["runAsNonRoot"] is True, obj_key(doc)
        assert spec.get("automountServiceAccountToken") is False or doc["kind"] == "InferenceService", obj_key(doc)
        for container in containers(doc):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], obj_key(doc)
            assert {"requests", "limits"} <= set(container["resources"]), obj_key(doc)


def test_serving_and_recurring_run_call_real_cli_options(overlay: tuple[str, Objects], tmp_path: Path) -> None:
    """The InferenceService's and the CronJob's `tlops` command lines parse with the CLI they run, and the
    nightly config is a valid tlops config naming the model the InferenceService serves."""
    import typer.main

    from tlops.cli import app
    from tlops.config.settings import load_config
    from tlops.serving.server import ROUTES

    _, objects = overlay
    secrets = {"MLFLOW_TRACKING_URI": "http://tlops-mlflow.tlops.svc.cluster.local:5000",
               "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": "http://minio:9000"}
    cli = typer.main.get_command(app)
    settings = objects[("ConfigMap", "tlops-settings")]["data"]

    (predictor,) = objects[("InferenceService", "tlops-champion")]["spec"]["predictor"]["containers"]
    env = resolve_env(predictor, objects, secrets)
    assert predictor["command"][0] == "tlops"
    serve_args = [*predictor["command"][1:], *expand_args(predictor, env)]
    assert serve_args[0] == "serve"
    serve = cli.get_command(cli.make_context("tlops", serve_args), "serve")  # type: ignore[attr-defined]
    params = serve.make_context("serve", serve_args[1:]).params
    assert params["model"] == f"models:/{settings['TLOPS_MODEL_NAME']}@champion"
    assert params["host"] == "0.0.0.0" and params["port"] == predictor["ports"][0]["containerPort"]
    assert params["log_uri"] == settings["TLOPS_PREDICTION_LOG_URI"] and 0 < params["sample_rate"] <= 1
    # Scrape-ready: the pods carry where the metrics are, and the server answers there (tested in the unit suite).
    notes = objects[("InferenceService", "tlops-champion")]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
    assert int(notes["prometheus.io/port"]) == predictor["ports"][0]["containerPort"]
    assert ROUTES["/metrics"] == "GET"

    cron = objects[("CronJob", "tlops-retrain")]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and cron["spec"]["startingDeadlineSeconds"] <= 3600
    (submitter,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = resolve_env(submitter, objects, secrets)
    assert submitter["command"] == ["tlops", "submit"]
    submit = cli.get_command(cli.make_context("tlops", ["submit"]), "submit")  # type: ignore[attr-defined]
    params = submit.make_context("submit", expand_args(submitter, env)).params
    assert params["data"] == settings["TLOPS_DATA_URI"] and params["image"] == settings["TLOPS_IMAGE"]
    assert params["experiment"] == settings["KFP_EXPERIMENT"] and env["KF_PIPELINES_ENDPOINT"].startswith("http")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(objects[("ConfigMap", "tlops-pipeline-config")]["data"]["config.yaml"])
    cfg = load_config(config_file)
    assert cfg.registry.model_name == settings["TLOPS_MODEL_NAME"]
    assert ("ServiceAccount", cfg.cluster.service_account) in objects
    assert str(params["config"]) == "/etc/tlops/config.yaml"


def test_env_order_check_catches_a_reordering_patch(tmp_path: Path) -> None:
    """kustomize moves an env entry a strategic-merge patch names to the front of the list; a patched entry that
    uses $(VAR) then comes before the variables it uses, and the reference check above says so."""
    overlay = write_overlay(tmp_path / "o", "resources: [BASE]\npatches: [{path: patch.yaml}]\n", patch=(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: tlops-mlflow, namespace: tlops}\n"
        "spec:\n  template:\n    spec:\n      containers:\n        - name: mlflow\n          env:\n"
        "            - {name: MLFLOW_BACKEND_STORE_URI, value: 'postgresql+psycopg://$(POSTGRES_USER)@db/mlflow'}\n"))
    objects = render_objects(overlay)
    (container,) = containers(objects[("Deployment", "tlops-mlflow")])
    names = [e["name"] for e in container["env"]]
    assert names.index("MLFLOW_BACKEND_STORE_URI") < names.index("POSTGRES_USER")
    assert unset_references(container) == ["MLFLOW_BACKEND_STORE_URI uses $(POSTGRES_USER) before it is set"]
    env = resolve_env(container, objects, {k: "x" for k in ("POSTGRES_USER", "POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID",
                                                            "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")})
    assert "$(POSTGRES_USER)" in env["MLFLOW_BACKEND_STORE_URI"]  # as the kubelet leaves it: unexpanded
    container["args"].append("$(NOPE)")
    assert unset_references(container)[-1] == "'$(NOPE)' uses $(NOPE), which is not set"
