"""Data helpers only the tests use: put a folder into an S3 bucket, compare two difference hashes."""

from __future__ import annotations

from pathlib import Path

from tlops.data.storage import _s3_error as s3_error
from tlops.data.storage import parse_s3, s3_client


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def upload_dir(local_dir: str | Path, uri: str) -> int:
    """Upload every file under ``local_dir`` to ``uri``; returns the number of files."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3(uri)
    client = s3_client()
    n = 0
    try:
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                rel = path.relative_to(local_dir).as_posix()
                client.upload_file(str(path), bucket, f"{prefix}/{rel}" if prefix else rel)
                n += 1
    except (BotoCoreError, ClientError) as exc:
        raise s3_error(uri, exc) from None
    return n
