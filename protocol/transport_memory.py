"""The in-memory transport: dramatiq's `StubBroker`, for the embedded cluster and tests.

Queues live in this process; a batch is simply put on its queues envelope by envelope (nothing
can fail half-way), and nothing survives the process.
"""

from __future__ import annotations

from dramatiq.brokers.stub import StubBroker

from protocol.transport import Batch
from protocol.transport_dramatiq import BatchPublisher, DramatiqTransport, install_encoder


class _Enqueue(BatchPublisher):
    def __init__(self, transport: MemoryTransport) -> None:
        self.transport = transport

    def publish(self, batch: Batch) -> None:
        stub = self.transport.stub
        for queue, data in batch.items:
            q = stub.queues.get(queue)
            if q is None:
                stub.declare_queue(queue)
                q = stub.queues[queue]
            q.put(data)  # what StubBroker.enqueue puts there: the encoded envelope


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
