"""Data from an S3 protocol endpoint: moto's server mode on loopback, reached through boto3 over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_config
from tests.integration.conftest import S3_SECRET as SECRET

pytestmark = pytest.mark.integration


def test_manifest_from_s3_keeps_s3_uris_and_mirrors_by_etag(bucket: str, tmp_path: Path, tiny_digits: Path) -> None:
    from tlops.data.discovery import build_manifest, manifest_hash
    from tlops.data.storage import s3_client

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


def test_an_object_over_the_size_limit_is_never_downloaded(s3_endpoint: dict[str, str], tmp_path: Path,
                                                          tiny_digits: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused from its listed size, as a local file is: the mirror holds no byte of it, the manifest names it
    under its label with the reason, and a raised limit fetches it on the next build."""
    from tests.helpers.data import upload_dir
    from tlops.data.discovery import build_manifest
    from tlops.data.storage import s3_client

    s3_client().create_bucket(Bucket="big")
    upload_dir(tiny_digits / "1", "s3://big/digits/1")
    s3_client().put_object(Bucket="big", Key="digits/1/huge.png", Body=b"\x89PNG" + b"\0" * (3 << 20))
    monkeypatch.setenv("TLOPS_MAX_FILE_BYTES", str(1 << 20))
    df = build_manifest("s3://big/digits", tmp_path / "cache")
    huge = df[df["uri"] == "s3://big/digits/1/huge.png"].iloc[0]
    assert huge["label"] == "1" and not huge["decodable"] and huge["sha256"] == ""
    assert huge["error"] == f"{(3 << 20) + 4} bytes, over the limit of {1 << 20} (TLOPS_MAX_FILE_BYTES)"
    stand_in = next((tmp_path / "cache").rglob("huge.png"))
    assert stand_in.stat().st_blocks == 0  # sparse: nothing of the object was written
    assert df.drop(huge.name)["decodable"].all() and len(df) == 31
    monkeypatch.setenv("TLOPS_MAX_FILE_BYTES", str(8 << 20))
    again = build_manifest("s3://big/digits", tmp_path / "cache")
    fetched = again[again["uri"] == "s3://big/digits/1/huge.png"].iloc[0]
    assert fetched["sha256"] != "" and fetched["error"] != huge["error"]  # downloaded now, and read (not a PNG)
    assert stand_in.read_bytes().startswith(b"\x89PNG")


def test_keys_that_escape_the_prefix_are_refused(s3_endpoint: dict[str, str], tmp_path: Path) -> None:
    from tlops.data.storage import materialize, s3_client
    from tlops.errors import TlopsError

    s3_client().create_bucket(Bucket="evil")
    s3_client().put_object(Bucket="evil", Key="data/../../outside.png", Body=b"x")
    with pytest.raises(TlopsError, match="escapes its root"):
        materialize("s3://evil/data", tmp_path / "cache")
    assert not (tmp_path / "outside.png").exists()


def test_missing_bucket_is_a_clear_error(s3_endpoint: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("run", "--data", "s3://no-such-bucket/x", cwd=tmp_path, env=s3_endpoint)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bucket does not exist" in result.stderr


# Covered in the default run by test_storage_real.py's pipeline test; kept for a focused check.
@pytest.mark.slow
def test_pipeline_runs_on_s3_data(bucket: str, s3_endpoint: dict[str, str], tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", tmp_path / ".tlops")
    result = run_cli("run", "--config", str(cfg), "--data", bucket, cwd=tmp_path, env=s3_endpoint)
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    assert "s3://images/digits" in result.stdout and "PROMOTE" in result.stdout
    # Credentials never reach the tracking store: not in the database, not in any logged artifact.
    for path in (tmp_path / ".tlops").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.fixture
def reader_of_images_only(s3_endpoint: dict[str, str], bucket: str) -> Iterator[dict[str, str]]:
    """Credentials of an IAM user allowed to read bucket ``images`` only, with moto enforcing IAM meanwhile.

    moto's server checks signatures and IAM policies once ``/moto-api/reset-auth`` sets the number of
    unauthenticated requests to 0; the fixture sets it back to unlimited afterwards.
    """
    import json
    import urllib.request

    import boto3

    from tlops.data.storage import s3_client

    s3_client().create_bucket(Bucket="locked")
    s3_client().put_object(Bucket="locked", Key="data/0/a.png", Body=b"\x89PNG\r\n\x1a\n")
    iam = boto3.client("iam", endpoint_url=s3_endpoint["AWS_ENDPOINT_URL"])
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="images-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject"],
                       "Resource": ["arn:aws:s3:::images", "arn:aws:s3:::images/*"]}]}))
    key = iam.create_access_key(UserName="reader")["AccessKey"]

    def no_auth_requests(count: str) -> None:
        # Not form-encoded (urllib's default), or the server's framework consumes the body as a form.
        req = urllib.request.Request(f"{s3_endpoint['AWS_ENDPOINT_URL']}/moto-api/reset-auth", data=count.encode(),
                                     headers={"Content-Type": "application/octet-stream"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200

    no_auth_requests("0")
    try:
        yield {**s3_endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    finally:
        no_auth_requests("inf")


def test_access_denied_is_one_line_naming_bucket_and_prefix(reader_of_images_only: dict[str, str],
                                                           tmp_path: Path) -> None:
    import boto3

    env = reader_of_images_only
    session = boto3.session.Session(aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                    aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                                    region_name=env["AWS_DEFAULT_REGION"])
    reader = session.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    # The same credentials read the bucket their policy allows, and are refused by the endpoint elsewhere.
    assert reader.list_objects_v2(Bucket="images", Prefix="digits/")["KeyCount"] == 90
    with pytest.raises(reader.exceptions.ClientError, match="AccessDenied") as denied:
        reader.list_objects_v2(Bucket="locked", Prefix="data/")
    assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    result = run_cli("validate", "--data", "s3://locked/data", cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    assert line.startswith("error: s3://locked/data: access denied (403) to bucket 'locked', prefix 'data' on ")
    assert "grant these credentials s3:ListBucket and s3:GetObject" in line
    assert env["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr


def test_prefix_without_objects_is_unusable_input(bucket: str, s3_endpoint: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("validate", "--data", "s3://images/no-such-prefix", cwd=tmp_path, env=s3_endpoint)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    assert line == ("error: no objects found under s3://images/no-such-prefix: "
                    "expected s3://images/no-such-prefix/<class>/<image>")
    assert not (tmp_path / ".tlops" / "cache" / "s3" / "images" / "no-such-prefix").exists()
