"""The retraining story: four scheduled cycles on the demo data, each a full pipeline run through the CLI.

1. First data: v1 is trained and promoted.
2. More images arrive: v2 is promoted only if the gate says it is better; every test image stays in test.
3. A poisoned delivery (40% of the new labels shuffled, plus corrupt files): validation rejects it.
4. A config change that breaks parity (ImageNet mean/std on a backbone trained with 0.5/0.5): blocked at parity.

Afterwards ``tlops audit`` and ``tlops history`` tell the story, and the champion, served over HTTP by
``tlops serve``, returns the predictions it gave when it was promoted.

    python -m scenarios.retraining [--workdir DIR]      (make scenario)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.processes import free_port, stop, wait_until_up

MODEL = "scenario-digits"
FIRST, MORE, POISON = 60, 100, 130  # images per class after each delivery (digits has about 180 per class)
SHUFFLED = 0.4


@dataclass
class Cycle:
    name: str
    returncode: int
    stdout: str
    stderr: str
    champion_after: str | None
    seconds: float
    notes: list[str] = field(default_factory=list)


def _cli(*args: str, cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "tlops", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _client(work: Path) -> Any:
    import mlflow

    uri = f"sqlite:///{work / '.tlops' / 'mlflow.db'}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def champion(work: Path) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(work).get_model_version_by_alias(MODEL, "champion").version)
    except MlflowException:
        return None


def deliver(data: Path, upto: int, poison: bool, seed: int = 0) -> list[str]:
    """Add the digits up to ``upto`` per class to ``data``; poisoned: 40% of the new ones under a wrong
    label, plus corrupt files. Returns what was done, for the story."""
    from tlops.data.discovery import export_digits

    staging = data.parent / f"staging-{upto}"
    shutil.rmtree(staging, ignore_errors=True)
    export_digits(staging, per_class=upto)
    rng = random.Random(seed)
    new = sorted(p for p in staging.rglob("*.png") if not (data / p.parent.name / p.name).exists())
    moved = 0
    for path in new:
        label = path.parent.name
        if poison and rng.random() < SHUFFLED:
            label = rng.choice([c for c in "0123456789" if c != label])
            moved += 1
        (data / label).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, data / label / path.name)
    shutil.rmtree(staging)
    notes = [f"{len(new)} new images" + (f", {moved} of them under a wrong label" if poison else "")]
    if poison:
        (data / "3" / "upload_0001.png").write_bytes(b"")  # an interrupted upload
        good = next((data / "5").glob("*.png")).read_bytes()
        (data / "5" / "upload_0002.png").write_bytes(good[: len(good) // 2])  # truncated
        (data / "8" / "upload_0003.jpg").write_text("<html>403 Forbidden</html>")  # an error page saved as image
        notes.append("3 corrupt files (empty, truncated, an HTML page named .jpg)")
    return notes


def _config(work: Path) -> Path:
    cfg = {
        "workdir": str(work / ".tlops"),
        "backbone": "efficientnet_lite0",
        # Content-hash splits: the story checks that no test image of v1 ever moves as deliveries grow.
        "data": {"uri": str(work / "data"), "split": "hash"},
        "validation": {"min_images_per_class": 3},
        "preprocess": {"image_size": 64, "allow_resolution_change": True},
        "train": {"strategy": "linear-probe", "num_threads": 0},
        "gate": {"min_accuracy": 0.85, "max_regression": 0.0},
        "registry": {"model_name": MODEL},
    }
    path = work / "tlops.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _test_split(work: Path, version: str) -> set[str]:
    """The sha256 of every test image of the run behind ``version`` (from its logged manifest)."""
    import pandas as pd

    client = _client(work)
    run_id = client.get_model_version(MODEL, version).run_id
    dest = work / f"manifest-v{version}"
    dest.mkdir(exist_ok=True)
    df = pd.read_csv(client.download_artifacts(run_id, "validation/manifest.csv", str(dest)), dtype=str)
    return set(df.loc[df["split"] == "test", "sha256"])


def serve_predictions(work: Path, images: list[Path], timeout: float = 120.0) -> list[str]:
    """Labels for ``images`` from ``tlops serve --model models:/MODEL@champion`` on loopback."""
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / '.tlops' / 'mlflow.db'}"}
    proc = subprocess.Popen([sys.executable, "-m", "tlops", "serve", "--model", f"models:/{MODEL}@champion",
                             "--port", str(port)], cwd=work, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_up(f"{base}/ping", proc, timeout):
            raise RuntimeError(f"tlops serve did not start: {proc.stderr.read() if proc.stderr else ''}")
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(p.read_bytes()).decode()] for p in images]}}).encode()
        req = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            predictions = json.loads(resp.read())["predictions"]
        return [str(p["label"]) for p in predictions]
    finally:
        stop(proc)


def offline_predictions(work: Path, version: str, images: list[Path]) -> list[str]:
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(f"sqlite:///{work / '.tlops' / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version}")
    out = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    return [str(x) for x in out["label"]]


def run_scenario(work: Path, log: Any = print) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    cfg = _config(work)
    cycles: list[Cycle] = []

    def cycle(name: str, notes: list[str], *extra: str) -> Cycle:
        log(f"\n== {name}: {'; '.join(notes)}")
        t0 = time.monotonic()
        proc = _cli("run", "--config", str(cfg), *extra, cwd=work)
        c = Cycle(name, proc.returncode, proc.stdout, proc.stderr, champion(work), time.monotonic() - t0, notes)
        for line in proc.stdout.splitlines():
            if line.strip().startswith(("gate", "- ", "metrics", "champion", "model", "aliases")):
                log(f"   {line.strip()}")
        if proc.returncode != 0:
            log(f"   exit {proc.returncode}: {proc.stderr.strip()}")
        log(f"   champion now: version {c.champion_after or 'none'} ({c.seconds:.0f}s)")
        cycles.append(c)
        return c

    cycle("1 first data", deliver(data, FIRST, poison=False))
    promoted_v1 = champion(work)
    test_v1 = _test_split(work, promoted_v1) if promoted_v1 else set()
    cycle("2 more images", deliver(data, MORE, poison=False))
    versions = sorted(int(v.version) for v in _client(work).search_model_versions(f"name='{MODEL}'"))
    test_v2 = _test_split(work, str(versions[-1])) if versions else set()
    champion_after_2 = champion(work)
    # What the champion predicts right after it was promoted, on images of every class.
    probe = sorted(data.glob("*/digit_*.png"))[::37][:20]
    at_promotion = offline_predictions(work, champion_after_2, probe) if champion_after_2 else []
    # Cycle 4 runs on the last good data, so that only its config change can stop it.
    shutil.copytree(data, work / "data-clean")
    cycle("3 poisoned delivery", deliver(data, POISON, poison=True))
    cycle("4 parity-breaking config", ["ImageNet mean/std declared on EfficientNet-Lite0 (trained with 0.5/0.5)"],
          "--set", "preprocess.mean=0.485,0.456,0.406", "--set", "preprocess.std=0.229,0.224,0.225",
          "--data", str(work / "data-clean"))
    audit = _cli("audit", "--model", MODEL, "--format", "json", "--config", str(cfg), cwd=work)
    history = _cli("history", MODEL, "--format", "json", "--config", str(cfg), cwd=work)
    served = serve_predictions(work, probe) if champion_after_2 else []
    log("\n== afterwards")
    log(f"   history: {history.stdout.strip()[:2000]}")
    log(f"   audit exit {audit.returncode}")
    log(f"   served predictions equal those at promotion: {served == at_promotion} ({len(probe)} images)")
    return {"cycles": cycles, "v1": promoted_v1, "champion_after_2": champion_after_2, "versions": versions,
            "test_v1": test_v1, "test_v2": test_v2, "audit": audit, "history": history,
            "at_promotion": at_promotion, "served": served, "probe": probe}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".tlops/scenario"))
    args = parser.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    result = run_scenario(args.workdir.resolve())
    ok = result["served"] == result["at_promotion"] and result["cycles"][2].returncode != 0 \
        and result["cycles"][3].returncode != 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
