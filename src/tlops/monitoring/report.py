"""``tlops monitor``'s report: the terminal table (rich), the HTML page with its figures (Jinja2, matplotlib), the
MLflow run, and the command that ties them to the prediction log and the champion's reference record."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlops.selection.served import MODEL_TAG, VERDICT_TAG, VERSION_TAG, WINDOW_TAGS

if TYPE_CHECKING:
    from tlops.config.settings import Config

log = logging.getLogger(__name__)


def format_table(result: dict[str, Any]) -> str:
    from rich.console import Console
    from rich.table import Table

    est, window = result["estimate"], result["window"]
    table = Table(title=f"{result['model']} version {result['version']}: {window['records']} served images, "
                        f"{window['first']} to {window['last']}", title_justify="left")
    for col, justify in (("check", "left"), ("statistic", "right"), ("p-value", "right"), ("", "left"),
                         ("detail", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for c in result["checks"]:
        state = ("[dim]not measured[/dim]" if not c["measured"] else "[bold red]flagged[/bold red]" if c["flagged"]
                 else "[green]ok[/green]")
        table.add_row(c["name"], "–" if c["statistic"] is None else f"{c['statistic']:.4f}",
                      "–" if c["p_value"] is None else f"{c['p_value']:.2g}", state, c["detail"])
    floor = "none recorded" if est["floor"] is None else f"{est['floor']:.3f}"
    table.add_row("estimated accuracy", f"{est['accuracy']:.3f}", "", "[bold red]below floor[/bold red]" if
                  est["below_floor"] else "[green]ok[/green]",
                  f"ATC, 95% interval {est['low']:.3f}–{est['high']:.3f}; {est['held_out_split']} accuracy "
                  f"{est['held_out_accuracy']:.3f}; gate floor {floor}")
    out = io.StringIO()
    console = Console(file=out, width=140, force_terminal=False, color_system=None)
    console.print(table)
    verdict = result["verdict"].upper() + (": " + "; ".join(result["reasons"]) if result["reasons"] else "")
    console.print(verdict)
    return out.getvalue().rstrip()


def figures(arrays: dict[str, Any]) -> dict[str, bytes]:
    """PNG figures: confidences, class shares, nearest-training distances, brightness (served vs reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}

    def save(name: str, fig: Any) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        out[name] = buf.getvalue()

    def hist(name: str, served: np.ndarray, ref: np.ndarray, ref_name: str, title: str,
             line: float | None = None) -> None:
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        bins = np.histogram_bin_edges(np.concatenate([served, ref]), bins=30).tolist()
        ax.hist(ref, bins=bins, density=True, alpha=0.5, label=ref_name)
        ax.hist(served, bins=bins, density=True, alpha=0.5, label="served")
        if line is not None:
            ax.axvline(line, color="k", linestyle="--", label="out-of-distribution limit")
        ax.set_title(title)
        ax.legend()
        save(name, fig)

    hist("confidence.png", arrays["confidence"], arrays["val_confidence"], "held out", "confidence (top-1)")
    classes = arrays["classes"]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    x = np.arange(len(classes))
    served = np.array([arrays["predicted"].count(c) for c in classes], dtype=float)
    ref = np.array([arrays["val_predicted"].count(c) for c in classes], dtype=float)
    ax.bar(x - 0.2, ref / max(1, ref.sum()), 0.4, label="held out")
    ax.bar(x + 0.2, served / max(1, served.sum()), 0.4, label="served")
    ax.set_xticks(x, classes)
    ax.set_title("predicted class shares")
    ax.legend()
    save("class_shares.png", fig)
    if "distance" in arrays:
        hist("ood_distance.png", arrays["distance"], arrays["val_distance"], "held out",
             "distance to the nearest training embedding", arrays["ood_limit"])
    hist("brightness.png", arrays["brightness"], arrays["train_brightness"], "training", "brightness")
    return out


def html(result: dict[str, Any], pngs: dict[str, bytes]) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    encoded = {name: base64.b64encode(data).decode() for name, data in pngs.items()}
    return env.get_template("report.html.j2").render(**result, figures=encoded)


def log_run(cfg: Config, result: dict[str, Any], page: str, pngs: dict[str, bytes]) -> str:
    """The report as an MLflow run of the experiment ``<tracking.experiment>-monitor``; returns its id."""
    import mlflow

    from tlops import tracking

    experiment = f"{cfg.tracking.experiment}-monitor"
    experiment_id = tracking.setup(cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
        update={"experiment": experiment})}))
    window = result["window"]
    tags = {MODEL_TAG: result["model"], VERSION_TAG: result["version"], VERDICT_TAG: result["verdict"],
            "monitor.reasons": "; ".join(result["reasons"])[:5000], "monitor.log_uri": window["log_uri"]}
    for tag in WINDOW_TAGS:
        tags[tag] = str(window[tag.rsplit(".", 1)[1]] or "")
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"monitor-{result['model']}-v{result['version']}",
                          tags=tags) as run:
        metrics = {"records": float(window["records"]), "estimate.accuracy": result["estimate"]["accuracy"],
                   "estimate.low": result["estimate"]["low"], "estimate.high": result["estimate"]["high"]}
        for c in result["checks"]:
            key = c["name"].split(" (")[0].replace(" ", "_")
            if c["statistic"] is not None:
                metrics[f"{key}.statistic"] = float(c["statistic"])
            if c["p_value"] is not None:
                metrics[f"{key}.p_value"] = float(c["p_value"])
        mlflow.log_metrics(metrics)
        mlflow.log_dict(result, "monitor/monitor.json")
        mlflow.log_text(page, "monitor/report.html")
        with tempfile.TemporaryDirectory(prefix="tlops-monitor-") as tmp:
            for name, data in pngs.items():
                (Path(tmp) / name).write_bytes(data)
                mlflow.log_artifact(str(Path(tmp) / name), "monitor")
        return str(run.info.run_id)


def run_monitor(cfg: Config, model: str, since: str | None, until: str | None, log_uri: str | None,
                output: str | None) -> tuple[dict[str, Any], str]:
    """The whole command: (the result, its terminal table). Nothing is written before every figure is computed;
    the files are written atomically."""
    import os

    from tlops.fileio import write_json, write_text
    from tlops.monitoring.monitor import assess, fetch_reference, resolve_model, window_records
    from tlops.serving.predlog import parse_when

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per problem, no bars
    mon = cfg.monitoring
    uri = log_uri or mon.log_uri or str(Path(cfg.workdir) / "prediction-log")
    start = parse_when(since) if since else None
    end = parse_when(until) if until else None
    if start and end and start >= end:
        from tlops.errors import TlopsError

        raise TlopsError(f"--since {since} is not before --until {until}")
    champion = resolve_model(model)
    with tempfile.TemporaryDirectory(prefix="tlops-reference-") as tmp:
        reference = fetch_reference(champion, tmp)
    frame, window = window_records(uri, champion, start, end, mon.min_records)
    report = assess(reference, frame, champion.floor, mon.alpha, mon.ood_quantile, mon.bootstrap_resamples,
                    mon.mmd_sample)
    arrays = report.pop("_arrays")
    result = {"model": champion.name, "version": champion.version, "run_id": champion.run_id, "window": window,
              "checked_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **report}
    pngs = figures(arrays)
    page = html(result, pngs)
    result["mlflow_run_id"] = log_run(cfg, result, page, pngs)
    out = Path(output) if output else Path(cfg.workdir) / "monitor" / (
        f"{champion.name}-v{champion.version}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}")
    write_text(out / "report.html", page)
    write_json(out / "monitor.json", json.loads(json.dumps(result, default=float)))
    result["report"] = str(out / "report.html")
    return result, format_table(result)


def export_queue(cfg: Config, model: str, since: str | None, until: str | None, log_uri: str | None,
                 output: str | None, n: int) -> tuple[Path, int]:
    """``tlops monitor --export-queue N``: the queue directory and how many images it holds."""
    from tlops.errors import TlopsError
    from tlops.monitoring.monitor import fetch_reference, resolve_model, window_records
    from tlops.monitoring.queue import pick, write_queue
    from tlops.serving.predlog import parse_when

    if n < 1:
        raise TlopsError(f"--export-queue {n}: expected a number of images, at least 1")
    uri = log_uri or cfg.monitoring.log_uri or str(Path(cfg.workdir) / "prediction-log")
    champion = resolve_model(model)
    with tempfile.TemporaryDirectory(prefix="tlops-reference-") as tmp:
        reference = fetch_reference(champion, tmp)
    frame, _window = window_records(uri, champion, parse_when(since) if since else None,
                                    parse_when(until) if until else None, 1)
    picked = pick(frame, reference, n)
    out = Path(output) if output else Path(cfg.workdir) / "queue" / (
        f"{champion.name}-v{champion.version}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}")
    return write_queue(picked, [str(c) for c in reference.classes], out), len(picked)
