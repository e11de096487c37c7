"""Data from an S3 protocol endpoint: moto's server mode on loopback, reached through boto3 over HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli, write_config
from tests.integration.conftest import S3_SECRET as SECRET

pytestmark = pytest.mark.integration


def test_manifest_from_s3_keeps_s3_uris_and_mirrors_by_etag(bucket: str, tmp_path: Path, tiny_digits: Path) -> None:
    from tlops.data import build_manifest, manifest_hash
    from tlops.storage import s3_client

    df = build_manifest(bucket, tmp_path / "cache")
    assert len(df) == 90 and df["uri"].str.startswith("s3://images/digits/").all()
    assert set(df["label"]) == {"0", "1", "7"}
    local = build_manifest(str(tiny_digits), tmp_path / "cache2")
    assert sorted(df["sha256"]) == sorted(local["sha256"])  # same bytes, same splits
    assert dict(zip(df["sha256"], df["split"], strict=True)) == dict(zip(local["sha256"], local["split"], strict=True))
    # A second build downloads nothing new; a deleted object leaves the mirror too.
    mirror = next((tmp_path / "cache").rglob("digit_*.png"))
    mtime = mirror.stat().st_mtime_ns
    s3_client().delete_object(Bucket="images", Key="digits/0/" + next(
        p.name for p in sorted((tiny_digits / "0").iterdir())))
    again = build_manifest(bucket, tmp_path / "cache")
    assert len(again) == 89 and manifest_hash(again) != manifest_hash(df)
    assert mirror.stat().st_mtime_ns == mtime or not mirror.exists()
    s3_client().upload_file(str(sorted((tiny_digits / "0").iterdir())[0]), "images",
                            "digits/0/" + sorted((tiny_digits / "0").iterdir())[0].name)


def test_keys_that_escape_the_prefix_are_refused(s3_endpoint: dict[str, str], tmp_path: Path) -> None:
    from tlops.errors import TlopsError
    from tlops.storage import materialize, s3_client

    s3_client().create_bucket(Bucket="evil")
    s3_client().put_object(Bucket="evil", Key="data/../../outside.png", Body=b"x")
    with pytest.raises(TlopsError, match="escapes its root"):
        materialize("s3://evil/data", tmp_path / "cache")
    assert not (tmp_path / "outside.png").exists()


def test_missing_bucket_is_a_clear_error(s3_endpoint: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("run", "--data", "s3://no-such-bucket/x", cwd=tmp_path, env=s3_endpoint)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bucket does not exist" in result.stderr


def test_pipeline_runs_on_s3_data(bucket: str, s3_endpoint: dict[str, str], tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", tmp_path / ".tlops")
    result = run_cli("run", "--config", str(cfg), "--data", bucket, cwd=tmp_path, env=s3_endpoint)
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    assert "s3://images/digits" in result.stdout and "PROMOTE" in result.stdout
    # Credentials never reach the tracking store: not in the database, not in any logged artifact.
    for path in (tmp_path / ".tlops").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
