"""The fault-injecting TCP proxy against a tiny local echo server."""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faultproxy import FaultProxy


class _Echo(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.connections = 0
        self.received = 0
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.server_address[1]


class _EchoHandler(socketserver.BaseRequestHandler):
    server: _Echo

    def handle(self) -> None:
        with self.server.lock:
            self.server.connections += 1
        sock: socket.socket = self.request
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return  # the client finished: closing ends the echo stream
            with self.server.lock:
                self.server.received += len(data)
            try:
                sock.sendall(data)
            except OSError:
                return


@pytest.fixture
def echo() -> Iterator[_Echo]:
    server = _Echo()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def proxy(echo: _Echo) -> Iterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", echo.port).start()
    try:
        yield p
    finally:
        p.stop()


def connect(proxy: FaultProxy, timeout: float = 2.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return recv_exactly(sock, len(data))


def silent(sock: socket.socket, wait: float = 0.5) -> bool:
    """True when nothing arrives within `wait` and the connection is neither closed nor reset."""
    sock.settimeout(wait)
    try:
        sock.recv(1)  # data, a close (b"") or a reset all break the silence
    except TimeoutError:
        return True
    except OSError:
        return False
    return False


def closed_by_peer(sock: socket.socket, wait: float = 2.0) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def eventually(pred, timeout: float = 2.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())


def test_listens_on_a_free_loopback_port_and_forwards_both_ways(
    proxy: FaultProxy, echo: _Echo
) -> None:
    assert proxy.port > 0 and proxy.port != echo.port
    assert proxy.address == f"127.0.0.1:{proxy.port}"
    with connect(proxy) as a, connect(proxy) as b:
        assert roundtrip(a, b"hello") == b"hello"
        assert roundtrip(b, b"world!") == b"world!"
        stats = proxy.stats()
        assert stats["accepted"] == 2 and stats["forwarded"] == 2 and stats["active"] == 2
        assert stats["bytes_to_target"] == 11 and stats["bytes_from_target"] == 11
    assert eventually(lambda: proxy.stats()["active"] == 0)


def test_large_transfer_is_intact(proxy: FaultProxy) -> None:
    payload = os.urandom(4 * 1024 * 1024)
    with connect(proxy, timeout=10) as sock:
        got = bytearray()

        def read() -> None:
            got.extend(recv_exactly(sock, len(payload)))

        reader = threading.Thread(target=read)
        reader.start()
        sock.sendall(payload)
        reader.join(20)
        assert bytes(got) == payload
    assert proxy.stats()["bytes_to_target"] == len(payload)


def test_half_close_is_forwarded(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert recv_exactly(sock, 10) == b"last words"
        assert closed_by_peer(sock)


def test_blackhole_silences_open_connections_without_closing_them(
    proxy: FaultProxy, echo: _Echo
) -> None:
    with connect(proxy) as sock:
        assert roundtrip(sock, b"before") == b"before"
        received = echo.received
        proxy.blackhole()
        assert proxy.blackholed
        sock.sendall(b"into the void")
        assert silent(sock, 0.8), "a black-holed link must be silent, not closed or reset"
        assert echo.received == received, "nothing may reach the target"
        sock.sendall(b"still here?")
        assert silent(sock, 0.3)
        stats = proxy.stats()
        assert stats["blackholed"] == 1 and stats["active"] == 1 and stats["blackholes"] == 1


def test_blackhole_accepts_new_connections_and_says_nothing(
    proxy: FaultProxy, echo: _Echo
) -> None:
    proxy.blackhole()
    with connect(proxy) as sock:
        sock.sendall(b"anyone?")
        assert silent(sock, 0.8)
    time.sleep(0.1)
    assert echo.connections == 0, "no connection to the target while black-holed"
    stats = proxy.stats()
    assert stats["accepted"] == 1 and stats["forwarded"] == 0 and stats["blackholed"] == 1


def test_heal_closes_blackholed_connections_and_forwards_new_ones(
    proxy: FaultProxy, echo: _Echo
) -> None:
    with connect(proxy) as old:
        assert roundtrip(old, b"x") == b"x"
        proxy.blackhole()
        with connect(proxy) as during:
            assert silent(during, 0.3)
            proxy.heal()
            assert not proxy.blackholed
            assert closed_by_peer(old), "heal closes the black-holed connections"
            assert closed_by_peer(during)
    with connect(proxy) as fresh:
        assert roundtrip(fresh, b"again") == b"again"
    stats = proxy.stats()
    assert stats["healed"] == 2 and stats["blackholed"] == 2
    assert echo.connections == 2  # the old one and the fresh one; never the silent one


def test_heal_without_blackhole_leaves_connections_alone(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        proxy.heal()
        assert roundtrip(sock, b"fine") == b"fine"
    assert proxy.stats()["healed"] == 0


def test_reset_closes_every_connection_abruptly(proxy: FaultProxy) -> None:
    a, b = connect(proxy), connect(proxy)
    try:
        assert roundtrip(a, b"1") == b"1"
        assert roundtrip(b, b"2") == b"2"
        proxy.reset()
        for sock in (a, b):
            sock.settimeout(2)
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
                sock.sendall(b"x")  # some stacks report the RST on the next send
                sock.recv(1)
    finally:
        a.close()
        b.close()
    assert proxy.stats()["resets"] == 2
    with connect(proxy) as c:
        assert roundtrip(c, b"after reset") == b"after reset"


def test_unreachable_target_closes_the_client(echo: _Echo) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # nothing listens here once this socket closes
    with FaultProxy("127.0.0.1", dead_port) as proxy:
        try:
            sock = connect(proxy)
        except ConnectionResetError:
            pass  # the reset overtook the end of the handshake
        else:
            with sock:
                assert closed_by_peer(sock)
        assert eventually(lambda: proxy.stats()["refused"] == 1)


def test_stop_closes_the_listener_and_connections(echo: _Echo) -> None:
    proxy = FaultProxy("127.0.0.1", echo.port).start()
    port = proxy.port
    sock = connect(proxy)
    try:
        assert roundtrip(sock, b"hi") == b"hi"
        proxy.stop()
        assert closed_by_peer(sock)
    finally:
        sock.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert proxy.stats()["accepted"] == 1
    proxy.stop()  # a second stop is harmless


def test_start_twice_is_refused_and_a_taken_port_fails_start(proxy: FaultProxy) -> None:
    with pytest.raises(RuntimeError):
        proxy.start()
    with pytest.raises(OSError):
        FaultProxy("127.0.0.1", 1, listen_port=proxy.port).start()
