"""The evaluation as a person reads it: the figures (confusion matrix, reliability diagram, per-class recall),
the HTML page (``templates/evaluation.html.j2`` of :mod:`tlops.reports`, with the gate's decision first when
there is one) and the Markdown summary the gate writes on the model version."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np
from markupsafe import Markup

from tlops.reports import render


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def confusion_png(categories: list[str], matrix: list[list[int]]) -> bytes:
    """Rows coloured by the share of each true class (its recall on the diagonal), counts written in."""
    from matplotlib.figure import Figure

    counts = np.asarray(matrix, dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(categories)
    side = min(12.0, max(4.0, 0.5 * n + 2))
    fig = Figure(figsize=(side, side * 0.85))
    ax = fig.add_subplot()
    im = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels=categories, rotation=90 if n > 10 else 0)
    ax.set_yticks(range(n), labels=categories)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (colour: share of the true class)")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=8,
                            color="white" if shares[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def reliability_png(calib: dict[str, Any], champion: dict[str, Any] | None = None) -> bytes:
    """Accuracy against confidence per bin (a calibrated model sits on the diagonal), and how full each bin is."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 6.5))
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    bins = calib["bins"]
    width = bins[0]["hi"] - bins[0]["lo"] if bins else 0.1
    centres = [b["lo"] + width / 2 for b in bins]
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.bar(centres, [b["accuracy"] for b in bins], width=width * 0.9, color="#2b6cb0", edgecolor="black",
            label=f"candidate (ECE {calib['ece']:.3f})")
    if champion is not None:
        cb = champion["bins"]
        top.plot([b["lo"] + width / 2 for b in cb if b["n"]], [b["accuracy"] for b in cb if b["n"]], marker="o",
                 color="#dd6b20", label=f"champion (ECE {champion['ece']:.3f})")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title("Reliability diagram")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, [b["n"] for b in bins], width=width * 0.9, color="#a0aec0", edgecolor="black")
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    return _png(fig)


def per_class_png(candidate: dict[str, dict[str, float]], champion: dict[str, dict[str, float]] | None) -> bytes:
    from matplotlib.figure import Figure

    classes = [c for c, m in candidate.items() if m["support"] > 0]
    x = np.arange(len(classes))
    fig = Figure(figsize=(min(14.0, max(5.0, 0.45 * len(classes) + 2)), 3.8))
    ax = fig.add_subplot()
    w = 0.4 if champion else 0.8
    ax.bar(x - (w / 2 if champion else 0), [candidate[c]["recall"] for c in classes], width=w, color="#2b6cb0",
           label="candidate")
    if champion:
        ax.bar(x + w / 2, [champion.get(c, {"recall": 0.0})["recall"] for c in classes], width=w, color="#dd6b20",
               label="champion")
    ax.set_xticks(x, labels=classes, rotation=90 if len(classes) > 12 else 0)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall")
    ax.set_title("Recall per class")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def figures(result: dict[str, Any]) -> dict[str, bytes]:
    """The report's figures as PNG bytes, by file name."""
    cand, champ = result["candidate"], result.get("champion")
    cm = result["confusion_matrix"]
    return {
        "confusion_matrix.png": confusion_png(cm["categories"], cm["matrix"]),
        "reliability.png": reliability_png(cand["calibration"], champ["calibration"] if champ else None),
        "per_class_recall.png": per_class_png(cand["per_class"], champ["per_class"] if champ else None),
    }


# ------------------------------------------------------------------------------------------------- report

def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.4f}"


def release_markdown(release: dict[str, Any], result: dict[str, Any], run_id: str = "") -> str:
    """The gate's decision for a KFP Markdown output: decision, reasons, headline figures, fingerprint, data."""
    cand, champ = result["candidate"], result.get("champion")
    against = (f"compared with champion version {release['compared_with']}" if release.get("compared_with")
               else "no champion to compare with")
    lines = [f"## Gate: {str(release.get('decision', '?')).upper()} — {release.get('model_name', '')} version "
             f"{release.get('version', '?')}", "", f"{against[0].upper()}{against[1:]}.", ""]
    lines += [f"- {r}" for r in release.get("reasons", [])]
    lines += ["", "| figure | candidate | champion |", "|---|---|---|"]
    for label, key in (("test accuracy", "accuracy"), ("macro-F1", "macro_f1"), ("ECE", "ece")):
        lines.append(f"| {label} | {_num(cand.get(key))} | {_num(champ.get(key)) if champ else '–'} |")
    if result.get("domains"):
        lines += ["", "| test split (accuracy) | candidate | champion | source-only |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in domain_rows(result["domains"])]
    data = release.get("data") or {}
    splits = ", ".join(f"{k} {v}" for k, v in (data.get("splits") or {}).items())
    lines += ["", f"Preprocessing fingerprint `{release.get('fingerprint', '')}`.", "",
              f"Data `{data.get('uri', '')}`, content hash `{data.get('manifest_hash', '')}`"
              + (f" ({splits} images)." if splits else "."), ""]
    if run_id:
        lines.append(f"MLflow run `{run_id}`" + (f"; report {result['report']}" if result.get("report") else "")
                     + ".")
    return "\n".join(lines) + "\n"


def _code(text: Any) -> Markup:
    return Markup("<code>{}</code>").format(text)


def _release(release: dict[str, Any]) -> dict[str, Any]:
    """The gate's part of the page: decision and reasons, model version, preprocessing fingerprint, the data and
    the training curves. ``release`` keys: decision, reasons, model_name, version, compared_with, fingerprint,
    reference_fingerprint, declared, data (uri, manifest_hash, files, classes, splits), curves (PNG bytes)."""
    decision = str(release.get("decision", "?"))
    fingerprint, reference = str(release.get("fingerprint", "")), str(release.get("reference_fingerprint", ""))
    data = release.get("data") or {}
    splits = data.get("splits") or {}
    data_rows = [["source", _code(data.get("uri", ""))],
                 ["content hash (images, labels, splits)", _code(data.get("manifest_hash", ""))],
                 ["images", _num(data.get("files"))], ["classes", _num(data.get("classes"))]]
    data_rows += [[f"{split} split", f"{_num(splits[split])} images"] for split in ("train", "val", "test")
                  if split in splits]
    return {
        "decision": decision, "class": {"promote": "good", "reject": "bad"}.get(decision, "wait"),
        "model_name": str(release.get("model_name", "")), "version": str(release.get("version", "?")),
        "compared_with": release.get("compared_with"), "reasons": release.get("reasons", []),
        "preprocessing": [
            ["fingerprint (the spec the model was trained and is served with)", _code(fingerprint)],
            ["the backbone's reference", "the same" if reference == fingerprint else _code(reference)],
            ["declared differences", str(release.get("declared") or "none")]],
        "data": data_rows if data else [],
        "curves": base64.b64encode(release["curves"]).decode() if release.get("curves") else "",
    }


def _headline(cand: dict[str, Any], champ: dict[str, Any] | None) -> list[list[str]]:
    rows: list[list[str]] = []

    def row(label: str, a: Any, b: Any = None, digits: int = 4) -> None:
        diff = (a - b) if isinstance(a, int | float) and isinstance(b, int | float) else None
        rows.append([label, _num(a, digits), _num(b, digits) if champ else "–", _signed(diff) if champ else "–"])

    row("accuracy", cand["accuracy"], champ and champ["accuracy"])
    row("macro-F1", cand["macro_f1"], champ and champ["macro_f1"])
    for k, v in cand["top_k"].items():
        row(k.replace("_", "-") + " accuracy", v, champ and champ["top_k"].get(k))
    row(f"lowest class recall ({cand['min_recall_class']})", cand["min_class_recall"],
        champ and champ["min_class_recall"])
    row("expected calibration error", cand["ece"], champ and champ["ece"])
    row("weights (MB)", cand["model_size_bytes"] / 1e6, champ and champ["model_size_bytes"] / 1e6, 2)
    return rows


def _comparison(comp: dict[str, Any]) -> list[list[Any]]:
    verdict = "better" if comp["ci_low"] > 0 else "worse" if comp["ci_high"] < 0 else "not distinguishable"
    cls = {"better": "good", "worse": "bad"}.get(verdict, "")
    return [
        ["accuracy difference (candidate − champion)", _signed(comp["difference"])],
        [f"{comp['confidence']:.0%} paired bootstrap interval ({comp['resamples']} resamples, seed {comp['seed']})",
         f"[{comp['ci_low']:+.4f}, {comp['ci_high']:+.4f}]"],
        ["McNemar exact p-value", f"{comp['mcnemar_p']:.4f}"],
        ["images only the candidate gets right", str(comp["only_candidate_right"])],
        ["images only the champion gets right", str(comp["only_champion_right"])],
        ["verdict", Markup("<span class='{}'>{}</span>").format(cls, verdict)],
    ]


def domain_rows(domains: dict[str, Any]) -> list[list[str]]:
    """Accuracy on the target and the source test splits: candidate, champion, source-only model."""
    rows = []
    for domain in ("target", "source"):
        whos = domains.get(domain) or {}
        n = (whos.get("candidate") or {}).get("n")
        rows.append([f"{domain} test ({_num(n)} images)" + (" — the gate compares here" if domain == "target" else ""),
                     *(_num((whos.get(who) or {}).get("accuracy")) for who in ("candidate", "champion",
                                                                              "source_only"))])
    return rows


def _tables(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per class, the slices, calibration and serving figures: (title, header, rows) each; first, with a target
    test split, accuracy on both domains."""
    cand, champ = result["candidate"], result.get("champion")
    domains = []
    if result.get("domains"):
        domains = [{"title": "Target and source domains (accuracy; every figure below is the target test split's)",
                    "header": ["test split", "candidate", "champion", "source-only model"],
                    "rows": domain_rows(result["domains"])}]
    per_class = [[c, str(m["support"]), _num(m["precision"]), _num(m["recall"]), _num(m["f1"]),
                  _num(champ["per_class"].get(c, {}).get("recall") if champ else None)]
                 for c, m in cand["per_class"].items()]
    tables = [{"title": "Per class", "header": ["class", "images", "precision", "recall", "F1", "champion recall"],
               "rows": per_class}]
    titles = {"class": "Slices by class", "size": "Slices by image size (longer side)", "source": "Slices by source"}
    for key, items in result.get("slices", {}).items():
        tables.append({"title": titles.get(key, key), "header": ["slice", "images", "accuracy", "champion accuracy"],
                       "rows": [[i["slice"], str(i["n"]), _num(i["accuracy"]), _num(i.get("champion_accuracy"))]
                                for i in items]})
    tables.append({"title": f"Calibration (ECE {cand['ece']:.4f})",
                   "header": ["confidence bin", "images", "accuracy", "mean confidence"],
                   "rows": [[f"({b['lo']:.1f}, {b['hi']:.1f}]", str(b["n"]), _num(b["accuracy"]) if b["n"] else "–",
                             _num(b["confidence"]) if b["n"] else "–"] for b in cand["calibration"]["bins"]]})
    lat = cand["latency"]
    tables.append({"title": "Serving", "header": ["figure", "value"], "rows": [
        [f"latency per image, p50 (batch size 1, CPU, {lat.get('threads', '?')} thread(s))",
         f"{_num(lat['p50_ms'], 2)} ms"],
        ["latency per image, p95", f"{_num(lat['p95_ms'], 2)} ms"],
        ["images timed", str(lat["n"])],
        ["weights", f"{cand['model_size_bytes']:,} bytes"]]})
    return domains + tables


def report_html(result: dict[str, Any], pngs: dict[str, bytes], title: str = "tlops evaluation",
                release: dict[str, Any] | None = None) -> str:
    """One self-contained page: with ``release`` (the gate's) the decision first, then the headline table,
    comparison, figures, per-class, slices, serving figures."""
    cand, champ, comp = result["candidate"], result.get("champion"), result.get("comparison")
    champ_name = f"champion (version {champ['version']})" if champ else "champion (none yet)"
    return render("evaluation.html.j2", title=title, model_uri=str(result.get("model_uri", "")), n=cand["n"],
                  evaluated_at=str(result.get("evaluated_at", "")),
                  release=_release(release) if release else None,
                  headline_header=["metric", "candidate", champ_name, "difference"],
                  headline=_headline(cand, champ), comparison=_comparison(comp) if comp else None,
                  figures=[(name, base64.b64encode(data).decode()) for name, data in pngs.items()],
                  tables=_tables(result))
