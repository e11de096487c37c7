"""The GPU path of every strategy, run once (marked ``gpu``; skipped where CUDA is not available)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from tlops.config.settings import TrainConfig
from tlops.data.discovery import class_names
from tlops.training.finetune import fine_tune
from tlops.vision.backbones import feature_extractor, reference_spec
from tlops.vision.preprocessing import with_resolution
from tlops.vision.stages import split_stages

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
BACKBONE = "efficientnet_lite0"


def cfg(**kw: object) -> TrainConfig:
    base: dict[str, object] = {"epochs": 2, "batch_size": 16, "lr": 3e-3, "patience": None, "resume": False,
                               "device": "cuda", "head_init": "random"}
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("strategy", ["linear-probe", "partial", "full", "gradual", "scratch"])
def test_every_strategy_on_cuda(strategy: str, manifest: pd.DataFrame, tmp_path: Path) -> None:
    spec = with_resolution(reference_spec(BACKBONE), 64)
    result = fine_tune(BACKBONE, manifest, class_names(manifest), spec, cfg(strategy=strategy), workdir=tmp_path)
    env = result.environment
    assert env["device"].startswith("cuda") and env["cuda"] != "none"
    if strategy != "linear-probe":
        assert env["amp_dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
        assert env["channels_last"] is True
        assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert next(result.model.parameters()).device.type == "cpu"  # handed back on the CPU, ready to save


def test_partial_on_cuda_keeps_frozen_stages(manifest: pd.DataFrame, tmp_path: Path) -> None:
    spec = with_resolution(reference_spec(BACKBONE), 64)
    before = [st.state() for st in split_stages(feature_extractor(BACKBONE))]
    result = fine_tune(BACKBONE, manifest, class_names(manifest), spec, cfg(strategy="partial", frozen_stages=3),
                       workdir=tmp_path)
    after = [st.state() for st in split_stages(result.model.backbone)]
    for i in range(3):
        assert all(torch.equal(before[i][k], after[i][k]) for k in before[i])


def test_compile_path(manifest: pd.DataFrame, tmp_path: Path) -> None:
    spec = with_resolution(reference_spec(BACKBONE), 64)
    result = fine_tune(BACKBONE, manifest, class_names(manifest), spec,
                       cfg(strategy="partial", frozen_stages=6, epochs=1, compile=True), workdir=tmp_path)
    assert result.environment["compiled"] is True


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ddp_on_two_gpus_matches_one(manifest: pd.DataFrame, tmp_path: Path) -> None:
    spec = with_resolution(reference_spec(BACKBONE), 64)
    base = cfg(strategy="full", epochs=1, freeze_bn_stats=True, amp=False, deterministic=True)
    one = fine_tune(BACKBONE, manifest, class_names(manifest), spec, base, workdir=tmp_path / "one")
    two = fine_tune(BACKBONE, manifest, class_names(manifest), spec, base.model_copy(update={"processes": 2}),
                    workdir=tmp_path / "two")
    s1, s2 = one.model.state_dict(), two.model.state_dict()
    assert max(float((s1[k].float() - s2[k].float()).abs().max()) for k in s1) < 1e-3
