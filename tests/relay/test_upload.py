"""
Tests for :mod:`mgpumanager.relay.upload`: a body in memory goes up whole in
one write, with its length; a body in a temporary file is read from its start,
however much of it was read before.
"""

from __future__ import annotations

import io
import tempfile

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import FileBodyProducer

from mgpumanager.relay.upload import InMemoryBody, body_producer


class BodyProducerTests(SynchronousTestCase):
    def test_a_body_in_memory_is_written_whole_at_once_with_its_length(self) -> None:
        content = io.BytesIO(b'{"text": "hello"}')
        content.read()  # twisted.web leaves the position at the end
        producer = body_producer(content)
        sink = StringTransport()

        done = producer.startProducing(sink)

        self.assertIsInstance(producer, InMemoryBody)
        self.assertEqual(producer.length, 17)
        self.assertEqual(sink.value(), b'{"text": "hello"}')
        self.assertIsNone(self.successResultOf(done))

    def test_the_same_body_is_sent_again_whole_on_a_retry(self) -> None:
        content = io.BytesIO(b"abc")
        first, second = StringTransport(), StringTransport()

        body_producer(content).startProducing(first)
        body_producer(content).startProducing(second)

        self.assertEqual((first.value(), second.value()), (b"abc", b"abc"))

    def test_a_body_in_a_file_is_read_from_its_start_in_chunks(self) -> None:
        with tempfile.TemporaryFile() as content:
            content.write(b"x" * 300_000)
            producer = body_producer(content)

            self.assertIsInstance(producer, FileBodyProducer)
            self.assertEqual(producer.length, 300_000)
