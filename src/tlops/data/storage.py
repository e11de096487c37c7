"""Data and artifact URIs: local paths and ``s3://bucket/prefix`` through boto3.

The S3 endpoint comes from the environment (``AWS_ENDPOINT_URL``), so MinIO and other S3-compatible
stores work unchanged. S3 data is mirrored into a local cache keyed by ETag; the manifest keeps the
original ``s3://`` URIs.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path, PurePosixPath
from typing import Any

from tlops.errors import TlopsError
from tlops.fileio import atomic_write, read_json, write_json


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def parse_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise TlopsError(f"{uri}: an S3 URI needs a bucket, as in s3://bucket/prefix")
    return bucket, prefix.strip("/")


def s3_client() -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    cfg = BotoConfig(
        connect_timeout=float(os.environ.get("TLOPS_S3_CONNECT_TIMEOUT", "5")),
        read_timeout=float(os.environ.get("TLOPS_S3_READ_TIMEOUT", "60")),
        retries={"total_max_attempts": int(os.environ.get("TLOPS_S3_MAX_ATTEMPTS", "5")), "mode": "standard"},
    )
    # boto3 reads AWS_ENDPOINT_URL itself; passing it explicitly keeps older botocore working too.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=endpoint, config=cfg)


def _s3_error(uri: str, exc: Exception) -> TlopsError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS default"
    if isinstance(exc, EndpointConnectionError) or "Connect timeout" in str(exc):
        return TlopsError(
            f"{uri}: cannot reach the S3 endpoint {endpoint}; check AWS_ENDPOINT_URL and that the service is up"
        )
    if isinstance(exc, NoCredentialsError):
        return TlopsError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "error")
        if code in ("NoSuchBucket", "404"):
            return TlopsError(f"{uri}: bucket does not exist on {endpoint}")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return TlopsError(f"{uri}: S3 at {endpoint} does not accept these credentials ({code}); "
                              "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            bucket, prefix = parse_s3(uri)
            return TlopsError(f"{uri}: access denied (403) to bucket {bucket!r}, prefix {prefix or '/'!r} on "
                              f"{endpoint}; grant these credentials s3:ListBucket and s3:GetObject there, "
                              "or use credentials that have them")
        return TlopsError(f"{uri}: S3 refused the request ({code}) on {endpoint}")
    return TlopsError(f"{uri}: S3 request failed on {endpoint}: {type(exc).__name__}: {exc}")


def safe_relpath(rel: str, root_desc: str) -> PurePosixPath:
    """A relative path that cannot leave its root (no absolute paths, no ``..``)."""
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or any(part == ".." for part in p.parts) or not p.parts:
        raise TlopsError(f"{rel!r} escapes its root {root_desc}; paths must stay inside the data root")
    return p


def list_s3(uri: str) -> list[tuple[str, str, int]]:
    """(key relative to the prefix, etag, size) for every object under the prefix."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3(uri)
    client = s3_client()
    out: list[tuple[str, str, int]] = []
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""
        )
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/"):
                    continue
                rel = key[len(prefix) + 1 :] if prefix else key
                safe_relpath(rel, uri)
                out.append((rel, obj["ETag"].strip('"'), int(obj["Size"])))
    except (BotoCoreError, ClientError) as exc:
        raise _s3_error(uri, exc) from None
    return out


def _download(client: Any, bucket: str, key: str, dest: str) -> None:
    client.download_file(bucket, key, dest)


def _stand_in(size: int, tmp: str) -> None:
    with open(tmp, "wb") as fh:
        fh.truncate(size)


def materialize(uri: str, cache_root: str | Path, max_bytes: int | None = None) -> Path:
    """A local directory holding the data at ``uri``: the path itself, or a synced S3 mirror.

    An object over ``max_bytes`` is never downloaded: the mirror holds a sparse stand-in of its size (no
    bytes written, no disk used), so the walk refuses it from its size as it would a local file, under the
    same name, label and split.
    """
    if not is_s3(uri):
        return Path(uri)
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3(uri)
    local = Path(cache_root) / "s3" / bucket / (prefix or "_root")
    index_path = local / ".tlops-etags.json"
    index: dict[str, str] = read_json(index_path) if index_path.is_file() else {}
    objects = list_s3(uri)
    client = s3_client()
    seen = set()
    try:
        for rel, etag, size in objects:
            seen.add(rel)
            dest = local / safe_relpath(rel, uri)
            over = max_bytes is not None and size > max_bytes
            mark = f"over-limit:{etag}" if over else etag
            if index.get(rel) == mark and dest.is_file():
                continue
            if over:
                atomic_write(dest, functools.partial(_stand_in, size))
            else:
                key = f"{prefix}/{rel}" if prefix else rel
                atomic_write(dest, functools.partial(_download, client, bucket, key))
            index[rel] = mark
    except (BotoCoreError, ClientError) as exc:
        raise _s3_error(uri, exc) from None
    # Objects deleted from the bucket disappear from the mirror too.
    for rel in set(index) - seen:
        (local / rel).unlink(missing_ok=True)
        index.pop(rel)
    if objects or index_path.exists():
        write_json(index_path, index)
    # else: nothing under the prefix and nothing mirrored before; no directory is made, so a caller can
    # tell "no objects" from "objects that are not images".
    return local


def fetch_file(uri: str, dest: str | Path) -> bool:
    """Copy the file at ``uri`` (``s3://`` or a local path) to ``dest`` atomically; False when there is none."""
    import shutil

    if not is_s3(uri):
        if not Path(uri).is_file():
            return False
        atomic_write(dest, functools.partial(shutil.copyfile, uri))
        return True
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_s3(uri)
    try:
        atomic_write(dest, functools.partial(_download, s3_client(), bucket, key))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
            return False
        raise _s3_error(uri, exc) from None
    except BotoCoreError as exc:
        raise _s3_error(uri, exc) from None
    return True


def put_file(src: str | Path, uri: str) -> None:
    """Store the file ``src`` at ``uri`` (``s3://``: one PUT, so the object appears whole or not at all)."""
    import shutil

    if not is_s3(uri):
        atomic_write(uri, functools.partial(shutil.copyfile, str(src)))
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_s3(uri)
    try:
        s3_client().upload_file(str(src), bucket, key)
    except (BotoCoreError, ClientError) as exc:
        raise _s3_error(uri, exc) from None
