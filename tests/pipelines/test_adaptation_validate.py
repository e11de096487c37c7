"""Target data through the validate step (and the gate's source check): the target manifest as a declared output,
leakage between source, target-train and target-test caught, and the bad inputs said in one line, exit 2, with
nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_config
from tlops.config.settings import GateConfig, load_config
from tlops.data.fontdigits import export_font_digits
from tlops.errors import GateFailed, TlopsError


@pytest.fixture(scope="module")
def fonts(font_targets: dict[str, Path]) -> dict[str, Path]:
    return font_targets


def _validate(tmp_path: Path, tiny_digits: Path, **data: object):
    from tlops.steps import validate_step

    overrides = {f"data__{k}": str(v) for k, v in data.items()}
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / ".tlops",
                                   tracking__uri=f"sqlite:///{tmp_path / 'mlflow.db'}", **overrides))
    out = tmp_path / "out"
    decision = validate_step(str(tiny_digits), cfg.to_json(), str(out / "manifest.csv"), str(out / "report.json"),
                             plan_path=str(out / "plan.json"), target_manifest_path=str(out / "target.csv"))
    return decision, out


def test_the_target_manifest_is_a_declared_output_checked_with_the_source(tmp_path, tiny_digits, fonts) -> None:
    from tlops.config.plan import RunPlan
    from tlops.data.target import read_target_manifest
    from tlops.fileio import read_json

    decision, out = _validate(tmp_path, tiny_digits, target_uri=fonts["unlabelled"],
                              target_labelled_uri=fonts["labelled"])
    assert decision == "train"
    target = read_target_manifest(out / "target.csv")
    assert target["path"].isna().all()  # by URI only, as the source manifest
    assert (target["domain"] == "target").sum() == 24 and (target["domain"] == "target-labelled").sum() == 30
    checks = {c["name"]: c["status"] for c in read_json(out / "report.json")["checks"]}
    assert checks["target_decodable"] == checks["domain_overlap"] == checks["domain_leakage"] == "PASS"
    assert RunPlan.read(out / "plan.json").config.data.target_uri == str(fonts["unlabelled"])


def test_without_target_data_the_output_is_the_header_alone(tmp_path, tiny_digits) -> None:
    from tlops.data.target import read_target_manifest

    _, out = _validate(tmp_path, tiny_digits)
    assert read_target_manifest(out / "target.csv").empty


@pytest.mark.parametrize("where", ["source", "target-test"])
def test_the_same_image_in_two_domains_fails_validation(tmp_path, tiny_digits, fonts, where) -> None:
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(fonts["unlabelled"], unlabelled)
    if where == "source":  # a source scan among the target images
        shutil.copy(next((tiny_digits / "7").glob("*.png")), unlabelled / "7" / "leak.png")
    else:  # every labelled target image among the unlabelled ones: the target test split leaks into adaptation
        for png in fonts["labelled"].rglob("*.png"):
            shutil.copy(png, unlabelled / png.parent.name / f"leak_{png.name}")
    with pytest.raises(GateFailed, match=r"domain_overlap: .*leak.*\(target-train\)"):
        _validate(tmp_path, tiny_digits, target_uri=unlabelled, target_labelled_uri=fonts["labelled"])


def _one_line(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_target_inputs_are_one_line_exit_2_nothing_written(tmp_path, tiny_digits, fonts) -> None:
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(TlopsError) as err:
        _validate(tmp_path / "1", tiny_digits, target_uri=empty)
    assert err.value.exit_code == 2 and "data.target_uri" in str(err.value) and "no images" in str(err.value)
    assert not (tmp_path / "1" / "out").exists()  # nothing half written
    strangers = tmp_path / "strangers"
    export_font_digits(strangers, per_class=8, classes=[2, 3], seed=5)
    with pytest.raises(TlopsError) as err:
        _validate(tmp_path / "2", tiny_digits, target_uri=fonts["unlabelled"], target_labelled_uri=strangers)
    assert err.value.exit_code == 2 and "2, 3" in str(err.value) and "source's classes" in str(err.value)
    assert not (tmp_path / "2" / "out").exists()


@pytest.mark.slow  # two launches (about 25 s); each bad input is also checked in-process above
def test_tlops_run_says_each_bad_target_input_in_one_line(tmp_path, tiny_digits, fonts) -> None:
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    cfg = write_config(tmp_path / "c.yaml", tmp_path / ".tlops")
    line = _one_line(run_cli("run", "--config", str(cfg), "--data", str(tiny_digits), "--strategy", "adabn",
                             cwd=tmp_path))
    assert "train.strategy adabn" in line and "data.target_uri" in line
    line = _one_line(run_cli("run", "--config", str(cfg), "--data", str(tiny_digits), "--strategy", "adabn",
                             "--set", f"data.target_uri={empty}", cwd=tmp_path))
    assert "data.target_uri" in line and "no images" in line


def test_the_gate_refuses_a_candidate_losing_too_much_on_the_source() -> None:
    from tlops.registry import decide

    cand = {"accuracy": 0.80, "n": 30, "min_class_recall": 0.5, "latency": {}, "model_size_bytes": 1}
    gate = GateConfig(min_accuracy=0.5, max_source_regression=0.02)
    base = {"validation_ok": True, "parity_ok": True}
    # no champion: against the source-only model
    lost = {"target": {"candidate": {"accuracy": 0.8}}, "source": {"candidate": {"accuracy": 0.90},
                                                                   "source_only": {"accuracy": 0.95}}}
    d = decide(cand, None, gate, domains=lost, **base)
    assert d.decision == "reject"
    assert any("source test accuracy 0.9000 loses 0.0500 against the source-only model's 0.9500, more than "
               "gate.max_source_regression 0.0200" in r for r in d.reasons), d.reasons
    kept = {**lost, "source": {**lost["source"], "candidate": {"accuracy": 0.94}}}
    assert decide(cand, None, gate, domains=kept, **base).decision == "promote"
    # with a champion: against the champion's source accuracy, whatever the source-only model did
    champ = {"accuracy": 0.7, "version": "3"}
    vs = {**lost, "source": {**lost["source"], "champion": {"accuracy": 0.99, "version": "3"}}}
    d = decide(cand, champ, gate, domains=vs, **base)
    assert d.decision == "reject" and any("against champion version 3's 0.9900" in r for r in d.reasons)


def test_tlops_validate_checks_the_target_data_too(tmp_path, tiny_digits, fonts, capsys) -> None:
    from tlops.cli import main

    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(fonts["unlabelled"], unlabelled)
    shutil.copy(next((tiny_digits / "1").glob("*.png")), unlabelled / "1" / "leak.png")
    args = ["validate", "--data", str(tiny_digits), "--set", f"workdir={tmp_path / '.tlops'}",
            "--set", f"data.target_uri={unlabelled}", "--output", str(tmp_path / "out")]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "FAIL domain_overlap" in out and "leak.png (target-train)" in out
    assert (tmp_path / "out" / "target_manifest.csv").is_file()
