"""The one project image every component runs in (the core installed; nothing installed at run time)."""

from __future__ import annotations

import os

DEFAULT_IMAGE = "tlops:0.1.0"
IMAGE_ENV = "TLOPS_IMAGE"


def resolve_image(configured: str | None = None) -> str:
    """The image a compiled pipeline names: ``cluster.image`` (``--image``), else ``$TLOPS_IMAGE``, else the
    default. Read when the pipeline is compiled, never at import."""
    return configured or os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE
