"""``selection.skip_when: no-served-drift``: the scheduled run trains only when ``tlops monitor``'s latest verdict
on the champion's served traffic says it moved. The verdict is read from the monitor's MLflow run (experiment
``<tracking.experiment>-monitor``, tags ``monitor.model``, ``monitor.version``, ``monitor.verdict`` and the
window), and the run that decides records which monitor run and which window it went by."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tlops.config.settings import Config

VERDICT_TAG = "monitor.verdict"
MODEL_TAG = "monitor.model"
VERSION_TAG = "monitor.version"
WINDOW_TAGS = ("monitor.window.since", "monitor.window.until", "monitor.window.first", "monitor.window.last")


def latest_verdict(cfg: Config, name: str, version: str) -> dict[str, Any] | None:
    """The newest monitor run on ``name`` version ``version``: its verdict, reasons, window and id; None if none."""
    import mlflow

    exp = mlflow.get_experiment_by_name(f"{cfg.tracking.experiment}-monitor")
    if exp is None:
        return None
    runs = mlflow.MlflowClient().search_runs(
        [exp.experiment_id], filter_string=f"tags.`{MODEL_TAG}` = '{name}' and tags.`{VERSION_TAG}` = '{version}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    tags = runs[0].data.tags
    return {"monitor_run": runs[0].info.run_id, "verdict": tags.get(VERDICT_TAG, ""),
            "reasons": tags.get("monitor.reasons", ""), "log_uri": tags.get("monitor.log_uri", ""),
            "window": f"{tags.get('monitor.window.first', '?')} to {tags.get('monitor.window.last', '?')}",
            "checked_at": runs[0].info.start_time}


def served_decision(cfg: Config) -> tuple[bool, str, dict[str, Any]]:
    """(skip, why, record) from the monitor's latest verdict on the champion; tags the active run with it."""
    import mlflow

    from tlops import registry

    name = cfg.registry.model_name
    champ = registry.champion_version(name)
    if champ is None:
        return False, f"no champion of {name} yet: training", {"verdict": "none"}
    found = latest_verdict(cfg, name, str(champ.version))
    where = f"champion {name} version {champ.version}"
    if found is None:
        record: dict[str, Any] = {"verdict": "none", "version": str(champ.version)}
        skip, reason = False, (f"no tlops monitor verdict on {where}'s served traffic: training "
                               "(skip_when no-served-drift)")
    else:
        record = {**found, "version": str(champ.version)}
        window = f"window {found['window']} of {found['log_uri']} (monitor run {found['monitor_run']})"
        if found["verdict"] == "quiet":
            skip, reason = True, f"no served drift on {where}: {window}"
        else:
            skip, reason = False, f"served drift on {where} ({found['reasons'] or found['verdict']}): {window}"
    mlflow.set_tags({"served.verdict": record["verdict"], "served.window": str(record.get("window", ""))[:500],
                     "served.monitor_run": str(record.get("monitor_run", ""))})
    return skip, reason, record
