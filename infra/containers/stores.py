#!/usr/bin/env python3
"""The stores as real services in containers, deployed the way infra/ deploys them: PostgreSQL, the S3 endpoint
(moto's server in the project image, standing in for MinIO) and the MLflow tracking server (`mlflow server
--serve-artifacts`, PostgreSQL backend, artifacts in s3://tlops-mlflow/mlartifacts), each a pod started by
`podman kube play` from the manifests that `kubectl kustomize infra/overlays/podman` renders, on a podman network
of their own, published on 127.0.0.1.

    .venv/bin/python infra/containers/stores.py up          # start (or restart) them; prints the endpoints (JSON)
    .venv/bin/python infra/containers/stores.py env         # `export ...` lines for a client on this machine
    .venv/bin/python infra/containers/stores.py status
    .venv/bin/python infra/containers/stores.py down [--volumes]

From Python (tests/containers/conftest.py): ``up(...) -> Stores``, ``down(...)``, ``Stores.load(...)``.

Clients on this machine use the published ports (``Stores.host_env()``); containers on the network use the
Service names (``Stores.cluster_env()``, ``Stores.hosts`` for ``--add-host``). MLflow proxies artifacts, so a
client never needs the bucket's credentials or an in-cluster host name to read them.

What podman 4.3's kube play cannot take as Kubernetes writes it is translated here, one function each:
StatefulSet (-> Deployment), Job (-> Pod), PersistentVolumeClaim (-> podman volume), Secret (-> podman secret
in the format its secretKeyRef lookup reads), $(VAR) references in env values (expanded), Service (-> a static
pod IP and hostAliases in every pod), emptyDir (-> a volume of the pod's own; group-writable tmpfs under fsGroup).

Exit codes of the CLI: 0 done; 3 SKIP (no podman or no kubectl/kustomize to render the manifests); 1 failure.
"""

from __future__ import annotations

import argparse
import base64
import copy
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / "infra" / "overlays" / "podman"
POSTGRES_CONTAINERFILE = REPO / "infra" / "containers" / "postgres.Containerfile"
DEFAULT_STATE_DIR = REPO / ".tlops" / "stores"
NETWORK = "tlops"
SUBNET = os.environ.get("TLOPS_STORES_SUBNET", "10.89.64.0/24")  # an instance's network takes a free /24 after it
NAMESPACE = "tlops"
SKIP = 3
# The workloads played, in start order; the pod of each gets the static address .10, .11, ... of the subnet.
WORKLOADS = ("tlops-postgres", "tlops-minio", "tlops-minio-buckets", "tlops-mlflow")
# Artifacts only through the tracking server, never presigned S3 URLs (see Stores.host_env).
PROXY_ONLY = {"MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false", "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false"}
PORT_ENV = {"tlops-mlflow": "TLOPS_STORES_MLFLOW_PORT", "tlops-minio": "TLOPS_STORES_S3_PORT",
            "tlops-postgres": "TLOPS_STORES_POSTGRES_PORT"}


class StoresError(RuntimeError):
    """The stores could not be brought up (the message says which step and shows the container's log)."""


class StoresUnavailable(StoresError):
    """This machine cannot run them at all (no podman, nothing to render manifests with): skip, not fail."""


# --------------------------------------------------------------------------------------------- the result


@dataclass
class Stores:
    """The running stores: endpoints for this machine and for containers on ``network``, and the credentials."""

    state_dir: str
    instance: str  # "" for the default; else pods, network, secrets and volumes carry "-<instance>"
    network: str
    image: str
    postgres_image: str
    mlflow_url: str  # http://127.0.0.1:<port>, the tracking server (and artifact proxy) from this machine
    s3_endpoint: str  # http://127.0.0.1:<port>, moto's S3 server from this machine
    postgres_host: str
    postgres_port: int
    postgres_user: str
    postgres_password: str
    postgres_db: str
    aws_access_key_id: str
    aws_secret_access_key: str
    artifacts_destination: str  # s3://tlops-mlflow/mlartifacts (MLflow's --artifacts-destination)
    data_uri: str  # s3://tlops-data/digits (TLOPS_DATA_URI)
    cluster_mlflow_url: str  # http://tlops-mlflow:5000 inside the network
    cluster_s3_endpoint: str  # http://tlops-minio:9000 inside the network
    hosts: dict[str, str] = field(default_factory=dict)  # Service name -> pod IP, for --add-host
    pods: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    scratch_volumes: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)

    @property
    def artifact_bucket(self) -> str:
        return self.artifacts_destination.removeprefix("s3://").split("/", 1)[0]

    @property
    def data_bucket(self) -> str:
        return self.data_uri.removeprefix("s3://").split("/", 1)[0]

    @property
    def postgres_uri(self) -> str:
        return (f"postgresql+psycopg://{self.postgres_user}:{self.postgres_password}@{self.postgres_host}:"
                f"{self.postgres_port}/{self.postgres_db}")

    def host_env(self) -> dict[str, str]:
        """Environment for a client on this machine (the tlops CLI, boto3, the MLflow client).

        The two MLFLOW_ENABLE_PROXY_MULTIPART_* switches are set to false on purpose: unset, an MLflow 3.17
        client asks the server's /server-info, which advertises multipart transfers for an S3 destination, and
        then downloads every artifact (and uploads those >= 500 MB) through presigned S3 URLs that name the S3
        endpoint as the server sees it (tlops-minio.tlops.svc.cluster.local:9000): unreachable from here."""
        return {"MLFLOW_TRACKING_URI": self.mlflow_url, "AWS_ENDPOINT_URL": self.s3_endpoint,
                "AWS_ACCESS_KEY_ID": self.aws_access_key_id, "AWS_SECRET_ACCESS_KEY": self.aws_secret_access_key,
                "AWS_DEFAULT_REGION": "us-east-1", "TLOPS_DATA_URI": self.data_uri,
                **PROXY_ONLY}

    def cluster_env(self) -> dict[str, str]:
        """Environment for a container on ``network`` (with ``add_host_args()``), as the Secret gives pods."""
        env = {**self.host_env(), "MLFLOW_TRACKING_URI": self.cluster_mlflow_url,
               "AWS_ENDPOINT_URL": self.cluster_s3_endpoint}
        for key in PROXY_ONLY:  # inside the network the presigned URLs' host resolves: as the pods run
            env.pop(key)
        return env

    def add_host_args(self) -> list[str]:
        """`podman run` arguments that resolve the Service names on ``network`` (there is no cluster DNS)."""
        return [f"--add-host={name}:{ip}" for name, ip in sorted(self.hosts.items())]

    def save(self) -> Path:
        path = Path(self.state_dir) / "stores.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        path.chmod(0o600)
        return path

    @classmethod
    def load(cls, state_dir: str | Path = DEFAULT_STATE_DIR) -> Stores:
        return cls(**json.loads((Path(state_dir) / "stores.json").read_text()))


# --------------------------------------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(f"stores: {message}", file=sys.stderr, flush=True)


def podman(*args: str, timeout: float = 120, check: bool = True, input: str | None = None
           ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise StoresError(f"podman {' '.join(args[:3])} ... failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def render(overlay: Path = OVERLAY) -> list[dict[str, Any]]:
    """The overlay's objects, rendered by kubectl's kustomize (or a kustomize binary)."""
    if shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(overlay)]
    elif shutil.which("kustomize"):
        command = ["kustomize", "build", str(overlay)]
    else:
        raise StoresUnavailable("neither kubectl nor kustomize is installed to render infra/overlays/podman")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise StoresError(f"{' '.join(command)} failed: {proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def random_token(length: int) -> str:
    # Letters and digits only: the PostgreSQL password goes into a URL (MLFLOW_BACKEND_STORE_URI).
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(length))


def http_status(url: str, timeout: float = 5) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback only
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def pod_name(doc: dict[str, Any]) -> str:
    # kube play names a Deployment's pod <name>-pod-0, a Pod by its name; containers are <pod>-<container>.
    return doc["metadata"]["name"] if doc["kind"] == "Pod" else f"{doc['metadata']['name']}-pod-0"


def container_logs(container: str, lines: int = 40) -> str:
    proc = podman("logs", "--tail", str(lines), container, check=False, timeout=30)
    return (proc.stdout + proc.stderr).strip()


# --------------------------------------------------------------------------------------------- translations


def statefulset_to_deployment(doc: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """kube play (podman 4.3) plays Pods, Deployments and PVCs only. A one-replica StatefulSet is a Deployment
    whose volumeClaimTemplates become claims named as the StatefulSet's own would be: <template>-<name>-0."""
    out = copy.deepcopy(doc)
    out["kind"] = "Deployment"
    spec = out["spec"]
    templates = spec.pop("volumeClaimTemplates", [])
    spec.pop("serviceName", None)
    spec.pop("podManagementPolicy", None)
    claims = []
    volumes = spec["template"]["spec"].setdefault("volumes", [])
    for template in templates:
        claim = f"{template['metadata']['name']}-{doc['metadata']['name']}-0"
        claims.append(claim)
        volumes.append({"name": template["metadata"]["name"], "persistentVolumeClaim": {"claimName": claim}})
    return out, claims


def job_to_pod(doc: dict[str, Any]) -> dict[str, Any]:
    """kube play does not play Jobs: the Job's pod template runs once as a Pod (restartPolicy Never);
    up() waits for it to exit 0, as the Job controller would (without its retries)."""
    template = copy.deepcopy(doc["spec"]["template"])
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {**template.get("metadata", {}), "name": doc["metadata"]["name"]},
            "spec": template["spec"]}


def expand_env_references(container: dict[str, Any], configmaps: dict[str, dict[str, str]],
                          secret_values: dict[str, dict[str, str]]) -> None:
    """kube play passes `$(VAR)` through literally; the kubelet expands it, in an env value from the variables
    defined above it in the list, in the command and arguments from the whole list. Expand them here (each
    value then holds what the kubelet would have put there)."""
    def expand(text: str, variables: dict[str, str]) -> str:
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: variables.get(m.group(1), m.group(0)), text)

    resolved: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            value = entry["value"] = expand(str(entry["value"]), resolved)
        else:
            ref = entry.get("valueFrom", {})
            if "configMapKeyRef" in ref:
                value = configmaps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
            elif "secretKeyRef" in ref:
                value = secret_values[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
            else:
                continue
        resolved[entry["name"]] = value
    for key in ("command", "args"):
        if key in container:
            container[key] = [expand(str(arg), resolved) for arg in container[key]]


def create_podman_secret(name: str, values: dict[str, str]) -> None:
    """A Secret as podman 4.3's secretKeyRef lookup reads it: a JSON map of base64 values. (Its own `kind: Secret`
    support stores the YAML, which that lookup then rejects as "not valid JSON".)"""
    podman("secret", "rm", name, check=False)
    data = json.dumps({k: base64.b64encode(v.encode()).decode() for k, v in values.items()})
    podman("secret", "create", name, "-", input=data)


def service_hosts(objects: list[dict[str, Any]], addresses: dict[str, str]) -> dict[str, str]:
    """There is no Service proxy or cluster DNS: each Service name (short, namespaced and cluster FQDN) resolves
    to the static address of the one pod it selects, through hostAliases. The Service port must equal the
    container port (true of every Service in infra/), since nothing translates ports."""
    hosts: dict[str, str] = {}
    workloads = [d for d in objects if d["kind"] in {"Deployment", "Pod"}]
    for svc in (d for d in objects if d["kind"] == "Service"):
        selector = svc["spec"].get("selector", {})
        for doc in workloads:
            labels = doc["metadata"].get("labels", {}) if doc["kind"] == "Pod" else \
                doc["spec"]["template"]["metadata"].get("labels", {})
            if doc["metadata"]["name"] in addresses and selector and selector.items() <= labels.items():
                ports = {p.get("name"): p["containerPort"] for c in pod_spec(doc)["containers"]
                         for p in c.get("ports", [])}
                for port in svc["spec"]["ports"]:
                    target = port.get("targetPort", port["port"])
                    number = ports.get(target, target)
                    if number != port["port"]:
                        raise StoresError(f"service {svc['metadata']['name']} maps port {port['port']} to "
                                          f"{number}: podman cannot translate ports between pods")
                name = svc["metadata"]["name"]
                for alias in (name, f"{name}.{NAMESPACE}", f"{name}.{NAMESPACE}.svc",
                              f"{name}.{NAMESPACE}.svc.cluster.local"):
                    hosts[alias] = addresses[doc["metadata"]["name"]]
    return hosts


def emptydirs_to_volumes(name: str, doc: dict[str, Any]) -> list[str]:
    """kube play turns an emptyDir into a named volume called after the pod's volume ("tmp"), the same one for
    every pod and every run that names a volume so, and it ignores fsGroup (the volume comes up root-owned 0755:
    a non-root container cannot write to it, e.g. PostgreSQL's socket directory). Each emptyDir becomes a volume
    of this pod's own, new on each up: under fsGroup a tmpfs made as Kubernetes makes it (world-writable, group
    fsGroup, set-group-id bit), else a local volume that takes the image directory's owner and mode."""
    spec = pod_spec(doc)
    group = spec.get("securityContext", {}).get("fsGroup")
    made = []
    for volume in spec.get("volumes", []):
        if "emptyDir" in volume:
            scratch = f"{name}-{volume['name']}-scratch"
            podman("volume", "rm", "-f", scratch, check=False)
            options = [] if group is None else ["--opt", "type=tmpfs", "--opt", "device=tmpfs",
                                                "--opt", f"o=gid={group},mode=2777"]
            podman("volume", "create", *options, scratch)
            del volume["emptyDir"]
            volume["persistentVolumeClaim"] = {"claimName": scratch}
            made.append(scratch)
    return made


def add_host_aliases(doc: dict[str, Any], hosts: dict[str, str]) -> None:
    by_ip: dict[str, list[str]] = {}
    for name, ip in sorted(hosts.items()):
        by_ip.setdefault(ip, []).append(name)
    pod_spec(doc)["hostAliases"] = [{"ip": ip, "hostnames": names} for ip, names in sorted(by_ip.items())]


# --------------------------------------------------------------------------------------------- up / down


def ensure_network(name: str) -> ipaddress.IPv4Network:
    """The podman network the pods get static addresses in: SUBNET for the default one, else the first /24 of
    10.89.0.0/16 from SUBNET on that no network uses (an existing network keeps its own)."""
    proc = podman("network", "inspect", name, check=False)
    if proc.returncode != 0:
        taken = set()
        for info in json.loads(podman("network", "inspect", *network_names()).stdout or "[]"):
            taken |= {s["subnet"] for s in network_subnets(info)}
        wanted = ipaddress.ip_network(SUBNET)
        candidates = [wanted] + [ipaddress.ip_network(f"10.89.{i}.0/24") for i in range(65, 255)]
        subnet = next((str(c) for c in candidates if str(c) not in taken), None)
        if subnet is None:
            raise StoresError("no free /24 left in 10.89.0.0/16 for a podman network")
        podman("network", "create", "--subnet", subnet, name)
        proc = podman("network", "inspect", name)
    subnets = network_subnets(json.loads(proc.stdout)[0])
    if not subnets:
        raise StoresError(f"podman network {name} has no subnet to give pods static addresses in")
    return ipaddress.ip_network(subnets[0]["subnet"])


def network_names() -> list[str]:
    return podman("network", "ls", "--format", "{{.Name}}").stdout.split()


def network_subnets(info: dict[str, Any]) -> list[dict[str, str]]:
    return info.get("subnets") or [{"subnet": r[0]["subnet"]} for r in
                                   (p.get("ipam", {}).get("ranges", []) for p in info.get("plugins", [])) if r]


def rename_for_instance(doc: dict[str, Any], suffix: str, volumes: list[str]) -> None:
    """A separate set's names: the workload (so its pod), the podman secrets and the claims it refers to."""
    if not suffix:
        return
    doc["metadata"]["name"] += suffix
    spec = pod_spec(doc)
    for volume in spec.get("volumes", []):
        claim = volume.get("persistentVolumeClaim", {})
        if claim and claim["claimName"] not in volumes and claim["claimName"] + suffix in volumes:
            claim["claimName"] += suffix
    for container in spec["containers"]:
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                ref["name"] += suffix


def ensure_postgres_image(image: str, base_image: str) -> None:
    """Build (cached layers: seconds when nothing changed) the PostgreSQL image from its Containerfile."""
    exists = podman("image", "exists", image, check=False).returncode == 0
    if podman("image", "exists", base_image, check=False).returncode != 0:
        if exists:
            return
        raise StoresError(f"{image} is missing and so is its base {base_image}: run infra/containers/base-image.sh")
    proc = podman("build", "--pull=never", "--layers", "--build-arg", f"BASE_IMAGE={base_image}",
                  "-f", str(POSTGRES_CONTAINERFILE), "-t", image, str(POSTGRES_CONTAINERFILE.parent),
                  timeout=1200, check=False)
    if proc.returncode != 0:
        if not exists:
            raise StoresError(f"building {image} failed: {proc.stderr.strip()[-2000:]}")
        log(f"rebuilding {image} failed, the existing image is used: {proc.stderr.strip()[-300:]}")


def load_credentials(state_dir: Path) -> dict[str, str]:
    """Generated once per state directory (kept 0600 there, never in git): the PostgreSQL volume is initialised
    with the password of the first `up`, so later ones must reuse it."""
    path = state_dir / "credentials.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    creds = {"POSTGRES_USER": "mlflow", "POSTGRES_PASSWORD": random_token(24),
             "AWS_ACCESS_KEY_ID": "tlops" + random_token(12).upper(), "AWS_SECRET_ACCESS_KEY": random_token(32)}
    state_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(creds, indent=2) + "\n")
    path.chmod(0o600)
    return creds


def wait_until(what: str, ready: Any, timeout: float, container: str | None = None, interval: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if container:
            state = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", container, check=False)
            if state.returncode == 0 and state.stdout.split()[0] in {"exited", "stopped"}:
                raise StoresError(f"{what}: container {container} stopped ({state.stdout.strip()}):\n"
                                  f"{container_logs(container)}")
        time.sleep(interval)
    tail = f":\n{container_logs(container)}" if container else ""
    raise StoresError(f"{what}: not ready after {timeout:.0f}s{tail}")


def up(image: str = "localhost/tlops:0.1.0", postgres_image: str = "localhost/tlops-postgres:15",
       base_image: str = "localhost/tlops-base:bookworm", state_dir: str | Path = DEFAULT_STATE_DIR,
       ports: dict[str, int] | None = None, timeout: float = 300, instance: str = "") -> Stores:
    """Start (or restart) the stores and wait until MLflow answers /health; returns their endpoints.

    instance: "" runs the default set (pods tlops-mlflow-pod-0, ..., network tlops); a name runs a separate set
    beside it (pods, network, secrets and volumes suffixed "-<instance>", host ports free ones when the
    overlay's are taken), so that a test session never touches stores someone else started.

    ports: host ports by workload ("tlops-mlflow", "tlops-minio", "tlops-postgres"); default: the overlay's
    (15000, 19000, 15432) or TLOPS_STORES_*_PORT, and a free port when that one is taken."""
    if not shutil.which("podman"):
        raise StoresUnavailable("podman is not installed (infra/containers/setup-podman.sh)")
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    objects = render()
    if podman("image", "exists", image, check=False).returncode != 0:
        raise StoresError(f"the project image {image} is missing: run infra/containers/build-image.sh")
    ensure_postgres_image(postgres_image, base_image)
    remove_pods(state, instance)  # a previous run's pods (ours, by name), so the ports and addresses are free

    by_key = {(d["kind"], d["metadata"]["name"]): d for d in objects}
    configmaps = {d["metadata"]["name"]: dict(d.get("data", {})) for d in objects if d["kind"] == "ConfigMap"}
    creds = load_credentials(state)
    secret_values = {
        "tlops-postgres": {"POSTGRES_USER": creds["POSTGRES_USER"], "POSTGRES_PASSWORD": creds["POSTGRES_PASSWORD"]},
        "tlops-credentials": {"AWS_ACCESS_KEY_ID": creds["AWS_ACCESS_KEY_ID"],
                              "AWS_SECRET_ACCESS_KEY": creds["AWS_SECRET_ACCESS_KEY"],
                              "AWS_ENDPOINT_URL": f"http://tlops-minio.{NAMESPACE}.svc.cluster.local:9000",
                              "MLFLOW_TRACKING_URI": f"http://tlops-mlflow.{NAMESPACE}.svc.cluster.local:5000"},
    }
    for name, values in secret_values.items():
        create_podman_secret(name + (f"-{instance}" if instance else ""), values)

    # The workloads, translated to what kube play takes; the claims they use become podman volumes.
    workloads: dict[str, dict[str, Any]] = {}
    claims: list[str] = []
    scratch: list[str] = []
    suffix = f"-{instance}" if instance else ""
    for name in WORKLOADS:
        if ("StatefulSet", name) in by_key:
            doc, made = statefulset_to_deployment(by_key[("StatefulSet", name)])
            claims += made
        elif ("Job", name) in by_key:
            doc = job_to_pod(by_key[("Job", name)])
        else:
            doc = copy.deepcopy(by_key[("Deployment", name)])
        scratch += emptydirs_to_volumes(name + suffix, doc)
        for volume in pod_spec(doc).get("volumes", []):
            if "persistentVolumeClaim" in volume and volume["persistentVolumeClaim"]["claimName"] not in scratch:
                claims.append(volume["persistentVolumeClaim"]["claimName"])
        for container in pod_spec(doc)["containers"]:
            if container["image"].rpartition(":")[0].endswith("/tlops"):
                container["image"] = image  # the image under test, when it is not the overlay's tag
            if name == "tlops-postgres":
                container["image"] = postgres_image
            expand_env_references(container, configmaps, secret_values)
        workloads[name] = doc
    claims = sorted({claim + suffix for claim in claims})
    for claim in claims:
        if podman("volume", "exists", claim, check=False).returncode != 0:
            podman("volume", "create", claim)

    network = NETWORK + suffix
    subnet = ensure_network(network)
    addresses = {name: str(subnet.network_address + 10 + i) for i, name in enumerate(WORKLOADS)}
    hosts = service_hosts(list(workloads.values()) + [d for d in objects if d["kind"] == "Service"], addresses)
    host_ports: dict[str, int] = {}
    for name, doc in workloads.items():
        add_host_aliases(doc, hosts)
        for container in pod_spec(doc)["containers"]:
            # kube play publishes every containerPort, on 0.0.0.0 and the same host port when no hostPort is
            # given (MinIO's console would land on 0.0.0.0:9001); pods on the network reach any port anyway,
            # so only the ports given a hostPort (on 127.0.0.1, by the overlay) are kept.
            container["ports"] = [p for p in container.get("ports", []) if "hostPort" in p]
            for port in container["ports"]:
                port.setdefault("hostIP", "127.0.0.1")
                wanted = (ports or {}).get(name) or int(os.environ.get(PORT_ENV.get(name, ""), 0) or port["hostPort"])
                if not port_is_free(wanted):
                    taken, wanted = wanted, free_port()
                    log(f"127.0.0.1:{taken} is taken; {name} is published on 127.0.0.1:{wanted} instead")
                port["hostPort"] = wanted
                host_ports[name] = wanted

    for doc in workloads.values():
        rename_for_instance(doc, suffix, claims + scratch)

    stores = Stores(
        state_dir=str(state), instance=instance, network=network, image=image, postgres_image=postgres_image,
        mlflow_url=f"http://127.0.0.1:{host_ports['tlops-mlflow']}",
        s3_endpoint=f"http://127.0.0.1:{host_ports['tlops-minio']}",
        postgres_host="127.0.0.1", postgres_port=host_ports["tlops-postgres"],
        postgres_user=creds["POSTGRES_USER"], postgres_password=creds["POSTGRES_PASSWORD"],
        postgres_db=configmaps["tlops-settings"]["MLFLOW_DB_NAME"],
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"], aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
        artifacts_destination=configmaps["tlops-settings"]["MLFLOW_ARTIFACTS_DESTINATION"],
        data_uri=configmaps["tlops-settings"]["TLOPS_DATA_URI"],
        cluster_mlflow_url="http://tlops-mlflow:5000", cluster_s3_endpoint="http://tlops-minio:9000",
        hosts=hosts, pods=[pod_name(d) for d in workloads.values()], volumes=claims,
        scratch_volumes=scratch, secrets=sorted(name + suffix for name in secret_values))
    stores.save()  # before starting anything, so that `down` finds what a failed `up` left

    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(deadline - time.monotonic(), 1.0)

    def play(name: str) -> str:
        doc = workloads[name]
        manifest = state / f"{name}.yaml"
        manifest.write_text(yaml.safe_dump_all(
            [d for d in objects if d["kind"] == "ConfigMap"] + [doc], sort_keys=False))
        podman("kube", "play", "--replace", "--network", network, "--ip", addresses[name], str(manifest),
               timeout=min(left(), 300))
        container = f"{pod_name(doc)}-{pod_spec(doc)['containers'][0]['name']}"
        log(f"{name}: pod {pod_name(doc)} at {addresses[name]}")
        return container

    pg = play("tlops-postgres")
    s3 = play("tlops-minio")
    wait_until("PostgreSQL", lambda: podman(
        "exec", pg, "pg_isready", "-q", "-h", "127.0.0.1", "-U", stores.postgres_user, "-d", stores.postgres_db,
        check=False, timeout=20).returncode == 0, left(), pg)
    wait_until("the S3 endpoint", lambda: http_status(stores.s3_endpoint + "/") is not None, left(), s3)

    job = play("tlops-minio-buckets")
    wait_until("the bucket job", lambda: podman(
        "inspect", "--format", "{{.State.Status}}", job, check=False).stdout.strip() in {"exited", "stopped"},
        left())
    code = podman("inspect", "--format", "{{.State.ExitCode}}", job).stdout.strip()
    (state / "tlops-minio-buckets.log").write_text(container_logs(job, 200) + "\n")
    if code != "0":
        raise StoresError(f"the bucket job exited {code}:\n{container_logs(job)}")
    podman("pod", "rm", "-f", pod_name(workloads["tlops-minio-buckets"]), check=False)  # done, as a finished Job

    mlflow = play("tlops-mlflow")
    wait_until("the MLflow server", lambda: http_status(stores.mlflow_url + "/health") == 200, left(), mlflow)
    log(f"up: MLflow {stores.mlflow_url}, S3 {stores.s3_endpoint}, PostgreSQL 127.0.0.1:{stores.postgres_port}")
    return stores


def remove_pods(state_dir: Path, instance: str = "") -> list[str]:
    """The pods `up` creates for this instance (by name; none other), stopped and removed."""
    suffix = f"-{instance}" if instance else ""
    names = {f"{n}{suffix}-pod-0" for n in WORKLOADS} | {f"tlops-minio-buckets{suffix}"}
    path = state_dir / "stores.json"
    if path.exists():
        names |= set(json.loads(path.read_text()).get("pods", []))
    removed = []
    for name in sorted(names):
        # podman 4.3 may fail a forced removal when the container stops by itself between its SIGTERM and the
        # SIGKILL that follows ("container state improper"); a second attempt then finds it stopped.
        for attempt in range(3):
            if podman("pod", "exists", name, check=False).returncode != 0:
                break
            proc = podman("pod", "rm", "-f", "-t", "5", name, timeout=120, check=False)
            if proc.returncode == 0:
                removed.append(name)
                break
            if attempt == 2:
                raise StoresError(f"podman pod rm {name} failed: {proc.stderr.strip()[-500:]}")
            time.sleep(1)
    return removed


def down(state_dir: str | Path = DEFAULT_STATE_DIR, volumes: bool = False, instance: str = "") -> None:
    """Stop and remove the stores' pods and secrets; with volumes=True also their data and credentials. The
    instance is the one recorded in state_dir when `up` wrote it there, else the argument."""
    state = Path(state_dir).resolve()
    stores_file = state / "stores.json"
    recorded = json.loads(stores_file.read_text()) if stores_file.exists() else {}
    instance = recorded.get("instance", instance)
    removed = remove_pods(state, instance)
    for name in recorded.get("secrets", []):
        podman("secret", "rm", name, check=False)
    for name in recorded.get("scratch_volumes", []):
        podman("volume", "rm", "-f", name, check=False)
    if volumes:
        for name in recorded.get("volumes", []):
            podman("volume", "rm", "-f", name, check=False)
        (state / "credentials.json").unlink(missing_ok=True)
    stores_file.unlink(missing_ok=True)
    network = recorded.get("network", NETWORK + (f"-{instance}" if instance else ""))
    if podman("network", "exists", network, check=False).returncode == 0:
        podman("network", "rm", network, check=False)  # fails, and stays, while other containers use it
    log(f"down: removed {', '.join(removed) or 'no pods'}{' and the volumes' if volumes else ''}")


def status(instance: str = "") -> dict[str, str]:
    suffix = f"-{instance}" if instance else ""
    out = {}
    for name in (f"{n}{suffix}-pod-0" for n in WORKLOADS if n != "tlops-minio-buckets"):
        proc = podman("pod", "inspect", "--format", "{{.State}}", name, check=False)
        out[name] = proc.stdout.strip() if proc.returncode == 0 else "absent"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", default=os.environ.get("TLOPS_STORES_DIR", str(DEFAULT_STATE_DIR)))
    parser.add_argument("--instance", default=os.environ.get("TLOPS_STORES_INSTANCE", ""),
                        help="run a separate set beside the default one (names suffixed -INSTANCE)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start (or restart) the stores and wait until they answer")
    p_up.add_argument("--image", default=os.environ.get("TLOPS_IMAGE", "localhost/tlops:0.1.0"))
    p_up.add_argument("--postgres-image", default="localhost/tlops-postgres:15")
    p_up.add_argument("--timeout", type=float, default=300)
    p_down = sub.add_parser("down", help="stop and remove them")
    p_down.add_argument("--volumes", action="store_true", help="also remove their data and credentials")
    sub.add_parser("env", help="shell exports for a client on this machine")
    sub.add_parser("status", help="the state of each pod")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            stores = up(image=args.image, postgres_image=args.postgres_image, state_dir=args.state_dir,
                        timeout=args.timeout, instance=args.instance)
            print(json.dumps({k: v for k, v in asdict(stores).items() if "password" not in k and "secret" not in k},
                             indent=2))
        elif args.command == "down":
            down(args.state_dir, volumes=args.volumes, instance=args.instance)
        elif args.command == "env":
            for key, value in Stores.load(args.state_dir).host_env().items():
                print(f"export {key}={value}")
        else:
            print(json.dumps(status(args.instance), indent=2))
    except StoresUnavailable as exc:
        log(f"SKIP: {exc}")
        return SKIP
    except (StoresError, subprocess.TimeoutExpired, FileNotFoundError) as exc:
        log(f"FAILED: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
