"""Serving: the MLflow pyfunc and the model directory it loads (``pyfunc``, entry point ``pyfunc_entry``),
``tlops serve`` (``server``) and the compressed variants (``compress``).

``tlops.serving.ImageClassifierPyfunc`` stays importable here: model versions registered before the package
layout store an entry file that imports it from this path (``from tlops.serving import ImageClassifierPyfunc``).
Loaded in a fresh process they import their own bundled copy of tlops; loaded where tlops is already imported
(``tlops serve``, the evaluate step's champion) they import this one. Nothing is imported until that name is asked
for: ``compress.runtime`` must load without torch.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "ImageClassifierPyfunc":
        from tlops.serving.pyfunc import ImageClassifierPyfunc

        return ImageClassifierPyfunc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
