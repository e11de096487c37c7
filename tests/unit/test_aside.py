"""tlops.aside: figures drawn in a forked child while the step goes on, with the step's own process as the fallback.

The child's bytes are the bytes the step would have drawn itself; a child that fails or hangs costs time, never
the result; nothing is left behind (no zombie, no open pipe)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tlops import aside
from tlops.aside import Aside
from tlops.evaluation import report
from tlops.training.curves import plot_history

PARENT = os.getpid()


def _gone(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_the_work_runs_in_a_child_while_the_caller_goes_on(tmp_path: Path) -> None:
    go = tmp_path / "go"

    def work() -> dict[str, bytes]:
        # Waits for the caller, which writes the file only once the Aside exists: computed in the constructor
        # (in this process, before returning), the work would find no file and say so.
        deadline = time.monotonic() + 20
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return {"pid": str(os.getpid()).encode(), "saw": b"go" if go.exists() else b"no go"}

    job = Aside(work)
    go.write_text("")
    out = job.result()
    assert out["saw"] == b"go"
    assert int(out["pid"]) != os.getpid()
    assert job.pid is None and job.fd is None


def test_bytes_of_any_size_and_names_come_back_whole() -> None:
    big = bytes(range(256)) * 4096 + b"\x00tail"  # 1 MiB and more: many times a pipe's buffer
    out = Aside(lambda: {"big.bin": big, "empty": b"", "naïve ☃.png": b"\x89PNG"}).result()
    assert out == {"big.bin": big, "empty": b"", "naïve ☃.png": b"\x89PNG"}
    assert list(out) == ["big.bin", "empty", "naïve ☃.png"]


def test_the_figures_a_child_draws_are_the_ones_drawn_in_process() -> None:
    history = [{"epoch": i, "l2": l2, "train_loss": 1.0 / (i + 1), "train_accuracy": 0.8 + 0.05 * i,
                "val_accuracy": 0.75 + 0.05 * i} for i, l2 in enumerate([1e-4, 1e-3, 1e-2])]
    bins = [{"lo": i / 4, "hi": (i + 1) / 4, "accuracy": i / 4, "confidence": i / 4 + 0.1, "n": i + 1}
            for i in range(4)]
    per_class = {c: {"recall": r, "support": 3, "precision": r, "f1": r} for c, r in (("cat", 0.5), ("dog", 1.0))}
    result = {"candidate": {"calibration": {"bins": bins, "ece": 0.1}, "per_class": per_class},
              "champion": {"calibration": {"bins": bins, "ece": 0.2}, "per_class": per_class},
              "confusion_matrix": {"categories": ["cat", "dog"], "matrix": [[2, 1], [0, 3]]}}
    child = Aside(lambda: {"curves.png": plot_history(history, "linear-probe"), **report.figures(result)}).result()
    here = {"curves.png": plot_history(history, "linear-probe"), **report.figures(result)}
    assert set(child) == {"curves.png", "confusion_matrix.png", "reliability.png", "per_class_recall.png"}
    assert child == here
    assert all(v.startswith(b"\x89PNG") for v in child.values())


def test_an_error_is_raised_where_the_step_runs() -> None:
    def broken() -> dict[str, bytes]:
        raise ValueError("no such column: accuracy")

    job = Aside(broken)
    pid = job.pid
    with pytest.raises(ValueError, match="no such column"):
        job.result()
    assert pid is not None and _gone(pid)


def test_a_child_that_fails_costs_time_not_the_result() -> None:
    def only_here() -> dict[str, bytes]:
        if os.getpid() != PARENT:
            os._exit(3)  # the child dies without a word
        return {"where": b"here"}

    assert Aside(only_here).result() == {"where": b"here"}


def test_a_child_that_hangs_is_killed_and_the_work_done_here() -> None:
    def hangs_in_child() -> dict[str, bytes]:
        if os.getpid() != PARENT:
            time.sleep(60)
        return {"where": b"here"}

    job = Aside(hangs_in_child)
    pid = job.pid
    t0 = time.monotonic()
    assert job.result(timeout_s=0.5) == {"where": b"here"}
    assert time.monotonic() - t0 < 30
    assert pid is not None and _gone(pid)


def test_a_result_never_asked_for_leaves_no_zombie() -> None:
    job = Aside(lambda: {"x": b"1" * 200_000})  # more than the pipe holds: the child blocks on its write
    pid = job.pid
    assert pid is not None
    del job
    assert _gone(pid)


def test_turned_off_the_work_runs_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(aside.ENV, "0")
    job = Aside(lambda: {"pid": str(os.getpid()).encode()})
    assert job.pid is None
    assert job.result() == {"pid": str(os.getpid()).encode()}
