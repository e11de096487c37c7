"""Checkpoints under an s3:// prefix (moto's server on loopback): written there, and resumed from there by a
rerun on a machine with an empty local mirror."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tlops.config.settings import TrainConfig
from tlops.data.discovery import build_manifest, class_names
from tlops.training.finetune import fine_tune
from tlops.vision.backbones import reference_spec
from tlops.vision.preprocessing import with_resolution

pytestmark = pytest.mark.integration
BACKBONE = "efficientnet_lite0"


def test_checkpoints_go_to_s3_and_a_rerun_resumes_from_there(s3_endpoint: dict[str, str], tiny_digits: Path,
                                                             tmp_path: Path) -> None:
    from tlops.data.storage import s3_client

    s3_client().create_bucket(Bucket="runs")
    manifest = build_manifest(str(tiny_digits), tmp_path / "manifest-cache")
    spec = with_resolution(reference_spec(BACKBONE), 32)
    cfg = TrainConfig(strategy="partial", frozen_stages=7, epochs=1, batch_size=16, num_threads=2, head_init="random",
                      checkpoint_dir="s3://runs/tiny/ckpt")
    first = fine_tune(BACKBONE, manifest, class_names(manifest), spec, cfg, workdir=tmp_path / "w")
    keys = {o["Key"] for o in s3_client().list_objects_v2(Bucket="runs", Prefix="tiny/ckpt/")["Contents"]}
    assert keys == {"tiny/ckpt/last.pt", "tiny/ckpt/best.pt"}
    shutil.rmtree(tmp_path / "w")  # another machine: nothing local
    again = fine_tune(BACKBONE, manifest, class_names(manifest), spec, cfg, workdir=tmp_path / "w")
    assert again.resumed_at_step == 3  # 57 training images // 16 = 3 steps: the finished run
    assert torch.equal(again.model.head.weight, first.model.head.weight)
