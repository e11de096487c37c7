"""Linear probe: tlops' feature cache against the tutorial loop that runs the frozen backbone every epoch.

    .venv/bin/python bench/bench_linear_probe.py [--epochs 10] [--repeats 3] [--size 96]

Both sides train the same linear head (same init, same Adam, same batches in the same order) on the demo
digits for ``--epochs`` epochs, and score it on the test split:

- tutorial: a DataLoader over the image files (decode + the spec's transform) and the frozen backbone (eval
  mode, no gradients) in every step of every epoch, as the usual "ConvNet as fixed feature extractor" loop;
- tlops, cold: the features of each split computed once into an empty feature cache (tlops.vision.features), then
  the head trained on the cached tensors;
- tlops, warm: the same run again: the cache is hit, the backbone never runs.

Each repeat runs all three side by side; the ratios printed are of medians over the repeats. Not a test.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from bench.common import Files, digits_manifest, machine, median, split
from tlops.data.discovery import class_names
from tlops.vision.backbones import feature_extractor, get_info, reference_spec
from tlops.vision.features import FeatureCache
from tlops.vision.preprocessing import build_transform, with_resolution

BACKBONE = "efficientnet_lite0"


def new_head(dim: int, classes: int) -> tuple[nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    head = nn.Linear(dim, classes)
    return head, torch.optim.Adam(head.parameters(), lr=1e-3)


def tutorial(backbone: nn.Module, train: tuple[list[str], list[int]], test: tuple[list[str], list[int]],
             spec, classes: int, epochs: int, batch: int) -> tuple[float, float]:  # noqa: ANN001
    """Every epoch decodes every image and runs the frozen backbone on it."""
    t0 = time.perf_counter()
    transform = build_transform(spec)
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone.eval()
    head, opt = new_head(get_info(BACKBONE).feature_dim, classes)
    model = nn.Sequential(backbone, head)
    loader = DataLoader(Files(*train, transform), batch_size=batch, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        head.train()
        for x, y in loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(Files(*test, transform), batch_size=batch):
            correct += int((model(x).argmax(1) == y).sum())
    return time.perf_counter() - t0, correct / len(test[1])


def cached(backbone: nn.Module, cache_dir: Path, train: tuple[list[str], list[int]], train_sha: list[str],
           test: tuple[list[str], list[int]], test_sha: list[str], spec, classes: int, epochs: int,  # noqa: ANN001
           batch: int) -> tuple[float, float, int]:
    """Features from the cache (computed once on a miss), then the same head on the same batches."""
    t0 = time.perf_counter()
    cache = FeatureCache(cache_dir)
    device = torch.device("cpu")
    x_train = cache.features(BACKBONE, backbone, train[0], train_sha, spec, batch, device, "train")
    x_test = cache.features(BACKBONE, backbone, test[0], test_sha, spec, batch, device, "test")
    y_train, y_test = torch.tensor(train[1]), torch.tensor(test[1])
    head, opt = new_head(x_train.shape[1], classes)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        # What DataLoader(shuffle=True, generator=g) draws: a worker base seed, then the permutation.
        torch.empty((), dtype=torch.int64).random_(generator=g)
        order = torch.randperm(len(y_train), generator=g)
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            loss = loss_fn(head(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float((head(x_test).argmax(1) == y_test).float().mean())
    return time.perf_counter() - t0, acc, cache.misses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=96, help="input size (the demo declares 96 px)")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)

    manifest = digits_manifest()
    classes = class_names(manifest)
    spec = with_resolution(reference_spec(BACKBONE), args.size)
    train, test = split(manifest, "train", classes), split(manifest, "test", classes)
    sha = {s: list(manifest[(manifest["split"] == s) & manifest["decodable"]]["sha256"]) for s in ("train", "test")}
    backbone = feature_extractor(BACKBONE)
    print(f"machine: {machine()}")
    print(f"data: digits, {len(train[1])} train / {len(test[1])} test images at {args.size} px; {args.epochs} "
          f"epochs, batch {args.batch}, {args.repeats} repeats")
    rows: dict[str, list[tuple[float, float]]] = {"tutorial": [], "cold": [], "warm": []}
    for r in range(args.repeats):
        cache_dir = Path(tempfile.mkdtemp(prefix="tlops-bench-features-"))
        try:
            t, acc, misses = cached(backbone, cache_dir, train, sha["train"], test, sha["test"], spec, len(classes),
                                    args.epochs, args.batch)
            assert misses == 2
            rows["cold"].append((t, acc))
            t, acc, misses = cached(backbone, cache_dir, train, sha["train"], test, sha["test"], spec, len(classes),
                                    args.epochs, args.batch)
            assert misses == 0
            rows["warm"].append((t, acc))
        finally:
            shutil.rmtree(cache_dir)
        rows["tutorial"].append(tutorial(backbone, train, test, spec, len(classes), args.epochs, args.batch))
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f}s acc {v[-1][1]:.4f}" for k, v in rows.items()),
              flush=True)
    med = {k: median([t for t, _ in v]) for k, v in rows.items()}
    acc = {k: median([a for _, a in v]) for k, v in rows.items()}
    print(f"tutorial loop (backbone every epoch): {med['tutorial']:.1f} s, test accuracy {acc['tutorial']:.4f}")
    print(f"tlops, cold feature cache:            {med['cold']:.1f} s, test accuracy {acc['cold']:.4f}")
    print(f"tlops, warm feature cache:            {med['warm']:.2f} s, test accuracy {acc['warm']:.4f}")
    print(f"speed-up, cold cache: {med['tutorial'] / med['cold']:.1f}x; warm cache: "
          f"{med['tutorial'] / med['warm']:.0f}x; accuracy difference {abs(acc['tutorial'] - acc['cold']) * 100:.2f} "
          "points")


if __name__ == "__main__":
    main()
