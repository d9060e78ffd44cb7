"""
The simulated audio servers speak OpenAI's audio API to the official ``openai``
client, the speech server answers HTTP/1.0 and closes every connection as Python's
``http.server`` does, and uploads are read as a stream.
"""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import pytest_twisted
import treq
from twisted.internet.threads import deferToThread

from mgpumanager.simulate import multipart
from mgpumanager.simulate.host import HostConfig, SimulatedHost
from mgpumanager.simulate.multipart import MultipartError, boundary_of, parse_form
from mgpumanager.simulate.voice import fake_wav
from tests.rawhttp import exchange
from tests.simulate.test_simulate import body_json, eventually, started


@pytest_twisted.async_yield_fixture
async def host(tmp_path: Path) -> AsyncIterator[SimulatedHost]:
    simulated = await started(HostConfig.fast(audio_dir=str(tmp_path / "audio")))
    yield simulated
    await simulated.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


@pytest_twisted.ensureDeferred
async def test_the_openai_client_gets_speech(host: SimulatedHost) -> None:
    speech = client(host.urls()["speech"])
    assert host.card.held_by("speech") == 0

    def speak() -> bytes:
        return speech.audio.speech.create(
            model="kokoro", voice="af_heart", input="hello there", response_format="wav"
        ).content

    audio = await deferToThread(speak)
    assert audio == fake_wav("hello there")
    assert host.card.held_by("speech") == 800, "the first request loaded the model"
    models = await deferToThread(speech.models.list)
    assert [m.id for m in models.data] == ["kokoro", "tts-1"]

    def unknown_voice() -> None:
        speech.audio.speech.create(model="kokoro", voice="nobody", input="x")

    with pytest.raises(openai.BadRequestError):
        await deferToThread(unknown_voice)


@pytest_twisted.ensureDeferred
async def test_the_speech_server_loads_and_unloads_when_told(host: SimulatedHost) -> None:
    url = host.urls()["speech"]
    loaded = await body_json(await treq.post(url + "/admin/load"))
    assert loaded["status"] == "loaded" and host.card.held_by("speech") == 800
    unloaded = await body_json(await treq.post(url + "/admin/unload"))
    assert unloaded["status"] == "unloaded"
    await eventually(lambda: host.card.held_by("speech") == 0)
    health = await body_json(await treq.get(url + "/health"))
    assert (health["status"], health["loaded"]) == ("healthy", False)


@pytest_twisted.ensureDeferred
async def test_the_speech_server_answers_http_1_0_and_closes(host: SimulatedHost) -> None:
    one = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    # Two pipelined requests on a keep-alive connection: http.server answers one, closes.
    received = await deferToThread(exchange, host.ports["speech"], one + one, 5.0)
    assert received.startswith(b"HTTP/1.0 200 ")
    assert received.count(b"HTTP/1.") == 1
    head = received.split(b"\r\n\r\n")[0].lower()
    assert b"\r\nconnection: close" in head
    assert b"\r\nserver: basehttp/" in head
    assert b"transfer-encoding" not in head


@pytest_twisted.ensureDeferred
async def test_the_openai_client_gets_transcripts_from_whisper(host: SimulatedHost) -> None:
    stt = client(host.urls()["whisper"])
    clip = os.urandom(300_000)  # over twisted.web's in-memory limit: a temporary file

    def transcribe() -> str:
        return stt.audio.transcriptions.create(
            model="whisper-1", file=("clip.wav", io.BytesIO(clip), "audio/wav")
        ).text

    assert await deferToThread(transcribe) == f"simulated transcript of {len(clip)} bytes"

    translated = await treq.post(
        host.urls()["whisper"] + "/v1/audio/translations",
        data={"model": "whisper-1", "response_format": "text"},
        files={"file": ("c.wav", io.BytesIO(b"abc"))},
    )
    assert translated.headers.getRawHeaders("content-type") == ["text/plain; charset=utf-8"]
    assert await translated.text() == "simulated transcript of 3 bytes"
    [seen] = host.whisper.requests_to("/v1/audio/transcriptions")
    assert seen.body_size > len(clip)


@pytest_twisted.ensureDeferred
async def test_a_form_without_file_or_model_is_refused(host: SimulatedHost) -> None:
    url = host.urls()["whisper"] + "/v1/audio/transcriptions"
    no_model = await treq.post(url, files={"file": ("a.wav", io.BytesIO(b"abc"))})
    assert no_model.code == 400
    assert "model" in (await body_json(no_model))["error"]
    not_a_form = await treq.post(url, json={"model": "whisper-1"})
    assert not_a_form.code == 400
    await not_a_form.content()


def form(parts: list[tuple[str, str | None, bytes]], boundary: bytes = b"b0undary") -> bytes:
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += b"--" + boundary + b"\r\nContent-Disposition: " + disposition.encode()
        body += b"\r\nContent-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    return body + b"--" + boundary + b"--\r\n"


def test_forms_are_read_in_chunks_whatever_the_boundaries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(multipart, "CHUNK", 7)  # delimiters straddle every read
    data = bytes(range(256)) * 40 + b"\r\n--b0undar"  # almost a delimiter, inside the file
    body = form([("model", None, b"whisper-1"), ("file", "a.wav", data), ("empty", None, b"")])
    parsed = parse_form(io.BytesIO(body), boundary_of('multipart/form-data; boundary="b0undary"'))
    assert parsed.fields == {"model": "whisper-1", "empty": ""}
    upload = parsed.files["file"]
    assert (upload.filename, upload.size) == ("a.wav", len(data))
    assert upload.data.read() == data
    parsed.close()


@pytest.mark.parametrize(
    "body",
    [
        form([("file", "a", b"x")])[:-10],  # cut short
        b"--b0undary\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b0undary--",  # no name
        b"--b0undary!!",
    ],
)
def test_malformed_forms_are_refused(body: bytes) -> None:
    with pytest.raises(MultipartError):
        parse_form(io.BytesIO(body), b"b0undary")


def test_a_form_needs_its_content_type() -> None:
    with pytest.raises(MultipartError):
        boundary_of("application/json")
    with pytest.raises(MultipartError):
        boundary_of("multipart/form-data")
