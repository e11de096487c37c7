"""What ``tlops serve`` tells about itself: Prometheus metrics at ``/metrics``, and the sampled prediction log.

The server calls three hooks: :meth:`ServingMonitor.observe` once per request (after its answer is built),
:meth:`ServingMonitor.sample` to decide which images of a request are logged, and :meth:`ServingMonitor.served`
with the answer. Each is counter increments and, for sampled images, a non-blocking queue put; the log's own
thread does the rest (:class:`tlops.serving.predlog.PredictionLog`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from tlops.errors import TlopsError
from tlops.serving.predlog import PredictionLog, Served

# Seconds; a single digit image takes a few ms, a batch of large photos on one CPU thread a second or more.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _LogCollector:
    """The prediction log's counters, read when Prometheus scrapes (the log's thread keeps plain integers)."""

    def __init__(self, monitor: ServingMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        log = self.monitor.log
        written = CounterMetricFamily("tlops_prediction_log_records_written",
                                      "Prediction log records written to the store.")
        written.add_metric([], log.written if log else 0)
        dropped = CounterMetricFamily("tlops_prediction_log_records_dropped",
                                      "Prediction log records dropped: queue full, or the store failed.",
                                      labels=["reason"])
        for reason in ("queue_full", "store_error"):
            dropped.add_metric([reason], log.dropped[reason] if log else 0)
        pending = GaugeMetricFamily("tlops_prediction_log_queue", "Prediction log records waiting to be written.")
        pending.add_metric([], log.pending if log else 0)
        rate = GaugeMetricFamily("tlops_prediction_log_sample_rate", "Share of served images logged.")
        rate.add_metric([], self.monitor.sample_rate if log else 0.0)
        yield from (written, dropped, pending, rate)


class ServingMonitor:
    """The server's metrics (a registry of its own, so two apps in one process do not mix) and its log."""

    def __init__(self, sample_rate: float = 0.0, log: PredictionLog | None = None, seed: int | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        if not 0.0 <= sample_rate <= 1.0:
            raise TlopsError(f"--sample-rate {sample_rate:g}: expected a share of the images from 0 (no log) to 1")
        self.sample_rate = sample_rate if log is not None else 0.0
        self.log = log if sample_rate > 0 else None
        self._rng = random.Random(seed)
        self.registry = CollectorRegistry()
        self.requests = Counter("tlops_requests", "HTTP requests answered, by route, method and status.",
                                ["route", "method", "status"], registry=self.registry)
        self.errors = Counter("tlops_request_errors", "HTTP requests answered with an error, by status.",
                              ["status"], registry=self.registry)
        self.latency = Histogram("tlops_request_duration_seconds", "Time from the request's start to its answer.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.predictions = Counter("tlops_predictions", "Images predicted, by model version and predicted class.",
                                   ["model", "version", "class"], registry=self.registry)
        self.registry.register(_LogCollector(self))

    @classmethod
    def create(cls, sample_rate: float, log_uri: str | None, keep_images: bool = False,
               max_queue: int = 4096) -> ServingMonitor:
        """The monitor ``tlops serve`` runs with: a prediction log at ``log_uri`` when ``sample_rate`` > 0."""
        if not 0.0 <= sample_rate <= 1.0:
            raise TlopsError(f"--sample-rate {sample_rate:g}: expected a share of the images from 0 (no log) to 1")
        if sample_rate > 0 and not log_uri:
            raise TlopsError("--sample-rate above 0 needs --log-uri (monitoring.log_uri): a directory or s3:// "
                             "prefix for the prediction log")
        log = PredictionLog(str(log_uri), keep_images=keep_images, max_queue=max_queue) if sample_rate > 0 else None
        return cls(sample_rate, log)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        if status >= 400:
            self.errors.labels(str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def sample(self, n: int) -> list[bool] | None:
        """Which of a request's ``n`` images to log; None when none is (then no embedding is asked for)."""
        if self.log is None:
            return None
        rate, rng = self.sample_rate, self._rng
        mask = [rate >= 1.0 or rng.random() < rate for _ in range(n)]
        return mask if any(mask) else None

    def served(self, info: dict[str, Any], images: list[bytes], proba: np.ndarray, embedding: np.ndarray | None,
               mask: list[bool] | None) -> None:
        """Count the request's predictions per class; offer its sampled images to the log."""
        classes = info.get("classes") or []
        name, version = str(info.get("name", "")), str(info.get("version") or "")
        if len(proba):
            picked, counts = np.unique(np.asarray(proba).argmax(axis=1), return_counts=True)
            for i, count in zip(picked.tolist(), counts.tolist(), strict=True):
                label = str(classes[i]) if i < len(classes) else str(i)
                self.predictions.labels(name, version, label).inc(count)
        if mask is None or self.log is None:
            return
        now = time.time()
        for i, keep in enumerate(mask):
            if keep:
                self.log.offer(Served(now, info, images[i], proba[i],
                                      None if embedding is None else embedding[i]))

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in the Prometheus text format, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
