"""The command line itself: version, help with the closed sets, shell completion, mistyped config keys."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tlops import __version__
from tlops.cli import BACKBONES, STRATEGIES, app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"tlops {__version__}\n"


def test_backbone_choices_are_the_catalogue() -> None:
    from tlops.vision.backbones import CATALOGUE

    assert tuple(sorted(CATALOGUE)) == BACKBONES


@pytest.mark.parametrize(("command", "shown"), [
    (["run"], ["[linear-probe|partial|full|gradual|scratch|adabn|self-training|mcc|auto]",
               "[efficientnet_lite0|resnet18|resnet50|auto|checkpoint:DIR]", "--fail-on-reject"]),
    (["history"], ["[table|json]"]), (["audit"], ["[table|json]"]), (["parity"], ["[table|json]"]),
    (["select"], ["[table|json]", "among efficientnet_lite0, resnet18, resnet50 and checkpoint:DIR"]),
])
def test_help_shows_every_closed_set(command: list[str], shown: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0
    flat = " ".join(result.output.split())
    for text in shown:
        assert text in flat, text
    assert set(STRATEGIES) == {"linear-probe", "partial", "full", "gradual", "scratch", "adabn", "self-training",
                               "mcc", "auto"}


def _complete(words: str) -> list[str]:
    """What bash completion offers for ``words`` (typer's own completion, as the installed script runs it)."""
    env = {**os.environ, "_TLOPS_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
           "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    code = "import sys; from tlops.cli import app; sys.exit(app(prog_name='tlops'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return out.stdout.split()


def test_shell_completion_offers_the_choices() -> None:
    assert _complete("tlops run --strategy gr") == ["gradual"]
    assert set(_complete("tlops history NAME --format ")) == {"table", "json"}
    assert "resnet18" in _complete("tlops run --backbone res")


@pytest.mark.parametrize(("setting", "said"), [
    ("train.epoch=3", "config: field train.epoch: no such field; did you mean 'train.epochs'?"),
    ("trian.epochs=3", "config: field trian: no such field; did you mean 'train'"),
    ("gate.min_acuracy=0.5", "did you mean 'gate.min_accuracy'?"),
    ("cluster.steps.fine-tune.cpu_limt=2", "did you mean 'cluster.steps.fine-tune.cpu_limit'?"),
    ("zzz=1", "no such field; fields of the config: workdir, state_uri, backbone, data,"),
])
def test_a_mistyped_set_key_gets_the_closest_names(setting: str, said: str) -> None:
    from tlops.config.settings import load_config
    from tlops.errors import TlopsError

    with pytest.raises(TlopsError) as err:
        load_config(None, [setting])
    assert said in str(err.value) and "\n" not in str(err.value)


def test_a_mistyped_set_key_is_one_line_from_the_command(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "tlops", "compile", "-o", str(tmp_path / "p.yaml"), "--set",
                             "train.stratgy=full"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == ("error: config: field train.stratgy: no such field; did you mean 'train.strategy'?\n")


QUICK = """
import atexit, sys
from tlops import cli

atexit.register(lambda: print(" teardown", end=""))  # only a full exit reaches it


@cli.app.command("probe-exit")
def probe_exit(code: int = 0, quick: bool = True) -> None:
    print("summary", end="")  # unflushed: the quick exit must still deliver it
    cli.QUICK_EXIT = quick
    if code:
        raise SystemExit(code)


sys.argv = ["tlops", "probe-exit", *sys.argv[1:]]
cli.entry()
"""


@pytest.mark.parametrize(("args", "out", "status"), [
    ([], "summary", 0),  # a command that asked for it: no teardown, its output and status intact
    (["--no-quick"], "summary teardown", 0),  # one that did not: the full exit
    (["--code", "3"], "summary teardown", 3),  # a failure: the full exit, its status
])
def test_a_command_that_holds_nothing_ends_without_the_teardown(args: list[str], out: str, status: int) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    proc = subprocess.run([sys.executable, "-c", QUICK, *args], env=env, capture_output=True, text=True, timeout=60)
    assert (proc.stdout, proc.returncode) == (out, status), proc.stderr
