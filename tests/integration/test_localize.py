"""Pixels by URI: a step fetches the files its manifest names into its own cache and checks each sha256, on a real
S3 endpoint (moto's server on 127.0.0.1) and on local files; data that changed under the run is one clear line."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_config
from tlops.data.discovery import build_manifest
from tlops.data.manifest import DataChanged, golden_rows, localize, usable

pytestmark = pytest.mark.integration


def _sha(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_s3_rows_are_fetched_into_the_steps_cache_and_checked(bucket: str, tmp_path: Path) -> None:
    from tlops.data.storage import s3_client

    manifest = build_manifest(bucket, tmp_path / "validate-disk")  # what the validate step saw
    rows = usable(manifest).head(12).assign(path=None)  # as a later step reads the declared manifest
    local = localize(rows, tmp_path / "step-disk")
    assert all(p.startswith(str(tmp_path / "step-disk" / "objects")) for p in local["path"])
    assert [_sha(p) for p in local["path"]] == list(local["sha256"])
    # Content-addressed: a second step on the same disk reads its copy without asking the store again.
    s3_client().delete_object(Bucket="images", Key=str(rows["uri"].iloc[0]).removeprefix("s3://images/"))
    assert list(localize(rows, tmp_path / "step-disk")["path"]) == list(local["path"])
    with pytest.raises(DataChanged, match=r"no longer exists; the data changed under the run"):
        localize(rows.head(1), tmp_path / "fresh-disk")


def test_an_object_changed_after_validation_is_named_and_not_kept(bucket: str, tmp_path: Path,
                                                                  tiny_digits: Path) -> None:
    from tlops.data.storage import s3_client

    manifest = build_manifest(bucket, tmp_path / "validate-disk")
    row = golden_rows(manifest, 1)
    key = str(row["uri"].iloc[0]).removeprefix("s3://images/")
    other = next(p for p in sorted(tiny_digits.rglob("*.png")) if _sha(str(p)) != row["sha256"].iloc[0])
    s3_client().put_object(Bucket="images", Key=key, Body=other.read_bytes())
    with pytest.raises(DataChanged) as caught:
        localize(row, tmp_path / "step-disk")
    message = str(caught.value)
    assert message.startswith(f"{row['uri'].iloc[0]}: its content changed after the validate step (sha256 ")
    assert "\n" not in message
    assert not [p for p in (tmp_path / "step-disk").rglob("*") if p.is_file()]  # nothing half-kept
    # Reference data of an earlier run may have moved on: without strict the row is left out instead.
    assert localize(row, tmp_path / "step-disk", strict=False).empty


def test_local_files_are_read_in_place_and_checked(tiny_digits: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_digits, data)
    manifest = build_manifest(str(data), tmp_path / "validate-disk")
    rows = golden_rows(manifest, 3).assign(path=None)
    assert list(localize(rows, tmp_path / "step")["path"]) == list(rows["uri"])
    Path(rows["uri"].iloc[1]).write_bytes(Path(rows["uri"].iloc[0]).read_bytes())
    with pytest.raises(DataChanged, match="its content changed after the validate step"):
        localize(rows, tmp_path / "step")


def test_objects_and_local_files_in_one_manifest_keep_their_rows(bucket: str, tiny_digits: Path,
                                                                  tmp_path: Path) -> None:
    """Objects are fetched on threads and local files checked in line: each row still gets its own content."""
    import pandas as pd

    remote = usable(build_manifest(bucket, tmp_path / "v1")).head(6)
    local = usable(build_manifest(str(tiny_digits), tmp_path / "v2")).head(6)
    rows = pd.concat([remote.iloc[::2], local.iloc[:3], remote.iloc[1::2], local.iloc[3:]]).assign(path=None)
    out = localize(rows, tmp_path / "step", workers=3)
    assert list(out["uri"]) == list(rows["uri"])
    assert [_sha(p) for p in out["path"]] == list(rows["sha256"])
    assert [p.startswith(str(tmp_path / "step")) for p in out["path"]] == [str(u).startswith("s3://")
                                                                          for u in rows["uri"]]


def test_an_object_changed_between_validate_and_fine_tune_stops_the_run(bucket: str, s3_endpoint: dict[str, str],
                                                                        tiny_digits: Path, tmp_path: Path) -> None:
    """The whole CLI: once the validate step is done, one training image is replaced in the bucket. Fine-tune
    fetches it by URI, finds another sha256 and stops with one line naming the object; nothing is registered."""
    import os

    import mlflow

    from tlops.data.storage import s3_client

    manifest = build_manifest(bucket, tmp_path / "look")
    golden = set(golden_rows(manifest)["uri"])
    train = usable(manifest)
    target = str(train[(train["split"] == "train") & ~train["uri"].isin(golden)]["uri"].iloc[-1])
    db = tmp_path / "mlflow.db"
    cfg = write_config(tmp_path / "c.yaml", tmp_path / ".tlops", tracking__uri=f"sqlite:///{db}",
                       registry__model_name="changed-digits")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({**s3_endpoint, "TLOPS_PRIVATE_WORKDIR": "1"})
    proc = subprocess.Popen([sys.executable, "-m", "tlops", "run", "--config", str(cfg), "--data", bucket],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Task 'validate' finished" in line:
            replacement = sorted(tiny_digits.rglob("*.png"))[0].read_bytes()
            s3_client().put_object(Bucket="images", Key=target.removeprefix("s3://images/"), Body=replacement)
            break
        assert time.monotonic() < deadline, "the validate step did not finish"
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-2000:] + err[-2000:]
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: fine-tune: {target}: its content changed after the "
                                                   "validate step"), err[-2000:]
    assert "Traceback" not in err
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    assert not mlflow.MlflowClient().search_registered_models("name = 'changed-digits'")
