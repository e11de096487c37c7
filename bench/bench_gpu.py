"""ResNet-50 training throughput on one GPU (AMP, channels_last, batch 256) next to NVIDIA's published figure.

    .venv/bin/python -m bench.bench_gpu [--batch 256] [--steps 60] [--warmup 15] [--repeats 3] [--compile]

NVIDIA's DeepLearningExamples report 2,470 images/s for ResNet-50 v1.5 training with AMP at batch 256 on one
A100 80GB (PyTorch, DALI data loading). Two figures are measured here, each the median of ``--repeats``:

1. the training step alone (forward, backward, AdamW step under bf16/fp16 autocast, channels_last) on
   tensors already on the GPU: the model's ceiling, the figure comparable with NVIDIA's;
2. tlops' own loop (``train_gradient``, strategy ``scratch`` so no weights file is needed; the same compute as
   ``full``) on the demo digits resized to 224 px, DataLoader workers and pinned memory as the engine sets
   them: what the pipeline gets end to end, decoding included.

Needs a CUDA device; on a machine without one it says so and exits 0. Not a test.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch import nn

from bench.common import digits_manifest, machine, median
from tlops.config.settings import TrainConfig
from tlops.data.discovery import class_names
from tlops.training.loop import train_gradient
from tlops.vision.backbones import build_classifier, reference_spec

NVIDIA_A100_AMP_BS256 = 2470.0


def step_only(batch: int, steps: int, warmup: int, compile_model: bool) -> float:
    device = torch.device("cuda")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    model = build_classifier("resnet50", 1000, pretrained=False).to(device, memory_format=torch.channels_last)
    runner = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype):
            loss = loss_fn(runner(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def engine(batch: int, epochs: int, compile_model: bool) -> float:
    full = digits_manifest()
    classes = class_names(full)
    spec = reference_spec("resnet50")  # 224 px crop, torchvision's preset
    cfg = TrainConfig(strategy="scratch", epochs=epochs, batch_size=batch, patience=None, resume=False,
                      device="cuda", compile=compile_model)
    with tempfile.TemporaryDirectory(prefix="tlops-bench-gpu-") as tmp:
        result = train_gradient("resnet50", full, classes, spec, cfg, workdir=tmp)
    later = result.history[1:] or result.history  # the first epoch pays for cuDNN autotuning (and compile)
    seen = sum(h["images_per_second"] * h["seconds"] for h in later)
    return seen / sum(h["seconds"] for h in later)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="tlops loop epochs over the 1,145 training digits")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark was not run")
        return
    print(f"machine: {machine()}; GPU {torch.cuda.get_device_name()}")
    steps = [step_only(args.batch, args.steps, args.warmup, args.compile) for _ in range(args.repeats)]
    print(f"ResNet-50 training step alone, AMP + channels_last, batch {args.batch}: {median(steps):.0f} images/s "
          f"(median of {args.repeats}); NVIDIA A100 80GB published: {NVIDIA_A100_AMP_BS256:.0f} images/s "
          f"-> {median(steps) / NVIDIA_A100_AMP_BS256:.2f}x")
    loop = [engine(args.batch, args.epochs, args.compile) for _ in range(args.repeats)]
    print(f"tlops train_gradient on digits at 224 px, batch {args.batch}: {median(loop):.0f} images/s "
          f"({median(loop) / median(steps):.0%} of the step alone)")


if __name__ == "__main__":
    main()
