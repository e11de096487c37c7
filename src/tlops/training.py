"""Fine-tuning: every transfer strategy, one training loop, checkpoints and resume.

- ``linear-probe``: the frozen backbone's features come from the on-disk feature cache (computed once per
  backbone, preprocessing and data), then an L-BFGS logistic-regression head is fit with an L2 sweep on the
  validation split.
- ``partial``: the first ``frozen_stages`` stages frozen (their BatchNorm in eval mode), the rest trained.
- ``full``: every layer trained; backbone lr = head lr x ``backbone_lr_factor``, optionally decayed layer-wise.
- ``gradual``: the head alone first, then one more stage from the top every ``gradual_unfreeze_every`` epochs.
- ``scratch``: the same architecture from random initialisation, every layer at the head's lr: the baseline.

The gradient strategies share :func:`train_gradient`: AdamW or SGD, warm-up then cosine, label smoothing,
optional class weights, gradient clipping, early stopping on validation accuracy with the best weights kept,
checkpoints every N steps and at each epoch end (resumed by a rerun), bf16/fp16 autocast, channels_last and
``torch.compile`` on GPU, and DDP (see :mod:`tlops.ddp`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from tlops import features
from tlops.backbones import ImageClassifier, build_classifier
from tlops.config import DEFAULT_EPOCHS, AugmentConfig, TrainConfig
from tlops.errors import TlopsError
from tlops.features import FeatureCache, extract_features, weights_identity
from tlops.preprocessing import PreprocessSpec
from tlops.stages import Stage, split_stages, stages_or_whole

log = logging.getLogger(__name__)
__all__ = ["FitResult", "extract_features", "fine_tune", "linear_probe", "train_gradient"]
# Fields that say how a run is executed, not what it computes: they stay out of the checkpoint key, so a
# run can resume on another device, with other workers or as DDP.
RUNTIME_FIELDS = frozenset({
    "num_threads", "device", "feature_cache", "input_cache_mb", "num_workers", "amp", "channels_last", "compile",
    "deterministic", "processes", "accelerator", "checkpoint_dir", "checkpoint_every_steps", "resume",
    "stop_after_steps",
})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise TlopsError("train.device is cuda but no CUDA device is available; use auto or cpu")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class FitResult:
    model: ImageClassifier
    history: list[dict[str, float]]
    best_epoch: int
    best_val_accuracy: float
    strategy: str = "linear-probe"
    environment: dict[str, Any] = field(default_factory=dict)
    checkpoint_dir: str | None = None
    resumed_at_step: int | None = None  # the global step a rerun resumed from; None: started afresh
    stopped_early: bool = False
    kept_over: str | None = None  # the fine-tuning strategy whose model lost to this probe's on validation


def _usable(manifest: pd.DataFrame) -> pd.DataFrame:
    from tlops.manifest import usable

    return usable(manifest)


def _split(manifest: pd.DataFrame, classes: list[str], split: str) -> tuple[list[str], list[int], list[str]]:
    """Paths, class indices and content hashes of one split, in manifest order."""
    index = {c: i for i, c in enumerate(classes)}
    part = _usable(manifest)
    part = part[part["split"] == split]
    return (list(part["path"]), [index[str(lab)] for lab in part["label"]], [str(s) for s in part["sha256"]])


# ---------------------------------------------------------------------------------------------- linear probe


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                  max_iter: int) -> nn.Linear:
    """Multinomial logistic regression, full batch with L-BFGS: mean cross-entropy + l2/2 * |W|^2."""
    lin = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)
    loss_fn = nn.CrossEntropyLoss()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(lin(x), y) + 0.5 * l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads, then restore the number there was."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit_head(head: nn.Linear, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
              y_val: torch.Tensor, cfg: TrainConfig) -> tuple[list[dict[str, float]], int, float]:
    """Sweep the L2 strength on the validation split (the usual linear-probe protocol); keep the best.

    On one thread: the matrices are small (images x feature dimension x classes), so a second thread gains little
    and, on cores other processes share, its barrier waits cost more than the work (measured 17x slower
    under load)."""
    with torch_threads(1):
        return _sweep_l2(head, x_train, y_train, x_val, y_val, cfg)


def _sweep_l2(head: nn.Linear, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
              y_val: torch.Tensor, cfg: TrainConfig) -> tuple[list[dict[str, float]], int, float]:
    history: list[dict[str, float]] = []
    best: tuple[float, int, nn.Linear | None] = (-1.0, 0, None)
    from tlops.progress import Counter

    loss_fn = nn.CrossEntropyLoss()
    fits = Counter(f"linear probe: L2 sweep on {len(x_train)} feature vectors", len(cfg.l2_grid), "fits")
    for i, l2 in enumerate(cfg.l2_grid):
        lin = _fit_logistic(x_train, y_train, head.out_features, l2, cfg.epochs)
        fits.advance()
        with torch.no_grad():
            train_loss = float(loss_fn(lin(x_train), y_train))
            train_acc = float((lin(x_train).argmax(1) == y_train).float().mean())
            val_acc = float((lin(x_val).argmax(1) == y_val).float().mean()) if len(x_val) else train_acc
        history.append({"epoch": i, "l2": l2, "train_loss": train_loss, "train_accuracy": train_acc,
                        "val_accuracy": val_acc})
        log.info("linear probe: l2=%g train accuracy %.4f, val accuracy %.4f", l2, train_acc, val_acc)
        if val_acc > best[0]:
            best = (val_acc, i, lin)
    best_acc, best_i, best_lin = best
    assert best_lin is not None
    head.load_state_dict(best_lin.state_dict())
    return history, best_i, best_acc


def linear_probe(backbone_name: str, manifest: pd.DataFrame, classes: list[str], spec: PreprocessSpec,
                 cfg: TrainConfig, cache_dir: str | Path | None = None, cache_remote: str | None = None) -> FitResult:
    """Train a new head on frozen pre-trained features of the train split; select on val.

    With ``cache_dir`` the features are read from (or written to) the feature cache there.
    """
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    if cfg.augment.active:
        log.warning("linear probe: train.augment is ignored (features are computed once, without augmentation)")
    model = build_classifier(backbone_name, num_classes=len(classes), pretrained=True)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    cache = FeatureCache(cache_dir, cache_remote) if cache_dir is not None else None
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split in ("train", "val"):
        paths, labels, shas = _split(manifest, classes, split)
        if cache is not None:
            x = cache.features(backbone_name, model.backbone, paths, shas, spec, cfg.batch_size, device, split)
        else:
            x = features.extract_features(model.backbone, paths, spec, cfg.batch_size, device, desc=split)
        feats[split] = (x, torch.tensor(labels, dtype=torch.long))
    if not len(feats["train"][1]):
        raise TlopsError("the train split has no usable labelled image: nothing to fit the probe on")
    history, best_epoch, best_acc = _fit_head(model.head, *feats["train"], *feats["val"], cfg)
    log.info("linear probe: best val accuracy %.4f at epoch %d", best_acc, best_epoch)
    env = environment(device, 1, None, False, False)
    if cache is not None:
        env["feature_cache"] = {"hits": cache.hits, "misses": cache.misses, "dir": str(cache.root)}
    return FitResult(model=model.cpu().eval(), history=history, best_epoch=best_epoch,
                     best_val_accuracy=best_acc, strategy="linear-probe", environment=env)


# ------------------------------------------------------------------------------------ strategies and groups


@dataclass
class Plan:
    """Which stages are frozen at each epoch, and each stage's learning rate."""

    stages: list[Stage]
    stage_lrs: list[float]
    head_lr: float
    frozen_at: Callable[[int], int]  # epoch -> number of leading stages frozen (len(stages): head only)


def make_plan(model: ImageClassifier, cfg: TrainConfig) -> Plan:
    strategy = cfg.strategy
    stages = split_stages(model.backbone) if strategy in ("partial", "gradual") else stages_or_whole(model.backbone)
    n = len(stages)
    if strategy == "scratch":
        return Plan(stages, [cfg.lr] * n, cfg.lr, lambda epoch: 0)
    if cfg.layer_decay < 1.0 and n == 1:
        log.warning("train.layer_decay ignored: %s has no known stage split", type(model.backbone).__name__)
    lrs = [cfg.lr * cfg.backbone_lr_factor * cfg.layer_decay ** (n - 1 - i) for i in range(n)]
    if strategy == "partial":
        if cfg.frozen_stages >= n:
            raise TlopsError(f"train.frozen_stages is {cfg.frozen_stages} but the backbone has {n} stages "
                             f"({', '.join(s.name for s in stages)}); freezing all of them is "
                             "train.strategy=linear-probe")
        k = cfg.frozen_stages
        return Plan(stages, lrs, cfg.lr, lambda epoch: k)
    if strategy == "gradual":
        head, every = cfg.gradual_head_epochs, cfg.gradual_unfreeze_every

        def gradual(epoch: int) -> int:
            if epoch < head:
                return n
            return max(n - 1 - (epoch - head) // every, 0)

        return Plan(stages, lrs, cfg.lr, gradual)
    return Plan(stages, lrs, cfg.lr, lambda epoch: 0)


def _no_decay(name: str, p: nn.Parameter) -> bool:
    """Biases and normalisation scales/shifts (1-D tensors) take no weight decay."""
    return p.ndim <= 1 or name.endswith(".bias")


def param_groups(model: ImageClassifier, plan: Plan, weight_decay: float) -> list[dict[str, Any]]:
    """One (decay, no-decay) pair of groups per stage, then the head's; each group carries its base lr.

    Every parameter is in a group from the start, frozen or not: unfreezing (gradual) only flips
    ``requires_grad``, so the optimizer's and the checkpoint's structure never change.
    """
    groups: list[dict[str, Any]] = []
    named = {id(p): n for n, p in model.named_parameters()}

    def add(name: str, params: list[nn.Parameter], lr: float) -> None:
        decay = [p for p in params if not _no_decay(named[id(p)], p)]
        rest = [p for p in params if _no_decay(named[id(p)], p)]
        for suffix, ps, wd in (("", decay, weight_decay), (".no_decay", rest, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": lr, "weight_decay": wd, "name": name + suffix})

    for st, lr in zip(plan.stages, plan.stage_lrs, strict=True):
        add(st.name, st.parameters(), lr)
    add("head", list(model.head.parameters()), plan.head_lr)
    covered = sum(len(g["params"]) for g in groups)
    if covered != len(list(model.parameters())):
        raise TlopsError(f"internal: {covered} of {len(list(model.parameters()))} parameters in optimizer groups")
    return groups


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """lr multiplier: linear from 1/(warmup+1) to 1 over the warm-up, then cosine down to zero at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min((step - warmup_steps) / span, 1.0)))

    return factor


def class_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """n / (k * count_c): the usual 'balanced' weights; a class absent from training gets weight 0."""
    counts = torch.bincount(torch.tensor(labels), minlength=num_classes).float()
    w = len(labels) / (num_classes * counts.clamp(min=1))
    return torch.where(counts > 0, w, torch.zeros_like(w))


def apply_frozen(model: ImageClassifier, plan: Plan, frozen: int, freeze_bn_stats: bool) -> None:
    """Train mode, except frozen stages (and every BatchNorm with freeze_bn_stats): eval mode, no grads."""
    model.train()
    for i, st in enumerate(plan.stages):
        st.set_frozen(i < frozen)
        if i < frozen:
            st.eval()
    if freeze_bn_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


# ------------------------------------------------------------------------------------------------- hardware


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


# ---------------------------------------------------------------------------------------------- the loop


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


def run_key(backbone_name: str, spec: PreprocessSpec, classes: list[str], manifest: pd.DataFrame,
            cfg: TrainConfig) -> str:
    """What a checkpoint belongs to: weights, preprocessing, data (content, labels, split) and training config."""
    rows = sorted(f"{r.sha256}\t{r.label}\t{r.split}" for r in _usable(manifest).itertuples()
                  if r.split in ("train", "val"))
    train = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RUNTIME_FIELDS}
    ident = {"weights": weights_identity(backbone_name), "preprocess": spec.fingerprint, "classes": classes,
             "data": hashlib.sha256("\n".join(rows).encode()).hexdigest(), "train": train,
             "backbone": backbone_name}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def checkpoint_location(cfg: TrainConfig, workdir: str | Path, key: str, state_uri: str | None = None) -> str:
    if cfg.checkpoint_dir:
        return cfg.checkpoint_dir
    if state_uri:
        return f"{state_uri.rstrip('/')}/checkpoints/{key[:16]}"
    return str(Path(workdir) / "checkpoints" / key[:16])


class _Progress:
    """Batch progress: a tqdm bar on a terminal, else ``tlops.progress`` (a line for the launcher's live bar,
    or a log line every ``every`` seconds)."""

    def __init__(self, total: int, desc: str, enabled: bool, every: float = 10.0) -> None:
        from tlops import progress

        self.bar = None
        self.counter: progress.Counter | None = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty() and not progress.structured():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        elif enabled:
            self.counter = progress.Counter(desc, total, "batches",
                                            every_s=None if progress.structured() else every)

    def step(self, n_images: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
        elif self.counter is not None:
            self.counter.advance(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _batches(x: list[torch.Tensor], y: list[int], size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(x), size):
        yield torch.stack(x[start : start + size]), torch.tensor(y[start : start + size], dtype=torch.long)


@torch.no_grad()
def _evaluate(model: nn.Module, x: list[torch.Tensor], y: list[int], hw: Hardware, batch: int) -> tuple[float, float]:
    """(summed cross-entropy, number correct) on this rank's share of the validation images."""
    model.eval()
    loss_sum, correct = 0.0, 0.0
    for xb, yb in _batches(x, y, batch):
        xb = xb.to(hw.device, non_blocking=True)
        if hw.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yb = yb.to(hw.device)
        with _autocast(hw):
            logits = model(xb).float()
        loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += float((logits.argmax(1) == yb).sum())
    return loss_sum, correct


def _autocast(hw: Hardware) -> contextlib.AbstractContextManager[Any]:
    if hw.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(hw.device.type, dtype=hw.amp_dtype)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train_gradient(backbone_name: str, manifest: pd.DataFrame, classes: list[str], spec: PreprocessSpec,
                   cfg: TrainConfig, workdir: str | Path = ".tlops", dist: DistContext | None = None,
                   head: dict[str, torch.Tensor] | None = None) -> FitResult:
    """Train with a gradient strategy (partial, full, gradual, scratch); resumes from its last checkpoint.

    Under DDP every rank calls this with its ``dist``; only rank 0 writes checkpoints, and every rank
    returns the same best model. ``head``: the head's initial weights (the linear probe's, for LP-FT).
    """
    from torch.utils.data import DataLoader

    from tlops.checkpoints import BEST, LAST, CheckpointStore, rng_state, set_rng_state
    from tlops.loaders import ManifestImages, ResumableSampler

    if not cfg.is_gradient:
        raise TlopsError(f"train_gradient: strategy {cfg.strategy} is not trained by gradient descent")
    ctx = dist or DistContext()
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

    train_paths, train_labels, _ = _split(manifest, classes, "train")
    val_paths, val_labels, _ = _split(manifest, classes, "val")
    n = len(train_paths)
    if n < 2 * ctx.world:
        raise TlopsError(f"the train split has {n} usable image(s): too few to train {cfg.strategy}")
    if cfg.batch_size % ctx.world:
        raise TlopsError(f"train.batch_size {cfg.batch_size} must be a multiple of the {ctx.world} DDP processes")
    batch = cfg.batch_size
    if n < batch:  # drop_last would leave no step at all
        batch = max((n // ctx.world) * ctx.world, ctx.world)
        log.warning("train.batch_size %d exceeds the %d training images; using %d", cfg.batch_size, n, batch)
    per_rank = batch // ctx.world
    steps_per_epoch = n // batch
    total_steps = cfg.epochs * steps_per_epoch

    model = build_classifier(backbone_name, num_classes=len(classes), pretrained=cfg.strategy != "scratch")
    if head is not None:
        model.head.load_state_dict(head)
    plan = make_plan(model, cfg)
    model.to(device)
    if hw.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(param_groups(model, plan, cfg.weight_decay), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch), total_steps))
    scaler = torch.amp.GradScaler("cuda") if hw.amp_dtype == torch.float16 else None
    weight = class_weights(train_labels, len(classes)).to(device) if cfg.class_weighted_loss else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)

    key = run_key(backbone_name, spec, classes, manifest, cfg)
    store = CheckpointStore(checkpoint_location(cfg, workdir, key), Path(workdir) / "cache")
    start_epoch, skip, global_step = 0, 0, 0
    history: list[dict[str, float]] = []
    best_acc, best_epoch, bad_epochs = -1.0, -1, 0
    best_state: dict[str, torch.Tensor] | None = None
    partial_sums = [0.0, 0.0, 0.0]  # loss sum, correct, images of the epoch so far (mid-epoch resume)
    finished, stopped_early, resumed_at = False, False, None
    last = None
    if cfg.resume:
        store.sync_down()  # every rank: on several machines each needs its own mirror of an s3:// store
        ctx.barrier()
        last = store.load(LAST)
    if last is not None:
        if last.get("key") != key:
            raise TlopsError(f"checkpoint {store.dir / LAST} belongs to another run (data, preprocessing or "
                             "training config differ); point train.checkpoint_dir elsewhere or delete it")
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        if scaler is not None and last.get("scaler"):
            scaler.load_state_dict(last["scaler"])
        set_rng_state(last["rng"])
        start_epoch, skip, global_step = int(last["epoch"]), int(last["step_in_epoch"]), int(last["global_step"])
        history = list(last["history"])
        best_acc, best_epoch, bad_epochs = float(last["best_val_accuracy"]), int(last["best_epoch"]), \
            int(last["bad_epochs"])
        partial_sums = [float(v) for v in last["epoch_sums"]] if ctx.main else [0.0, 0.0, 0.0]
        finished, stopped_early = bool(last["finished"]), bool(last["stopped_early"])
        best = store.load(BEST)
        if best is not None and int(best["epoch"]) == best_epoch:
            best_state = best["model"]
        elif best_epoch >= 0:
            # Killed between the epoch-end last.pt and best.pt: that last.pt holds the best epoch's weights
            # (a mid-epoch last.pt cannot follow it without best.pt having been repaired here first).
            best_state = last["model"]
            if ctx.main:
                store.save(BEST, {"model": best_state, "epoch": best_epoch, "val_accuracy": best_acc})
        resumed_at = global_step
        log.info("resuming %s from %s: epoch %d, step %d of %d%s", cfg.strategy, store.location, start_epoch + 1,
                 skip, steps_per_epoch, " (finished)" if finished else "")

    train_set = ManifestImages(train_paths, train_labels, spec, cfg.augment, cfg.seed,
                               cache_bytes=cfg.input_cache_mb * 2**20 if hw.workers == 0 else 0)
    sampler = ResumableSampler(train_set, ctx.world, ctx.rank, cfg.seed)
    loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, num_workers=hw.workers,
                        pin_memory=hw.pin_memory, drop_last=True)
    val_set = ManifestImages(val_paths[ctx.rank :: ctx.world], val_labels[ctx.rank :: ctx.world], spec,
                             AugmentConfig())  # evaluation: the spec's transform, never augmented
    val_x: list[torch.Tensor] | None = None
    wrapped: nn.Module = model
    frozen_now = -1
    process_steps = 0

    def save_last(epoch: int, step_in_epoch: int, sums: list[float]) -> None:
        store.save(LAST, {
            "key": key, "model": _state(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else {},
            "rng": rng_state(), "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "epoch_sums": sums, "history": history, "best_val_accuracy": best_acc, "best_epoch": best_epoch,
            "bad_epochs": bad_epochs, "finished": finished, "stopped_early": stopped_early,
            "strategy": cfg.strategy, "steps_per_epoch": steps_per_epoch,
        })

    for epoch in range(start_epoch, cfg.epochs):
        if finished:
            break
        frozen = plan.frozen_at(epoch)
        apply_frozen(model, plan, frozen, cfg.bn_stats_frozen)
        if frozen != frozen_now:
            wrapped = _wrap(model, ctx, hw)
            frozen_now = frozen
            if frozen and ctx.main:
                log.info("epoch %d: %d of %d backbone stages frozen", epoch + 1, frozen, len(plan.stages))
        trainable = [p for p in model.parameters() if p.requires_grad]
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch, skip=skip * per_rank)
        step_in_epoch = skip
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        sums0 = partial_sums
        progress = _Progress(steps_per_epoch - skip, f"epoch {epoch + 1}/{cfg.epochs}", ctx.main)
        t0 = time.perf_counter()
        for xb, yb in loader:
            xb = xb.to(device, non_blocking=True)
            if hw.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = yb.to(device, non_blocking=True)
            with _autocast(hw):
                logits = wrapped(xb)
            loss = criterion(logits.float(), yb)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.grad_clip_norm is not None and trainable:
                nn.utils.clip_grad_norm_(trainable, cfg.grad_clip_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().double() * len(yb)
            correct += (logits.detach().argmax(1) == yb).sum()
            seen += len(yb)
            global_step += 1
            step_in_epoch += 1
            process_steps += 1
            progress.step(batch)
            if (cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0
                    and step_in_epoch < steps_per_epoch):
                sums = ctx.all_sum([float(loss_sum), float(correct), float(seen)])
                if ctx.main:
                    save_last(epoch, step_in_epoch, [a + b for a, b in zip(sums0, sums, strict=True)])
            if cfg.stop_after_steps is not None and process_steps >= cfg.stop_after_steps:
                log.warning("train.stop_after_steps=%d reached: killing this process (SIGKILL)", process_steps)
                logging.shutdown()
                os.kill(os.getpid(), signal.SIGKILL)
        progress.close()
        train_seconds = time.perf_counter() - t0
        skip = 0
        partial_sums = [0.0, 0.0, 0.0]
        tot_loss, tot_correct, tot_seen = (a + b for a, b in zip(
            sums0, ctx.all_sum([float(loss_sum), float(correct), float(seen)]), strict=True))

        if val_x is None:
            val_x = [val_set[i][0] for i in range(len(val_set))]
        v_loss, v_correct, v_n = ctx.all_sum(
            [*_evaluate(model, val_x, val_set.labels, hw, max(per_rank * 2, 32)), float(len(val_x))])
        train_acc = tot_correct / max(tot_seen, 1)
        val_acc = v_correct / v_n if v_n else train_acc  # no validation split: select on training accuracy
        row = {"epoch": epoch, "train_loss": tot_loss / max(tot_seen, 1), "train_accuracy": train_acc,
               "val_loss": v_loss / v_n if v_n else float("nan"), "val_accuracy": val_acc,
               "lr": optimizer.param_groups[-1]["lr"], "frozen_stages": frozen, "seconds": train_seconds,
               "images_per_second": (seen * ctx.world) / max(train_seconds, 1e-9)}
        history.append(row)
        improved = val_acc > best_acc
        if improved:
            best_acc, best_epoch, bad_epochs = val_acc, epoch, 0
            best_state = _state(model)
        else:
            bad_epochs += 1
        stopped_early = cfg.patience is not None and bad_epochs >= cfg.patience and epoch + 1 < cfg.epochs
        finished = stopped_early or epoch + 1 == cfg.epochs
        if ctx.main:
            log.info("epoch %d/%d: train loss %.4f accuracy %.4f, val loss %.4f accuracy %.4f (best %.4f at epoch "
                     "%d), lr %.2e, %.1f images/s", epoch + 1, cfg.epochs, row["train_loss"], train_acc,
                     row["val_loss"], val_acc, best_acc, best_epoch + 1, row["lr"], row["images_per_second"])
            save_last(epoch + 1, 0, [0.0, 0.0, 0.0])
            if improved:
                store.save(BEST, {"model": best_state, "epoch": epoch, "val_accuracy": val_acc})
        if stopped_early:
            log.info("early stop: no better validation accuracy for %d epochs", cfg.patience)
            break
    ctx.barrier()
    if best_state is None:  # no epoch ran (epochs already done in a checkpoint without a best): keep last
        best_state = _state(model)
    model.load_state_dict(best_state)
    model.to(memory_format=torch.contiguous_format)  # as it will be served: the saved model is rebuilt NCHW
    env = environment(device, ctx.world, hw.amp_dtype, hw.channels_last, hw.compile)
    env.update({"train_images": n, "batch_size": batch, "steps_per_epoch": steps_per_epoch,
                "checkpoint_dir": store.location})
    return FitResult(model=model.cpu().eval(), history=history, best_epoch=best_epoch, best_val_accuracy=best_acc,
                     strategy=cfg.strategy, environment=env, checkpoint_dir=store.location,
                     resumed_at_step=resumed_at, stopped_early=stopped_early)


def _wrap(model: nn.Module, ctx: DistContext, hw: Hardware) -> nn.Module:
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


def fine_tune(backbone_name: str, manifest: pd.DataFrame, classes: list[str], spec: PreprocessSpec,
              cfg: TrainConfig, workdir: str | Path = ".tlops", state_uri: str | None = None) -> FitResult:
    """Train with ``cfg.strategy``: the entry point of the fine-tune step.

    With ``state_uri`` the feature cache and the checkpoints live there (as well as in ``workdir``), so a step
    that runs again on a fresh disk resumes."""
    cache_dir = Path(workdir) / "cache" / "features" if cfg.feature_cache else None
    remote = f"{state_uri.rstrip('/')}/features" if state_uri else None
    if cfg.strategy == "linear-probe":
        return linear_probe(backbone_name, manifest, classes, spec, cfg, cache_dir=cache_dir, cache_remote=remote)
    from tlops import ddp

    probe = None
    if cfg.starts_from_probe:  # LP-FT: the probe first (from the feature cache), its head the starting point
        probe = linear_probe(backbone_name, manifest, classes, spec, cfg.model_copy(update={
            "strategy": "linear-probe", "epochs": DEFAULT_EPOCHS["linear-probe"]}),
            cache_dir=cache_dir, cache_remote=remote)
        log.info("%s starts from the linear probe's head (validation accuracy %.4f)", cfg.strategy,
                 probe.best_val_accuracy)
    head = {k: v.detach().clone() for k, v in probe.model.head.state_dict().items()} if probe else None

    if state_uri and not cfg.checkpoint_dir:
        # checkpoint_dir is a runtime field: the key (and so the checkpoint's identity) does not change.
        key = run_key(backbone_name, spec, classes, manifest, cfg)
        cfg = cfg.model_copy(update={"checkpoint_dir": checkpoint_location(cfg, workdir, key, state_uri)})

    if ddp.launched_by_torchrun():
        result = ddp.fit_under_torchrun(backbone_name, manifest, classes, spec, cfg, workdir, head)
    elif cfg.processes > 1:
        result = ddp.spawn_fit(backbone_name, manifest, classes, spec, cfg, workdir, cfg.processes, head)
    else:
        result = train_gradient(backbone_name, manifest, classes, spec, cfg, workdir, head=head)
    if probe is not None:
        result.environment["probe_val_accuracy"] = probe.best_val_accuracy
        if cfg.keep_better_probe and result.best_val_accuracy < probe.best_val_accuracy:
            log.warning("%s: best validation accuracy %.4f is below the linear probe's %.4f; the probe's model is "
                        "kept (train.keep_better_probe: false keeps the fine-tuned one)", cfg.strategy,
                        result.best_val_accuracy, probe.best_val_accuracy)
            probe.environment.update(result.environment)
            probe.kept_over = cfg.strategy
            return probe
    return result


def checkpoint_payload(model: ImageClassifier) -> dict[str, Any]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
