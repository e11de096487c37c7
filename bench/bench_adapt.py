"""Domain adaptation on a real shift: handwritten digits (scikit-learn) -> digits from this machine's fonts.

    .venv/bin/python -m bench.bench_adapt [--seeds 3] [--source-per-class 50] [--target-per-class 30]
                                          [--size 32] [--epochs 6] [--mode features|finetune]

Source: scikit-learn's 8x8 handwritten scans (``tlops demo-data``), ``--source-per-class`` labelled images
per digit. Target: the same ten digits rendered from the machine's own fonts (``tlops.data.fontdigits``: fc-list,
/usr/share/fonts) at varied sizes, positions and strokes, reduced to the scans' 8x8, 17-level look; an
unlabelled training pool and a disjoint labelled test set of ``--target-per-class`` images per digit each.

Two protocols on EfficientNet-Lite0 (ImageNet weights) at ``--size`` px, three seeds each:

- ``--mode features`` (the default; minutes on a CPU): the backbone frozen, only linear heads trained on
  its standardised features. Source-only: a head on the source features; AdaBN: the same head on target
  features whose BatchNorm statistics were re-estimated on the unlabelled target pool; self-training: three
  rounds of confident, class-balanced pseudo-labels on those features; MCC: the head trained with the
  Minimum Class Confusion loss on them; target-supervised: a head on the pool's own labels (the ceiling).
- ``--mode finetune``: every layer trained (``tlops.training.adaptation``: source-only fine-tuning, AdaBN and
  self-training with weak/strong views on top of it, MCC fine-tuning, the ceiling); hours on a shared CPU.

Prints target-test and source-test accuracy per seed, medians over seeds, and the share of the
source-only-to-ceiling gap each strategy closes. No target label is used by any strategy but the ceiling.
Not a test.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
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


def load(root: Path, transform) -> tuple[torch.Tensor, torch.Tensor, list[str]]:  # noqa: ANN001
    paths = sorted(p for p in root.rglob("*.png"))
    x = torch.stack([transform(str(p)) for p in paths])
    y = torch.tensor([int(p.parent.name) for p in paths])
    return x, y, [p.name for p in paths]


def split_source(x: torch.Tensor, y: torch.Tensor, per_class: int) -> tuple[torch.Tensor, ...]:
    """The first ``per_class`` images of each digit for training, the rest of the scans for the source test."""
    train = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        train[torch.nonzero(y == c).flatten()[:per_class]] = True
    return x[train], y[train], x[~train], y[~train]


def run_seed(seed: int, data: dict[str, torch.Tensor], cfg: AdaptConfig,
             results: dict[str, list[tuple[float, float]]]) -> None:
    t0 = time.perf_counter()

    def fresh() -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_classifier(BACKBONE, num_classes=10)

    def score(name: str, model: torch.nn.Module) -> None:
        tgt = accuracy(model, data["xt_test"], data["yt_test"])
        src = accuracy(model, data["xs_test"], data["ys_test"])
        results[name].append((tgt, src))
        print(f"seed {seed} {name:18s} target {tgt:.4f}  source {src:.4f}  ({time.perf_counter() - t0:.0f}s)",
              flush=True)

    xs, ys, xt = data["xs"], data["ys"], data["xt"]
    source = fresh()
    fine_tune_source(source, xs, ys, cfg)
    score("source-only", source)
    model = copy.deepcopy(source)
    adabn(model, xt)
    score("adabn", model)
    model = copy.deepcopy(source)
    self_train(model, xs, ys, xt, cfg)
    score("self-training", model)
    model = fresh()
    mcc(model, xs, ys, xt, cfg)
    score("mcc", model)
    model = fresh()
    fine_tune_source(model, xt, data["yt"], cfg)  # the ceiling: the pool's own labels
    score("target-supervised", model)


def head_fit(fs: torch.Tensor, ys: torch.Tensor, seed: int, ft: torch.Tensor | None = None, mcc_weight: float = 0.0,
             pseudo: tuple[torch.Tensor, torch.Tensor] | None = None, steps: int = 300) -> torch.nn.Linear:
    """A linear head on frozen features (standardised by the caller): AdamW, full batch, ``steps`` steps;
    plus MCC on the target features, or cross-entropy on pseudo-labelled target features."""
    from tlops.training.adaptation import mcc_loss

    torch.manual_seed(seed)
    head = torch.nn.Linear(fs.shape[1], 10)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(fs), ys, label_smoothing=0.1)
        if ft is not None and mcc_weight:
            loss = loss + mcc_weight * mcc_loss(head(ft))
        if pseudo is not None and len(pseudo[0]):
            loss = loss + torch.nn.functional.cross_entropy(head(pseudo[0]), pseudo[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


@torch.no_grad()
def features(backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    backbone.eval()
    return torch.cat([backbone(x[i:i + 128]) for i in range(0, len(x), 128)])


def run_features(data: dict[str, torch.Tensor], seeds: int, threshold: float,
                 results: dict[str, list[tuple[float, float]]]) -> None:
    """The cheap protocol for a CPU: every strategy on the frozen backbone's features, only heads trained.

    Source-only: a head on source features (the backbone's own ImageNet BatchNorm statistics, as the
    probe uses them). AdaBN: the same head, target features with statistics re-estimated on the
    unlabelled target pool (``tlops.training.adaptation.adabn``). Self-training: rounds of confident class-balanced
    pseudo-labels on the AdaBN target features (``select_pseudo_labels``). MCC: the head trained with
    ``mcc_loss`` on the AdaBN target features. Ceiling: a head on the target pool's own labels."""
    from tlops.training.adaptation import select_pseudo_labels

    src = build_classifier(BACKBONE, num_classes=10).backbone  # ImageNet statistics, as the probe uses them
    tgt = copy.deepcopy(src)
    adabn(tgt, data["xt"])
    fs, fs_test = features(src, data["xs"]), features(src, data["xs_test"])
    ft, ft_test = features(tgt, data["xt"]), features(tgt, data["xt_test"])
    fts_test = features(src, data["xt_test"])  # target test seen with the source's statistics
    mu, sd = fs.mean(0), fs.std(0) + 1e-6
    mt, st = ft.mean(0), ft.std(0) + 1e-6
    fs, fs_test, fts_test = (fs - mu) / sd, (fs_test - mu) / sd, (fts_test - mu) / sd
    ft, ft_test = (ft - mt) / st, (ft_test - mt) / st
    ys, yt = data["ys"], data["yt"]

    def acc(head: torch.nn.Linear, f: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float((head(f).argmax(1) == y).float().mean())

    for seed in range(seeds):
        t0 = time.perf_counter()
        head = head_fit(fs, ys, seed)
        found = {"source-only": (acc(head, fts_test, data["yt_test"]), acc(head, fs_test, data["ys_test"])),
                 "adabn": (acc(head, ft_test, data["yt_test"]), acc(head, fs_test, data["ys_test"]))}
        st_head = head
        for _ in range(3):
            with torch.no_grad():
                probs = torch.softmax(st_head(ft), 1)
            idx, labels = select_pseudo_labels(probs, threshold)
            st_head = head_fit(fs, ys, seed, pseudo=(ft[idx], labels))
        found["self-training"] = (acc(st_head, ft_test, data["yt_test"]), acc(st_head, fs_test, data["ys_test"]))
        m_head = head_fit(fs, ys, seed, ft=ft, mcc_weight=1.0)
        found["mcc"] = (acc(m_head, ft_test, data["yt_test"]), acc(m_head, fs_test, data["ys_test"]))
        ceiling = head_fit(ft, yt, seed)
        found["target-supervised"] = (acc(ceiling, ft_test, data["yt_test"]), float("nan"))
        for name in METHODS:
            results[name].append(found[name])
            print(f"seed {seed} {name:18s} target {found[name][0]:.4f}  source {found[name][1]:.4f}  "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--source-per-class", type=int, default=50)
    parser.add_argument("--source-test", type=int, default=300, help="scans kept for the source test")
    parser.add_argument("--target-per-class", type=int, default=30)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--backbone-lr-factor", type=float, default=0.3)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--mode", choices=("features", "finetune"), default="features",
                        help="features: frozen backbone, heads only (minutes on a CPU); finetune: every layer")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine(), flush=True)
    spec = with_resolution(reference_spec(BACKBONE), args.size)
    transform = build_transform(spec)
    tmp = Path(tempfile.mkdtemp(prefix="tlops-bench-adapt-"))
    export_digits(tmp / "source")
    export_font_digits(tmp / "pool", args.target_per_class, seed=1)
    export_font_digits(tmp / "test", args.target_per_class, seed=2)
    xs_all, ys_all, _ = load(tmp / "source", transform)
    xs, ys, xs_test, ys_test = split_source(xs_all, ys_all, args.source_per_class)
    keep = torch.randperm(len(ys_test), generator=torch.Generator().manual_seed(0))[:args.source_test]
    xt, yt, _ = load(tmp / "pool", transform)  # yt: only the ceiling sees it
    xt_test, yt_test, _ = load(tmp / "test", transform)
    data = {"xs": xs, "ys": ys, "xs_test": xs_test[keep], "ys_test": ys_test[keep], "xt": xt, "yt": yt,
            "xt_test": xt_test, "yt_test": yt_test}
    print(f"source train {len(xs)}, source test {len(keep)}, target pool {len(xt)} (unlabelled), "
          f"target test {len(xt_test)}; {args.size} px, {args.epochs} epochs, lr {args.lr:g} "
          f"(backbone x{args.backbone_lr_factor:g}), threshold {args.threshold:g}", flush=True)

    results: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
    if args.mode == "features":
        run_features(data, args.seeds, args.threshold, results)
    for seed in range(args.seeds if args.mode == "finetune" else 0):
        cfg = AdaptConfig(epochs=args.epochs, seed=seed, rounds=2, lr=args.lr,
                          backbone_lr_factor=args.backbone_lr_factor, threshold=args.threshold)
        run_seed(seed, data, cfg, results)

    print("\nmedians over seeds (target test accuracy, source test accuracy, share of the gap closed):")
    base = median([t for t, _ in results["source-only"]])
    ceiling = median([t for t, _ in results["target-supervised"]])
    for name in METHODS:
        tgt, src = median([t for t, _ in results[name]]), median([s for _, s in results[name]])
        gap = (tgt - base) / (ceiling - base) if ceiling > base else float("nan")
        per_seed = ", ".join(f"{t:.3f}" for t, _ in results[name])
        print(f"{name:18s} target {tgt:.4f} [{per_seed}]  source {src:.4f}  gap closed {gap:+.2f}")


if __name__ == "__main__":
    main()
