"""Progress from a step without a terminal to the person at `tlops run`: the step's structured lines
(tlops.progress), kfp-style streaming into the launcher's _Tee, and the two views (plain lines, a live display)."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.local import _Tee
from pipelines.view import LiveView, PlainView, parse_event
from tlops import progress

REPO = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# A step's work as tlops.progress says it, in a process of its own (as a kfp.local step is): a phase, then 40
# images at about 25 per second.
STEP = """
import time
from tlops import progress
progress.phase("loading the candidate")
counter = progress.Counter("predicting with the candidate", 40, "images")
for _ in range(40):
    time.sleep(0.04)
    counter.advance()
"""


def _step_output() -> list[str]:
    """The step's stdout and stderr merged, as kfp's SubprocessRunner reads them, framed by kfp's task lines."""
    env = {**os.environ, progress.ENV: "json", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    out = subprocess.run([sys.executable, "-c", STEP], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=120, check=True).stdout
    return ["10:00:00.000 - INFO - Executing task \x1b[96m'evaluate'\x1b[0m\n",
            *(f"    {line}\n" for line in out.splitlines()),
            "10:00:09.000 - INFO - Task \x1b[96m'evaluate'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m\n"]


def test_a_step_speaks_in_structured_lines_only_when_asked() -> None:
    lines = _step_output()
    events = [e for e in (parse_event(line) for line in lines) if e]
    assert events[0] == {"kind": "phase", "text": "loading the candidate"}
    counts = [e for e in events if e["kind"] == "count"]
    assert counts[0]["done"] == 0 and counts[-1]["done"] == 40 and counts[-1]["total"] == 40
    assert counts[-1]["unit"] == "images" and counts[-1]["rate"] > 0
    assert len(counts) < 40  # throttled, not one line per image


def test_the_plain_view_prints_lines_with_rate_and_time_left() -> None:
    out = io.StringIO()
    log = io.StringIO()
    tee = _Tee(log, PlainView(out, every_s=0.0), verbose=False)
    for line in _step_output():
        tee.write(line)
    shown = out.getvalue()
    assert "[tlops-progress]" not in shown and "[tlops-progress]" in log.getvalue()  # the log keeps everything
    assert "Executing task 'evaluate'" in shown and "finished with status SUCCESS" in shown
    assert re.search(r"^\[tlops\] \d\d:\d\d:\d\d evaluate: loading the candidate$", shown, re.M), shown
    assert re.search(r"evaluate: predicting with the candidate: \d+/40 images \([\d.]+ images/s, about \d+ s left\)",
                     shown), shown
    assert "predicting with the candidate: 40/40 images" in shown and " 0/40" not in shown
    assert tee.seconds["evaluate"] >= 0


def test_the_plain_view_throttles_a_counter() -> None:
    out = io.StringIO()
    view = PlainView(out, every_s=3600)
    for done in range(0, 11):
        view.event("fine-tune", {"kind": "count", "what": "features train", "done": done, "total": 10,
                                 "unit": "images", "rate": 5.0, "eta_s": (10 - done) / 5})
    assert out.getvalue().splitlines() == [f"[tlops] {out.getvalue()[8:16]} fine-tune: features train: 10/10 images "
                                           "(5.0 images/s)"]


def test_the_live_view_draws_the_step_bar_rate_and_time_left() -> None:
    from rich.console import Console

    screen = io.StringIO()
    view = LiveView(screen, console=Console(file=screen, force_terminal=True, width=150))
    tee = _Tee(io.StringIO(), view, verbose=False)
    seen = []
    for line in _step_output():
        tee.write(line)
        view.progress.refresh()
        seen.append(ANSI.sub("", screen.getvalue()))
    view.close()
    drawn = ANSI.sub("", screen.getvalue())
    assert "step 1/6 evaluate" in drawn
    assert "evaluate: loading the candidate" in drawn
    assert re.search(r"evaluate: predicting with the candidate .*━.* \d+/40 images · [\d.]+ images/s · \d+ s left",
                     drawn), drawn[-2000:]
    assert "done: evaluate in" in drawn
    assert "Executing task" not in drawn and "[tlops-progress]" not in drawn


def test_a_terminal_gets_the_live_view_and_a_pipe_plain_lines() -> None:
    code = ("import sys; from pipelines.view import make_view; v = make_view(sys.stdout); "
            "print(type(v).__name__, file=sys.__stderr__); v.close()")
    env = {**os.environ, "TERM": "xterm", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    main, child = pty.openpty()
    try:
        on_pty = subprocess.run([sys.executable, "-c", code], stdout=child, stderr=subprocess.PIPE, env=env,
                                text=True, timeout=120)
    finally:
        os.close(child)
        os.close(main)
    on_pipe = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, text=True, timeout=120)
    assert on_pty.stderr.strip() == "LiveView" and on_pipe.stderr.strip() == "PlainView"


def test_the_heartbeat_names_what_a_quiet_step_is_doing(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(progress.ENV, "json")
    with progress.heartbeat("evaluate", every_s=0.3):
        progress.phase("loading champion tlops-digits version 3")
        time.sleep(1.2)
    events = [e for e in (parse_event(line) for line in capsys.readouterr().err.splitlines()) if e]
    beats = [e for e in events if e["kind"] == "heartbeat"]
    assert beats and beats[0]["text"].startswith("evaluate: still loading champion tlops-digits version 3 (")


def test_without_a_launcher_progress_is_throttled_log_lines(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(progress.ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="tlops"):
        counter = progress.Counter("features train", 1000, "images", every_s=3600)
        for _ in range(1000):
            counter.advance()
    said = [r.getMessage() for r in caplog.records if r.name == "tlops.progress"]
    assert len(said) == 2 and said[0].startswith("features train: 1/1000 images (")  # the first and the last
    assert re.fullmatch(r"features train: 1000/1000 images \([\d.]+ images/s\)", said[1]), said
