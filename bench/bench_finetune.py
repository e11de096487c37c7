"""Full fine-tuning throughput: tlops' training loop against torchvision's reference classification recipe.

    .venv/bin/python -m bench.bench_finetune [--images 384] [--batch 32] [--epochs 2] [--repeats 3] [--size 96]

The same model (EfficientNet-Lite0, ImageNet weights, new 10-class head, every layer trained), the same
images (the first ``--images`` training digits at ``--size`` px through the spec's transform), the same batch
size, AdamW, label smoothing 0.1 and gradient clipping at 1.0, on both sides:

- reference: ``train_one_epoch`` as in torchvision's ``references/classification/train.py``: a standard
  DataLoader (RandomSampler, files decoded every epoch), ``model.train()``, criterion, ``zero_grad`` /
  ``backward`` / ``clip_grad_norm_`` / ``step``, and its per-step metric logging (``loss.item()``, top-1 and
  top-5 accuracy, img/s in a MetricLogger);
- tlops: ``train_gradient`` with ``strategy: full`` as the fine-tune step runs it (param groups, warm-up +
  cosine, accumulated metrics, the decoded-input cache, a checkpoint per epoch; its default NHWC layout),
  and once more with ``channels_last: false`` to show what the layout is worth.

Throughput is training images / time in the training loop (model building, validation and checkpoint
writing excluded on both sides; tlops' checkpoint is written after its loop's clock stops). Each repeat runs
every variant side by side; ratios are of medians over repeats. Not a test.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict, deque

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from bench.common import Files, digits_manifest, machine, median, split
from tlops.config.settings import TrainConfig
from tlops.data.discovery import class_names
from tlops.training.loop import train_gradient
from tlops.vision.backbones import build_classifier, reference_spec
from tlops.vision.preprocessing import build_transform, with_resolution

BACKBONE = "efficientnet_lite0"


class SmoothedValue:
    """torchvision references' SmoothedValue: a window and a global average."""

    def __init__(self, window_size: int = 20) -> None:
        self.deque: deque[float] = deque(maxlen=window_size)
        self.total, self.count = 0.0, 0

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[torch.Tensor]:
    """torchvision references' utils.accuracy."""
    with torch.inference_mode():
        maxk = max(topk)
        batch_size = target.size(0)
        if target.ndim == 2:
            target = target.max(dim=1)[1]
        _, pred = output.topk(maxk, 1, True, True)
        pred = pred.t()
        correct = pred.eq(target[None])
        return [correct[:k].flatten().sum(dtype=torch.float32) * (100.0 / batch_size) for k in topk]


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader,
                    device: torch.device, clip_grad_norm: float | None, print_freq: int = 10) -> int:
    """references/classification/train.py's train_one_epoch (no AMP scaler, no EMA, as on a CPU)."""
    model.train()
    meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
    meters["img/s"] = SmoothedValue(window_size=10)
    seen = 0
    for i, (image, target) in enumerate(data_loader):
        start_time = time.time()
        image, target = image.to(device), target.to(device)
        output = model(image)
        loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        if clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        batch_size = image.shape[0]
        meters["loss"].update(loss.item())
        meters["lr"].update(optimizer.param_groups[0]["lr"])
        meters["acc1"].update(acc1.item(), n=batch_size)
        meters["acc5"].update(acc5.item(), n=batch_size)
        meters["img/s"].update(batch_size / (time.time() - start_time))
        if i % print_freq == 0:
            _ = "  ".join(f"{k}: {v.total / max(v.count, 1):.4f}" for k, v in meters.items())  # the log line
        seen += batch_size
    return seen


def reference(paths: list[str], labels: list[int], classes: int, spec, batch: int, epochs: int,  # noqa: ANN001
              lr: float) -> float:
    torch.manual_seed(0)
    model = build_classifier(BACKBONE, classes, pretrained=True)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    loader = DataLoader(Files(paths, labels, build_transform(spec)), batch_size=batch,
                        sampler=RandomSampler(range(len(paths))), num_workers=0, pin_memory=False)
    seen, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        seen += train_one_epoch(model, criterion, optimizer, loader, torch.device("cpu"), clip_grad_norm=1.0)
    return seen / (time.perf_counter() - t0)


def tlops_loop(manifest, classes: list[str], spec, batch: int, epochs: int, lr: float,  # noqa: ANN001
               channels_last: bool | None) -> float:
    cfg = TrainConfig(strategy="full", epochs=epochs, batch_size=batch, lr=lr, backbone_lr_factor=1.0,
                      weight_decay=0.01, label_smoothing=0.1, grad_clip_norm=1.0, patience=None, resume=False,
                      warmup_epochs=0.0, channels_last=channels_last)
    with tempfile.TemporaryDirectory(prefix="tlops-bench-ft-") as tmp:
        result = train_gradient(BACKBONE, manifest, classes, spec, cfg, workdir=tmp)
    seen = sum(h["images_per_second"] * h["seconds"] for h in result.history)
    return seen / sum(h["seconds"] for h in result.history)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384, help="training images (a multiple of --batch)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args(argv)

    full = digits_manifest()
    classes = class_names(full)
    train_rows = full[full["split"] == "train"].head(args.images)
    val_rows = full[full["split"] == "val"].head(64)  # tlops validates each epoch (not timed)
    manifest = full.loc[list(train_rows.index) + list(val_rows.index)]
    paths, labels = split(manifest, "train", classes)
    spec = with_resolution(reference_spec(BACKBONE), args.size)
    print(f"machine: {machine()}")
    print(f"data: {len(paths)} digits at {args.size} px, batch {args.batch}, {args.epochs} epochs, full fine-tuning "
          f"of {BACKBONE}, {args.repeats} repeats")
    rows: dict[str, list[float]] = {"reference": [], "tlops": [], "tlops_nchw": []}
    for r in range(args.repeats):
        rows["reference"].append(reference(paths, labels, len(classes), spec, args.batch, args.epochs, args.lr))
        rows["tlops"].append(tlops_loop(manifest, classes, spec, args.batch, args.epochs, args.lr, None))
        rows["tlops_nchw"].append(tlops_loop(manifest, classes, spec, args.batch, args.epochs, args.lr, False))
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rows.items()), flush=True)
    med = {k: median(v) for k, v in rows.items()}
    ratios = [t / ref for t, ref in zip(rows["tlops"], rows["reference"], strict=True)]
    ratios_nchw = [t / ref for t, ref in zip(rows["tlops_nchw"], rows["reference"], strict=True)]
    print(f"torchvision reference train_one_epoch: {med['reference']:.1f} images/s")
    print(f"tlops train_gradient (channels_last):  {med['tlops']:.1f} images/s")
    print(f"tlops train_gradient (NCHW):           {med['tlops_nchw']:.1f} images/s")
    print(f"ratio tlops / reference: median {median(ratios):.2f}x (per repeat "
          f"{', '.join(f'{x:.2f}' for x in ratios)}); with NCHW {median(ratios_nchw):.2f}x")


if __name__ == "__main__":
    main()
