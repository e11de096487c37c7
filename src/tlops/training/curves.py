"""Training curves as a PNG: loss and accuracy per epoch (per L2 strength for the linear probe)."""

from __future__ import annotations

import io
import math
from typing import Any


def plot_history(history: list[dict[str, Any]], strategy: str) -> bytes:
    """Two panels, loss and accuracy, train against validation; PNG bytes (matplotlib's object API on the Agg
    canvas: no pyplot state, so it may be drawn in any thread)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    probe = strategy == "linear-probe"
    xs = [float(h["l2"]) if probe else int(h["epoch"]) + 1 for h in history]
    fig = Figure(figsize=(9, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        ys = [float(h[key]) if key in h else math.nan for h in history]
        if any(math.isfinite(y) for y in ys):
            ax_loss.plot(xs, ys, marker="o", label=label)
    for key, label in (("train_accuracy", "train"), ("val_accuracy", "validation")):
        ax_acc.plot(xs, [float(h.get(key, math.nan)) for h in history], marker="o", label=label)
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_title(f"{strategy}: {title}")
        ax.set_xlabel("L2 strength" if probe else "epoch")
        if probe:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
