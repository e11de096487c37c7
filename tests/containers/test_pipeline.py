"""The cluster path in real containers: the compiled pipeline with every step in its own container of the project
image (kfp's DockerRunner on podman's socket), on the stores' network, its data only from s3://, its work directory
a tmpfs of its own, tracking only through the MLflow server that `podman kube play` runs from infra/.

It ends with a promoted model whose registry record, metrics and served predictions equal those of the same data
run by `tlops run` locally; a fine-tune container killed mid-epoch resumes from its checkpoint in S3; the S3
endpoint stopped during validate is one line and nothing registered. Tests run in file order, sharing the stores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import write_config
from tests.containers.conftest import podman

pytestmark = pytest.mark.containers
PREFIX = "digits"
# A gradient strategy (so a checkpoint exists to resume from), small enough for two CPU cores.
# head_init random: the resume is what these runs look at, not LP-FT (whose probe may win and be kept).
TRAIN = {"train__strategy": "partial", "train__head_init": "random", "train__epochs": 2, "train__batch_size": 8,
         "train__checkpoint_every_steps": 1,
         "train__lr": 0.003, "preprocess__image_size": 48, "evaluation__latency_images": 5,
         "evaluation__bootstrap_resamples": 200,
         # The content-hash split these runs were written for: 2 epochs at 48 px clear the gate's 0.5 floor on its
         # test images (on the stratified split's 18, the same model scored 0.44: a plumbing test, not a quality one).
         "data__split": "hash"}
STEPS = ("validate", "parity", "fine-tune", "evaluate", "compress", "gate")


@pytest.fixture(scope="module")
def docker_host(podman_ready: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """podman's Docker-compatible API on a socket of this module's, for kfp's DockerRunner."""
    sock = tmp_path_factory.mktemp("podman") / "podman.sock"
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "podman system service did not start"
        time.sleep(0.2)
    yield f"unix://{sock}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def data(stores: Any, tiny_digits: Path) -> str:
    """The tiny digits in the stores' data bucket, uploaded from this machine through the published port."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=stores.s3_endpoint, aws_access_key_id=stores.aws_access_key_id,
                      aws_secret_access_key=stores.aws_secret_access_key, region_name="us-east-1")
    buckets = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    if stores.data_bucket not in buckets:
        s3.create_bucket(Bucket=stores.data_bucket)
    for path in sorted(tiny_digits.rglob("*.png")):
        s3.upload_file(str(path), stores.data_bucket, f"{PREFIX}/{path.relative_to(tiny_digits).as_posix()}")
    return f"s3://{stores.data_bucket}/{PREFIX}"


def tlops(*args: str, env: dict[str, str], cwd: Path, timeout: int = 1500) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "tlops", *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=timeout)


def config(root: Path, model: str, state: str) -> Path:
    return write_config(root / f"{model}.yaml", root / ".tlops", registry__model_name=model, state_uri=state, **TRAIN)


def container_args(stores: Any, image: str) -> list[str]:
    args = ["--image", image, "--network", stores.network]
    args += [f"--add-host={name}:{ip}" for name, ip in sorted(stores.hosts.items())]
    for key in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
        args += ["--step-env", f"{key}={stores.cluster_env()[key]}"]
    return args


def step_seconds(log: str) -> dict[str, float]:
    """Wall time per step from the run's log: kfp.local's 'Executing task' and 'finished with status' lines."""
    import re

    log = re.sub(r"\x1b\[[0-9;]*m", "", log)
    stamps: dict[str, list[float]] = {}
    for m in re.finditer(r"(\d\d):(\d\d):(\d\d\.\d+) - INFO - (?:Executing task|Task) '([\w-]+)'", log):
        h, mi, s, name = m.groups()
        stamps.setdefault(name, []).append(int(h) * 3600 + int(mi) * 60 + float(s))
    return {name: round(t[-1] - t[0], 1) for name, t in stamps.items() if len(t) >= 2}


def record(model: str) -> dict[str, Any]:
    """What the registry holds for version 1 of ``model`` and its run: tags, aliases, metrics, evaluation."""
    import mlflow

    client = mlflow.MlflowClient()
    mv = client.get_model_version(model, "1")
    run = client.get_run(mv.run_id)
    local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="evaluation/metrics.json")
    aliases = {k: str(v) for k, v in client.get_registered_model(model).aliases.items()}
    return {"tags": mv.tags, "aliases": aliases, "metrics": run.data.metrics,
            "evaluation": json.loads(Path(local).read_text())}


KEPT_TAGS = ("preprocess.fingerprint", "preprocess.reference_fingerprint", "parity", "parity.serving", "validation",
             "data.manifest_hash", "backbone", "test_accuracy", "test_macro_f1", "gate.decision")


@pytest.fixture(scope="module")
def runs(stores: Any, data: str, docker_host: str, tlops_image: str, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, Any]:
    """The same data and config run twice: by `tlops run` here (each step a subprocess) and in containers."""
    root = tmp_path_factory.mktemp("runs")
    env = {**stores.host_env(), "DOCKER_HOST": docker_host}
    out: dict[str, Any] = {"root": root, "env": env}
    t0 = time.perf_counter()
    local = tlops("run", "--config", str(config(root, "digits-local", f"{data}-state/local")), "--data", data,
                  env=env, cwd=root)
    out["local_s"] = time.perf_counter() - t0
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    t0 = time.perf_counter()
    boxed = tlops("run", "--config", str(config(root, "digits-containers", f"{data}-state/containers")), "--data",
                  data, *container_args(stores, tlops_image), env=env, cwd=root)
    out["containers_s"] = time.perf_counter() - t0
    assert boxed.returncode == 0, boxed.stdout[-3000:] + boxed.stderr[-3000:]
    out["local"], out["containers"] = local, boxed
    logs = sorted((root / ".tlops" / "logs").glob("run-*.log"))
    out["steps"] = {"local": step_seconds(logs[0].read_text()), "containers": step_seconds(logs[1].read_text())}
    print(f"\nwall time: local {out['local_s']:.0f}s, containers {out['containers_s']:.0f}s; per step "
          f"{json.dumps(out['steps'])}")
    return out


def test_every_step_ran_in_its_own_container_of_the_image(runs: dict[str, Any], tlops_image: str) -> None:
    log = sorted((runs["root"] / ".tlops" / "logs").glob("run-*.log"))[1].read_text()
    assert log.count(f"Found image '{tlops_image}'") == len(STEPS), log[-3000:]
    assert "Pulling image" not in log
    assert set(runs["steps"]["containers"]) >= set(STEPS)
    ir = sorted((runs["root"] / ".tlops").glob("pipeline-*.yaml"))
    assert ir and tlops_image in ir[-1].read_text()  # the compiled pipeline is what ran
    assert "PROMOTE" in runs["containers"].stdout


def test_containers_and_local_runs_give_the_same_model_and_record(runs: dict[str, Any], stores_env: dict) -> None:
    local, boxed = record("digits-local"), record("digits-containers")
    for tag in KEPT_TAGS:
        assert boxed["tags"][tag] == local["tags"][tag], tag
    assert boxed["aliases"] == local["aliases"] == {"champion": "1"}
    for key in ("test_accuracy", "test_macro_f1", "best_val_accuracy", "data.files"):
        assert boxed["metrics"][key] == pytest.approx(local["metrics"][key], abs=1e-9), key
    assert boxed["evaluation"]["confusion_matrix"] == local["evaluation"]["confusion_matrix"]
    for key in ("accuracy", "macro_f1", "ece", "n"):
        assert boxed["evaluation"]["candidate"][key] == pytest.approx(local["evaluation"]["candidate"][key]), key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_served_champion_from_the_image_answers_the_local_models_predictions(
        runs: dict[str, Any], stores: Any, stores_env: dict, tlops_image: str, tiny_digits: Path) -> None:
    """`tlops serve` in the image, on the stores' network, reached through a published port; a client here loads
    the local run's champion through the tracking server (artifacts proxied: no in-cluster host in any URL)."""
    import base64

    import mlflow
    import pandas as pd

    port = free_port()
    env = stores.cluster_env()
    name = f"tlops-serve-{port}"
    args = ["run", "-d", "--rm", "--pull=never", "--read-only", "--name", name, "--network", stores.network,
            *stores.add_host_args(), "-p", f"127.0.0.1:{port}:8080"]
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    started = podman(*args, tlops_image, "tlops", "serve", "--model", "models:/digits-containers@champion",
                     "--host", "0.0.0.0", "--port", "8080")
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=5) as resp:
                    version = json.loads(resp.read())
                break
            except OSError:
                alive = podman("container", "exists", name).returncode == 0
                assert alive and time.monotonic() < deadline, podman("logs", name).stderr[-3000:]
                time.sleep(1)
        images = sorted(tiny_digits.rglob("*.png"))[::9]
        body = json.dumps({"inputs": {"image": [base64.b64encode(p.read_bytes()).decode() for p in images]}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            served = json.loads(resp.read())["predictions"]
    finally:
        podman("rm", "-f", name)
    assert str(version.get("version")) == "1"
    here = mlflow.pyfunc.load_model("models:/digits-local@champion").predict(
        pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    assert [p["label"] for p in served] == [str(x) for x in here["label"]]
    for got, want in zip(served, here["score"], strict=True):
        assert got["score"] == pytest.approx(float(want), abs=1e-5)


def fine_tune_container() -> str | None:
    """The running container of the fine-tune step: kfp's command ends with ``--function_to_execute fine_tune``."""
    for cid in podman("ps", "-q", "--no-trunc").stdout.split():
        inspected = podman("inspect", "--format", "{{json .Args}}", cid)
        args = json.loads(inspected.stdout or "[]") if inspected.returncode == 0 else []
        if args[-2:] == ["--function_to_execute", "fine_tune"]:
            return cid
    return None


def test_a_killed_fine_tune_container_resumes_from_its_checkpoint_in_s3(
        runs: dict[str, Any], stores: Any, stores_env: dict, data: str, tlops_image: str) -> None:
    import boto3

    root, env = runs["root"], runs["env"]
    cfg = config(root, "digits-killed", f"{data}-state/killed")
    s3 = boto3.client("s3", endpoint_url=stores.s3_endpoint, aws_access_key_id=stores.aws_access_key_id,
                      aws_secret_access_key=stores.aws_secret_access_key, region_name="us-east-1")
    state_prefix = f"{PREFIX}-state/killed/checkpoints/"
    cmd = [sys.executable, "-m", "tlops", "run", "--config", str(cfg), "--data", data,
           *container_args(stores, tlops_image)]
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    proc = subprocess.Popen(cmd, cwd=root, env={**full, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    # First the fine-tune container, then its first checkpoint in S3, then SIGKILL at once: mid-epoch.
    container, killed = None, None
    deadline = time.monotonic() + 900
    while proc.poll() is None and killed is None:
        assert time.monotonic() < deadline, "no checkpoint appeared in S3"
        if container is None:
            container = fine_tune_container()
            time.sleep(0.5)
            continue
        found = s3.list_objects_v2(Bucket=stores.data_bucket, Prefix=state_prefix).get("Contents", [])
        if any(o["Key"].endswith("/last.pt") for o in found):
            assert podman("kill", "--signal", "KILL", container).returncode == 0
            killed = container
        time.sleep(0.05)
    out, err = proc.communicate(timeout=600)
    assert killed, "the fine-tune container was not seen running with a checkpoint in S3:\n" + out[-2000:]
    assert proc.returncode != 0 and "PROMOTE" not in out, out[-2000:] + err[-2000:]
    assert "Traceback" not in err and len([x for x in err.splitlines() if x.strip()]) == 1, err[-2000:]

    again = tlops(*cmd[3:], env=env, cwd=root)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    import mlflow

    mlflow.set_tracking_uri(stores.mlflow_url)
    resumed, local = record("digits-killed"), record("digits-local")
    run = mlflow.MlflowClient().get_run(resumed["tags"]["mlflow.run_id"])
    assert run.data.tags["train.resumed_at_step"] != "none"  # it picked up the killed run's checkpoint
    for key in ("test_accuracy", "test_macro_f1", "best_val_accuracy"):
        assert resumed["metrics"][key] == pytest.approx(local["metrics"][key], abs=1e-9), key
    assert resumed["evaluation"]["confusion_matrix"] == local["evaluation"]["confusion_matrix"]


def test_a_wrong_image_name_is_one_line(runs: dict[str, Any], stores: Any, data: str) -> None:
    root, env = runs["root"], runs["env"]
    cfg = config(root, "digits-noimage", f"{data}-state/noimage")
    result = tlops("run", "--config", str(cfg), "--data", data, "--image", "localhost/tlops:no-such-tag",
                   env=env, cwd=root, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --image localhost/tlops:no-such-tag: no such image")
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unreachable_tracking_server_is_one_line(runs: dict[str, Any], stores: Any, data: str,
                                                    tlops_image: str) -> None:
    root, env = runs["root"], runs["env"]
    cfg = config(root, "digits-notrack", f"{data}-state/notrack")
    args = container_args(stores, tlops_image)
    args[args.index(f"MLFLOW_TRACKING_URI={stores.cluster_env()['MLFLOW_TRACKING_URI']}")] = \
        "MLFLOW_TRACKING_URI=http://tlops-mlflow:5999"
    result = tlops("run", "--config", str(cfg), "--data", data, "--set", "tracking.retries=1",
                   "--set", "tracking.timeout_s=5", *args, env=env, cwd=root, timeout=900)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: validate: ") and "tlops-mlflow:5999" in lines[0], lines


def restart_s3(stores: Any, container: str) -> None:
    """The S3 endpoint back as the stores started it: moto keeps objects in memory, so the buckets are made again
    (their objects are gone) for the tests that come after."""
    import boto3

    podman("start", container)
    s3 = boto3.client("s3", endpoint_url=stores.s3_endpoint, aws_access_key_id=stores.aws_access_key_id,
                      aws_secret_access_key=stores.aws_secret_access_key, region_name="us-east-1")
    deadline = time.monotonic() + 60
    while True:
        try:
            present = {b["Name"] for b in s3.list_buckets()["Buckets"]}
            break
        except Exception:
            assert time.monotonic() < deadline, "the S3 endpoint did not come back"
            time.sleep(1)
    for bucket in {stores.artifact_bucket, stores.data_bucket} - present:
        s3.create_bucket(Bucket=bucket)


def test_s3_stopped_during_validate_is_one_line_and_registers_nothing(
        runs: dict[str, Any], stores: Any, data: str, tlops_image: str) -> None:
    """Last in this file: it stops the S3 endpoint, then starts it again with empty buckets."""
    import mlflow

    root, env = runs["root"], runs["env"]
    cfg = config(root, "digits-nos3", f"{data}-state/nos3")
    (pod,) = [p for p in stores.pods if p.startswith("tlops-minio-") and "buckets" not in p]
    listed = podman("ps", "--filter", f"pod={pod}", "--format", "{{.ID}} {{.Names}}").stdout
    (s3_container,) = [line.split()[0] for line in listed.splitlines() if not line.endswith("-infra")]
    cmd = [sys.executable, "-m", "tlops", "run", "--config", str(cfg), "--data", data,
           "--set", "tracking.retries=1", *container_args(stores, tlops_image)]
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    proc = subprocess.Popen(cmd, cwd=root, env={**full, **env, "TLOPS_S3_MAX_ATTEMPTS": "2",
                                                "TLOPS_S3_CONNECT_TIMEOUT": "3"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    stopped = False
    try:
        for line in proc.stdout:
            if "Executing task 'validate'" in line:
                stopped = podman("stop", "--time", "1", s3_container).returncode == 0
                break
        out, err = proc.communicate(timeout=900)
    finally:
        restart_s3(stores, s3_container)
    assert stopped
    assert proc.returncode == 2, out[-2000:] + err[-2000:]
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: validate: s3://"), lines
    assert "cannot reach the S3 endpoint" in lines[0]
    mlflow.set_tracking_uri(stores.mlflow_url)
    assert not mlflow.MlflowClient().search_model_versions("name = 'digits-nos3'")
