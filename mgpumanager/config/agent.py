"""
``agent``: where the daemon answers HAProxy's agent check, so that a balancer in
front of several hosts weighs each by its queue (:mod:`mgpumanager.web.agent`).
Absent, no agent port opens and a single host behaves exactly as before.
"""

from __future__ import annotations

import attrs

from mgpumanager.config.reader import Listen


@attrs.frozen
class AgentConfig:
    """The agent check's ``host:port``; ``None``: the daemon opens no agent port."""

    listen: Listen | None = None
