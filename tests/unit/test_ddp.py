"""DDP on CPU: two gloo processes, each with half of every global batch, end where one process ends."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from tlops.config.settings import TrainConfig
from tlops.data.discovery import class_names
from tlops.errors import TlopsError
from tlops.training.finetune import fine_tune
from tlops.training.loaders import ResumableSampler
from tlops.vision.backbones import feature_extractor, reference_spec
from tlops.vision.preprocessing import with_resolution

BACKBONE = "efficientnet_lite0"
# BatchNorm statistics frozen: CPU has no SyncBatchNorm, and per-rank batch statistics would differ from
# the global batch's. Everything else (data order, gradients, clipping, schedule) must agree.
# SGD, whose update is linear in the gradient: Adam's m/sqrt(v) turns float noise in a near-zero gradient into
# an lr-sized step, which would hide what is compared here (the all-reduced gradients).
CFG = TrainConfig(strategy="full", epochs=1, batch_size=16, optimizer="sgd", lr=0.05, backbone_lr_factor=1.0,
                  warmup_epochs=0.0, num_threads=2, patience=None, resume=False, freeze_bn_stats=True,
                  head_init="random")


def test_two_gloo_processes_match_one_process(manifest: pd.DataFrame, tmp_path: Path) -> None:
    spec = with_resolution(reference_spec(BACKBONE), 32)
    classes = class_names(manifest)
    one = fine_tune(BACKBONE, manifest, classes, spec, CFG, workdir=tmp_path / "one")
    two = fine_tune(BACKBONE, manifest, classes, spec, CFG.model_copy(update={"processes": 2}),
                    workdir=tmp_path / "two")
    assert two.environment["world_size"] == 2 and one.environment["world_size"] == 1
    assert [h["val_accuracy"] for h in two.history] == [h["val_accuracy"] for h in one.history]
    assert [h["train_accuracy"] for h in two.history] == [h["train_accuracy"] for h in one.history]
    for h1, h2 in zip(one.history, two.history, strict=True):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], abs=1e-5)
    # The weights after the last step (last.pt) and the best epoch's (returned) agree; only the summation
    # order differs (all-reduce of two half-batch gradients, 1 thread per rank against 2).
    last1, last2 = (torch.load(Path(str(r.checkpoint_dir)) / "last.pt", weights_only=True)["model"] for r in (one, two))
    worst = 0.0
    for s1, s2 in ((one.model.state_dict(), two.model.state_dict()), (last1, last2)):
        worst = max(worst, *(float((s1[k].float() - s2[k].float()).abs().max()) for k in s1))
    assert worst < 1e-4, worst
    # ... while training moved the weights far more than that.
    pretrained = feature_extractor(BACKBONE).state_dict()
    moved = max(float((last1[f"backbone.{k}"].float() - v.float()).abs().max()) for k, v in pretrained.items())
    assert moved > 100 * max(worst, 1e-6)


def test_workers_import_this_tlops_when_a_loaded_model_put_its_partial_copy_first(
        manifest: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading an MLflow model puts its bundled code (a tlops without the training modules) on sys.path; the
    spawned workers must still import the tlops this process runs."""
    import sys

    from tlops.serving.pyfunc import bundle_code

    partial = bundle_code(tmp_path / "code")
    assert not (partial / "training").exists()
    monkeypatch.setattr(sys, "path", [str(partial.parent), *sys.path])
    spec = with_resolution(reference_spec(BACKBONE), 32)
    two = fine_tune(BACKBONE, manifest, class_names(manifest), spec,
                    CFG.model_copy(update={"processes": 2, "checkpoint_every_steps": 0}), workdir=tmp_path / "w")
    assert two.environment["world_size"] == 2
    assert sys.path[0] == str(partial.parent)  # the caller's path is as it was


def test_ranks_split_each_global_batch_between_them() -> None:
    data = list(range(21))
    one = list(ResumableSampler(data, num_replicas=1, rank=0, seed=5))  # type: ignore[arg-type]
    ranks = [list(ResumableSampler(data, num_replicas=2, rank=r, seed=5)) for r in (0, 1)]  # type: ignore[arg-type]
    # Global batch of 4 = 2 per rank: step k of both ranks together is step k of the single process.
    for k in range(len(one) // 4):
        assert sorted(ranks[0][2 * k : 2 * k + 2] + ranks[1][2 * k : 2 * k + 2]) == sorted(one[4 * k : 4 * k + 4])
    resumed = ResumableSampler(data, num_replicas=2, rank=1, seed=5)  # type: ignore[arg-type]
    resumed.set_epoch(0, skip=4)
    assert list(resumed) == ranks[1][4:] and len(resumed) == len(ranks[1]) - 4


def test_global_batch_must_split_evenly(manifest: pd.DataFrame, tmp_path: Path) -> None:
    spec = with_resolution(reference_spec(BACKBONE), 32)
    cfg = CFG.model_copy(update={"processes": 2, "batch_size": 15})
    with pytest.raises(TlopsError, match="batch_size 15 must be a multiple of the 2 DDP processes"):
        fine_tune(BACKBONE, manifest, class_names(manifest), spec, cfg, workdir=tmp_path)


def test_torchrun_environment_is_recognised(monkeypatch: pytest.MonkeyPatch) -> None:
    from tlops.training import ddp

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not ddp.launched_by_torchrun()
    monkeypatch.setenv("RANK", "1")
    assert ddp.launched_by_torchrun()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not ddp.launched_by_torchrun()
    assert torch.distributed.is_available()
