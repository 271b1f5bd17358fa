"""A fault-injecting TCP proxy for partition tests (stdlib only).

    proxy = FaultProxy("127.0.0.1", 2181).start()
    ...connect clients to 127.0.0.1:proxy.port...
    proxy.blackhole()   # a silent partition: nothing forwarded, nothing read, nothing closed
    proxy.heal()        # black-holed connections are closed; new ones are forwarded again
    proxy.reset()       # every connection closed abruptly (RST)
    proxy.stop()

The proxy runs an asyncio loop on a thread of its own; every public method is thread-safe and
returns once its effect is in place. While black-holed, connections already open stop being
read on both sides and no byte crosses; new connections are accepted and left silent (no
connection to the target is made). A peer therefore sees an unanswering link, as across a
network partition, never a reset, until `heal()` or `reset()` closes those connections so that
clients reconnect. Counters (`stats()`) record what crossed and what was cut.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

T = TypeVar("T")

_HIGH_WATER = 256 * 1024  # bytes buffered toward one side before the other side is paused


@dataclass
class ProxyStats:
    accepted: int = 0  # connections accepted from clients
    forwarded: int = 0  # accepted connections joined to the target
    refused: int = 0  # accepted connections whose target connection failed
    active: int = 0  # connections open now
    blackholed: int = 0  # connections that were (or are) black-holed
    healed: int = 0  # black-holed connections closed by heal()
    resets: int = 0  # connections closed by reset()
    bytes_to_target: int = 0
    bytes_from_target: int = 0
    blackholes: int = 0  # blackhole() calls that started a partition


def _abort(transport: asyncio.BaseTransport | None) -> None:
    """Close at once with RST (SO_LINGER 0), dropping anything still buffered."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()  # type: ignore[attr-defined]


class _Side(asyncio.Protocol):
    """One socket of a pipe; what it reads goes to the other side."""

    def __init__(self, pipe: _Pipe, upstream: bool) -> None:
        self.pipe = pipe
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.upstream:
            self.pipe.proxy._accept(self.pipe)

    def data_received(self, data: bytes) -> None:
        self.pipe.relay(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        self.pipe.half_close(self)
        return True  # keep the other direction open until it ends too

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe.lost(self)

    def pause_writing(self) -> None:
        self.pipe.other(self).pause()

    def resume_writing(self) -> None:
        self.pipe.other(self).resume()

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if (
            self.transport is not None
            and not self.transport.is_closing()
            and not self.pipe.blackholed
        ):
            self.transport.resume_reading()


class _Pipe:
    """A client connection and its connection to the target."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self, upstream=False)
        self.target = _Side(self, upstream=True)
        self.blackholed = False
        self.closed = False

    def other(self, side: _Side) -> _Side:
        return self.target if side is self.client else self.client

    def relay(self, side: _Side, data: bytes) -> None:
        if self.blackholed or self.closed:
            return  # read in the same batch as the cut: dropped, the link is silent now
        dest = self.other(side).transport
        if dest is None or dest.is_closing():
            return
        dest.write(data)
        if side is self.client:
            self.proxy.counters.bytes_to_target += len(data)
        else:
            self.proxy.counters.bytes_from_target += len(data)

    def half_close(self, side: _Side) -> None:
        if self.blackholed:
            return
        dest = self.other(side).transport
        if dest is not None and not dest.is_closing() and dest.can_write_eof():
            dest.write_eof()
        if self.client.eof and self.target.eof:
            self.close()

    def blackhole(self) -> None:
        if self.blackholed or self.closed:
            return
        self.blackholed = True
        self.proxy.counters.blackholed += 1
        self.client.pause()
        self.target.pause()

    def lost(self, side: _Side) -> None:
        if self.blackholed and not self.closed and side is self.target:
            return  # the target gave up on a silent link: the client keeps hearing nothing
        self.close()

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy._pipes.discard(self)
        self.proxy.counters.active = len(self.proxy._pipes)
        for side in (self.client, self.target):
            if abort:
                _abort(side.transport)
            elif side.transport is not None and not side.transport.is_closing():
                side.transport.close()


class FaultProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port`, with faults on demand."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.connect_timeout = connect_timeout
        self._listen_port = listen_port
        self.counters = ProxyStats()
        self._pipes: set[_Pipe] = set()
        self._blackholed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        loop = asyncio.new_event_loop()
        ready: threading.Event = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(loop.create_server(
                    lambda: _Pipe(self).client,
                    self.listen_host, self._listen_port,
                ))
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            self._listen_port = self._server.sockets[0].getsockname()[1]
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(
            target=run, name=f"faultproxy:{self.target_port}", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = self._loop = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listener and every connection; stop the loop thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for pipe in list(self._pipes):
                pipe.close(abort=True)

        self._call(shutdown)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        self._loop = self._thread = None
        self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start() if self._thread is None else self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._listen_port

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    @property
    def blackholed(self) -> bool:
        return self._blackholed

    # -- faults ---------------------------------------------------------------------------
    def blackhole(self) -> None:
        """Stop forwarding and reading on every connection, open or new; close none."""

        def cut() -> None:
            if not self._blackholed:
                self.counters.blackholes += 1
            self._blackholed = True
            for pipe in list(self._pipes):
                pipe.blackhole()

        self._call(cut)

    def heal(self) -> None:
        """Forward new connections again; close the black-holed ones so clients reconnect."""

        def mend() -> None:
            self._blackholed = False
            for pipe in [p for p in self._pipes if p.blackholed]:
                self.counters.healed += 1
                pipe.close(abort=True)

        self._call(mend)

    def reset(self) -> None:
        """Close every open connection abruptly (RST to both peers)."""

        def cut_all() -> None:
            for pipe in list(self._pipes):
                self.counters.resets += 1
                pipe.close(abort=True)

        self._call(cut_all)

    def stats(self) -> dict[str, int]:
        if self._loop is None:
            return asdict(self.counters)
        return self._call(lambda: asdict(self.counters))

    # -- internals ------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the proxy's loop and return its result."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("proxy not started")
        if threading.current_thread() is self._thread:
            return fn()

        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(10)

    def _accept(self, pipe: _Pipe) -> None:
        self._pipes.add(pipe)
        self.counters.accepted += 1
        self.counters.active = len(self._pipes)
        transport = pipe.client.transport
        assert transport is not None and self._loop is not None
        transport.set_write_buffer_limits(high=_HIGH_WATER)
        transport.pause_reading()  # until the target connection is up
        if self._blackholed:
            pipe.blackhole()
            return
        self._loop.create_task(self._connect(pipe))

    async def _connect(self, pipe: _Pipe) -> None:
        assert self._loop is not None
        try:
            await asyncio.wait_for(
                self._loop.create_connection(
                    lambda: pipe.target, self.target_host, self.target_port
                ),
                self.connect_timeout,
            )
        except (OSError, TimeoutError):
            self.counters.refused += 1
            pipe.close(abort=True)
            return
        target = pipe.target.transport
        assert target is not None
        if pipe.closed:
            _abort(target)
            return
        target.set_write_buffer_limits(high=_HIGH_WATER)
        self.counters.forwarded += 1
        if pipe.blackholed:
            pipe.target.pause()  # a partition began while connecting: stay silent
            return
        pipe.client.resume()

