"""What ``tlops run`` shows while the pipeline runs: a live display on a terminal, plain lines elsewhere.

The steps run in kfp.local subprocesses (or containers) with no terminal of their own: they say how far they
are as ``[tlops-progress] {json}`` lines (``tlops.progress``), which kfp streams into this process's stdout,
where ``pipelines.local._Tee`` hands them to a view.

- ``LiveView`` (stdout is a terminal): a rich display at the bottom of the screen with the pipeline's step
  (``step 3/6 fine-tune``), the current work with its bar, count, rate and time left (or the phase, with a
  spinner), and elapsed times; the steps' ``[tlops]`` lines and each finished step scroll above it.
- ``PlainView`` (a pipe, a CI log): the lines as before, and each progress event as one line, a counter at most
  every ``PLAIN_EVERY_S`` seconds (and always its first and last update).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, TextIO

from tlops.progress import PREFIX, describe, format_seconds

EVENT = re.compile(re.escape(PREFIX) + r"(\{.*\})\s*$")
PLAIN_EVERY_S = 5.0
STEPS = ("validate", "parity", "fine-tune", "evaluate", "compress", "gate")


def parse_event(line: str) -> dict[str, Any] | None:
    """The progress event a step's output line carries, or None for any other line."""
    found = EVENT.search(line)
    if found is None:
        return None
    try:
        event = json.loads(found.group(1))
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


class PlainView:
    """Lines only: what a log file or a CI job shows."""

    kfp_lines = True  # kfp's own "Executing task" and "finished with status" lines say when a step starts and ends

    def __init__(self, terminal: TextIO, every_s: float = PLAIN_EVERY_S) -> None:
        self.terminal, self.every_s = terminal, every_s
        self.said: dict[tuple[str, str], float] = {}

    def line(self, text: str) -> None:
        self.terminal.write(text + "\n")
        self.terminal.flush()

    def step_started(self, name: str) -> None:
        pass  # kfp's own "Executing task" line says it

    def step_finished(self, name: str, seconds: float | None, ok: bool) -> None:
        pass  # kfp's own "finished with status" line says it

    def event(self, step: str, event: dict[str, Any]) -> None:
        if event.get("kind") == "count":
            # A counter's start is not said (the heartbeat names it if it is slow): its updates every
            # every_s seconds are, and its end.
            key = (step, str(event.get("what")))
            now = time.monotonic()
            total, done = event.get("total"), event.get("done", 0)
            final = total is not None and done >= total and done > 0
            last = self.said.setdefault(key, now)
            if not done or not (final or now - last >= self.every_s):
                return
            self.said[key] = now
        text = describe(event)
        if not text:
            return
        prefix = "" if event.get("kind") == "heartbeat" else f"{step}: "
        self.line(f"[tlops] {time.strftime('%H:%M:%S')} {prefix}{text}")

    def close(self) -> None:
        pass


class LiveView:
    """A rich live display on the terminal: the pipeline's step and the current work, updated in place."""

    kfp_lines = False

    def __init__(self, terminal: TextIO, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console or Console(file=terminal)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=30),
                                 TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=self.console,
                                 transient=True, redirect_stdout=False, redirect_stderr=True,
                                 refresh_per_second=4)
        self.steps = self.progress.add_task("starting the pipeline", total=len(STEPS), detail="")
        self.work = self.progress.add_task("", total=None, detail="", visible=False)
        self.done_steps = 0
        self.progress.start()

    def line(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def step_started(self, name: str) -> None:
        total = 3 if name == "skip" else len(STEPS)  # validate, parity, skip: a run that trains nothing
        self.progress.update(self.steps, total=total,
                             description=f"step {self.done_steps + 1}/{total} [bold]{name}[/bold]")
        self.progress.reset(self.work, total=None, description=f"  {name}: starting", detail="", visible=True)

    def step_finished(self, name: str, seconds: float | None, ok: bool) -> None:
        self.done_steps += 1
        self.progress.update(self.steps, completed=self.done_steps)
        took = f" in {format_seconds(seconds)}" if seconds is not None else ""
        self.progress.console.print(f"{'done' if ok else 'FAILED'}: {name}{took}", markup=False, highlight=False)
        self.progress.update(self.work, visible=False)

    def event(self, step: str, event: dict[str, Any]) -> None:
        from rich.markup import escape

        kind = event.get("kind")
        if kind == "heartbeat":
            return  # the spinner and the elapsed time already show the step is alive
        if kind == "count":
            total, done, unit = event.get("total"), int(event.get("done", 0)), str(event.get("unit", ""))
            detail = f"{done}/{total} {unit}" if total else f"{done} {unit}"
            if event.get("rate"):
                detail += f" · {event['rate']:.1f} {unit}/s"
            if event.get("eta_s") is not None and total and done < total:
                detail += f" · {format_seconds(event['eta_s'])} left"
            self.progress.update(self.work, description=f"  {step}: {escape(str(event.get('what', '')))}", total=total,
                                 completed=done, detail=detail, visible=True)
        else:
            self.progress.update(self.work, description=f"  {step}: {escape(str(event.get('text', '')))}", total=None,
                                 completed=0, detail="", visible=True)

    def close(self) -> None:
        self.progress.stop()


def make_view(terminal: TextIO) -> PlainView | LiveView:
    """A live display when ``terminal`` is a terminal that can draw one, else plain lines."""
    import os

    isatty = getattr(terminal, "isatty", None)
    if isatty is not None and isatty() and os.environ.get("TERM", "") != "dumb":
        return LiveView(terminal)
    return PlainView(terminal)
