"""Checkpoints and resume: a training process killed mid-epoch (SIGKILL) and started again ends where an
uninterrupted run with the same seed ends."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import REPO
from tlops.config.settings import TrainConfig
from tlops.data.discovery import build_manifest, class_names, write_manifest
from tlops.errors import TlopsError
from tlops.fileio import write_json
from tlops.training.checkpoints import rng_state, set_rng_state
from tlops.training.finetune import fine_tune
from tlops.training.state import FitResult
from tlops.vision.preprocessing import PreprocessSpec

BACKBONE = "efficientnet_lite0"
# 53 training images, batch 8: 6 steps an epoch, 12 in all. Checkpoints every 2 steps; the first process
# kills itself after step 9, i.e. during the second epoch, 1 step after the checkpoint of step 8.
CFG = TrainConfig(strategy="full", epochs=2, batch_size=8, lr=2e-3, num_threads=2, patience=None, head_init="random",
                  checkpoint_every_steps=2, augment={"random_resized_crop": True, "crop_scale": (0.5, 1.0)})


@pytest.fixture(scope="module")
def manifest(tiny_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    # The content-hash split, whose 53 training images the step counts here are written for.
    return build_manifest(str(tiny_digits), tmp_path_factory.mktemp("cache"), stratified=False)


def train_in_subprocess(manifest: pd.DataFrame, spec: PreprocessSpec, cfg: TrainConfig, workdir: Path,
                        ) -> subprocess.CompletedProcess:
    write_manifest(manifest, workdir / "manifest.csv", local_paths=True)  # this process's own child
    write_json(workdir / "spec.json", spec.to_record())
    (workdir / "train.json").write_text(cfg.model_dump_json())
    script = textwrap.dedent(f"""
        from tlops.config.settings import TrainConfig
        from tlops.data.discovery import class_names, read_manifest
        from tlops.fileio import read_json
        from tlops.vision.preprocessing import PreprocessSpec
        from tlops.training.finetune import fine_tune
        m = read_manifest({str(workdir / "manifest.csv")!r})
        cfg = TrainConfig.model_validate_json(open({str(workdir / "train.json")!r}).read())
        spec = PreprocessSpec.from_record(read_json({str(workdir / "spec.json")!r}))
        fine_tune({BACKBONE!r}, m, class_names(m), spec, cfg, workdir={str(workdir)!r})
        """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)


def assert_same_run(a: FitResult, b: FitResult, atol: float = 1e-6) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        assert torch.allclose(sa[k].float(), sb[k].float(), atol=atol, rtol=0), k
    assert len(a.history) == len(b.history)
    for ha, hb in zip(a.history, b.history, strict=True):
        assert ha["val_accuracy"] == hb["val_accuracy"]
        assert ha["train_accuracy"] == hb["train_accuracy"]
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], abs=atol)


def test_killed_mid_epoch_then_rerun_matches_an_uninterrupted_run(manifest: pd.DataFrame, spec: PreprocessSpec,
                                                                  tmp_path: Path) -> None:
    killed = train_in_subprocess(manifest, spec, CFG.model_copy(update={"stop_after_steps": 9}), tmp_path / "a")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    [ckpt_dir] = (tmp_path / "a" / "checkpoints").iterdir()
    last = torch.load(ckpt_dir / "last.pt", weights_only=True)  # tensors and plain values only
    assert (last["global_step"], last["epoch"], last["step_in_epoch"]) == (8, 1, 2)
    assert not last["finished"] and len(last["history"]) == 1
    assert {"model", "optimizer", "scheduler", "rng"} <= set(last)

    classes = class_names(manifest)
    resumed = fine_tune(BACKBONE, manifest, classes, spec, CFG, workdir=tmp_path / "a")
    assert resumed.resumed_at_step == 8
    straight = fine_tune(BACKBONE, manifest, classes, spec, CFG, workdir=tmp_path / "b")
    assert straight.resumed_at_step is None
    # Same seed, same steps on the same images (augmentation included): the same weights and metrics.
    assert_same_run(resumed, straight)

    # A rerun of a finished run trains nothing and returns the same best model.
    mtime = (ckpt_dir / "last.pt").stat().st_mtime_ns
    again = fine_tune(BACKBONE, manifest, classes, spec, CFG, workdir=tmp_path / "a")
    assert again.resumed_at_step == 12 and (ckpt_dir / "last.pt").stat().st_mtime_ns == mtime
    assert_same_run(again, straight)


def test_a_checkpoint_of_another_run_is_refused(manifest: pd.DataFrame, spec: PreprocessSpec, tmp_path: Path) -> None:
    cfg = CFG.model_copy(update={"epochs": 1, "checkpoint_dir": str(tmp_path / "ckpt"), "checkpoint_every_steps": 0})
    first = fine_tune(BACKBONE, manifest, class_names(manifest), spec, cfg, workdir=tmp_path)
    # Killed after the epoch-end last.pt but before best.pt: the rerun takes the best weights from last.pt
    # and writes best.pt again.
    (tmp_path / "ckpt" / "best.pt").unlink()
    again = fine_tune(BACKBONE, manifest, class_names(manifest), spec, cfg, workdir=tmp_path)
    assert again.resumed_at_step is not None and (tmp_path / "ckpt" / "best.pt").is_file()
    assert torch.equal(again.model.head.weight, first.model.head.weight)
    other = cfg.model_copy(update={"lr": 1e-4})
    with pytest.raises(TlopsError, match="belongs to another run"):
        fine_tune(BACKBONE, manifest, class_names(manifest), spec, other, workdir=tmp_path)
    # resume=false starts afresh (and overwrites).
    fresh = fine_tune(BACKBONE, manifest, class_names(manifest), spec,
                      other.model_copy(update={"resume": False}), workdir=tmp_path)
    assert fresh.resumed_at_step is None


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_checkpoint_key_ignores_how_the_run_is_executed(manifest: pd.DataFrame, spec: PreprocessSpec) -> None:
    from tlops.training.state import run_key

    classes = class_names(manifest)
    key = run_key(BACKBONE, spec, classes, manifest, CFG)
    runtime = CFG.model_copy(update={"num_threads": 1, "processes": 2, "stop_after_steps": 3, "device": "cpu"})
    assert run_key(BACKBONE, spec, classes, manifest, runtime) == key
    assert run_key(BACKBONE, spec, classes, manifest, CFG.model_copy(update={"lr": 0.1})) != key
    relabelled = manifest.copy()
    relabelled.loc[relabelled.index[0], "label"] = "7" if relabelled["label"].iloc[0] != "7" else "1"
    assert run_key(BACKBONE, spec, classes, relabelled, CFG) != key
    assert json.loads(CFG.model_dump_json())["checkpoint_every_steps"] == 2
