"""
The status page browsers get at ``GET /``: one self-contained HTML file that
ships inside the package, so the daemon serves it without a build step or a
network fetch.
"""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def status_page() -> bytes:
    """
    The page's bytes, read once: the file never changes while the daemon
    runs, and every browser tab asks for it.
    """
    return resources.files(__package__).joinpath("status.html").read_bytes()
