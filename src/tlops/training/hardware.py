"""Where a run executes, apart from what it computes: the device, threads and seeds, precision and memory
format (:class:`Hardware`), the DDP group this process belongs to (:class:`DistContext`), the model wrapped for
both, and the record of it all kept with the result (:func:`environment`)."""

from __future__ import annotations

import contextlib
import os
import platform
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tlops.config.settings import TrainConfig
from tlops.errors import TlopsError


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise TlopsError("train.device is cuda but no CUDA device is available; use auto or cpu")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads, then restore the number there was."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Hardware:
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    compile: bool
    workers: int
    pin_memory: bool

    @classmethod
    def resolve(cls, cfg: TrainConfig, device: torch.device) -> Hardware:
        cuda = device.type == "cuda"
        amp = cfg.amp if cfg.amp is not None else cuda
        amp_dtype = None
        if amp:
            # bf16 needs no loss scaling; fp16 (GPUs before Ampere) goes through a GradScaler. On a CPU autocast
            # is opt-in (train.amp: true): bf16, fast only where the CPU has bf16 instructions.
            amp_dtype = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
        workers = cfg.num_workers if cfg.num_workers is not None else (min(8, os.cpu_count() or 1) if cuda else 0)
        return cls(device=device, amp_dtype=amp_dtype,
                   # NHWC: faster training on GPUs with tensor cores, and with oneDNN on CPUs too (bench/README.md)
                   channels_last=cfg.channels_last if cfg.channels_last is not None else True,
                   compile=cfg.compile, workers=workers, pin_memory=cuda)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def inputs(self, xb: torch.Tensor) -> torch.Tensor:
        """A batch of images on the device, in the memory format the model runs in."""
        xb = xb.to(self.device, non_blocking=True)
        return xb.contiguous(memory_format=torch.channels_last) if self.channels_last else xb

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 autocast needs loss scaling; bf16 and float32 do not."""
        return torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None


@dataclass
class DistContext:
    """Where this process stands in a DDP group (world 1: no group)."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device if self._nccl() else "cpu")
        dist.all_reduce(t)
        return [float(v) for v in t.cpu()]

    def _nccl(self) -> bool:
        import torch.distributed as dist

        return dist.get_backend() == "nccl"

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def configure(cfg: TrainConfig, ctx: DistContext) -> Hardware:
    """Seeds, torch threads (shared among the ranks of this machine), device and determinism for this process."""
    seed_everything(cfg.seed)
    threads = cfg.num_threads or torch.get_num_threads()
    if ctx.world > 1:
        # The ranks share this machine's cores: more threads than cores in all makes every rank crawl.
        threads = min(threads, max(1, (os.cpu_count() or 1) // ctx.world))
    torch.set_num_threads(threads)
    device = ctx.device or resolve_device(cfg.device)
    hw = Hardware.resolve(cfg, device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
    return hw


def wrap(model: nn.Module, ctx: DistContext, hw: Hardware) -> nn.Module:
    """DDP (rebuilt whenever the set of trainable parameters changes) and torch.compile, as configured."""
    wrapped = model
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        if any(p.requires_grad for p in model.parameters()):
            ids = [hw.device.index] if hw.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=ids)
    if hw.compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    return wrapped


def environment(device: torch.device, world_size: int, amp_dtype: torch.dtype | None, channels_last: bool,
                compiled: bool) -> dict[str, Any]:
    """What the run ran on: library versions, device, threads, precision."""
    import torchvision

    try:
        import timm

        timm_version = timm.__version__
    except ImportError:  # pragma: no cover - timm is a dependency
        timm_version = "absent"
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__), "timm": str(timm_version),
        "cuda": str(torch.version.cuda or "none"),
        "cudnn": str(torch.backends.cudnn.version()) if torch.cuda.is_available() else "none",
        "device": str(device), "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                               else platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count() or 0, "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(), "world_size": world_size,
        "amp_dtype": str(amp_dtype).removeprefix("torch.") if amp_dtype else "float32",
        "channels_last": channels_last, "compiled": compiled,
    }
    return env
