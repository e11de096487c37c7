"""The project image as built here (infra/containers/build-image.sh): it runs as uid 10001 with a read-only root
filesystem, carries the pinned torch, and keeps nothing of the build's package sources."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable

import pytest

pytestmark = pytest.mark.containers

Run = Callable[..., subprocess.CompletedProcess[str]]


def test_image_runs_tlops_help_as_uid_10001_read_only(run_in_image: Run) -> None:
    proc = run_in_image("sh", "-c", "id -u; id -g; pwd; tlops --help; touch /home/tlops/x || echo read-only",
                        network=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    uid, gid, cwd, *rest = proc.stdout.splitlines()
    assert (uid, gid, cwd) == ("10001", "10001", "/home/tlops")
    text = "\n".join(rest)
    assert "Usage: tlops" in text and "run" in text
    assert text.rstrip().endswith("read-only"), "the root filesystem must be read-only"


def test_default_command_is_tlops_help(tlops_image: str) -> None:
    proc = subprocess.run(["podman", "run", "--rm", "--pull=never", "--read-only", "--network=none", tlops_image],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: tlops" in proc.stdout


def test_state_goes_to_a_named_volume_and_tmp(run_in_image: Run) -> None:
    """Read-only root: the tlops workdir (.tlops, relative to /home/tlops) on a named volume, which takes the
    image directory's owner, so uid 10001 can write there; caches and matplotlib's config go under /tmp."""
    volume = f"tlops-test-{uuid.uuid4().hex[:8]}"
    try:
        proc = run_in_image(
            "python", "-c",
            "import os, pathlib, matplotlib.pyplot as plt, torch, torchvision;"
            "p = pathlib.Path('.tlops/probe.txt'); p.write_text('ok');"
            "plt.plot([0, 1]); plt.savefig('.tlops/plot.png');"
            "print(torch.__version__, torchvision.__version__, os.environ['MPLCONFIGDIR'], os.environ['HOME'])",
            network=False, volumes=[f"{volume}:/home/tlops/.tlops"], timeout=180)
        assert proc.returncode == 0, proc.stderr
        torch_version, vision_version, mpl_dir, home = proc.stdout.split()
        assert torch_version.split("+")[0] == "2.14.1" and vision_version.split("+")[0] == "0.29.1"
        assert mpl_dir.startswith("/tmp/") and home == "/home/tlops"
    finally:
        subprocess.run(["podman", "volume", "rm", "-f", volume], capture_output=True, timeout=60)


def test_build_time_package_sources_stay_out_of_the_image(run_in_image: Run, tlops_image: str) -> None:
    """The build's pip settings (a pip.conf secret), its served package directories and its CA secret leave
    nothing behind: no PIP_* index settings, no pip.conf, no mount points, only the virtual environment in /opt."""
    proc = run_in_image("sh", "-c", "env | grep '^PIP_' | sort; echo /opt: $(ls -A /opt);"
                        "echo /run: $(ls -A /run); echo /run/secrets: $(ls -A /run/secrets 2>/dev/null);"
                        "echo /etc/pip.conf: $(ls /etc/pip.conf 2>/dev/null)",
                        network=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split("=")[0] for line in lines if "=" in line] == ["PIP_DISABLE_PIP_VERSION_CHECK",
                                                                    "PIP_NO_CACHE_DIR"]
    listing = {line.split(":")[0]: line.split(":", 1)[1].split() for line in lines if line.startswith("/")}
    assert listing["/opt"] == ["tlops"], listing
    assert "pip-ca.crt" not in listing["/run"] and listing["/run/secrets"] == [], listing
    assert listing["/etc/pip.conf"] == [], "the build's pip.conf (a secret) stays out of the image"
    user = subprocess.run(["podman", "image", "inspect", "--format", "{{.Config.User}}", tlops_image],
                          capture_output=True, text=True, timeout=60).stdout.strip()
    assert user == "10001:10001"


# Every module the steps' start-up imports, and how to tell whether its bytecode in the image is the one Python
# would use: a timestamp-based .pyc whose header names the source's mtime and size (what importlib checks).
_BYTECODE_CHECK = r"""
import importlib, importlib.util, os, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
missing, checked = [], 0
for module in list(sys.modules.values()):
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None) or ""
    if not (spec is not None and spec.has_location and origin.endswith(".py")):
        continue
    checked += 1
    try:
        with open(importlib.util.cache_from_source(origin), "rb") as fh:
            header = fh.read(16)
    except OSError:
        missing.append(origin)
        continue
    st = os.stat(origin)
    flags = int.from_bytes(header[4:8], "little")
    if flags == 0 and (int.from_bytes(header[8:12], "little") != int(st.st_mtime) & 0xFFFFFFFF
                       or int.from_bytes(header[12:16], "little") != st.st_size & 0xFFFFFFFF):
        missing.append(origin + " (stale)")
print(checked)
print("\n".join(missing))
"""


def test_every_module_a_step_starts_with_has_its_bytecode_in_the_image(run_in_image: Run) -> None:
    """The steps run read-only as uid 10001 (PYTHONDONTWRITEBYTECODE=1): a module whose compiled bytecode the image
    does not carry, or carries stale, is compiled again at every start of every step. The Dockerfile compiles the
    interpreter's standard library, components/ and pipelines/ at build time (pip compiles site-packages); an image
    built without that has none for the standard library (json, logging, asyncio, email, unittest, ...)."""
    steps = ["kfp.dsl.executor_main", "mlflow", "tlops.steps", "tlops.data.validation", "tlops.evaluation.report",
             "tlops.registry", "tlops.serving.compress.step", "tlops.vision.parity", "tlops.training.finetune"]
    launch = ["tlops.cli", "components.steps", "pipelines.transfer_learning"]  # `tlops run`/`submit` in the image
    for modules, env in ((steps, {"_KFP_RUNTIME": "true"}), (launch, {})):  # the steps' command sets _KFP_RUNTIME
        proc = run_in_image("python", "-c", _BYTECODE_CHECK, *modules, env=env, network=False, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        checked, *missing = proc.stdout.strip().splitlines()
        assert int(checked) > 1000, "the check must have seen the steps' imports"
        assert missing == [], f"{len(missing)} of {checked} modules without up-to-date bytecode, e.g. {missing[:8]}"
