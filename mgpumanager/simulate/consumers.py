"""
The simulated inference servers, one per kind of real server the daemon fronts.

Each copies the HTTP surface and, more to the point, the memory habits of the real one:

* :class:`SimVoice` (like mvoice) loads only when told to (``/api/admin/load``);
* :class:`SimOllama` loads each model on demand and unloads it after its keep-alive;
* :class:`SimComfy` queues prompts, loads on the first one and frees on ``/free``;
* :class:`SimWhisper` is loaded while its systemd unit runs (``start``/``stop``);
* :class:`SimSpeech` is an OpenAI-style TTS server speaking HTTP/1.0.

None of them knows about the others: that is why, sent a mixed workload directly, they
run out of memory on the shared card.
"""

from mgpumanager.simulate.audio import SimSpeech
from mgpumanager.simulate.comfy import SimComfy
from mgpumanager.simulate.ollama import SimOllama
from mgpumanager.simulate.voice import SimVoice, body_size, fake_wav
from mgpumanager.simulate.whisper import SimWhisper

__all__ = ["SimComfy", "SimOllama", "SimSpeech", "SimVoice", "SimWhisper", "body_size", "fake_wav"]
