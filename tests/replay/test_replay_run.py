"""
A short replay through a real twistd in front of the study host: every job
answered, no model collision on the card, the figures the report prints.
"""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from twisted.internet import reactor

from mgpumanager.replay.report import OK
from mgpumanager.replay.run import Settings, replay
from mgpumanager.replay.traces import voice


@pytest_twisted.ensureDeferred
async def test_a_short_voice_trace_replays_with_every_job_answered_and_no_oom(
    tmp_path: Path,
) -> None:
    jobs = voice(seed=3, duration=240)
    settings = Settings("interactive-first")
    outcome = await replay(reactor, jobs, settings, tmp_path)
    assert len(outcome.records) == len(jobs)
    assert {record.outcome for record in outcome.records} == {OK}
    assert outcome.ooms == 0
    assert outcome.status["scheduler"]["policy"] == "interactive-first"
    assert outcome.status["scheduler"]["total_jobs"] == len(jobs)
    notes = "\n".join(outcome.notes(settings))
    assert "time scale 20" in notes and "daemon CPU" in notes
