"""DDP: the gradient strategies on several processes (gloo on CPU, NCCL on CUDA).

- ``train.processes: N`` on one machine: :func:`spawn_fit` starts N workers with
  ``torch.multiprocessing.spawn``; rank 0 hands the trained model back to the caller.
- Under ``torchrun`` (or a Kubeflow PyTorchJob, which sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``), every
  process joins the group through ``env://``: :func:`fit_under_torchrun`, or the command line
  ``torchrun --nproc-per-node N -m tlops.training.torchrun --config C --manifest M --spec S --model-dir OUT``.

Each rank reads its share of every global batch through :class:`tlops.training.loaders.ResumableSampler`, so with
the same ``train.batch_size`` (the global batch) one process and N processes take the same steps on the same
images. BatchNorm statistics are per rank unless ``train.freeze_bn_stats`` is set (on CUDA they are
synchronised with SyncBatchNorm); CPU has no SyncBatchNorm.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from tlops import logs
from tlops.config.settings import TrainConfig
from tlops.errors import TlopsError
from tlops.training.hardware import DistContext
from tlops.training.loop import train_gradient
from tlops.training.state import FitResult
from tlops.vision.backbones import build_classifier
from tlops.vision.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)
RESULT = "result.pt"


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _device_for(local_rank: int, cfg: TrainConfig) -> torch.device:
    from tlops.training.hardware import resolve_device

    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def log_to_stderr(rank: int) -> None:
    logs.to_stderr(f"[tlops] %(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s",
                   logging.INFO if rank == 0 else logging.WARNING)


def _worker(rank: int, world: int, init_file: str, job: dict[str, Any], out_dir: str) -> None:
    import torch.distributed as dist

    log_to_stderr(rank)
    cfg: TrainConfig = job["cfg"]
    device = _device_for(rank, cfg)
    dist.init_process_group(_backend(device), init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = train_gradient(job["backbone"], job["manifest"], job["classes"], job["spec"], cfg, job["workdir"],
                                dist=DistContext(rank, world, device), head=job["head"])
        if rank == 0:
            torch.save({"model": result.model.state_dict(), "history": result.history,
                        "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
                        "environment": result.environment, "checkpoint_dir": result.checkpoint_dir,
                        "resumed_at_step": result.resumed_at_step, "stopped_early": result.stopped_early},
                       Path(out_dir) / RESULT)
    finally:
        dist.destroy_process_group()


def _result_from(payload: dict[str, Any], backbone: str, classes: list[str], strategy: str) -> FitResult:
    model = build_classifier(backbone, num_classes=len(classes), pretrained=False)
    model.load_state_dict(payload["model"])
    return FitResult(model=model.eval(), history=list(payload["history"]), best_epoch=int(payload["best_epoch"]),
                     best_val_accuracy=float(payload["best_val_accuracy"]), strategy=strategy,
                     environment=dict(payload["environment"]), checkpoint_dir=payload["checkpoint_dir"],
                     resumed_at_step=payload["resumed_at_step"], stopped_early=bool(payload["stopped_early"]))


@contextlib.contextmanager
def _this_tlops_first() -> Iterator[None]:
    """The spawned workers import tlops by this process's sys.path: put the directory of the tlops running here
    first while they start. Another copy may sit earlier on the path, e.g. the partial copy an MLflow model
    loaded in this process bundles as its code (``code_paths``), which would give the workers a tlops without
    the training modules."""
    root = str(Path(__file__).resolve().parents[2])
    saved = list(sys.path)
    sys.path[:] = [root, *(p for p in saved if p != root)]
    try:
        yield
    finally:
        sys.path[:] = saved


def spawn_fit(backbone: str, manifest: pd.DataFrame, classes: list[str], spec: PreprocessSpec, cfg: TrainConfig,
              workdir: str | Path, processes: int, head: dict[str, torch.Tensor] | None = None) -> FitResult:
    """Train on ``processes`` DDP workers on this machine; returns rank 0's result."""
    import torch.multiprocessing as mp

    if cfg.device != "cpu" and torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise TlopsError(f"train.processes is {processes} but there are {torch.cuda.device_count()} CUDA devices")
    if cfg.batch_size % processes:
        raise TlopsError(f"train.batch_size {cfg.batch_size} must be a multiple of the {processes} DDP processes "
                         "(it is the global batch, split evenly among them)")
    job = {"backbone": backbone, "manifest": manifest, "classes": classes, "spec": spec, "cfg": cfg,
           "workdir": str(workdir), "head": head}
    with tempfile.TemporaryDirectory(prefix="tlops-ddp-") as tmp:
        init_file = str(Path(tmp) / "rendezvous")
        log.info("DDP: %d processes (%s)", processes, "nccl" if torch.cuda.is_available() and cfg.device != "cpu"
                 else "gloo")
        try:
            with _this_tlops_first():
                mp.spawn(_worker, args=(processes, init_file, job, tmp), nprocs=processes, join=True)
        except mp.ProcessRaisedException as exc:
            last = [line for line in str(exc).strip().splitlines() if line.strip()][-1]
            raise TlopsError(f"DDP worker failed: {last.strip()}") from None
        except mp.ProcessExitedException as exc:
            raise TlopsError(f"DDP worker died: {exc}; a rerun resumes from the last checkpoint") from None
        payload = torch.load(Path(tmp) / RESULT, map_location="cpu", weights_only=True)
    return _result_from(payload, backbone, classes, cfg.strategy)


def fit_under_torchrun(backbone: str, manifest: pd.DataFrame, classes: list[str], spec: PreprocessSpec,
                       cfg: TrainConfig, workdir: str | Path,
                       head: dict[str, torch.Tensor] | None = None) -> FitResult:
    """Join the process group torchrun (or a PyTorchJob) describes in the environment, and train."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = _device_for(int(os.environ.get("LOCAL_RANK", "0")), cfg)
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group(_backend(device), init_method="env://", rank=rank, world_size=world)
    try:
        return train_gradient(backbone, manifest, classes, spec, cfg, workdir, dist=DistContext(rank, world, device),
                              head=head)
    finally:
        if own_group:
            dist.destroy_process_group()


