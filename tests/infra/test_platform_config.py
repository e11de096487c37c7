"""Each compiled step's Kubernetes platform config (`tlops compile --config configs/cluster.yaml`), parsed
strictly by kfp-kubernetes' own protobuf messages, as the KFP backend's driver reads it: no unknown field is
skipped, every value has the type the message declares. The parsed values are then checked against the config
(secrets as env, node selectors, tolerations), as a Kubernetes Pod (kubernetes-validate), and against infra/."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.conftest import ir_tasks, run_cli
from tests.infra.conftest import (
    CLUSTER_CONFIG,
    MIN_K8S_VERSION,
    Objects,
    kubernetes_validate,
    latest_k8s_version,
    secret_templates,
    validate_manifest,
)

TASKS = ("validate", "parity", "fine-tune", "evaluate", "compress", "gate", "skip")
# What kfp-kubernetes writes for this pipeline; anything else set in a step's config is a surprise.
EXPECTED_FIELDS = {"secret_as_env", "node_selector", "tolerations"}
TOLERATION_OPERATORS = {"Exists", "Equal"}
TAINT_EFFECTS = {"", "NoSchedule", "PreferNoSchedule", "NoExecute"}
# A label key: an optional DNS subdomain prefix, then a name (Kubernetes' qualified name); a label value.
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                       r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_strict(config: dict[str, Any]) -> Any:
    """A step's platform config as kfp-kubernetes' KubernetesExecutorConfig, refusing unknown fields."""
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2 as pb

    return json_format.ParseDict(config, pb.KubernetesExecutorConfig(), ignore_unknown_fields=False)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """(IR, platform spec) of `tlops compile --output F --config configs/cluster.yaml`, run as a user runs it."""
    out = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    result = run_cli("compile", "--output", str(out), "--config", str(CLUSTER_CONFIG), cwd=out.parent, timeout=300)
    assert result.returncode == 0, result.stderr
    ir, platform = yaml.safe_load_all(out.read_text())
    return ir, platform


@pytest.fixture(scope="module")
def step_configs(compiled: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each task's Kubernetes executor config (as JSON), by task name; the platform spec parsed strictly first."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    ir, platform = compiled
    json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec(), ignore_unknown_fields=False)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    labels = {name: ir["components"][task["componentRef"]["name"]]["executorLabel"]
              for name, task in ir_tasks(ir).items()}
    assert set(labels) == set(TASKS)
    assert set(executors) == set(labels.values()) <= set(ir["deploymentSpec"]["executors"]), \
        "every step, and only the steps, has a platform config, for an executor the IR defines"
    return {name: executors[label] for name, label in labels.items()}


def cluster_config() -> Any:
    from tlops.config.settings import load_config

    return load_config(CLUSTER_CONFIG).cluster


@pytest.mark.parametrize("task", TASKS)
def test_step_config_parses_strictly_into_kfp_kubernetes_messages(
        step_configs: dict[str, dict[str, Any]], task: str) -> None:
    from google.protobuf import json_format

    parsed = parse_strict(step_configs[task])
    assert {field.name for field, _ in parsed.ListFields()} == EXPECTED_FIELDS - (
        set() if task == "fine-tune" else {"tolerations"})
    # Nothing was lost or added on the way: the message writes back the very JSON the compiler wrote.
    assert json_format.MessageToDict(parsed) == step_configs[task]


@pytest.mark.parametrize("task", TASKS)
def test_parsed_values_are_the_configs(step_configs: dict[str, dict[str, Any]], task: str) -> None:
    cluster = cluster_config()
    step = cluster.step(task)
    parsed = parse_strict(step_configs[task])

    # Secrets as env: each Secret mapping of the config (less the variables given as plain env), in order.
    want = [(s.name, {k: v for k, v in s.keys.items() if v not in cluster.env}, s.optional) for s in cluster.secrets]
    got = [(s.secret_name, {m.secret_key: m.env_var for m in s.key_to_env}, s.optional) for s in parsed.secret_as_env]
    assert got == [w for w in want if w[1]]
    for s in parsed.secret_as_env:
        assert s.secret_name_parameter.runtime_value.constant.string_value == s.secret_name
        assert all(ENV_NAME.match(m.env_var) for m in s.key_to_env)
    assert got == [("tlops-credentials", {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                                          "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}, False),
                   ("tlops-credentials", {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                                          "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}, True)]

    # Node selector: the cluster's labels and the step's own.
    labels = dict(parsed.node_selector.labels)
    assert labels == {**cluster.node_selector, **step.node_selector}
    assert not parsed.node_selector.HasField("node_selector_json")
    assert all(LABEL_KEY.match(k) and LABEL_VALUE.match(v) for k, v in labels.items()), labels
    assert labels["kubernetes.io/arch"] == "amd64"
    assert (labels.get("nvidia.com/gpu.present") == "true") == (task == "fine-tune")

    # Tolerations: the cluster's, then the step's, each with Kubernetes' own operators and effects.
    want_tol = [(t.key, t.operator, t.value or "", t.effect or "", t.toleration_seconds)
                for t in [*cluster.tolerations, *step.tolerations]]
    got_tol = [(t.key, t.operator, t.value, t.effect, t.toleration_seconds if t.HasField("toleration_seconds")
                else None) for t in parsed.tolerations]
    assert got_tol == want_tol
    for t in parsed.tolerations:
        assert t.operator in TOLERATION_OPERATORS and t.effect in TAINT_EFFECTS
        assert not (t.operator == "Exists" and t.value), "operator Exists takes no value"
        assert not t.HasField("toleration_json")
    assert got_tol == ([("nvidia.com/gpu", "Exists", "", "NoSchedule", None)] if task == "fine-tune" else [])


def pod_from(parsed: Any, name: str) -> dict[str, Any]:
    """The pod fields the KFP driver builds from a parsed step config, as a Kubernetes Pod."""
    env = [{"name": m.env_var, "valueFrom": {"secretKeyRef": {"name": s.secret_name, "key": m.secret_key,
                                                              "optional": s.optional}}}
           for s in parsed.secret_as_env for m in s.key_to_env]
    tolerations = []
    for t in parsed.tolerations:
        entry: dict[str, Any] = {"key": t.key, "operator": t.operator}
        entry.update({k: v for k, v in (("value", t.value), ("effect", t.effect)) if v})
        if t.HasField("toleration_seconds"):
            entry["tolerationSeconds"] = t.toleration_seconds
        tolerations.append(entry)
    spec: dict[str, Any] = {"containers": [{"name": "main", "image": "tlops:0.1.0", "env": env}],
                            "nodeSelector": dict(parsed.node_selector.labels)}
    if tolerations:
        spec["tolerations"] = tolerations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"tlops-{name}"}, "spec": spec}


@pytest.mark.parametrize("task", TASKS)
def test_parsed_values_make_a_valid_pod_with_the_secrets_of_infra(
        step_configs: dict[str, dict[str, Any]], task: str) -> None:
    parsed = parse_strict(step_configs[task])
    pod = pod_from(parsed, task)
    for version in (MIN_K8S_VERSION, latest_k8s_version()):
        validate_manifest(pod, version)
    templates = secret_templates()
    for s in parsed.secret_as_env:
        assert s.secret_name in templates, f"{task}: Secret {s.secret_name} is not one infra/ documents"
        if not s.optional:  # a required key the Secret lacks would keep the pod from starting
            assert {m.secret_key for m in s.key_to_env} <= templates[s.secret_name], task


def test_strict_parsing_rejects_unknown_and_mistyped_fields(step_configs: dict[str, dict[str, Any]]) -> None:
    """The checks above can fail: a field kfp-kubernetes does not know, at the top or deep inside, and a value of
    the wrong type are refused; the lenient parse would have dropped the unknown field without a word."""
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2 as pb

    good = step_configs["fine-tune"]
    parse_strict(good)
    unknown_top = {**good, "nodeSelectors": {"labels": {"a": "b"}}}
    with pytest.raises(json_format.ParseError, match="nodeSelectors"):
        parse_strict(unknown_top)
    lenient = json_format.ParseDict(unknown_top, pb.KubernetesExecutorConfig(), ignore_unknown_fields=True)
    assert json_format.MessageToDict(lenient) == good  # silently dropped
    unknown_deep = {**good, "tolerations": [{**good["tolerations"][0], "operater": "Exists"}]}
    with pytest.raises(json_format.ParseError, match="operater"):
        parse_strict(unknown_deep)
    with pytest.raises(json_format.ParseError):
        parse_strict({**good, "nodeSelector": {"labels": [["kubernetes.io/arch", "amd64"]]}})
    with pytest.raises(json_format.ParseError):
        parse_strict({**good, "secretAsEnv": [{**good["secretAsEnv"][0], "optional": "sometimes"}]})


def test_the_pod_check_can_fail(step_configs: dict[str, dict[str, Any]]) -> None:
    kv = kubernetes_validate()
    pod = pod_from(parse_strict(step_configs["fine-tune"]), "fine-tune")
    pod["spec"]["tolerations"][0]["tolerationSeconds"] = "forever"
    with pytest.raises(kv.ValidationError):
        validate_manifest(pod, MIN_K8S_VERSION)


def test_the_run_identity_is_one_infra_defines(local_objects: Objects) -> None:
    cluster = cluster_config()
    assert cluster.namespace == "tlops" and ("Namespace", cluster.namespace) in local_objects
    assert ("ServiceAccount", cluster.service_account) in local_objects
    assert ("RoleBinding", cluster.service_account) in local_objects


def test_plain_env_of_the_steps_names_services_infra_defines(
        compiled: tuple[dict[str, Any], dict[str, Any]], local_objects: Objects) -> None:
    from urllib.parse import urlparse

    from mlflow.server.security_utils import is_allowed_host_header

    ir, _ = compiled
    (env,) = {tuple(sorted((e["name"], e["value"]) for e in x["container"].get("env", [])))
              for x in ir["deploymentSpec"]["executors"].values()}
    plain = dict(env)
    (mlflow,) = local_objects[("Deployment", "tlops-mlflow")]["spec"]["template"]["spec"]["containers"]
    allowed = next(e["value"] for e in mlflow["env"] if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS").split(",")
    for var, service in (("MLFLOW_TRACKING_URI", "tlops-mlflow"), ("AWS_ENDPOINT_URL", "tlops-minio")):
        url = urlparse(plain[var])
        name, _, namespace = (url.hostname or "").partition(".")
        assert ("Service", name) in local_objects and name == service, f"{var}={plain[var]}"
        assert namespace.split(".")[0] in {"", "tlops"}, f"{var}={plain[var]}"
        ports = {p["port"] for p in local_objects[("Service", name)]["spec"]["ports"]}
        assert url.port in ports, f"{var}={plain[var]}"
    assert is_allowed_host_header(allowed, urlparse(plain["MLFLOW_TRACKING_URI"]).netloc)


def test_buckets_of_the_cluster_config_are_ones_infra_creates(local_objects: Objects) -> None:
    from tlops.config.settings import load_config

    cfg = load_config(CLUSTER_CONFIG)
    (job,) = local_objects[("Job", "tlops-minio-buckets")]["spec"]["template"]["spec"]["containers"]
    settings = local_objects[("ConfigMap", "tlops-settings")]["data"]
    created = {settings[k].removeprefix("s3://").split("/", 1)[0]
               for k in ("TLOPS_DATA_URI", "MLFLOW_ARTIFACTS_DESTINATION")}
    assert {e["name"] for e in job["env"]} >= {"TLOPS_DATA_URI", "MLFLOW_ARTIFACTS_DESTINATION"}
    for uri in (cfg.data.uri, cfg.state_uri):
        assert uri and uri.startswith("s3://")
        assert uri.removeprefix("s3://").split("/", 1)[0] in created, uri
