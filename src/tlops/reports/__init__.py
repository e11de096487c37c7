"""The HTML pages a person reads (the validation, parity and evaluation reports), rendered from the Jinja2
templates beside this module. Every page inlines one shared stylesheet (``templates/style.css``): a report is one
self-contained file, no scripts, no network, as the Kubeflow UI and an MLflow artifact view show it."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).with_name("templates")


@functools.cache
def _environment() -> Any:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["basename"] = lambda path: Path(str(path)).name
    return env


def render(template: str, **context: Any) -> str:
    """The page ``template`` (a file under ``templates/``) with ``context``; every value is HTML-escaped unless
    it is marked safe (``markupsafe.Markup``)."""
    return str(_environment().get_template(template).render(**context))
