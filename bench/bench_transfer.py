"""What transfer buys: test accuracy on the demo digits with 10% of the training labels, per strategy.

    .venv/bin/python -m bench.bench_transfer [--fraction 0.1] [--seeds 3] [--epochs 12] [--size 96]

For each seed, a stratified ``--fraction`` of the training split is kept (the validation and test splits stay
whole), and every strategy trains on it as the fine-tune step does (``tlops.training.finetune.fine_tune``):
linear-probe (L-BFGS on cached features), lp-ft (full fine-tuning from the probe's head with the pre-trained
BatchNorm statistics kept: the default start of a gradient strategy), full and gradual from a random head
(fine-tuning before LP-FT), and scratch (the same architecture from random weights: the baseline). Test
accuracy is measured with the spec's eval transform. Prints per-seed numbers, medians over seeds, and each
strategy's gain over scratch. Not a test.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import pandas as pd
import torch

from bench.common import digits_manifest, machine, median, split
from tlops.config.settings import TrainConfig
from tlops.data.discovery import class_names
from tlops.training.finetune import fine_tune
from tlops.vision.backbones import reference_spec
from tlops.vision.preprocessing import build_transform, with_resolution

BACKBONE = "efficientnet_lite0"
STRATEGIES = ("linear-probe", "lp-ft", "full", "gradual", "scratch")


def few_labels(manifest: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Keep ``fraction`` of each class's training images; val and test untouched."""
    train = manifest[manifest["split"] == "train"]
    kept = train.groupby("label").sample(frac=fraction, random_state=seed)
    return pd.concat([kept, manifest[manifest["split"] != "train"]])


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, paths: list[str], labels: list[int], spec) -> float:  # noqa: ANN001
    transform = build_transform(spec)
    model.eval()
    correct = 0
    for start in range(0, len(paths), 128):
        x = torch.stack([transform(p) for p in paths[start : start + 128]])
        correct += int((model(x).argmax(1) == torch.tensor(labels[start : start + 128])).sum())
    return correct / len(labels)


def config(strategy: str, epochs: int, seed: int) -> TrainConfig:
    if strategy == "linear-probe":
        return TrainConfig(seed=seed)
    if strategy == "lp-ft":  # full fine-tuning from the probe's head, BatchNorm statistics kept, one rate for all
        return TrainConfig(strategy="full", epochs=epochs, batch_size=16, seed=seed, patience=None, resume=False,
                           warmup_epochs=0.0, lr=3e-4, backbone_lr_factor=1.0, head_init="probe",
                           keep_better_probe=False)  # its own score, even where the probe's would be kept
    # The others from a random head, as before LP-FT (what fine-tuning gave without it).
    common = {"strategy": strategy, "epochs": epochs, "batch_size": 16, "seed": seed, "patience": None,
              "resume": False, "warmup_epochs": 1.0, "head_init": "random"}
    if strategy == "scratch":  # every layer at the same rate, as one trains from scratch
        return TrainConfig(**common, lr=2e-3)
    if strategy == "gradual":
        return TrainConfig(**common, lr=2e-3, backbone_lr_factor=0.2, layer_decay=0.8, gradual_head_epochs=2,
                           gradual_unfreeze_every=1)
    return TrainConfig(**common, lr=2e-3, backbone_lr_factor=0.2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--first-seed", type=int, default=0)
    args = parser.parse_args(argv)

    full = digits_manifest()
    classes = class_names(full)
    spec = with_resolution(reference_spec(BACKBONE), args.size)
    test_paths, test_labels = split(full, "test", classes)
    strategies = args.strategies.split(",")
    print(f"machine: {machine()}")
    results: dict[str, list[float]] = {s: [] for s in strategies}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        manifest = few_labels(full, args.fraction, seed)
        n_train = int((manifest["split"] == "train").sum())
        for strategy in strategies:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="tlops-bench-transfer-") as tmp:
                result = fine_tune(BACKBONE, manifest, classes, spec, config(strategy, args.epochs, seed), tmp)
            acc = test_accuracy(result.model, test_paths, test_labels, spec)
            results[strategy].append(acc)
            print(f"seed {seed}: {n_train} training labels, {strategy:12s} test accuracy {acc:.4f} "
                  f"(best val {result.best_val_accuracy:.4f} at epoch {result.best_epoch + 1}, "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"digits, {args.fraction:.0%} of the training labels, {args.size} px, {len(test_labels)} test images, "
          f"median over {args.seeds} seeds:")
    base = median(results["scratch"]) if "scratch" in results else None
    for strategy, accs in results.items():
        gain = f", {median(accs) - base:+.4f} over scratch" if base is not None and strategy != "scratch" else ""
        print(f"  {strategy:12s} {median(accs):.4f}{gain}")


if __name__ == "__main__":
    main()
