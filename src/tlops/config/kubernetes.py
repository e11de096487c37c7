"""The ``cluster`` section: how the pipeline's pods run on Kubernetes (resources, node placement, Secrets,
environment), checked here so that a wrong quantity or name fails before anything is compiled or submitted."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tlops.config.base import Section

# Kubernetes quantities as kfp accepts them: CPU cores ("2", "0.5", "500m"); memory bytes with an optional suffix.
CPU_QUANTITY = r"^([0-9]*[.])?[0-9]+m?$"
MEMORY_QUANTITY = r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$"
_MEMORY_FACTORS = {"": 1, **{s: 1000 ** (i + 1) for i, s in enumerate("KMGTPE")},
                   **{f"{s}i": 1024 ** (i + 1) for i, s in enumerate("KMGTPE")}}
# The pipeline's steps, by task name. Per-step defaults: validate and parity read every image once, fine-tune
# trains (16Gi also holds the feature cache and the input cache), gate only talks to MLflow.
# skip: runs instead of fine-tune, evaluate and gate when the validate step decided to train nothing.
CLUSTER_STEPS = ("validate", "parity", "fine-tune", "evaluate", "compress", "gate", "skip")
DEFAULT_STEP_SETTINGS: dict[str, dict[str, Any]] = {
    "validate": {"cpu_request": "1", "cpu_limit": "2", "memory_request": "2Gi", "memory_limit": "4Gi", "retries": 2},
    "parity": {"cpu_request": "1", "cpu_limit": "2", "memory_request": "2Gi", "memory_limit": "4Gi", "retries": 2},
    "fine-tune": {"cpu_request": "4", "cpu_limit": "8", "memory_request": "16Gi", "memory_limit": "16Gi",
                  "retries": 2},
    "evaluate": {"cpu_request": "2", "cpu_limit": "4", "memory_request": "4Gi", "memory_limit": "8Gi", "retries": 2},
    "compress": {"cpu_request": "2", "cpu_limit": "4", "memory_request": "4Gi", "memory_limit": "8Gi", "retries": 2},
    # A retried gate would register a second model version for the same candidate: no retries by default.
    "gate": {"cpu_request": "500m", "cpu_limit": "1", "memory_request": "1Gi", "memory_limit": "2Gi", "retries": 0},
    "skip": {"cpu_request": "250m", "cpu_limit": "1", "memory_request": "512Mi", "memory_limit": "1Gi", "retries": 2},
}
# Environment variable names (POSIX) and Kubernetes object names (DNS-1123 subdomain).
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
K8S_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
SECRET_ENV_NAME = re.compile(r"KEY|SECRET|PASSW|TOKEN|CREDENTIAL", re.IGNORECASE)
URL_WITH_PASSWORD = re.compile(r"://[^/@\s]+:[^/@\s]*@")


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def memory_bytes(quantity: str) -> int:
    digits = quantity.rstrip("EPTGMKi")
    return int(digits) * _MEMORY_FACTORS[quantity[len(digits):]]


class TolerationConfig(Section):
    """A Kubernetes toleration (kfp-kubernetes ``add_toleration``)."""

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> TolerationConfig:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("a toleration with operator Exists takes no value")
        if self.operator == "Equal" and not self.key:
            raise ValueError("a toleration with operator Equal needs a key")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("toleration_seconds applies to effect NoExecute only")
        return self


class StepClusterConfig(Section):
    """What one step's pod asks for: requests and limits, retries, and where it may be scheduled (added to the
    cluster-wide node_selector and tolerations)."""

    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    retries: int = Field(ge=0, le=10)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[TolerationConfig] = Field(default_factory=list)

    @field_validator("cpu_request", "cpu_limit", mode="before")
    @classmethod
    def _cpu(cls, value: Any) -> str:
        text = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
        if not isinstance(text, str) or not re.fullmatch(CPU_QUANTITY, text):
            raise ValueError(f"{value!r} is not a CPU quantity: write cores such as 2, 0.5 or 500m")
        return text

    @field_validator("memory_request", "memory_limit", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> str:
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(text, str) or not re.fullmatch(MEMORY_QUANTITY, text):
            raise ValueError(f"{value!r} is not a memory quantity: write bytes such as 512Mi, 4Gi or 8G")
        return text

    @model_validator(mode="after")
    def _request_within_limit(self) -> StepClusterConfig:
        if cpu_cores(self.cpu_request) > cpu_cores(self.cpu_limit):
            raise ValueError(f"cpu_request {self.cpu_request} is above cpu_limit {self.cpu_limit}")
        if memory_bytes(self.memory_request) > memory_bytes(self.memory_limit):
            raise ValueError(f"memory_request {self.memory_request} is above memory_limit {self.memory_limit}")
        return self


class SecretEnvConfig(Section):
    """Environment variables of every step taken from one Kubernetes Secret (kfp-kubernetes ``use_secret_as_env``).
    ``keys`` maps a key of the Secret to the variable it becomes; ``optional``: a missing Secret or key is no error."""

    name: str = Field(pattern=K8S_NAME)
    keys: dict[str, str] = Field(min_length=1)
    optional: bool = False

    @model_validator(mode="after")
    def _env_names(self) -> SecretEnvConfig:
        bad = [v for v in self.keys.values() if not re.fullmatch(ENV_NAME, v)]
        if bad:
            raise ValueError(f"secret {self.name}: {bad[0]!r} is not an environment variable name")
        return self


def _default_secrets() -> list[SecretEnvConfig]:
    # infra/base/secret-templates.yaml: the Secret tlops-credentials and its keys. The MLflow login is optional.
    required = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI")
    login = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    return [SecretEnvConfig(name="tlops-credentials", keys={k: k for k in required}),
            SecretEnvConfig(name="tlops-credentials", keys={k: k for k in login}, optional=True)]


class ClusterConfig(Section):
    """How the compiled pipeline runs on a Kubeflow cluster; not used by local runs. Fixed at compile time."""

    # The project image every step runs in. Unset: $TLOPS_IMAGE, else components.image.DEFAULT_IMAGE.
    image: str | None = Field(None, min_length=1)
    # Per step (validate, parity, fine-tune, evaluate, gate, skip); a partial entry keeps that step's other
    # defaults.
    steps: dict[str, StepClusterConfig] = Field(default_factory=dict)
    # Back-off between retries: first wait, growth factor, and the longest a step keeps being retried.
    retry_backoff: str = Field("30s", pattern=r"^[0-9]+s$")
    retry_backoff_factor: float = Field(2.0, ge=1.0)
    retry_backoff_max: str = Field("3600s", pattern=r"^[0-9]+s$")
    # Every step: node labels it must run on, and taints it tolerates (a step's own ones are added).
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[TolerationConfig] = Field(default_factory=list)
    # Credentials from Kubernetes Secrets, and plain (non-secret) environment variables. A variable set in
    # env is taken from there and left out of the secrets.
    secrets: list[SecretEnvConfig] = Field(default_factory=_default_secrets)
    env: dict[str, str] = Field(default_factory=dict)
    # Submitting: the KFP API endpoint (--host overrides; else $KF_PIPELINES_ENDPOINT), the KFP namespace
    # (multi-user installations), the service account the run's pods use, the KFP experiment.
    host: str | None = None
    namespace: str | None = Field(None, pattern=K8S_NAME)
    service_account: str | None = Field(None, pattern=K8S_NAME)
    experiment: str = Field("tlops", min_length=1)
    # Seconds to wait for each call to the KFP API.
    timeout_s: float = Field(30.0, gt=0.0, le=600.0)

    @model_validator(mode="before")
    @classmethod
    def _merge_step_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        given = data.get("steps") or {}
        if not isinstance(given, dict):
            return data  # the field's own validation names the problem
        unknown = sorted(set(given) - set(CLUSTER_STEPS))
        if unknown:
            raise ValueError(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(CLUSTER_STEPS)}")
        merged = {}
        for name in CLUSTER_STEPS:
            mine = given.get(name) or {}
            merged[name] = {**DEFAULT_STEP_SETTINGS[name], **mine} if isinstance(mine, dict) else mine
        return {**data, "steps": merged}

    @model_validator(mode="after")
    def _env_names(self) -> ClusterConfig:
        bad = [k for k in self.env if not re.fullmatch(ENV_NAME, k)]
        if bad:
            raise ValueError(f"env: {bad[0]!r} is not an environment variable name")
        # Plain env is written into the compiled YAML and the run's parameters: no credentials there.
        secret = [k for k, v in self.env.items() if SECRET_ENV_NAME.search(k) or URL_WITH_PASSWORD.search(v)]
        if secret:
            raise ValueError(f"env: {secret[0]} looks like a credential; put it in a Kubernetes Secret and map it "
                             "under cluster.secrets")
        return self

    def step(self, name: str) -> StepClusterConfig:
        return self.steps[name]
