"""Domain adaptation on a real shift: handwritten digits (scikit-learn) -> digits printed in the machine's fonts.

    nice -n 5 .venv/bin/python -m bench.bench_adapt [--seeds 3] [--source-per-class 50] [--target-per-class 30]
                                                    [--size 32] [--epochs 10] [--rounds 2] [--round-epochs 3]
                                                    [--threshold 0.9] [--jobs 3 --threads 1]

Source: scikit-learn's handwritten digits (``tlops demo-data``: the UCI optdigits forms, each digit a NIST
32x32 bitmap counted into 8x8 grey levels), ``--source-per-class`` labelled images per digit, 300 other
scans for the source test. Target: the ten digits printed in the machine's own fonts and read the same
way (``tlops.data.fontdigits``, style ``scan``: the same 8x8, 17-level grid, so the shift is print
against handwriting, not resolution). Three disjoint renderings of ``--target-per-class`` images per
digit: the unlabelled pool the strategies adapt on, a validation set and the test set.

Every layer of EfficientNet-Lite0 (ImageNet weights) is trained, at ``--size`` px
(``tlops.training.adaptation``, as the pipeline's fine-tune step runs it):

- source-only: fine-tuning on the labelled source;
- adabn: the source-only model, its BatchNorm statistics re-estimated on the target pool;
- self-training: from the AdaBN model, ``--rounds`` rounds (``--round-epochs`` each) of confident
  (``--threshold``), class-balanced pseudo-labels on the pool, learnt from strong views beside the source
  (statistics re-estimated on the pool before each round and at the end);
- mcc: fine-tuning from the ImageNet start on the source with Minimum Class Confusion on pool batches,
  then the pool's statistics;
- target-supervised (the ceiling): fine-tuning from the ImageNet start on the source and the pool, both
  with their labels (the pool alone, 300 images, gave a weaker ceiling than self-training: 0.63).

No strategy sees a target label: the pool's labels train only the ceiling; the validation set's labels
only score (printed beside the test, for choosing settings without looking at the test); the test set's
labels only score. Prints target-test, target-validation and source-test accuracy per seed and strategy,
medians over seeds, and the share of the source-only-to-ceiling gap each strategy closes. Not a test.
"""

from __future__ import annotations

import argparse
import copy
import logging
import multiprocessing
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from bench.common import machine, median
from tlops.data.discovery import export_digits
from tlops.data.fontdigits import export_font_digits
from tlops.training.adaptation import AdaptConfig, accuracy, adabn, fine_tune_source, mcc, self_train
from tlops.vision.backbones import build_classifier, reference_spec
from tlops.vision.preprocessing import build_transform, with_resolution

BACKBONE = "efficientnet_lite0"
METHODS = ("source-only", "adabn", "self-training", "mcc", "target-supervised")


def load(root: Path, transform) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    paths = sorted(root.rglob("*.png"))
    x = torch.stack([transform(str(p)) for p in paths])
    return x, torch.tensor([int(p.parent.name) for p in paths])


def split_source(x: torch.Tensor, y: torch.Tensor, per_class: int, classes: int) -> tuple[torch.Tensor, ...]:
    """The first ``per_class`` images of each digit for training, the rest of the scans for the source test."""
    train = torch.zeros(len(y), dtype=torch.bool)
    for c in range(classes):
        train[torch.nonzero(y == c).flatten()[:per_class]] = True
    return x[train], y[train], x[~train], y[~train]


def build_data(root: Path, size: int, source_per_class: int, target_per_class: int, source_test: int,
               classes: list[int] | None = None, scans_per_class: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor the protocol needs, rendered and exported under ``root``. The target pool, validation
    and test sets are three renderings with their own seeds (1, 3, 2): disjoint images of the same fonts.
    ``scans_per_class``: only the first scans of each digit (all by default)."""
    digits = classes if classes is not None else list(range(10))
    transform = build_transform(with_resolution(reference_spec(BACKBONE), size))
    export_digits(root / "source", classes=digits, per_class=scans_per_class)
    for name, seed in (("pool", 1), ("val", 3), ("test", 2)):
        export_font_digits(root / name, target_per_class, classes=digits, seed=seed)
    xs_all, ys_all = load(root / "source", transform)
    remap = torch.tensor([digits.index(d) if d in digits else -1 for d in range(10)])
    xs, ys, xs_test, ys_test = split_source(xs_all, remap[ys_all], source_per_class, len(digits))
    keep = torch.randperm(len(ys_test), generator=torch.Generator().manual_seed(0))[:source_test]
    data = {"xs": xs, "ys": ys, "xs_test": xs_test[keep], "ys_test": ys_test[keep]}
    for name, prefix in (("pool", "xt"), ("val", "xt_val"), ("test", "xt_test")):
        x, y = load(root / name, transform)
        data[prefix], data[prefix.replace("x", "y", 1)] = x, remap[y]
    return data


def run_seed(seed: int, data: dict[str, torch.Tensor], cfg: AdaptConfig, classes: int = 10,
             log: Callable[[str], None] = print, threads: int = 0) -> dict[str, dict[str, float]]:
    """Every strategy for one seed: {strategy: {"target": test accuracy, "val": target-validation
    accuracy, "source": source-test accuracy}}. The target pool's labels (``yt``) train only the ceiling."""
    if threads:
        torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    cfg = AdaptConfig(**{**cfg.__dict__, "seed": seed})
    found: dict[str, dict[str, float]] = {}

    def fresh() -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_classifier(BACKBONE, num_classes=classes)

    def score(name: str, model: torch.nn.Module) -> None:
        found[name] = {"target": accuracy(model, data["xt_test"], data["yt_test"]),
                       "val": accuracy(model, data["xt_val"], data["yt_val"]),
                       "source": accuracy(model, data["xs_test"], data["ys_test"])}
        r = found[name]
        log(f"seed {seed} {name:18s} target test {r['target']:.4f}  target val {r['val']:.4f}  "
            f"source test {r['source']:.4f}  ({time.perf_counter() - t0:.0f}s, cpu {time.process_time() - c0:.0f}s)")

    xs, ys, xt = data["xs"], data["ys"], data["xt"]
    source = fresh()
    fine_tune_source(source, xs, ys, cfg)
    score("source-only", source)
    model = copy.deepcopy(source)
    adabn(model, xt, cfg.batch_size)
    score("adabn", model)
    self_train(model, xs, ys, xt, cfg)  # from the AdaBN model; re-estimated on the pool each round
    score("self-training", model)
    model = fresh()
    mcc(model, xs, ys, xt, cfg)
    score("mcc", model)
    model = fresh()  # the ceiling: the source and the pool, each with its labels
    fine_tune_source(model, torch.cat([xs, xt]), torch.cat([ys, data["yt"]]), cfg)
    score("target-supervised", model)
    return found


def summarise(results: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Medians over seeds per strategy, and the share of the source-only-to-ceiling gap (of the medians)
    each closes on the target test set."""
    out: dict[str, dict[str, float]] = {}
    for name in METHODS:
        out[name] = {k: median([r[name][k] for r in results]) for k in ("target", "val", "source")}
    base, ceiling = out["source-only"]["target"], out["target-supervised"]["target"]
    for name in METHODS:
        gap = ceiling - base
        out[name]["gap_closed"] = (out[name]["target"] - base) / gap if gap > 0 else float("nan")
    return out


def _print(line: str) -> None:
    print(line, flush=True)


def _worker_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tlops").setLevel(logging.INFO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--source-per-class", type=int, default=50)
    parser.add_argument("--source-test", type=int, default=300, help="scans kept for the source test")
    parser.add_argument("--target-per-class", type=int, default=30)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--backbone-lr-factor", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--round-epochs", type=int, default=3, help="epochs of each self-training round")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--portion", type=float, default=None,
                        help="self-training: each predicted class's most confident share per round instead of the "
                             "threshold (round r: r x portion)")
    parser.add_argument("--mcc-weight", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per seed (0: torch's default)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once, each in its own process")
    args = parser.parse_args()
    _worker_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory(prefix="tlops-bench-adapt-") as tmp:  # the images live on as tensors
        data = build_data(Path(tmp), args.size, args.source_per_class, args.target_per_class, args.source_test)
    cfg = AdaptConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      backbone_lr_factor=args.backbone_lr_factor, rounds=args.rounds, round_epochs=args.round_epochs,
                      threshold=args.threshold, portion=args.portion,
                      mcc_weight=args.mcc_weight)
    print(f"source train {len(data['xs'])}, source test {len(data['xs_test'])}, target pool {len(data['xt'])} "
          f"(unlabelled), target val {len(data['xt_val'])}, target test {len(data['xt_test'])}; {args.size} px; "
          f"{cfg}", flush=True)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_logging) as pool:
            results = list(pool.map(run_seed, range(args.seeds), [data] * args.seeds, [cfg] * args.seeds,
                                    [10] * args.seeds, [_print] * args.seeds, [args.threads] * args.seeds))
    else:
        results = [run_seed(seed, data, cfg, log=_print, threads=args.threads) for seed in range(args.seeds)]
    print("\nmedians over seeds (target test, target val, source test; share of the gap closed on target test):")
    for name, row in summarise(results).items():
        per_seed = ", ".join(f"{r[name]['target']:.3f}" for r in results)
        print(f"{name:18s} target {row['target']:.4f} [{per_seed}]  val {row['val']:.4f}  "
              f"source {row['source']:.4f}  gap closed {row['gap_closed']:+.2f}")


if __name__ == "__main__":
    main()
