"""Watching the champion and closing the loop, end to end on real images, with the demo's settings (96 px,
linear probe, the gate's floor of 0.9), on a CSV manifest of scikit-learn's digits:

1. `tlops run` trains and promotes a champion (its evaluate step records the monitoring reference);
2. `tlops serve --sample-rate 1` logs the held-out test split as traffic: `tlops monitor` is quiet, exit 0, and
   its label-free accuracy estimate is within 3 points of the accuracy the server really had;
3. shifted traffic (digits rotated by 90 degrees and inverted, from the training and validation splits, and
   photographs) is flagged as drift and out of distribution, the estimate falls, exit 1;
4. `tlops monitor --export-queue` picks images to label; the test labels the digits among them from what it
   sent (the photographs stay unlabelled, as a person would leave them); `tlops data merge` adds them to the
   manifest with provenance; `tlops run` again validates the merged data (leakage and duplicate checks) and the
   gate promotes the new version;
5. on rotated-and-inverted versions of the old test split (never served, never labelled) the new champion is
   better than the old one, and on the old test split (the images the new run did not train on) no worse: less
   than a point lower, and not significantly (paired, exact McNemar).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import http.client
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import free_port, run_cli, wait_until_up

pytestmark = pytest.mark.slow

NAME = "watched-digits"


def _post(port: int, files: list[bytes]) -> list[str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"instances": [{"image": base64.b64encode(f).decode()} for f in files]})
    conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    labels = [p["label"] for p in json.loads(resp.read())["predictions"]]
    conn.close()
    return labels


def _png(img: object) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")  # type: ignore[attr-defined]
    return out.getvalue()


def _shifted(path: str) -> bytes:
    """The digit rotated by a quarter turn, light ink on black."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        return _png(ImageOps.invert(img.convert("L")).rotate(90))


@contextlib.contextmanager
def _serving(cfg: Path, cwd: Path, log_uri: Path) -> Iterator[int]:
    """`tlops serve` of the champion, logging every image it answers (bytes included) to ``log_uri``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = cwd / f"serve-{log_uri.name}.log"
    with open(out, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "tlops", "serve", "--model", f"models:/{NAME}@champion",
                                   "--port", str(port), "--config", str(cfg), "--sample-rate", "1", "--log-uri",
                                   str(log_uri), "--set", "monitoring.log_images=true"],
                                  cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert wait_until_up(f"http://127.0.0.1:{port}/ping", server, 300), out.read_text()
            yield port
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)


def _report(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout[: result.stdout.rindex("}") + 1])


def _predict(uri: str, files: list[bytes]) -> list[str]:
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(uri)
    return [str(x) for x in model.predict(pd.DataFrame({"image": files}))["label"]]


def test_served_traffic_is_watched_and_the_loop_closes(tmp_path: Path) -> None:
    from PIL import Image
    from skimage import data as sk

    from tlops.data.discovery import build_manifest, export_digits

    # The data: the digits as files, listed by a CSV manifest (what `tlops data merge` adds rows to).
    data = tmp_path / "data"
    export_digits(data / "digits")
    manifest_csv = data / "manifest.csv"
    with open(manifest_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for p in sorted((data / "digits").glob("*/*.png")):
            w.writerow([p.relative_to(data).as_posix(), p.parent.name])
    demo = yaml.safe_load((Path(__file__).parents[2] / "configs" / "demo.yaml").read_text())
    demo.update(workdir=str(tmp_path / ".tlops"))
    demo["data"]["uri"] = str(manifest_csv)
    demo["registry"]["model_name"] = NAME
    demo["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tmp_path / "tlops.yaml"
    cfg.write_text(yaml.safe_dump(demo))

    run = run_cli("run", "--config", str(cfg), cwd=tmp_path, timeout=2400)
    assert run.returncode == 0 and "PROMOTE" in run.stdout, run.stderr[-2000:] + run.stdout[-2000:]

    split = build_manifest(str(manifest_csv), tmp_path / "cache", demo["data"]["val_fraction"],
                           demo["data"]["test_fraction"])
    test = split[split["split"] == "test"].sample(frac=1.0, random_state=0)
    seen = split[split["split"] != "test"].sample(frac=1.0, random_state=0)

    # 2. Held-out digits as traffic: quiet, and the estimate within 3 points of the server's true accuracy.
    files, truth = [Path(p).read_bytes() for p in test["path"]], [str(x) for x in test["label"]]
    with _serving(cfg, tmp_path, tmp_path / "quiet-log") as port:
        served = [label for i in range(0, len(files), 16) for label in _post(port, files[i : i + 16])]
    accuracy = float(np.mean([a == b for a, b in zip(served, truth, strict=True)]))
    quiet = run_cli("monitor", "--model", f"{NAME}@champion", "--log-uri", str(tmp_path / "quiet-log"),
                    "--config", str(cfg), "--format", "json", "--output", str(tmp_path / "quiet"), cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-2000:] + quiet.stdout[-3000:]
    report = _report(quiet)
    assert report["verdict"] == "quiet"
    est = report["estimate"]
    print(f"quiet: true accuracy {accuracy:.4f} on {len(files)}, estimate {est}")
    assert abs(est["accuracy"] - accuracy) <= 0.03 and est["low"] <= accuracy <= est["high"], (est, accuracy)

    # 3. Shifted traffic: rotated and inverted digits the model trained on upright, and photographs.
    pool = seen.head(500)
    shifted = [_shifted(p) for p in pool["path"]]
    known = {hashlib.sha256(b).hexdigest(): str(label) for b, label in zip(shifted, pool["label"], strict=True)}
    photos = [_png(Image.fromarray(np.asarray(getattr(sk, n)())).convert("L")
                   .resize((8 * k, 8 * k)))
              for n in ("camera", "coins", "moon", "page", "text", "clock", "horse", "chelsea", "coffee", "astronaut")
              for k in (1, 2, 4)]
    traffic = shifted + photos
    with _serving(cfg, tmp_path, tmp_path / "shifted-log") as port:
        for i in range(0, len(traffic), 16):
            _post(port, traffic[i : i + 16])
    moved_run = run_cli("monitor", "--model", f"{NAME}@champion", "--log-uri", str(tmp_path / "shifted-log"),
                        "--config", str(cfg), "--format", "json", "--output", str(tmp_path / "shifted"), cwd=tmp_path)
    assert moved_run.returncode == 1, moved_run.stderr[-2000:]
    moved = _report(moved_run)
    flagged = {c["name"] for c in moved["checks"] if c["flagged"]}
    assert {"feature drift (MMD)", "out of distribution"} <= flagged, moved["checks"]
    assert moved["estimate"]["accuracy"] < est["accuracy"]

    # 4. The queue, labelled from what the test sent, merged into the manifest, and the pipeline again.
    queue_dir = tmp_path / "queue"
    queue = run_cli("monitor", "--model", f"{NAME}@champion", "--log-uri", str(tmp_path / "shifted-log"),
                    "--config", str(cfg), "--export-queue", "200", "--output", str(queue_dir), cwd=tmp_path)
    assert queue.returncode == 0, queue.stderr[-2000:]
    with open(queue_dir / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 200
    for row in rows:
        row["label"] = known.get(row["sha256"], "")  # a photograph: no digit, left unlabelled
    labelled = tmp_path / "labelled.csv"
    with open(labelled, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    n_labelled = sum(1 for r in rows if r["label"])
    assert 100 <= n_labelled < 200  # digits and photographs both made it into the queue
    before = manifest_csv.read_bytes()
    merged = run_cli("data", "merge", "--labels", str(labelled), "--into", str(manifest_csv), "--queue",
                     str(queue_dir), cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr[-2000:]
    with open(manifest_csv, newline="") as fh:
        after = list(csv.DictReader(fh))
    with io.StringIO(before.decode()) as fh:
        assert [(r["path"], r["label"]) for r in after[: len(after) - n_labelled]] == [
            (r["path"], r["label"]) for r in csv.DictReader(fh)]
    new_rows = [r for r in after if r.get("source") == "served"]
    assert len(new_rows) == n_labelled
    assert all(r["model_name"] == NAME and r["model_version"] == "1" and r["merged_at"] for r in new_rows)

    rerun = run_cli("run", "--config", str(cfg), cwd=tmp_path, timeout=2400)
    assert rerun.returncode == 0 and "PROMOTE" in rerun.stdout, rerun.stderr[-2000:] + rerun.stdout[-2000:]
    assert "validation pass;" in rerun.stdout, rerun.stdout[-3000:]
    resplit = build_manifest(str(manifest_csv), tmp_path / "cache", demo["data"]["val_fraction"],
                             demo["data"]["test_fraction"])
    assert (resplit["sha256"].isin(known) & (resplit["split"] == "train")).sum() > 0.5 * n_labelled

    # 5. Old champion (version 1) against the new one.
    import mlflow

    mlflow.set_tracking_uri(demo["tracking"]["uri"])
    champion = mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion").version
    assert champion != "1"
    held_shifted = [_shifted(p) for p in test["path"]]
    trained_on = set(resplit.loc[resplit["split"] == "train", "sha256"])
    old_test = test[~test["sha256"].isin(trained_on)]
    old_files = [Path(p).read_bytes() for p in old_test["path"]]
    right: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for version in ("1", champion):
        uri = f"models:/{NAME}/{version}"
        right[version] = (np.array(_predict(uri, held_shifted)) == np.array(truth),
                          np.array(_predict(uri, old_files)) == old_test["label"].astype(str).to_numpy())
    scores = {v: (float(a.mean()), float(b.mean())) for v, (a, b) in right.items()}
    # Paired on the old test split: images only the new champion gets wrong against those only the old one does.
    lost = int((right["1"][1] & ~right[champion][1]).sum())
    gained = int((~right["1"][1] & right[champion][1]).sum())
    print(f"version 1 (shifted, old test): {scores['1']}; version {champion}: {scores[champion]}; "
          f"old test images not trained on: {len(old_files)} of {len(test)}; on them {lost} lost, {gained} gained")
    assert scores[champion][0] > scores["1"][0] + 0.05, scores
    # "No worse" on the old split, as a paired test says it: fewer than a point lost, and the images lost not
    # significantly more than those gained (exact McNemar, one-sided at 5%). Measured: 0.9526 to 0.9499 (one
    # image of 359) in one run; a linear head that also reads rotated, inverted digits keeps the upright ones.
    from scipy.stats import binomtest

    assert scores[champion][1] >= scores["1"][1] - 0.01, scores
    assert lost + gained == 0 or binomtest(lost, lost + gained, 0.5, alternative="greater").pvalue > 0.05, (
        lost, gained)
