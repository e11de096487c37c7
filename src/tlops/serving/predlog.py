"""The prediction log: a sample of what ``tlops serve`` answered, as Parquet files partitioned by day.

``<log_uri>/day=YYYY-MM-DD/part-<UTC time>-<id>.parquet``, under a local directory or an ``s3://`` prefix. Each
file appears whole or not at all (a local file is written beside and renamed; an S3 object is one PUT), so a
reader never sees half of one. The request path only offers records to a bounded queue (:meth:`PredictionLog.offer`,
never blocking); one background thread, woken when a batch is ready, turns them into rows (image hash, size,
brightness, top-k) and writes them in batches, handing the GIL back after each row. A full queue or a store that
fails drops records and counts them; no request waits for the store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import logging
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlops.errors import TlopsError

log = logging.getLogger("tlops.server")

FORMAT = "tlops-prediction-log/1"
FORMAT_KEY = b"tlops.format"
_DAY_DIR = re.compile(r"day=(\d{4}-\d{2}-\d{2})")
_PART = re.compile(r"part-[A-Za-z0-9T_-]+\.parquet")
_DICTIONARY = ("model_name", "model_version", "preprocess_fingerprint", "mode", "format", "predicted")
COLUMNS = ("time", "model_name", "model_version", "preprocess_fingerprint", "image_sha256", "width", "height",
           "mode", "format", "brightness", "predicted", "confidence", "top_classes", "top_probabilities",
           "embedding", "image")


def schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("time", pa.timestamp("ms", tz="UTC")),
        ("model_name", pa.string()), ("model_version", pa.string()), ("preprocess_fingerprint", pa.string()),
        ("image_sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("mode", pa.string()),
        ("format", pa.string()), ("brightness", pa.float32()),
        ("predicted", pa.string()), ("confidence", pa.float32()),
        ("top_classes", pa.list_(pa.string())), ("top_probabilities", pa.list_(pa.float32())),
        ("embedding", pa.list_(pa.float32())),  # null where the runtime gives none (a graph without the output)
        ("image", pa.binary()),  # null unless image bytes are kept (monitoring.log_images)
    ], metadata={FORMAT_KEY: FORMAT.encode()})


@dataclass(frozen=True)
class Served:
    """What the request path hands over for one sampled image: no work beyond building this tuple."""

    time: float  # seconds since the epoch
    info: dict[str, Any]  # the served model's /version record (name, version, classes, preprocess_fingerprint)
    image: bytes
    proba: np.ndarray  # this image's class probabilities
    embedding: np.ndarray | None  # the backbone features the head saw


def image_properties(data: bytes) -> tuple[int, int, str, str, float]:
    """(width, height, mode, format, mean brightness in [0, 1]) of image file bytes; a reduced decode suffices."""
    from PIL import Image, ImageStat

    with Image.open(io.BytesIO(data)) as img:
        width, height, mode, fmt = img.width, img.height, img.mode, img.format or ""
        img.draft("L", (64, 64))  # JPEG: decode at a fraction of the size
        small = img.convert("L")
        small.thumbnail((64, 64))
        brightness = float(ImageStat.Stat(small).mean[0]) / 255.0
    return width, height, mode, fmt, brightness


def to_row(item: Served, top_k: int, keep_image: bool) -> dict[str, Any]:
    classes = list(item.info.get("classes", []))
    proba = np.asarray(item.proba, dtype=np.float32)
    order = np.argsort(-proba, kind="stable")[: max(1, min(top_k, len(proba)))]
    try:
        width, height, mode, fmt, brightness = image_properties(item.image)
    except Exception:  # answered, so decodable; kept anyway, without its properties
        width = height = -1
        mode, fmt, brightness = "", "", float("nan")
    names = [classes[i] if i < len(classes) else str(i) for i in order]
    return {
        "time": dt.datetime.fromtimestamp(item.time, tz=dt.UTC),
        "model_name": str(item.info.get("name", item.info.get("model", ""))),
        "model_version": str(item.info.get("version") or ""),
        "preprocess_fingerprint": str(item.info.get("preprocess_fingerprint", "")),
        "image_sha256": hashlib.sha256(item.image).hexdigest(),
        "width": width, "height": height, "mode": mode, "format": fmt, "brightness": brightness,
        "predicted": names[0], "confidence": float(proba[order[0]]),
        "top_classes": names, "top_probabilities": [float(proba[i]) for i in order],
        "embedding": None if item.embedding is None else np.asarray(item.embedding, dtype=np.float32),
        "image": item.image if keep_image else None,
    }


def table_of(rows: list[dict[str, Any]]) -> Any:
    """The rows as an Arrow table of the log's schema. The embeddings go in as one numpy buffer, not as Python
    lists of floats: on the log's thread, that is most of the GIL time the request path would feel."""
    import pyarrow as pa

    full = schema()
    at = full.get_field_index("embedding")
    emb = [row.pop("embedding") for row in rows]
    table = pa.Table.from_pylist(rows, schema=full.remove(at))
    lengths = np.array([0 if e is None else len(e) for e in emb], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    present = [e for e in emb if e is not None]
    values = np.concatenate(present).astype(np.float32) if present else np.zeros(0, dtype=np.float32)
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float32()),
                                      mask=pa.array([e is None for e in emb]))
    return table.add_column(at, full.field(at), column).replace_schema_metadata(full.metadata)


def day_of(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%d")


def write_part(uri: str, day: str, table: Any, client: Any = None) -> str:
    """One Parquet file of ``table`` under ``uri``'s partition of ``day``, whole or not at all; returns its URI.
    ``client``: the boto3 S3 client to use for an ``s3://`` URI (default: a new one)."""
    import pyarrow.parquet as pq

    from tlops.data.storage import is_s3, parse_s3, s3_client
    from tlops.fileio import atomic_write

    name = f"part-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}.parquet"
    # Dictionaries and statistics only where they pay: on the float lists (the embeddings, most of the bytes) they
    # doubled the encoding time and made the file larger (256 records: 20 ms and 1.08 MB against 10 ms, 0.76 MB).
    options = {"compression": "zstd", "use_dictionary": list(_DICTIONARY), "write_statistics": ["time"]}
    if is_s3(uri):
        bucket, prefix = parse_s3(uri)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, **options)
        key = "/".join(p for p in (prefix, f"day={day}", name) if p)
        (client or s3_client()).put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
        return f"s3://{bucket}/{key}"
    path = Path(uri) / f"day={day}" / name
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, **options))
    return str(path)


class PredictionLog:
    """Records offered by the request path, written by one background thread in batches of ``batch_records``
    (or every ``flush_s`` seconds, whichever comes first). ``max_queue`` bounds the records waiting: past it,
    :meth:`offer` drops and counts (``dropped["queue_full"]``); a batch the store refuses is dropped and counted
    too (``dropped["store_error"]``), with one warning per distinct problem."""

    def __init__(self, uri: str, batch_records: int = 256, flush_s: float = 5.0, max_queue: int = 4096,
                 keep_images: bool = False, top_k: int = 5) -> None:
        self.uri, self.batch_records, self.flush_s = uri.rstrip("/") or uri, max(1, batch_records), flush_s
        self.keep_images, self.top_k = keep_images, top_k
        self.written = 0
        self.files = 0
        self.dropped = {"queue_full": 0, "store_error": 0}
        self._queue: queue.Queue[Served | None] = queue.Queue(max(1, max_queue))
        self._lock = threading.Lock()
        self._last_problem = ""
        self._client: Any = None
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tlops-prediction-log", daemon=True)
        self._thread.start()

    def offer(self, item: Served) -> bool:
        """Queue one record without waiting; False (and counted) when the queue is full. The log's thread is
        woken only when a batch is ready (or by its flush interval), not for every record: a wake per request
        would have it take the GIL while the request's answer is still being written."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self.dropped["queue_full"] += 1
            return False
        if self._queue.qsize() >= self.batch_records:
            self._wake.set()
        return True

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (within ``timeout`` seconds), then stop the thread."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_s)
            self._wake.clear()
            batch: list[Served] = []
            done = False
            while not done:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:  # close()
                    done = True
                else:
                    batch.append(item)
            for start in range(0, len(batch), self.batch_records):
                self._flush(batch[start : start + self.batch_records])
            if done:
                return

    def _flush(self, batch: list[Served]) -> None:
        if not batch:
            return
        unwritten = len(batch)
        try:
            by_day: dict[str, list[dict[str, Any]]] = {}
            for item in batch:
                row = to_row(item, self.top_k, self.keep_images)
                by_day.setdefault(day_of(row["time"]), []).append(row)
                # Hand the GIL over after each record: a request waiting for it gets it now, not at the end of
                # the interpreter's 5 ms switch interval (a batch of 256 rows is about 17 ms of Python).
                time.sleep(0)
            for day, rows in sorted(by_day.items()):
                if self._client is None and self.uri.startswith("s3://"):
                    from tlops.data.storage import s3_client

                    self._client = s3_client()  # made once: a boto3 client takes longer to make than a write
                write_part(self.uri, day, table_of(rows), self._client)
                unwritten -= len(rows)
                with self._lock:
                    self.written += len(rows)
                    self.files += 1
            self._last_problem = ""
        except Exception as exc:  # the store is full, down or refuses: these records are lost, and counted
            with self._lock:
                self.dropped["store_error"] += unwritten
            problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if problem != self._last_problem:
                log.warning("prediction log %s: %d records dropped, the store failed (%s); serving goes on",
                            self.uri, unwritten, problem[:300])
                self._last_problem = problem


# ---------------------------------------------------------------------------------------------------- reading


def parse_when(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """A point in time: ISO 8601 (``2026-12-01``, ``2026-12-01T08:00``, UTC unless it says otherwise) or a
    duration before now (``30m``, ``24h``, ``7d``)."""
    now = now or dt.datetime.now(dt.UTC)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m:
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return now - dt.timedelta(seconds=seconds)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise TlopsError(f"{text!r}: not a time; give ISO 8601 (2026-12-01 or 2026-12-01T08:00) or a duration "
                         "before now (30m, 24h, 7d)") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _log_files(uri: str) -> list[tuple[str, str]]:
    """(day, file name relative to the log root) of every non-hidden file under ``uri``."""
    from tlops.data.storage import is_s3, list_s3

    if is_s3(uri):
        rels = [rel for rel, _etag, _size in list_s3(uri)]
    else:
        root = Path(uri)
        if not root.is_dir():
            raise TlopsError(f"prediction log {uri} does not exist; point --log-uri at the directory tlops serve "
                             "writes (monitoring.log_uri)")
        rels = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    out = []
    for rel in sorted(rels):
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts):
            continue  # a part being written (atomic_write's temporary name) or a hidden file
        day = _DAY_DIR.fullmatch(parts[0]) if len(parts) == 2 else None
        if day is None or not _PART.fullmatch(parts[1]):
            raise TlopsError(f"prediction log {uri}: {rel} is not a prediction log file (expected "
                             "day=YYYY-MM-DD/part-*.parquet); move it out of the log")
        out.append((day.group(1), rel))
    return out


def _read_table(uri: str, rel: str) -> Any:
    import pyarrow.parquet as pq

    from tlops.data.storage import _s3_error, is_s3, parse_s3, s3_client

    where = f"{uri}/{rel}"
    if is_s3(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = parse_s3(uri)
        try:
            body = s3_client().get_object(Bucket=bucket, Key="/".join(p for p in (prefix, rel) if p))["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(where, exc) from None
        source: Any = io.BytesIO(body)
    else:
        source = str(Path(uri) / rel)
    try:
        table = pq.read_table(source)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TlopsError(f"prediction log file {where} cannot be read as Parquet ({first:.160}); it is damaged "
                         "or not a prediction log: move it out of the log") from None
    found = (table.schema.metadata or {}).get(FORMAT_KEY, b"").decode(errors="replace")
    if found != FORMAT:
        raise TlopsError(f"prediction log file {where} is not a tlops prediction log ({FORMAT}; it says "
                         f"{found or 'nothing'}); move it out of the log")
    return table


def read_log(uri: str, since: dt.datetime | None = None, until: dt.datetime | None = None,
             columns: list[str] | None = None) -> Any:
    """The records logged in [since, until) as a pandas DataFrame (only the day partitions the window touches
    are read); a file in the log that is not one of its parts is an error naming it."""
    import pandas as pd
    import pyarrow as pa

    files = _log_files(uri)
    first = day_of(since) if since else None
    last = day_of(until) if until else None
    tables = [_read_table(uri, rel) for day, rel in files
              if (first is None or day >= first) and (last is None or day <= last)]
    if not tables:
        return pd.DataFrame(columns=list(columns or COLUMNS))
    table = pa.concat_tables([t.select(list(columns or COLUMNS)) for t in tables])
    frame = table.to_pandas()
    keep = np.ones(len(frame), dtype=bool)
    if since is not None:
        keep &= (frame["time"] >= pd.Timestamp(since)).to_numpy()
    if until is not None:
        keep &= (frame["time"] < pd.Timestamp(until)).to_numpy()
    return frame[keep].sort_values("time", kind="stable").reset_index(drop=True)
