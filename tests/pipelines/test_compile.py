from pathlib import Path

import pytest
import yaml

from tests.conftest import ir_tasks, run_cli


def test_compiled_ir_loads_back_and_names_every_task(tmp_path: Path) -> None:
    from kfp import components

    out = tmp_path / "pipeline.yaml"
    result = run_cli("compile", "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    loaded = components.load_component_from_file(str(out))
    assert loaded.name == "tlops-transfer-learning"
    ir = next(yaml.safe_load_all(out.read_text()))  # then the platform spec (secrets, placement)
    tasks = ir_tasks(ir)
    assert set(tasks) == {"validate", "parity", "fine-tune", "evaluate", "compress", "gate", "skip"}
    # The DAG order: each step depends on the one before it.
    assert "validate" in tasks["parity"]["dependentTasks"]
    assert "fine-tune" in tasks["evaluate"]["dependentTasks"]
    assert set(tasks["gate"]["dependentTasks"]) >= {"evaluate", "fine-tune"}
    # fine-tune, evaluate and gate run only on the validate step's plan "train"; skip only on the other one.
    branches = {name: task.get("triggerPolicy", {}).get("condition", "")
                for name, task in ir["components"]["comp-condition-branches-1"]["dag"]["tasks"].items()}
    (train,) = [c for c in branches.values() if "== 'train'" in c and "!" not in c]
    assert "validate-Output" in train
    # What crosses between steps is declared: every later step takes the validate step's run plan as an input
    # artifact, and the gate takes the parity report and the serving check (so it depends on parity).
    for name in ("parity", "fine-tune", "evaluate", "compress", "gate", "skip"):
        plan = tasks[name]["inputs"]["artifacts"]["run_plan"]
        assert plan.get("taskOutputArtifact", {}).get("producerTask") == "validate" or \
            plan.get("componentInputArtifact") == "pipelinechannel--validate-run_plan", (name, plan)
    gate_inputs = tasks["gate"]["inputs"]["artifacts"]
    assert {"run_plan", "evaluation", "parity_report", "serving_parity"} <= set(gate_inputs)
    assert ir["root"]["outputDefinitions"]["parameters"]["Output"]["parameterType"] == "STRING"
    images = {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values()}
    assert images == {"tlops:0.1.0"}
    # No step installs packages at run time: the command runs the executor from the image.
    for executor in ir["deploymentSpec"]["executors"].values():
        assert "pip install" not in " ".join(executor["container"].get("command", []))


def test_compile_into_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("compile", "--output", str(tmp_path / "no" / "p.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


# ------------------------------------------------------------------ the cluster settings in the compiled YAML

CLUSTER_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cluster.yaml"
TASKS = ("validate", "parity", "fine-tune", "evaluate", "compress", "gate", "skip")


def load_compiled(path: Path) -> tuple[dict, dict[str, dict], dict[str, dict]]:
    """The IR, and per task: its executor's container, and its Kubernetes platform config."""
    ir, platform = yaml.safe_load_all(path.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    containers, kube = {}, {}
    for name, task in ir_tasks(ir).items():
        label = ir["components"][task["componentRef"]["name"]]["executorLabel"]
        containers[name] = ir["deploymentSpec"]["executors"][label]["container"]
        kube[name] = executors.get(label, {})
    return ir, containers, kube


def test_cluster_config_and_image_land_in_the_compiled_yaml(tmp_path: Path) -> None:
    from tlops.config.kubernetes import DEFAULT_STEP_SETTINGS
    from tlops.config.settings import load_config

    cfg = load_config(CLUSTER_CONFIG)
    out = tmp_path / "cluster.yaml"
    result = run_cli("compile", "--config", str(CLUSTER_CONFIG), "--image", "registry.test/tlops:42",
                     "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "registry.test/tlops:42" in result.stdout
    ir, containers, kube = load_compiled(out)
    tasks = ir_tasks(ir)
    assert {c["image"] for c in containers.values()} == {"registry.test/tlops:42"}  # --image beats cluster.image

    for name in TASKS:
        want = cfg.cluster.steps[name]
        res = containers[name]["resources"]
        assert (res["resourceCpuRequest"], res["resourceCpuLimit"]) == (want.cpu_request, want.cpu_limit)
        assert (res["resourceMemoryRequest"], res["resourceMemoryLimit"]) == (want.memory_request, want.memory_limit)
        assert ("accelerator" in res) == (name == "fine-tune")
    assert containers["fine-tune"]["resources"]["resourceMemoryLimit"] == "24Gi"  # the file's override
    assert containers["validate"]["resources"]["resourceCpuRequest"] == DEFAULT_STEP_SETTINGS["validate"]["cpu_request"]
    accelerator = containers["fine-tune"]["resources"]["accelerator"]
    assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", "1")

    # Retries with back-off on the steps that may meet a flaky network or a preempted node; none on gate.
    for name in ("validate", "parity", "fine-tune", "evaluate"):
        policy = tasks[name]["retryPolicy"]
        assert policy["maxRetryCount"] == 2 and policy["backoffDuration"] == "30s"
        assert policy["backoffFactor"] == 2.0 and policy["backoffMaxDuration"] == "3600s"
    assert "retryPolicy" not in tasks["gate"]
    # Caching: validate and parity may come from the cache; the steps that must run again may not.
    cached = {name for name in TASKS if tasks[name].get("cachingOptions", {}).get("enableCache")}
    assert cached == {"validate", "parity"}

    for name in TASKS:
        env = {e["name"]: e["value"] for e in containers[name].get("env", [])}
        assert env == cfg.cluster.env
        secrets = kube[name]["secretAsEnv"]
        assert {s["secretName"] for s in secrets} == {"tlops-credentials"}
        required = {k["envVar"] for s in secrets if not s.get("optional") for k in s["keyToEnv"]}
        optional = {k["envVar"] for s in secrets if s.get("optional") for k in s["keyToEnv"]}
        assert required == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert optional == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
        labels = kube[name]["nodeSelector"]["labels"]
        assert labels["kubernetes.io/arch"] == "amd64"
        assert ("nvidia.com/gpu.present" in labels) == (name == "fine-tune")
        assert bool(kube[name].get("tolerations")) == (name == "fine-tune")
    assert kube["fine-tune"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                 "effect": "NoSchedule"}]
    # What the KFP backend's driver reads: each executor's config parses into kfp-kubernetes' own message.
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2 as pb

    for name in TASKS:
        parsed = json_format.ParseDict(kube[name], pb.KubernetesExecutorConfig())
        assert parsed.secret_as_env[0].secret_name == "tlops-credentials"


def test_image_from_environment_then_default_and_secrets_match_the_template(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.image import DEFAULT_IMAGE
    from pipelines.transfer_learning import compile_config
    from tlops.config.settings import load_config

    monkeypatch.setenv("TLOPS_IMAGE", "env.example/tlops:9")
    assert compile_config(load_config(), str(tmp_path / "env.yaml")) == "env.example/tlops:9"
    _, containers, kube = load_compiled(tmp_path / "env.yaml")
    assert {c["image"] for c in containers.values()} == {"env.example/tlops:9"}
    assert compile_config(load_config(overrides=["cluster.image=cfg.example/tlops:1"]),
                          str(tmp_path / "cfg.yaml")) == "cfg.example/tlops:1"
    monkeypatch.delenv("TLOPS_IMAGE")
    assert compile_config(load_config(), str(tmp_path / "default.yaml")) == DEFAULT_IMAGE
    _, containers, _ = load_compiled(tmp_path / "default.yaml")
    assert {c["image"] for c in containers.values()} == {DEFAULT_IMAGE}
    # By default every credential comes from the Secret of infra/, by the keys its template holds.
    templates = {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(
        (Path(__file__).resolve().parents[2] / "infra" / "base" / "secret-templates.yaml").read_text()) if doc}
    for secrets in (s for s in kube["validate"]["secretAsEnv"] if not s.get("optional")):
        assert secrets["secretName"] in templates
        assert {k["secretKey"] for k in secrets["keyToEnv"]} <= set(templates[secrets["secretName"]]["stringData"])


@pytest.mark.parametrize(("override", "message"), [
    ("cluster.steps.gate.cpu_request=4", "field cluster.steps.gate: Value error, cpu_request 4 is above cpu_limit 1"),
    ("cluster.steps.fine-tune.memory_limit=lots", "field cluster.steps.fine-tune.memory_limit"),
    ("cluster.steps.train.retries=1", "unknown step(s) train"),
    ("cluster.tolerations=[{operator: Exists, value: x}]", "operator Exists takes no value"),
    ("cluster.env={AWS_SECRET_ACCESS_KEY: abc}", "AWS_SECRET_ACCESS_KEY looks like a credential"),
    ("cluster.env={MLFLOW_TRACKING_URI: 'http://me:pw@mlflow:5000'}", "MLFLOW_TRACKING_URI looks like a credential"),
])
def test_bad_cluster_config_is_one_line_naming_the_field(override: str, message: str) -> None:
    from tlops.config.settings import load_config
    from tlops.errors import TlopsError

    with pytest.raises(TlopsError) as err:
        load_config(overrides=[override])
    assert message in str(err.value) and "\n" not in str(err.value)
