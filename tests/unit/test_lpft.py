"""LP-FT: a pre-trained gradient strategy starts from the linear probe's head and never loses to the probe."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from tlops.config.settings import TrainConfig
from tlops.data.discovery import class_names
from tlops.training.finetune import fine_tune
from tlops.training.loop import train_gradient
from tlops.training.probe import linear_probe
from tlops.training.state import run_key
from tlops.vision.preprocessing import PreprocessSpec

BACKBONE = "efficientnet_lite0"


def cfg(**overrides: object) -> TrainConfig:
    base: dict[str, object] = {"strategy": "full", "epochs": 1, "batch_size": 16, "num_threads": 2, "resume": False,
                               "patience": None, "warmup_epochs": 0.0, "l2_grid": [1e-3]}
    return TrainConfig(**{**base, **overrides})


def test_the_head_starts_as_the_probe_and_batchnorm_statistics_stay(manifest: pd.DataFrame, spec: PreprocessSpec,
                                                                    tmp_path: Path) -> None:
    classes = class_names(manifest)
    probe = linear_probe(BACKBONE, manifest, classes, spec, TrainConfig(l2_grid=[1e-3], num_threads=2))
    head = {k: v.clone() for k, v in probe.model.head.state_dict().items()}
    lpft = cfg(lr=1e-12)  # a step too small to move anything: what the model starts from is what it ends with
    assert lpft.starts_from_probe and lpft.bn_stats_frozen
    result = train_gradient(BACKBONE, manifest, classes, spec, lpft, tmp_path, head=head)
    for k, v in result.model.head.state_dict().items():
        assert torch.allclose(v, head[k], atol=1e-6), k
    # The head was fitted on features under the pre-trained BatchNorm statistics: they are kept (eval mode).
    bn = {k: v for k, v in result.model.backbone.state_dict().items() if "running_" in k}
    ref = {k: v for k, v in probe.model.backbone.state_dict().items() if "running_" in k}
    assert bn and all(torch.equal(bn[k], ref[k]) for k in bn)
    # Scored by the training loop on the validation images, it is the probe: same accuracy.
    assert result.best_val_accuracy == pytest.approx(probe.best_val_accuracy)


def test_a_fine_tune_that_loses_to_the_probe_gives_the_probe(manifest: pd.DataFrame, spec: PreprocessSpec,
                                                             tmp_path: Path) -> None:
    classes = class_names(manifest)
    # SGD at rate 50 wrecks the pre-trained features in one epoch: validation falls below the probe's.
    broken = cfg(optimizer="sgd", lr=50.0, backbone_lr_factor=1.0, grad_clip_norm=None)
    result = fine_tune(BACKBONE, manifest, classes, spec, broken, workdir=tmp_path)
    assert result.strategy == "linear-probe" and result.kept_over == "full"
    assert result.best_val_accuracy == result.environment["probe_val_accuracy"]
    # Asked to keep the fine-tuned model, it does.
    own = fine_tune(BACKBONE, manifest, classes, spec, broken.model_copy(update={"keep_better_probe": False}),
                    workdir=tmp_path)  # the same feature cache
    assert own.strategy == "full" and own.kept_over is None
    assert own.best_val_accuracy < own.environment["probe_val_accuracy"]


def test_head_init_is_part_of_the_checkpoint_key(manifest: pd.DataFrame, spec: PreprocessSpec) -> None:
    classes = class_names(manifest)
    assert run_key(BACKBONE, spec, classes, manifest, cfg()) != run_key(BACKBONE, spec, classes, manifest,
                                                                         cfg(head_init="random"))
    assert not cfg(strategy="scratch").starts_from_probe and not cfg(head_init="random").bn_stats_frozen
