"""The one project image every component runs in (the core installed; nothing installed at run time)."""

import os

DEFAULT_IMAGE = "tlops:0.1.0"
IMAGE = os.environ.get("TLOPS_IMAGE", DEFAULT_IMAGE)
