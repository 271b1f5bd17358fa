"""The in-memory transport: dramatiq's `StubBroker`, for the embedded cluster and tests.

Queues live in this process; a batch is simply enqueued message by message (nothing can fail
half-way), and nothing survives the process.
"""

from __future__ import annotations

from collections.abc import Sequence

from dramatiq.brokers.stub import StubBroker

from protocol.transport_dramatiq import BatchPublisher, DramatiqTransport, install_encoder


class _Enqueue(BatchPublisher):
    def __init__(self, transport: MemoryTransport) -> None:
        self.transport = transport

    def publish(self, items: Sequence[tuple[str, bytes]]) -> None:
        for queue, payload in items:
            self.transport.send(queue, payload)


class MemoryTransport(DramatiqTransport):
    def __init__(self) -> None:
        install_encoder()
        self.stub = StubBroker(middleware=[])
        super().__init__(self.stub)

    def batch_publisher(self) -> BatchPublisher:
        return _Enqueue(self)

    def pending(self, queue: str) -> int:
        q = self.stub.queues.get(queue)
        return q.qsize() if q is not None else 0
