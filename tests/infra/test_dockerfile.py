"""The project image: hadolint, the user, the base, where and in which order packages are installed, no
secrets, the build context, the ports the manifests use."""

from __future__ import annotations

from pathlib import Path

from tests.infra.conftest import (
    DOCKERFILE,
    REPO,
    SECRET_NAME,
    Objects,
    base_images,
    containers,
    dockerfile_instructions,
    env_and_arg_names,
    env_assignments,
    pip_installs,
    run_hadolint,
    substitute,
    venvs_created,
)

TORCH_PIN = "torch==2.14.1"
TORCHVISION_PIN = "torchvision==0.29.1"
BASE = "python:3.11-slim"


def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


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
    users = [rest for keyword, rest in instructions() if keyword == "USER"]
    assert users, "the image must switch to an unprivileged USER"
    user = users[-1].split(":", 1)[0]
    assert user not in {"root", "0"}, f"the final USER is {users[-1]!r}"
    assert user == "10001"


def test_dockerfile_builds_from_python_3_11_slim() -> None:
    """The base is python:3.11-slim, written out or as the default of a build argument (FROM ${BASE_IMAGE});
    a stage built on an earlier stage (FROM runtime AS serve) has that one's base."""
    found = instructions()
    assert found[0][0] in {"FROM", "ARG"}
    stages = {rest.split()[-1].lower() for keyword, rest in found if keyword == "FROM" and " as " in rest.lower()}
    images = [image for image in base_images(found) if image.lower() not in stages]
    assert images and all(i.removeprefix("docker.io/library/").startswith(BASE) for i in images), images


def test_base_image_resolution_follows_build_arguments() -> None:
    """The check above reads build arguments the way Docker does, so it can fail on another default."""
    text = "ARG BASE_IMAGE=python:3.12-slim\nFROM ${BASE_IMAGE}\nARG LATE=x\n"
    assert base_images(dockerfile_instructions(text)) == ["python:3.12-slim"]
    assert base_images(dockerfile_instructions("ARG B\nFROM ${B:-python:3.11-slim} AS app\n")) == [
        "python:3.11-slim"]
    assert substitute("$A/${B}/${C:-c}", {"A": "a", "B": "b"}) == "a/b/c"


def installs_in_order() -> list[tuple[int, str, list[str], dict[str, str]]]:
    """(position, the pip or python, its arguments, the ENV in effect) for every pip install, in order."""
    env: dict[str, str] = {}
    found = []
    for position, (keyword, rest) in enumerate(instructions()):
        if keyword == "ENV":
            env.update({k: substitute(v, env) for k, v in env_assignments(rest).items()})
        elif keyword == "RUN":
            found += [(position, runner, args, dict(env)) for runner, args in pip_installs(rest)]
    return found


def test_dockerfile_installs_pinned_torch_then_the_lock_then_the_project() -> None:
    torch_at = lock_at = project_at = None
    for position, _, args, _ in installs_in_order():
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


def environment_of(runner: str, env: dict[str, str], venvs: list[str]) -> str:
    """The Python environment a pip (or python) command installs into: the venv whose bin/ holds it, either
    by its path or as the first PATH entry (when it is called by name), else the system's."""
    if "/" in runner:
        directory = runner.rsplit("/", 1)[0]
    else:
        path = env.get("PATH", "").split(":")
        directory = path[0] if path else ""
    for venv in venvs:
        if directory == f"{venv}/bin":
            return venv
    return "system"


def test_every_install_goes_into_one_environment_the_runtime_uses() -> None:
    """All three installs land in the same Python environment; when the image creates a virtual environment,
    that one, created before the first install and first on the final PATH (so `tlops` in CMD is its)."""
    found = instructions()
    venvs = [(position, v) for position, (keyword, rest) in enumerate(found) if keyword == "RUN"
             for v in venvs_created(rest)]
    names = [v for _, v in venvs]
    installs = installs_in_order()
    targets = {environment_of(runner, env, names) for _, runner, _, env in installs}
    assert len(targets) == 1, f"the installs go into different environments: {sorted(targets)}"
    (target,) = targets
    if venvs:
        assert target in names, f"a virtual environment is created ({names}) but pip installs into {target}"
        assert min(p for p, v in venvs if v == target) < installs[0][0], "the venv exists before the first install"
        final_env: dict[str, str] = {}
        for keyword, rest in found:
            if keyword == "ENV":
                final_env.update({k: substitute(v, final_env) for k, v in env_assignments(rest).items()})
        assert final_env.get("PATH", "").split(":")[0] == f"{target}/bin", "the venv's bin/ leads PATH at run time"


def test_install_environment_check_can_fail() -> None:
    venvs = ["/opt/tlops"]
    assert environment_of("pip", {"PATH": "/opt/tlops/bin:/usr/bin"}, venvs) == "/opt/tlops"
    assert environment_of("/opt/tlops/bin/python", {}, venvs) == "/opt/tlops"
    assert environment_of("pip", {"PATH": "/usr/local/bin:/opt/tlops/bin"}, venvs) == "system"
    assert environment_of("pip", {}, venvs) == "system"
    assert venvs_created("groupadd x && python3 -m venv /opt/tlops/ && true") == ["/opt/tlops"]
    assert pip_installs("/opt/v/bin/python -m pip install --no-deps . && pip3 install -r requirements.lock") == [
        ("/opt/v/bin/python", ["--no-deps", "."]), ("pip3", ["-r", "requirements.lock"])]


def test_dockerfile_declares_no_secrets() -> None:
    names = env_and_arg_names(instructions())
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


def test_dockerfile_exposes_the_ports_the_manifests_use(local_objects: Objects) -> None:
    exposed = {int(p.split("/")[0]) for k, rest in instructions() if k == "EXPOSE" for p in rest.split()}
    used = {port["containerPort"] for k in [("Deployment", "tlops-mlflow"), ("InferenceService", "tlops-champion")]
            for c in containers(local_objects[k]) for port in c["ports"]}
    assert used == {5000, 8080} and used <= exposed
