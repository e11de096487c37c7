"""Run the pipeline on this machine with kfp.local: each step a subprocess of this Python."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, TextIO

from tlops.config import Config
from tlops.errors import GateFailed, TlopsError
from tlops.steps import ERROR_FILE_ENV

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Lines worth a person's attention while the full log goes to a file.
ECHO = re.compile(r"Executing task|finished with status|^\s*\[tlops\] ")


class _Tee:
    """Everything to the log file; the progress lines also to the terminal."""

    def __init__(self, log: TextIO, terminal: TextIO, verbose: bool) -> None:
        self.log, self.terminal, self.verbose, self.buf = log, terminal, verbose, ""

    def write(self, text: str) -> int:
        self.log.write(text)
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            plain = ANSI.sub("", line)
            if self.verbose or ECHO.search(plain):
                self.terminal.write(plain.strip() + "\n")
                self.terminal.flush()
        return len(text)

    def flush(self) -> None:
        self.log.flush()


def run_local(data_uri: str, cfg: Config, verbose: bool = False) -> dict[str, Any]:
    """Run the whole pipeline; returns the gate's summary, or raises TlopsError naming the failed step."""
    from kfp import local

    from pipelines.transfer_learning import transfer_learning_pipeline

    workdir = Path(cfg.workdir).resolve()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    log_path = workdir / "logs" / f"run-{stamp}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Steps run in this very environment, where the project image's contents are installed.
    warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "pipeline_root"))
    fd, error_file = tempfile.mkstemp(prefix="tlops-error-", suffix=".txt")
    os.close(fd)
    Path(error_file).unlink()
    old = os.environ.get(ERROR_FILE_ENV)
    os.environ[ERROR_FILE_ENV] = error_file
    terminal = sys.stdout
    try:
        with open(log_path, "w", encoding="utf-8") as log, contextlib.redirect_stdout(_Tee(log, terminal, verbose)):
            try:
                task = transfer_learning_pipeline(data_uri=data_uri, config_json=cfg.to_json(),
                                                  pipeline_run=f"tlops-{stamp}")
            except RuntimeError as exc:
                if Path(error_file).is_file():
                    failure = json.loads(Path(error_file).read_text())
                    error = GateFailed(failure["message"]) if failure["exit_code"] == 1 else TlopsError(
                        failure["message"])
                    raise error from None
                raise TlopsError(f"pipeline failed: {str(exc).splitlines()[0]}; full log: {log_path}") from None
    finally:
        if old is None:
            os.environ.pop(ERROR_FILE_ENV, None)
        else:
            os.environ[ERROR_FILE_ENV] = old
        Path(error_file).unlink(missing_ok=True)
    summary = json.loads(task.output)
    summary["log"] = str(log_path)
    return summary
