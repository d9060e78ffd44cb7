"""
The replayer on two cards: the study host puts the image model alone on the
last card, the daemon's config names both cards and each consumer's, and a
short trace replays through a real twistd with every job answered, no swap
and no out-of-memory on either card.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from mgpumanager.config.parsing import parse_config
from mgpumanager.replay.report import OK, JobRecord, format_table, jobs_per_hour
from mgpumanager.replay.run import Settings, daemon_config, main, replay
from mgpumanager.replay.study_host import MODELS, StudyHost
from mgpumanager.replay.traces import heavy, sped_up

TWO_CARDS = (24576, 24576)


def test_the_image_model_sits_alone_on_the_last_card() -> None:
    host = StudyHost(0, 20, state_path=None, clock=Clock(), cards_mib=TWO_CARDS)
    memory = {server.name: server.model.card for server in host.servers}
    assert memory["comfyui"] is host.bank.cards[1]
    assert memory["ollama"] is memory["mvoice"] is host.bank.cards[0]


def test_one_card_is_the_host_it_was() -> None:
    host = StudyHost(16384, 20, state_path=None, clock=Clock())
    assert [card.total_mib for card in host.bank.cards] == [16384]
    assert all(server.model.card is host.card for server in host.servers)
    assert all("gpus" not in consumer for consumer in _consumers(host).values())


def _consumers(host: StudyHost) -> dict[str, dict[str, object]]:
    host.ports = {model.name: 9000 + n for n, model in enumerate(MODELS)}
    return host.consumers()


def test_the_daemon_config_names_both_cards(tmp_path: Path) -> None:
    host = StudyHost(0, 20, state_path=str(tmp_path / "cards.json"), clock=Clock(),
                     cards_mib=TWO_CARDS)
    host.ports = {model.name: 9000 + n for n, model in enumerate(MODELS)}
    settings = Settings("interactive-first", cards_mib=TWO_CARDS)
    config = parse_config(daemon_config(host, settings, trace_seconds=3600))
    assert config.card_indexes == (0, 1)
    assert [card.settings.total_mib for card in config.cards] == list(TWO_CARDS)
    assert config.consumers["comfyui"].cards == (1,)
    assert config.consumers["ollama"].cards == config.consumers["mvoice"].cards == (0,)


def test_jobs_per_hour_runs_from_the_first_arrival_to_the_last_answer() -> None:
    records = [JobRecord(0.0, "tts", "interactive", OK, 0.0, 10.0),
               JobRecord(100.0, "image", "batch", OK, 5.0, 1800.0),
               JobRecord(200.0, "llm", "interactive", "refused")]
    assert jobs_per_hour(records) == pytest.approx(2 * 3600 / 1800)
    assert "throughput: 2 jobs answered, 4 jobs per hour" in format_table(records)
    assert jobs_per_hour([]) is None


def test_a_sped_up_trace_arrives_faster_and_works_as_long() -> None:
    jobs = heavy(seed=1, duration=600)
    faster = sped_up(jobs, 2)
    assert [job.at / 2 for job in jobs] == [job.at for job in faster]
    assert [job.service_seconds for job in jobs] == [job.service_seconds for job in faster]
    assert [(job.kind, job.chain) for job in jobs] == [(job.kind, job.chain) for job in faster]
    with pytest.raises(ValueError):
        sped_up(jobs, 0)


@pytest.mark.parametrize("argv", [["--cards", "24576"], ["--cards", "24576,big"],
                                  ["--cards", "24576,24576", "--card-mib", "16384"],
                                  ["--rate", "0"]])
def test_the_command_line_refuses_a_bad_card_list(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--shape", "heavy", "--policy", "fifo", *argv])


@pytest_twisted.ensureDeferred
async def test_a_short_heavy_trace_on_two_cards_needs_no_swap(tmp_path: Path) -> None:
    jobs = heavy(seed=2, duration=240)
    settings = Settings("interactive-first", cards_mib=TWO_CARDS)
    outcome = await replay(reactor, jobs, settings, tmp_path)
    assert len(outcome.records) == len(jobs)
    assert {record.outcome for record in outcome.records} == {OK}
    assert outcome.ooms == 0
    # Every model has a card to stay on: loaded once each, never unloaded.
    assert outcome.unloads == 0
    assert outcome.status["scheduler"]["total_jobs"] == len(jobs)
    assert "cards 24576 MiB + 24576 MiB; image work on the last card" in outcome.notes(settings)
