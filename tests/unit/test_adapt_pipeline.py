"""Domain adaptation as a pipeline strategy on tiny real data (digits scans as the source, digits from the
machine's fonts as the target, three classes, 32 px): the config, the target manifest and its checks, each
strategy through fine_tune with its checkpoint and resume, the gate's source-regression check."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from tlops.config.settings import Config, TrainConfig, load_config
from tlops.data.discovery import build_manifest, class_names
from tlops.data.target import LABELLED, TARGET, adaptation_pool, build_target_manifest, labelled_split
from tlops.errors import TlopsError
from tlops.training.finetune import fine_tune
from tlops.vision.backbones import reference_spec
from tlops.vision.preprocessing import PreprocessSpec, with_resolution

BACKBONE = "efficientnet_lite0"
STATS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def target_dirs(font_targets: dict[str, Path]) -> dict[str, Path]:
    return font_targets


@pytest.fixture(scope="module")
def source(tiny_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return build_manifest(str(tiny_digits), tmp_path_factory.mktemp("cache"))


def config(tmp: Path, tiny_digits: Path, target_dirs: dict[str, Path], **train: object) -> Config:
    return Config.model_validate({
        "workdir": str(tmp / ".tlops"),
        "data": {"uri": str(tiny_digits), "target_uri": str(target_dirs["unlabelled"]),
                 "target_labelled_uri": str(target_dirs["labelled"])},
        "train": {"strategy": "adabn", "epochs": 1, "batch_size": 16, "num_threads": 2, "patience": None,
                  "warmup_epochs": 0.0, "head_init": "random", **train}})


@pytest.fixture(scope="module")
def target(tiny_digits: Path, target_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    tmp = tmp_path_factory.mktemp("t")
    return build_target_manifest(config(tmp, tiny_digits, target_dirs), tmp / "cache")


@pytest.fixture(scope="module")
def spec() -> PreprocessSpec:
    return with_resolution(reference_spec(BACKBONE), 32)


def run(source: pd.DataFrame, target: pd.DataFrame, spec: PreprocessSpec, tmp: Path, **train: object):
    cfg = TrainConfig(**{"epochs": 1, "batch_size": 16, "num_threads": 2, "patience": None, "warmup_epochs": 0.0,
                         "head_init": "random", **train})
    pool = adaptation_pool(target).assign(path=lambda d: d["uri"])
    val = labelled_split(target, "val").assign(path=lambda d: d["uri"])
    test_sha = list(labelled_split(target, "test")["sha256"])
    return fine_tune(BACKBONE, source, class_names(source), spec, cfg, workdir=tmp, target=pool, target_val=val,
                     target_test_sha256=test_sha)


def test_target_manifest_has_both_sets_labels_of_unlabelled_dropped(target: pd.DataFrame) -> None:
    unl = target[target["domain"] == TARGET]
    lab = target[target["domain"] == LABELLED]
    assert len(unl) == 24 and unl["label"].isna().all() and set(unl["split"]) == {"train"}
    assert len(lab) == 30 and set(lab["label"]) == {"0", "1", "7"} and {"train", "test"} <= set(lab["split"])
    pool = adaptation_pool(target)
    assert not set(pool["sha256"]) & set(labelled_split(target, "test")["sha256"])


def test_adabn_through_fine_tune_changes_only_batchnorm_statistics(source, target, spec, tmp_path) -> None:
    result = run(source, target, spec, tmp_path, strategy="adabn", adaptation={"base": "linear-probe"})
    before, after = result.source_only, result.model.state_dict()
    assert before is not None and before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "AdaBN changed nothing"
    assert all(k.endswith(STATS) for k in changed), sorted(k for k in changed if not k.endswith(STATS))[:5]
    assert result.strategy == "adabn" and result.environment["adaptation_base"] == "linear-probe"
    assert "target_val_accuracy" in result.history[-1]


QUICK = {"adaptation": {"base": "linear-probe", "epochs": 1, "rounds": 2, "threshold": 0.05}}


@pytest.mark.parametrize("strategy", ["self-training", "mcc"])
def test_strategy_through_fine_tune_trains_and_records_each_unit(strategy, source, target, spec, tmp_path) -> None:
    result = run(source, target, spec, tmp_path, strategy=strategy, **QUICK)
    rows = [h for h in result.history if "adapt_unit" in h]
    assert len(rows) == (2 if strategy == "self-training" else 1)
    assert all("target_val_accuracy" in h and h["adapt_loss"] == h["adapt_loss"] for h in rows)
    changed = {k for k, v in result.model.state_dict().items() if not torch.equal(v, result.source_only[k])}
    assert any(not k.endswith(STATS) for k in changed), "no weight was trained"
    assert (Path(result.checkpoint_dir) / "adapt.pt").is_file()
    again = run(source, target, spec, tmp_path, strategy=strategy, **QUICK)  # a rerun: every unit from adapt.pt
    assert result.resumed_at_step is None and again.resumed_at_step == len(rows)
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in result.model.state_dict().items())


@pytest.mark.slow  # about 45 s under load; a finished run's rerun resuming is checked above
def test_self_training_killed_after_a_round_resumes_at_the_next(source, target, spec, tmp_path, monkeypatch) -> None:
    import tlops.training.adapt_run as adapt_run

    real, calls = adapt_run.self_train, []

    def crash_in_round_two(*args: object, **kwargs: object):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(adapt_run, "self_train", crash_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        run(source, target, spec, tmp_path, strategy="self-training", **QUICK)
    monkeypatch.setattr(adapt_run, "self_train", real)
    again = run(source, target, spec, tmp_path, strategy="self-training", **QUICK)
    assert again.resumed_at_step == 1  # round 1 came from the checkpoint, round 2 ran now
    assert [h["adapt_unit"] for h in again.history if "adapt_unit" in h] == [1.0, 2.0]


def test_the_adaptation_checkpoint_key_follows_settings_and_target_pool(target) -> None:
    from tlops.training.adapt_run import adapt_key

    pool, val = adaptation_pool(target), labelled_split(target, "val")
    cfg = TrainConfig(strategy="self-training", **QUICK)
    key = adapt_key("k", pool, val, cfg)
    assert key == adapt_key("k", pool, val, cfg)
    assert key != adapt_key("k", pool.iloc[1:], val, cfg)
    assert key != adapt_key("k", pool, val, cfg.model_copy(update={"adaptation": cfg.adaptation.model_copy(
        update={"rounds": 3})}))
    assert key != adapt_key("other source model", pool, val, cfg)


def test_pseudo_labels_never_include_target_test_images(source, target, spec, tmp_path) -> None:
    # The unlabelled target holds copies of every target test image: none may reach the pool or a pseudo-label.
    test = labelled_split(target, "test")
    leaky = pd.concat([target, test.assign(domain=TARGET, label=None, split="train")], ignore_index=True)
    pool = adaptation_pool(leaky)
    assert not set(pool["sha256"]) & set(test["sha256"])
    result = run(source, leaky, spec, tmp_path, strategy="self-training",
                 adaptation={**QUICK["adaptation"], "rounds": 1})
    pseudo = set(result.environment["pseudo_labelled_sha256"])
    assert pseudo, "threshold 0.05: some target images are pseudo-labelled"
    assert pseudo <= set(pool["sha256"]) and not pseudo & set(test["sha256"])


def test_a_pool_with_a_target_test_image_is_refused(source, target, spec, tmp_path) -> None:
    cfg = TrainConfig(strategy="self-training", epochs=1, batch_size=16, head_init="random", **QUICK)
    test = labelled_split(target, "test").assign(path=lambda d: d["uri"])
    pool = pd.concat([adaptation_pool(target).assign(path=lambda d: d["uri"]), test.head(1)], ignore_index=True)
    with pytest.raises(TlopsError, match="target test"):
        fine_tune(BACKBONE, source, class_names(source), spec, cfg, workdir=tmp_path, target=pool,
                  target_test_sha256=list(test["sha256"]))


@pytest.mark.parametrize("strategy", ["adabn", "self-training", "mcc"])
def test_a_strategy_that_needs_target_data_without_it_is_one_config_line(strategy, tmp_path) -> None:
    with pytest.raises(TlopsError) as err:
        load_config(None, [f"train.strategy={strategy}"])
    message = str(err.value)
    assert err.value.exit_code == 2 and "\n" not in message
    assert message.startswith(f"config: train.strategy {strategy} adapts") and "data.target_uri" in message
    assert load_config(None, [f"train.strategy={strategy}", "data.target_uri=/x"]).train.strategy == strategy


def test_adaptation_settings_stay_out_of_other_strategies_checkpoint_keys() -> None:
    plain = TrainConfig(strategy="full")
    other = TrainConfig(strategy="full", adaptation={"rounds": 7})
    assert plain.result_fields() == other.result_fields()
    assert "adaptation" not in plain.result_fields()
    assert TrainConfig(strategy="mcc").result_fields()["adaptation"]["rounds"] == 3


def test_the_report_and_the_summary_show_both_domains() -> None:
    from tlops.cli import format_summary
    from tlops.evaluation.report import domain_rows, release_markdown

    domains = {"target": {"candidate": {"accuracy": 0.61, "n": 30}, "champion": {"accuracy": 0.5, "version": "2"},
                          "source_only": {"accuracy": 0.4, "n": 30}},
               "source": {"candidate": {"accuracy": 0.93, "n": 18}, "champion": {"accuracy": 0.95, "version": "2"},
                          "source_only": {"accuracy": 0.97, "n": 18}}}
    rows = domain_rows(domains)
    assert rows[0][0].startswith("target test (30 images)") and rows[0][1:] == ["0.6100", "0.5000", "0.4000"]
    assert rows[1][0].startswith("source test (18 images)") and rows[1][1:] == ["0.9300", "0.9500", "0.9700"]
    cand = {"accuracy": 0.61, "macro_f1": 0.6, "n": 30}
    md = release_markdown({"decision": "promote", "reasons": []}, {"candidate": cand, "domains": domains})
    assert "| source test (18 images) | 0.9300 | 0.9500 | 0.9700 |" in md
    text = format_summary({"decision": "promote", "validation": "pass", "manifest_hash": "x" * 12, "fingerprint": "f",
                           "parity": "pass", "metrics": {"candidate": cand}, "domains": domains, "model_name": "m",
                           "model_version": "3", "reasons": [], "champion_now": "3", "challenger_now": None,
                           "compared_with": "2",
                           "tracking_uri": "t", "run_id": "r", "log": "l"}, 1.0)
    assert "target test: candidate 0.6100, champion 0.5000, source-only 0.4000" in text
    assert "source test: candidate 0.9300, champion 0.9500, source-only 0.9700" in text


def test_auto_with_target_data_picks_an_adaptation_strategy_and_says_why() -> None:
    from tlops.selection.domain import choose_adaptation

    assert choose_adaptation("close", "linear-probe", 0)[0] == "adabn"
    strategy, why = choose_adaptation("far", "partial", 8)
    assert strategy == "self-training" and "8 labelled target images per class" in why and "partial" in why
    assert choose_adaptation("moderate", "full", 2)[0] == "mcc"


def test_auto_with_target_data_resolves_the_adaptation_and_its_base(target, source, tmp_path, monkeypatch) -> None:
    import mlflow

    from tests.helpers.registry import restored_mlflow_uris
    from tlops import tracking
    from tlops.selection import similarity
    from tlops.selection.planner import plan_run, resolved_config

    far = similarity.Similarity("efficientnet_lite0", 0.9, 0.5, "far", 18.0, "partial", 54)
    monkeypatch.setattr(similarity, "task_similarity", lambda cfg, manifest: far)
    cfg = Config.model_validate({"workdir": str(tmp_path), "tracking": {"uri": f"sqlite:///{tmp_path / 'm.db'}"},
                                 "data": {"target_uri": "/t"}, "train": {"strategy": "auto"}})
    with restored_mlflow_uris(), mlflow.start_run(experiment_id=tracking.setup(cfg)) as run:
        plan = plan_run(cfg, source, target)
        tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    # the labelled target's train and val: 8 images per class, at least 5: self-training on a partial source model
    assert plan["strategy"] == "self-training" and plan["adaptation_base"] == "partial"
    assert "self-training" in tags["adaptation.why"] and tags["train.strategy.selected"] == "self-training"
    resolved = resolved_config(cfg, plan)
    assert resolved.train.strategy == "self-training" and resolved.train.adaptation.base == "partial"
    assert resolved.train.epochs == 10


def test_a_held_out_fraction_of_the_target_is_the_labelled_set(tiny_digits, target_dirs, tmp_path) -> None:
    cfg = Config.model_validate({"data": {"uri": str(tiny_digits), "target_uri": str(target_dirs["labelled"]),
                                          "target_labelled_fraction": 0.5}})
    target = build_target_manifest(cfg, tmp_path / "cache")
    lab, unl = target[target["domain"] == LABELLED], target[target["domain"] == TARGET]
    assert len(lab) == len(unl) == 15 and not set(lab["sha256"]) & set(unl["sha256"])
    assert lab.groupby("label").size().to_dict() == {"0": 5, "1": 5, "7": 5} and unl["label"].isna().all()
    assert (lab["split"] == "test").sum() == 3  # the held-out set split as the source is (20% test)
    with pytest.raises(ValueError, match="not both"):
        Config.model_validate({"data": {"target_uri": "/t", "target_labelled_uri": "/l",
                                        "target_labelled_fraction": 0.2}})


def test_a_pipeline_parameter_choosing_an_adaptation_without_target_data_is_one_line() -> None:
    from tlops.config.settings import with_parameters

    with pytest.raises(TlopsError, match=r"^pipeline parameters: train.strategy adabn adapts to target images, "
                                         r"but data.target_uri is not set"):
        with_parameters(Config().to_json(), strategy="adabn")


def test_demo_data_writes_font_digits_for_a_target(tmp_path) -> None:
    from typer.testing import CliRunner

    from tlops.cli import app

    result = CliRunner().invoke(app, ["demo-data", str(tmp_path / "fonts"), "--fonts", "2", "--seed", "4"])
    assert result.exit_code == 0 and "20 font-rendered digit images in 10 class folders" in result.output
    assert sorted(p.name for p in (tmp_path / "fonts").iterdir()) == [str(d) for d in range(10)]
    assert len(list((tmp_path / "fonts").rglob("*.png"))) == 20


@pytest.mark.slow  # about 30 s: two mcc runs; the finished rerun's resume stays in the default suite above
def test_mcc_killed_after_an_epoch_continues_as_if_never_stopped(source, target, spec, tmp_path, monkeypatch) -> None:
    import tlops.training.adapt_run as adapt_run

    two = {"adaptation": {**QUICK["adaptation"], "epochs": 2}}
    whole = run(source, target, spec, tmp_path / "whole", strategy="mcc", **two)
    real = adapt_run.mcc

    def killed_after_epoch_one(*args: object, on_epoch, **kwargs: object):
        def hook(epoch: int, row: dict, state: dict) -> None:
            on_epoch(epoch, row, state)  # the checkpoint is written, then the process dies
            raise KeyboardInterrupt("killed")

        return real(*args, on_epoch=hook, **kwargs)

    monkeypatch.setattr(adapt_run, "mcc", killed_after_epoch_one)
    with pytest.raises(KeyboardInterrupt):
        run(source, target, spec, tmp_path / "killed", strategy="mcc", **two)
    monkeypatch.setattr(adapt_run, "mcc", real)
    again = run(source, target, spec, tmp_path / "killed", strategy="mcc", **two)
    assert again.resumed_at_step == 1  # epoch 1 from the checkpoint, epoch 2 ran now
    assert [h["adapt_unit"] for h in again.history if "adapt_unit" in h] == [1.0, 2.0]
    expected = whole.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in again.model.state_dict().items())
