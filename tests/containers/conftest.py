"""Session fixtures for tests that run the project image and the stores in real containers (podman).

Run them with `make test-containers` (it sets podman up, builds the base and project images, then runs
`pytest -m containers tests/containers`). Every test here is marked `containers`, which `make test` leaves out.
Each fixture skips, with infra/containers/setup-podman.sh's reason, where this machine cannot run containers
(not root, no apt-get to install podman, a runtime that refuses to start one).

Fixtures (all session-scoped except where noted):

``podman_ready`` -> str
    podman's version, after infra/containers/setup-podman.sh said the engine works here.
``tlops_image`` -> str
    The project image reference (TLOPS_IMAGE, default localhost/tlops:0.1.0), built by
    infra/containers/build-image.sh. Skips, saying how to build it, when it is missing.
``stores`` -> Stores
    PostgreSQL, S3 (moto) and the MLflow tracking server, up (infra/containers/stores.py) for the session and
    removed after it with their volumes (TLOPS_KEEP_STORES=1 keeps them). A set of the session's own (instance
    ``test<pid>``, or TLOPS_STORES_INSTANCE): pods ``tlops-mlflow-<instance>-pod-0`` etc. on the podman network
    ``tlops-<instance>``, host ports the overlay's (15000, 19000, 15432) or free ones when those are taken, so
    it runs beside stores someone started by hand. See ``Stores`` in stores.py:
    ``mlflow_url``/``s3_endpoint`` (http://127.0.0.1:<port>), ``postgres_host``/``postgres_port``/
    ``postgres_user``/``postgres_password``/``postgres_db``/``postgres_uri``, ``aws_access_key_id``/
    ``aws_secret_access_key``, ``artifact_bucket``/``artifacts_destination``, ``data_bucket``/``data_uri``,
    ``network`` (the podman network), ``cluster_mlflow_url``/``cluster_s3_endpoint`` (Service names),
    ``hosts`` and ``add_host_args()`` (the Service names' addresses), ``host_env()`` (a client on this
    machine) and ``cluster_env()`` (a container on the network).
``stores_env`` (function scope) -> dict[str, str]
    ``stores.host_env()`` applied to os.environ for the test (monkeypatch), MLflow's and boto3's clients then
    talk to the stores.
``run_in_image`` -> Callable[..., CompletedProcess[str]]
    ``run_in_image(*command, env=None, network=True, read_only=True, volumes=(), timeout=300, user=None)``:
    `podman run --rm` of the project image with the command; ``network=True`` puts it on the stores' network
    with their Service names resolvable and ``stores.cluster_env()`` set (the stores come up on first use).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CONTAINERS = REPO / "infra" / "containers"
SETUP_PODMAN = CONTAINERS / "setup-podman.sh"
SKIP_CODE = 3
DEFAULT_IMAGE = "localhost/tlops:0.1.0"


def load_stores_module() -> ModuleType:
    """infra/containers/stores.py, imported from its path (infra/ is not a package)."""
    name = "tlops_infra_stores"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, CONTAINERS / "stores.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


stores_module = load_stores_module()
Stores = stores_module.Stores


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def podman_ready() -> str:
    if shutil.which("bash") is None:
        pytest.skip("no bash to run infra/containers/setup-podman.sh")
    proc = subprocess.run(["bash", str(SETUP_PODMAN)], capture_output=True, text=True, timeout=1800)
    if proc.returncode == SKIP_CODE:
        reason = [line for line in proc.stderr.splitlines() if "SKIP" in line] or [proc.stderr.strip()]
        pytest.skip(f"containers cannot run here: {reason[-1]}")
    if proc.returncode != 0:
        pytest.fail(f"infra/containers/setup-podman.sh failed ({proc.returncode}):\n{proc.stderr}")
    return podman("--version").stdout.split()[-1]


@pytest.fixture(scope="session")
def tlops_image(podman_ready: str) -> str:
    image = os.environ.get("TLOPS_IMAGE", DEFAULT_IMAGE)
    if podman("image", "exists", image).returncode != 0:
        pytest.skip(f"the project image {image} is not built: `make test-containers` builds it "
                    "(or infra/containers/base-image.sh && infra/containers/build-image.sh)")
    return image


@pytest.fixture(scope="session")
def stores(tlops_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    state_dir = Path(os.environ.get("TLOPS_STORES_DIR") or tmp_path_factory.mktemp("stores"))
    # A set of its own, beside any stores someone started on this machine (`stores.py up`), never touching them.
    instance = os.environ.get("TLOPS_STORES_INSTANCE") or f"test{os.getpid()}"
    try:
        running = stores_module.up(image=tlops_image, state_dir=state_dir, timeout=300, instance=instance)
    except stores_module.StoresUnavailable as exc:
        pytest.skip(f"the stores cannot run here: {exc}")
    except Exception:
        stores_module.down(state_dir, volumes=True)
        raise
    yield running
    if os.environ.get("TLOPS_KEEP_STORES") != "1":
        stores_module.down(state_dir, volumes=True)


@pytest.fixture
def stores_env(stores: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = stores.host_env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture(scope="session")
def run_in_image(tlops_image: str, request: pytest.FixtureRequest) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*command: str, env: dict[str, str] | None = None, network: bool = True, read_only: bool = True,
            volumes: Sequence[str] = (), timeout: float = 300, user: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        args = ["run", "--rm", "--pull=never"]
        if read_only:
            args.append("--read-only")  # podman then mounts a tmpfs on /tmp, as the pods' emptyDir
        if user:
            args += ["--user", user]
        variables: dict[str, str] = {}
        if network:
            running = request.getfixturevalue("stores")
            args += ["--network", running.network, *running.add_host_args()]
            variables.update(running.cluster_env())
        else:
            args += ["--network", "none"]
        variables.update(env or {})
        for key, value in variables.items():
            args += ["--env", f"{key}={value}"]
        for volume in volumes:
            args += ["--volume", volume]
        return podman(*args, tlops_image, *command, timeout=timeout)

    return run
