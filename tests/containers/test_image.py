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
