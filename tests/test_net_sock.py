"""The loop's ``sock_*`` coroutines on plain (non-blocking) sockets: asyncio's behaviour, on
both loops. Loopback TCP/UDP and Unix sockets only; every wait is bounded."""

from __future__ import annotations

import asyncio
import collections.abc
import errno
import hashlib
import inspect
import io
import os
import random
import select
import socket
import ssl
import struct
import sys
import warnings

import ferroloop
import pytest
from conftest import TIMEOUT, run


def _has_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _has_ipv6()
HAS_RECVFROM = sys.version_info >= (3, 11)  # sock_recvfrom & co. are new in 3.11


def payload(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def shrink(sock, size=64 * 1024):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


@pytest.fixture(params=["ipv4", "ipv6"])
def inet(request):
    if request.param == "ipv6" and not HAS_IPV6:
        pytest.skip("no IPv6 loopback: ::1 cannot be bound here")
    return (socket.AF_INET, "127.0.0.1") if request.param == "ipv4" else (socket.AF_INET6, "::1")


@pytest.fixture
def tcp_pair(loop, inet):
    """(client, server-side) non-blocking TCP sockets made with sock_connect/sock_accept."""
    family, host = inet
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen()
    listener.setblocking(False)
    client = socket.socket(family, socket.SOCK_STREAM)
    client.setblocking(False)

    async def connect():
        accept = asyncio.ensure_future(loop.sock_accept(listener))
        assert await loop.sock_connect(client, listener.getsockname()) is None
        return await accept

    try:
        conn, addr = run(loop, connect())
    finally:
        listener.close()
    assert addr == client.getsockname()
    assert conn.gettimeout() == 0  # sock_accept returns a non-blocking socket
    yield client, conn
    client.close()
    conn.close()


# --- stream sockets ----------------------------------------------------------------------------


def test_recv_and_sendall(loop, tcp_pair):
    a, b = tcp_pair

    async def main():
        assert await loop.sock_sendall(a, b"hello") is None
        got = b""
        while len(got) < 5:
            got += await loop.sock_recv(b, 100)
        assert got == b"hello"
        # sock_recv waits for data that is not there yet.
        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        await asyncio.sleep(0.01)
        assert not task.done()
        await loop.sock_sendall(b, bytearray(b"back"))
        assert await task == b"back"
        await loop.sock_sendall(b, memoryview(b"view"))
        buf = bytearray(10)
        n = await loop.sock_recv_into(a, buf)
        assert buf[:n] == b"view"[:n]
        b.shutdown(socket.SHUT_WR)
        rest = b""
        while True:
            chunk = await loop.sock_recv(a, 100)
            if not chunk:
                break
            rest += chunk
        assert buf[:n] + rest == b"view"
        assert await loop.sock_recv(a, 100) == b""  # EOF again
        assert await loop.sock_recv_into(a, bytearray(4)) == 0

    run(loop, main())


def test_sendall_large_with_concurrent_reader(loop, tcp_pair):
    a, b = tcp_pair
    shrink(a)
    shrink(b)
    data = payload(8 << 20)

    async def reader():
        h = hashlib.sha256()
        total = 0
        buf = bytearray(100_000)
        view = memoryview(buf)
        while True:
            n = await loop.sock_recv_into(b, buf)
            if not n:
                return total, h.hexdigest()
            total += n
            h.update(view[:n])

    async def main():
        task = asyncio.ensure_future(reader())
        await loop.sock_sendall(a, data)
        a.shutdown(socket.SHUT_WR)
        assert await task == (len(data), hashlib.sha256(data).hexdigest())

    run(loop, main())


def test_full_duplex_on_one_socket(loop, tcp_pair):
    """A sock_recv and a sock_sendall may wait on the same socket at once."""
    a, b = tcp_pair
    shrink(a)
    shrink(b)
    up, down = payload(4 << 20, seed=2), payload(4 << 20, seed=3)

    async def recv_all(sock, n):
        got = bytearray()
        while len(got) < n:
            chunk = await loop.sock_recv(sock, 65536)
            assert chunk
            got += chunk
        return bytes(got)

    async def main():
        results = await asyncio.gather(
            loop.sock_sendall(a, up),
            recv_all(a, len(down)),
            loop.sock_sendall(b, down),
            recv_all(b, len(up)),
        )
        assert results[1] == down and results[3] == up

    run(loop, main())


def test_unix_stream_connect_accept(loop, tmp_path):
    path = str(tmp_path / "s.sock")
    if len(path) > 100:
        import tempfile

        path = tempfile.mktemp(prefix="fl-", suffix=".sock", dir="/tmp")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    listener.setblocking(False)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setblocking(False)

    async def main():
        accept = asyncio.ensure_future(loop.sock_accept(listener))
        await loop.sock_connect(client, path)
        conn, addr = await accept
        with conn:
            assert addr == ""  # an unbound client
            assert conn.gettimeout() == 0
            await loop.sock_sendall(client, b"unix")
            assert await loop.sock_recv(conn, 10) == b"unix"
        missing = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        missing.setblocking(False)
        with missing, pytest.raises(FileNotFoundError):
            await loop.sock_connect(missing, path + ".missing")

    try:
        run(loop, main())
    finally:
        listener.close()
        client.close()


def test_sock_connect_refused_and_resolved(loop, inet):
    family, host = inet

    async def main():
        # A port nobody listens on: bind one, then close it.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        with s, pytest.raises(ConnectionRefusedError):
            await loop.sock_connect(s, (host, port))
        # Host names are resolved (asyncio's _ensure_resolved) for IP sockets.
        with socket.socket(family, socket.SOCK_STREAM) as listener:
            listener.bind((host, 0))
            listener.listen()
            port = listener.getsockname()[1]
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setblocking(False)
            with s:
                name = "localhost" if family == socket.AF_INET else "::1"
                assert await loop.sock_connect(s, (name, port)) is None
                assert s.getpeername()[1] == port

    run(loop, main())


# --- datagram sockets --------------------------------------------------------------------------


@pytest.fixture
def udp_pair(inet):
    family, host = inet
    a = socket.socket(family, socket.SOCK_DGRAM)
    b = socket.socket(family, socket.SOCK_DGRAM)
    for s in (a, b):
        s.bind((host, 0))
        s.setblocking(False)
    yield a, b
    a.close()
    b.close()


@pytest.mark.skipif(not HAS_RECVFROM, reason="sock_recvfrom & co. are new in 3.11")
def test_udp_sendto_recvfrom(loop, udp_pair):
    a, b = udp_pair

    async def main():
        n = await loop.sock_sendto(a, b"datagram", b.getsockname())
        assert n == 8
        data, addr = await loop.sock_recvfrom(b, 100)
        assert data == b"datagram" and addr == a.getsockname()
        # Waits for a datagram that is not there yet.
        task = asyncio.ensure_future(loop.sock_recvfrom(a, 100))
        await asyncio.sleep(0.01)
        assert not task.done()
        await loop.sock_sendto(b, bytearray(b"reply"), a.getsockname())
        assert await task == (b"reply", b.getsockname())
        # recvfrom_into: the whole buffer, or only nbytes of it.
        await loop.sock_sendto(a, b"0123456789", b.getsockname())
        buf = bytearray(20)
        assert await loop.sock_recvfrom_into(b, buf) == (10, a.getsockname())
        assert buf[:10] == b"0123456789"
        await loop.sock_sendto(a, b"abcdefghij", b.getsockname())
        buf = bytearray(20)
        nbytes, addr = await loop.sock_recvfrom_into(b, buf, 4)
        assert (nbytes, addr) == (4, a.getsockname())
        assert buf[:4] == b"abcd" and buf[4:] == bytes(16)
        # A short bufsize truncates the datagram (the rest is dropped).
        await loop.sock_sendto(a, b"truncated!", b.getsockname())
        assert await loop.sock_recvfrom(b, 3) == (b"tru", a.getsockname())
        await loop.sock_sendto(a, b"", b.getsockname())
        assert await loop.sock_recvfrom(b, 10) == (b"", a.getsockname())

    run(loop, main())


def test_udp_connected_recv_and_sendall(loop, udp_pair):
    a, b = udp_pair
    a.connect(b.getsockname())
    b.connect(a.getsockname())

    async def main():
        await loop.sock_sendall(a, b"dgram")
        assert await loop.sock_recv(b, 100) == b"dgram"
        await loop.sock_sendall(b, b"other way")
        buf = bytearray(100)
        n = await loop.sock_recv_into(a, buf)
        assert buf[:n] == b"other way"

    run(loop, main())


# --- argument checks ---------------------------------------------------------------------------


def _calls(loop, sock, other_addr):
    calls = {
        "sock_recv": lambda: loop.sock_recv(sock, 1),
        "sock_recv_into": lambda: loop.sock_recv_into(sock, bytearray(1)),
        "sock_sendall": lambda: loop.sock_sendall(sock, b"x"),
        "sock_connect": lambda: loop.sock_connect(sock, other_addr),
        "sock_accept": lambda: loop.sock_accept(sock),
        "sock_sendfile": lambda: loop.sock_sendfile(sock, io.BytesIO(b"x")),
    }
    if HAS_RECVFROM:
        calls.update(
            {
                "sock_recvfrom": lambda: loop.sock_recvfrom(sock, 1),
                "sock_recvfrom_into": lambda: loop.sock_recvfrom_into(sock, bytearray(1)),
                "sock_sendto": lambda: loop.sock_sendto(sock, b"x", other_addr),
            }
        )
    return calls


METHODS = [
    "sock_recv",
    "sock_recv_into",
    "sock_sendall",
    "sock_connect",
    "sock_accept",
    "sock_sendfile",
    "sock_recvfrom",
    "sock_recvfrom_into",
    "sock_sendto",
]


@pytest.mark.parametrize("method", METHODS)
def test_blocking_socket_rejected_in_debug_mode(loop, method):
    """In debug mode every sock_* method refuses a blocking socket (before touching it)."""
    if method not in _calls(loop, None, None):
        pytest.skip(f"loop.{method} is new in 3.11")
    loop.set_debug(True)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        assert s.gettimeout() is None  # blocking
        coro = _calls(loop, s, ("127.0.0.1", 9))[method]()
        with pytest.raises(ValueError) as e:
            run(loop, coro)
        assert str(e.value) == "the socket must be non-blocking"
    finally:
        s.close()
        loop.set_debug(False)


@pytest.mark.parametrize("method", METHODS)
def test_ssl_socket_rejected(loop, method):
    if method not in _calls(loop, None, None):
        pytest.skip(f"loop.{method} is new in 3.11")
    ctx = ssl.create_default_context()
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s = ctx.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
    s.setblocking(False)
    try:
        coro = _calls(loop, s, ("127.0.0.1", 9))[method]()
        with pytest.raises(TypeError) as e:
            run(loop, coro)
        assert str(e.value) == "Socket cannot be of type SSLSocket"
    finally:
        s.close()
        raw.close()


def test_sock_recv_on_a_transports_socket(loop, inet):
    family, host = inet

    class ServerSide(asyncio.Protocol):
        def connection_made(self, transport):
            lost.append(loop.create_future())

        def connection_lost(self, exc):
            lost[-1].set_result(exc)

    lost = []

    async def main():
        srv = await loop.create_server(ServerSide, host, 0)
        s = socket.create_connection(srv.sockets[0].getsockname()[:2], timeout=TIMEOUT)
        tr, _ = await loop.create_connection(asyncio.Protocol, sock=s)
        while not lost:  # accepted
            await asyncio.sleep(0.001)
        try:
            with pytest.raises(RuntimeError, match="is used by transport"):
                await loop.sock_recv(s, 1)
            with pytest.raises(RuntimeError, match="is used by transport"):
                await loop.sock_recv_into(s, bytearray(1))
        finally:
            tr.close()
            await lost[0]  # the server side saw EOF and closed
            srv.close()
            await srv.wait_closed()

    run(loop, main())


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_recv_of_nothing_returns_at_once(loop, kind, inet):
    """sock_recv(sock, 0) and sock_recv_into() of an empty buffer return b"" / 0 at once on
    an empty socket, as the socket's own recv(0) / recv_into() do (no wait for data)."""
    if kind == "unix":
        a, b = socket.socketpair()
    else:
        family, host = inet
        with socket.socket(family, socket.SOCK_STREAM) as listener:
            listener.bind((host, 0))
            listener.listen()
            b = socket.create_connection(listener.getsockname()[:2], timeout=TIMEOUT)
            a, _ = listener.accept()
    with a, b:
        a.setblocking(False)

        async def main():
            assert await asyncio.wait_for(loop.sock_recv(a, 0), 1) == b""
            assert await asyncio.wait_for(loop.sock_recv_into(a, bytearray()), 1) == 0
            empty_view = memoryview(bytearray(8))[4:4]
            assert await asyncio.wait_for(loop.sock_recv_into(a, empty_view), 1) == 0
            b.send(b"data")
            while not select.select([a], [], [], 0)[0]:
                await asyncio.sleep(0.001)
            assert await asyncio.wait_for(loop.sock_recv(a, 0), 1) == b""  # nothing taken
            assert await asyncio.wait_for(loop.sock_recv(a, 100), 1) == b"data"

        run(loop, main())


# --- the read after a short read ----------------------------------------------------------------


async def _short_read(loop, a, b, first, method):
    """One read of ``a`` that gets fewer bytes than it asked for (``b"abc"`` of 100): at once
    (the data was there) or after waiting for it."""
    if first == "at-once":
        b.send(b"abc")
        while not select.select([a], [], [], 0)[0]:
            await asyncio.sleep(0.001)
        task = asyncio.ensure_future(_recv(loop, a, 100, method))
    else:
        task = asyncio.ensure_future(_recv(loop, a, 100, method))
        await asyncio.sleep(0.01)
        assert not task.done()
        b.send(b"abc")
    assert await asyncio.wait_for(task, TIMEOUT) == b"abc"


async def _recv(loop, sock, n, method):
    if method == "sock_recv":
        return await loop.sock_recv(sock, n)
    buf = bytearray(n)
    k = await loop.sock_recv_into(sock, buf)
    return bytes(buf[:k])


@pytest.mark.parametrize("method", ["sock_recv", "sock_recv_into"])
@pytest.mark.parametrize("first", ["at-once", "waited"])
@pytest.mark.parametrize(
    "then", ["data-already-there", "data-later", "eof", "shut-rd", "big", "cancel"]
)
def test_read_after_a_short_read(loop, pair, first, then, method):
    """After a read that drained the socket, the next read still gets what is there (data that
    came in meanwhile, with no loop iteration in between), waits for what is not, sees the end
    of stream, and can be cancelled without losing data."""
    a, b = pair

    async def main():
        await _short_read(loop, a, b, first, method)
        if then == "data-already-there":
            b.send(b"more")  # no loop iteration between this and the read
            assert await asyncio.wait_for(_recv(loop, a, 100, method), TIMEOUT) == b"more"
        elif then == "data-later":
            task = asyncio.ensure_future(_recv(loop, a, 100, method))
            await asyncio.sleep(0.01)
            assert not task.done()
            b.send(b"later")
            assert await asyncio.wait_for(task, TIMEOUT) == b"later"
        elif then == "eof":
            b.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(_recv(loop, a, 100, method), TIMEOUT) == b""
            assert await asyncio.wait_for(_recv(loop, a, 100, method), TIMEOUT) == b""
            return
        elif then == "shut-rd":
            a.shutdown(socket.SHUT_RD)  # our own side: reads see the end at once
            assert await asyncio.wait_for(_recv(loop, a, 100, method), TIMEOUT) == b""
            return
        elif then == "big":
            data = payload(50_000)
            b.sendall(data)  # the Unix socket's buffer takes it at once
            got = b""
            while len(got) < len(data):
                got += await asyncio.wait_for(_recv(loop, a, 8192, method), TIMEOUT)
            assert got == data
        else:
            task = asyncio.ensure_future(_recv(loop, a, 100, method))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert loop.remove_reader(a) is False
            b.send(b"after cancel")
            assert await asyncio.wait_for(_recv(loop, a, 100, method), TIMEOUT) == b"after cancel"
        # A further short read, then one more round: the socket keeps working.
        b.send(b"xyz")
        assert await asyncio.wait_for(_recv(loop, a, 100, method), TIMEOUT) == b"xyz"

    run(loop, main())


@pytest.mark.parametrize("first", ["at-once", "waited"])
def test_read_after_a_short_read_returns_at_once_for_nothing(loop, pair, first):
    """After a read that drained the socket, reads of zero bytes return at once (they never
    wait for data), and bad arguments raise at once, as in asyncio."""
    a, b = pair

    async def main():
        await _short_read(loop, a, b, first, "sock_recv")
        assert await asyncio.wait_for(loop.sock_recv(a, 0), 1) == b""
        assert await asyncio.wait_for(loop.sock_recv_into(a, bytearray()), 1) == 0
        with pytest.raises(ValueError, match="negative buffersize"):
            await asyncio.wait_for(loop.sock_recv(a, -1), 1)
        with pytest.raises(TypeError):
            await asyncio.wait_for(loop.sock_recv_into(a, b"read-only"), 1)
        with pytest.raises(TypeError):
            await asyncio.wait_for(loop.sock_recv(a, "100"), 1)
        b.send(b"ok")
        assert await asyncio.wait_for(loop.sock_recv(a, 100), TIMEOUT) == b"ok"

    run(loop, main())


@pytest.mark.parametrize("first", ["at-once", "waited"])
def test_read_after_a_short_read_on_a_reset_connection(loop, tcp_pair, first):
    """A connection reset after a read that drained the socket: the next read raises
    ConnectionResetError (and does not hang)."""
    a, b = tcp_pair

    async def main():
        await _short_read(loop, a, b, first, "sock_recv")
        b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b.close()  # sends RST
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(loop.sock_recv(a, 100), TIMEOUT)

    run(loop, main())


@pytest.mark.parametrize("first", ["at-once", "waited"])
def test_read_after_a_short_read_on_a_closed_socket(loop, pair, first):
    """A socket closed after a read that drained it: the next read fails as the socket's own
    recv() does on a closed socket (no wait on a stale registration)."""
    a, b = pair

    async def main():
        await _short_read(loop, a, b, first, "sock_recv")
        a.close()
        with pytest.raises(OSError) as caught:
            await asyncio.wait_for(loop.sock_recv(a, 100), 1)
        assert caught.value.errno == errno.EBADF

    run(loop, main())


def test_datagrams_queued_after_a_short_read(loop):
    """Connected datagram sockets: every read is "short"; queued datagrams are still read one
    per call, in order."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        a.setblocking(False)
        b.setblocking(False)

        async def main():
            task = asyncio.ensure_future(loop.sock_recv(a, 100))
            await asyncio.sleep(0.01)
            b.send(b"d0")
            assert await asyncio.wait_for(task, TIMEOUT) == b"d0"
            for i in range(1, 5):
                b.send(b"d%d" % i)
            for i in range(1, 5):
                assert await asyncio.wait_for(loop.sock_recv(a, 100), TIMEOUT) == b"d%d" % i

        run(loop, main())


# --- cancellation ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sock_recv", "sock_recv_into"])
def test_cancelled_recv_leaves_socket_usable(loop, pair, method):
    a, b = pair

    async def recv(n):
        if method == "sock_recv":
            return await loop.sock_recv(a, n)
        buf = bytearray(n)
        k = await loop.sock_recv_into(a, buf)
        return bytes(buf[:k])

    async def main():
        task = asyncio.ensure_future(recv(100))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        assert loop.remove_reader(a) is False  # the cancelled call unregistered itself
        b.send(b"after cancel")  # nothing was consumed by the cancelled call
        assert await recv(100) == b"after cancel"
        # Cancelling a call whose data already arrived (the result is lost with the task,
        # as in asyncio); the socket still works.
        task = asyncio.ensure_future(recv(100))
        await asyncio.sleep(0)
        b.send(b"x")
        task.cancel()
        try:
            first = await task
        except asyncio.CancelledError:
            first = None
        b.send(b"y")
        rest = b""
        while not rest.endswith(b"y"):
            rest += await recv(100)
        # Nothing is lost: the cancelled call either returned b"x" or left it in the socket.
        assert (first or b"") + rest == b"xy", (first, rest)

    run(loop, main())


def test_cancelled_accept_leaves_listener_usable(loop, inet):
    family, host = inet
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen()
    listener.setblocking(False)

    async def main():
        task = asyncio.ensure_future(loop.sock_accept(listener))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        assert loop.remove_reader(listener) is False
        c = socket.socket(family, socket.SOCK_STREAM)
        c.setblocking(False)
        with c:
            await loop.sock_connect(c, listener.getsockname())
            conn, addr = await loop.sock_accept(listener)
            conn.close()
            assert addr == c.getsockname()

    try:
        run(loop, main())
    finally:
        listener.close()


def test_cancelled_sendall_leaves_socket_usable(loop, pair):
    a, b = pair
    shrink(a)
    shrink(b)

    async def main():
        task = asyncio.ensure_future(loop.sock_sendall(a, b"z" * (8 << 20)))
        await asyncio.sleep(0.01)
        assert not task.done()  # the peer reads nothing: sock_sendall waits
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        assert loop.remove_writer(a) is False

        # The socket still carries data: what was sent before, then the new data.
        async def drain():
            got = b""
            while not got.endswith(b"!"):
                got += await loop.sock_recv(b, 1 << 20)
            return got

        reader = asyncio.ensure_future(drain())
        await loop.sock_sendall(a, b"!")
        got = await reader
        assert got == b"z" * (len(got) - 1) + b"!"

    run(loop, main())


@pytest.mark.skipif(not HAS_RECVFROM, reason="sock_recvfrom is new in 3.11")
def test_cancelled_recvfrom_leaves_socket_usable(loop, udp_pair):
    a, b = udp_pair

    async def main():
        task = asyncio.ensure_future(loop.sock_recvfrom(b, 100))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await loop.sock_sendto(a, b"later", b.getsockname())
        assert await loop.sock_recvfrom(b, 100) == (b"later", a.getsockname())

    run(loop, main())


@pytest.mark.parametrize("outcome", ["result", "exception"])
@pytest.mark.parametrize("method", ["sock_recv", "sock_recv_into", "sock_sendall"])
def test_waiting_call_resolved_from_outside(loop, pair, method, outcome):
    """The future a waiting call waits on (a task's ``_fut_waiter``, not a public API) resolved
    by someone else: the call returns that value or raises that exception, as asyncio's
    ``await fut`` does, once, without the task spinning; the socket is left unregistered and
    usable."""
    a, b = pair
    shrink(a)
    shrink(b)
    calls = {
        "sock_recv": lambda: loop.sock_recv(a, 100),
        "sock_recv_into": lambda: loop.sock_recv_into(a, bytearray(100)),
        "sock_sendall": lambda: loop.sock_sendall(a, b"z" * (8 << 20)),
    }

    async def main():
        task = asyncio.ensure_future(calls[method]())
        await asyncio.sleep(0.01)
        assert not task.done()
        waiter = task._fut_waiter
        assert waiter is not None and not waiter.done()
        if outcome == "result":
            waiter.set_result("from outside")
            assert await asyncio.wait_for(task, TIMEOUT) == "from outside"
        else:
            waiter.set_exception(ConnectionAbortedError("from outside"))
            with pytest.raises(ConnectionAbortedError, match="from outside"):
                await asyncio.wait_for(task, TIMEOUT)
        await asyncio.sleep(0)
        assert loop.remove_reader(a) is False
        assert loop.remove_writer(a) is False
        if method == "sock_sendall":
            return
        b.send(b"after")  # nothing was consumed by the call resolved from outside
        assert await asyncio.wait_for(loop.sock_recv(a, 100), TIMEOUT) == b"after"

    run(loop, main())


# --- concurrent calls on one socket ------------------------------------------------------------


def test_concurrent_recv_on_one_socket(loop, pair):
    """asyncio keeps one reader per fd: a second sock_recv on the same socket replaces the
    first one's registration, so the first waits until cancelled."""
    a, b = pair

    async def main():
        first = asyncio.ensure_future(loop.sock_recv(a, 100))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(loop.sock_recv(a, 100))
        await asyncio.sleep(0)
        b.send(b"data")
        assert await second == b"data"
        b.send(b"more")
        await asyncio.sleep(0.02)
        assert not first.done()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await loop.sock_recv(a, 100) == b"more"

    run(loop, main())


def test_concurrent_accept_on_one_socket(loop):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)

    async def main():
        first = asyncio.ensure_future(loop.sock_accept(listener))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(loop.sock_accept(listener))
        await asyncio.sleep(0)
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.setblocking(False)
        with c:
            await loop.sock_connect(c, listener.getsockname())
            conn, _ = await second
            conn.close()
        await asyncio.sleep(0.02)
        assert not first.done()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first

    try:
        run(loop, main())
    finally:
        listener.close()


# --- sock_sendfile ------------------------------------------------------------------------------


@pytest.fixture
def data_file(tmp_path):
    data = payload(2 << 20, seed=4)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    with open(path, "rb") as f:
        yield f, data


async def _recv_to_eof(loop, sock):
    got = bytearray()
    while True:
        chunk = await loop.sock_recv(sock, 1 << 20)
        if not chunk:
            return bytes(got)
        got += chunk


@pytest.mark.parametrize(
    "offset, count",
    [(0, None), (0, 1), (4096, 10_000), (100, None), (0, 5 << 20), (3 << 20, None)],
)
@pytest.mark.parametrize("fallback_only", [False, True])
def test_sock_sendfile(loop, tcp_pair, data_file, offset, count, fallback_only):
    a, b = tcp_pair
    f, data = data_file
    expected = data[offset : offset + count if count else None]

    async def main():
        reader = asyncio.ensure_future(_recv_to_eof(loop, b))
        if fallback_only:
            # A file object without fileno(): only the fallback can send it.
            src = io.BytesIO(data)
            n = await loop.sock_sendfile(a, src, offset, count)
            assert src.tell() == offset + n
        else:
            n = await loop.sock_sendfile(a, f, offset, count, fallback=False)
            # asyncio moves the file position only when something was sent.
            assert f.tell() == (offset + n if n else 0)
        assert n == len(expected)
        a.shutdown(socket.SHUT_WR)
        assert await reader == expected

    run(loop, main())


def test_sock_sendfile_fallback_disabled(loop, tcp_pair):
    a, _ = tcp_pair

    async def main():
        with pytest.raises(asyncio.SendfileNotAvailableError):
            await loop.sock_sendfile(a, io.BytesIO(b"data"), fallback=False)

    run(loop, main())


def test_sock_sendfile_empty_file(loop, tcp_pair, tmp_path):
    a, _ = tcp_pair
    path = tmp_path / "empty"
    path.write_bytes(b"")

    async def main():
        with open(path, "rb") as f:
            assert await loop.sock_sendfile(a, f) == 0

    run(loop, main())


def test_sock_sendfile_argument_checks(loop, tcp_pair, data_file, tmp_path):
    a, _ = tcp_pair
    f, _ = data_file
    text = tmp_path / "t.txt"
    text.write_text("text")

    async def check(exc_type, message, *args, sock=a, **kw):
        with pytest.raises(exc_type) as e:
            await loop.sock_sendfile(sock, *args, **kw)
        assert str(e.value) == message

    async def main():
        with open(text) as tf:
            await check(ValueError, "file should be opened in binary mode", tf)
        await check(ValueError, "count must be a positive integer (got 0)", f, 0, 0)
        await check(TypeError, "count must be a positive integer (got '1')", f, 0, "1")
        await check(ValueError, "offset must be a non-negative integer (got -1)", f, -1)
        await check(TypeError, "offset must be a non-negative integer (got 1.0)", f, 1.0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.setblocking(False)
            await check(ValueError, "only SOCK_STREAM type sockets are supported", f, sock=udp)

    run(loop, main())


def test_sock_sendfile_cancelled_leaves_socket_usable(loop, tcp_pair, tmp_path):
    a, b = tcp_pair
    shrink(a)
    shrink(b)
    data = payload(8 << 20, seed=5)
    path = tmp_path / "big.bin"
    path.write_bytes(data)

    async def main():
        with open(path, "rb") as f:
            task = asyncio.ensure_future(loop.sock_sendfile(a, f, fallback=False))
            await asyncio.sleep(0.01)
            assert not task.done()  # the peer reads nothing
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.sleep(0)
        assert loop.remove_writer(a) is False
        reader = asyncio.ensure_future(_recv_to_eof(loop, b))
        await loop.sock_sendall(a, b"!")
        a.shutdown(socket.SHUT_WR)
        got = await reader
        sent = len(got) - 1
        assert 0 < sent < len(data)
        assert got == data[:sent] + b"!"

    run(loop, main())


# --- the sock_* methods are coroutines ----------------------------------------------------------


def test_sock_methods_are_coroutine_functions(loop, pair):
    """The sock_* calls return coroutines as asyncio sees them. asyncio's are native
    coroutines of `async def` methods; ferroloop's (like uvloop's compiled ones) are objects of
    its own coroutine type, so the `inspect` checks, which accept only native coroutines, hold
    on asyncio's loop alone (docs/DESIGN.md, "Where ferroloop differs")."""
    a, _ = pair
    for method, make in _calls(loop, a, ("127.0.0.1", 9)).items():
        # ferroloop's sock_connect and sock_sendfile are still asyncio's own `async def`s.
        native = not isinstance(loop, ferroloop.Loop) or method in ("sock_connect", "sock_sendfile")
        if native:
            assert inspect.iscoroutinefunction(getattr(loop, method)), method
        coro = make()
        try:
            assert asyncio.iscoroutine(coro), (method, type(coro))
            assert isinstance(coro, collections.abc.Coroutine), (method, type(coro))
            assert inspect.iscoroutine(coro) is native, (method, type(coro))
        finally:
            coro.close()  # never started: nothing happens to the socket
    assert loop.remove_reader(a) is False and loop.remove_writer(a) is False
    assert a.fileno() >= 0


def test_create_task_takes_sock_coroutines(loop, pair):
    """loop.create_task() (not only ensure_future()) accepts the sock_* coroutines."""
    a, b = pair

    async def main():
        recv = loop.create_task(loop.sock_recv(a, 100))
        buf = bytearray(100)
        await asyncio.sleep(0.01)
        assert not recv.done()
        send = loop.create_task(loop.sock_sendall(b, b"task"))
        assert await send is None
        assert await recv == b"task"
        into = loop.create_task(loop.sock_recv_into(b, buf))
        await loop.create_task(loop.sock_sendall(a, b"into"))
        assert await into == 4 and buf[:4] == b"into"

    run(loop, main())


def _waiting_call(loop, method, sock):
    """A call of ``method`` on ``sock`` that has to wait (nothing to read, or the peer's
    buffer is full for sendall), and the call that completes it afterwards."""
    if method == "sock_recv":
        return loop.sock_recv(sock, 100)
    if method == "sock_recv_into":
        return loop.sock_recv_into(sock, bytearray(100))
    if method == "sock_recvfrom":
        return loop.sock_recvfrom(sock, 100)
    if method == "sock_recvfrom_into":
        return loop.sock_recvfrom_into(sock, bytearray(100))
    raise AssertionError(method)


@pytest.mark.parametrize("method", ["sock_recv", "sock_recv_into"])
def test_wait_for_timeout_on_recv_leaves_socket_usable(loop, tcp_pair, method):
    a, b = tcp_pair

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(_waiting_call(loop, method, a), 0.05)
        assert loop.remove_reader(a) is False  # the timed-out call unregistered itself
        await loop.sock_sendall(b, b"after timeout")
        got = b""
        while len(got) < 13:
            got += await loop.sock_recv(a, 100)
        assert got == b"after timeout"  # nothing was swallowed by the timed-out call

    run(loop, main())


@pytest.mark.skipif(not HAS_RECVFROM, reason="sock_recvfrom & co. are new in 3.11")
@pytest.mark.parametrize("method", ["sock_recvfrom", "sock_recvfrom_into"])
def test_wait_for_timeout_on_recvfrom_leaves_socket_usable(loop, udp_pair, method):
    a, b = udp_pair

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(_waiting_call(loop, method, b), 0.05)
        assert loop.remove_reader(b) is False
        await loop.sock_sendto(a, b"after timeout", b.getsockname())
        assert await loop.sock_recvfrom(b, 100) == (b"after timeout", a.getsockname())
        # A cancelled recvfrom_into (cancelled while waiting) loses nothing either.
        task = asyncio.ensure_future(loop.sock_recvfrom_into(b, bytearray(100)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await loop.sock_sendto(a, b"after cancel", b.getsockname())
        buf = bytearray(100)
        assert await loop.sock_recvfrom_into(b, buf) == (12, a.getsockname())
        assert buf[:12] == b"after cancel"

    run(loop, main())


def test_wait_for_timeout_on_accept_leaves_listener_usable(loop, inet):
    family, host = inet
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen()
    listener.setblocking(False)

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(loop.sock_accept(listener), 0.05)
        assert loop.remove_reader(listener) is False
        with socket.create_connection(listener.getsockname()[:2], timeout=TIMEOUT) as c:
            conn, addr = await loop.sock_accept(listener)
            with conn:
                assert addr == c.getsockname()

    try:
        run(loop, main())
    finally:
        listener.close()


def test_wait_for_timeout_on_sendall_leaves_socket_usable(loop, tcp_pair):
    a, b = tcp_pair
    shrink(a)
    shrink(b)
    data = payload(8 << 20, seed=6)

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(loop.sock_sendall(a, data), 0.05)  # b reads nothing
        assert loop.remove_writer(a) is False

        async def drain():
            got = bytearray()
            while not got.endswith(b"!"):
                chunk = await loop.sock_recv(b, 1 << 20)
                assert chunk
                got += chunk
            return bytes(got)

        reader = asyncio.ensure_future(drain())
        await loop.sock_sendall(a, b"!")
        got = await reader
        # A prefix of the data (what the timed-out call sent), then the new byte: nothing
        # was sent twice or out of order.
        sent = len(got) - 1
        assert 0 < sent < len(data)
        assert got == data[:sent] + b"!"

    run(loop, main())


# --- a reader and a writer on one socket --------------------------------------------------------


@pytest.mark.parametrize("first", ["recv", "sendall"])
def test_recv_and_sendall_wait_on_one_socket_together(loop, tcp_pair, first):
    """A waiting sock_recv and a waiting sock_sendall on the same socket: each completes on
    its own event (registering one does not replace or wake the other)."""
    a, b = tcp_pair
    shrink(a)
    shrink(b)
    data = payload(8 << 20, seed=7)

    async def main():
        start = {
            "recv": lambda: loop.sock_recv(a, 100),
            "sendall": lambda: loop.sock_sendall(a, data),
        }
        tasks = {}
        for name in [first, "sendall" if first == "recv" else "recv"]:
            tasks[name] = asyncio.ensure_future(start[name]())
            await asyncio.sleep(0.01)
        assert not tasks["recv"].done() and not tasks["sendall"].done()
        await loop.sock_sendall(b, b"ping")
        assert await asyncio.wait_for(tasks["recv"], 5) == b"ping"
        await asyncio.sleep(0.01)
        assert not tasks["sendall"].done()  # b still reads nothing
        got = bytearray()
        while len(got) < len(data):
            chunk = await loop.sock_recv(b, 1 << 20)
            assert chunk
            got += chunk
        assert await asyncio.wait_for(tasks["sendall"], 5) is None
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        # Both registrations are gone.
        assert loop.remove_reader(a) is False and loop.remove_writer(a) is False

    run(loop, main())


# --- fd numbers reused after close --------------------------------------------------------------


def _socket_on_fd(fd):
    """A connected Unix stream socket pair whose first socket has file descriptor ``fd``
    (a number that was just closed, so normally the next socket gets it anyway)."""
    c, d = socket.socketpair()
    if c.fileno() != fd:
        os.dup2(c.fileno(), fd)
        c.close()
        c = socket.socket(fileno=fd)
    c.setblocking(False)
    d.setblocking(False)
    return c, d


@pytest.mark.parametrize("how", ["completed", "cancelled"])
def test_fd_number_reused_after_close(loop, how):
    """A socket closed after a sock_recv (that completed, or was cancelled while waiting),
    then a new socket with the same fd number: sock_recv, sock_sendall and add_reader work on
    it (no stale registration of the old socket)."""
    a, b = socket.socketpair()
    a.setblocking(False)
    fd = a.fileno()

    async def main():
        task = asyncio.ensure_future(loop.sock_recv(a, 100))
        await asyncio.sleep(0.01)
        assert not task.done()  # registered with the loop, waiting
        if how == "completed":
            b.send(b"old")
            assert await asyncio.wait_for(task, 5) == b"old"
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        a.close()
        b.close()
        c, d = _socket_on_fd(fd)
        with c, d:
            assert c.fileno() == fd
            # sock_recv has to wait: the new socket's reader is registered and fires.
            task = asyncio.ensure_future(loop.sock_recv(c, 100))
            await asyncio.sleep(0.01)
            assert not task.done()
            d.send(b"new")
            assert await asyncio.wait_for(task, 5) == b"new"
            await asyncio.wait_for(loop.sock_sendall(c, b"back"), 5)
            assert d.recv(100) == b"back"
            # add_reader on the same fd number.
            got = loop.create_future()

            def on_readable():
                if not got.done():
                    got.set_result(c.recv(100))

            loop.add_reader(fd, on_readable)
            try:
                d.send(b"reader")
                assert await asyncio.wait_for(got, 5) == b"reader"
            finally:
                assert loop.remove_reader(fd) is True

    run(loop, main())


# --- sockets a transport owns -------------------------------------------------------------------


def test_transport_check_only_when_the_call_must_wait(loop, inet):
    """asyncio checks that no transport uses the fd (``_ensure_fd_no_transport``) only on the
    path that registers a reader/writer: a sock_recv that finds data and a sock_sendall
    that sends everything at once go through on a transport's socket (taking the data from
    under the transport or writing around it), while calls that must wait raise
    RuntimeError. Strange, but asyncio's behaviour."""
    family, host = inet
    server_transports = []

    class Server(asyncio.Protocol):
        def connection_made(self, transport):
            self.data = bytearray()
            server_transports.append((transport, self))

        def data_received(self, data):
            self.data += data

    async def main():
        srv = await loop.create_server(Server, host, 0)
        s = socket.create_connection(srv.sockets[0].getsockname()[:2], timeout=TIMEOUT)
        tr, _ = await loop.create_connection(asyncio.Protocol, sock=s)
        try:
            while not server_transports:
                await asyncio.sleep(0.001)
            peer, peer_proto = server_transports[0]
            tr.pause_reading()  # the transport does not read; the data stays in the socket
            peer.write(b"ready")
            while not select.select([s], [], [], 0)[0]:
                await asyncio.sleep(0.001)
            assert await loop.sock_recv(s, 100) == b"ready"
            peer.write(b"into")
            while not select.select([s], [], [], 0)[0]:
                await asyncio.sleep(0.001)
            buf = bytearray(10)
            assert await loop.sock_recv_into(s, buf) == 4 and buf[:4] == b"into"
            assert await loop.sock_sendall(s, b"small") is None
            while len(peer_proto.data) < 5:
                await asyncio.sleep(0.001)
            assert peer_proto.data == b"small"
            # Nothing to read: the call would wait, so it is refused.
            with pytest.raises(RuntimeError, match="is used by transport"):
                await loop.sock_recv(s, 100)
            with pytest.raises(RuntimeError, match="is used by transport"):
                await loop.sock_recv_into(s, buf)
            # More than the socket takes at once: refused after a partial send.
            peer.pause_reading()
            shrink(s)
            with pytest.raises(RuntimeError, match="is used by transport"):
                await loop.sock_sendall(s, b"x" * (8 << 20))
        finally:
            tr.close()
            for t, _ in server_transports:
                t.close()
            srv.close()
            await srv.wait_closed()

    run(loop, main())


# --- buffers and sizes --------------------------------------------------------------------------


def _recv_into_target(kind, storage):
    """(buffer handed to sock_recv_into, offset of that buffer in ``storage``)"""
    if kind == "bytearray":
        return storage, 0
    if kind == "memoryview":
        return memoryview(storage), 0
    return memoryview(storage)[8:16], 8  # a slice: writes must land inside it only


@pytest.mark.parametrize("kind", ["bytearray", "memoryview", "memoryview-slice"])
@pytest.mark.parametrize("ready", [True, False], ids=["data-ready", "must-wait"])
def test_recv_into_buffer_kinds(loop, pair, kind, ready):
    a, b = pair
    data = b"0123456789abcdefghijklmnopqrstuvwxyz"

    async def main():
        storage = bytearray(b"." * 32)
        buf, offset = _recv_into_target(kind, storage)
        if ready:
            b.send(data)
            n = await loop.sock_recv_into(a, buf)
        else:
            task = asyncio.ensure_future(loop.sock_recv_into(a, buf))
            await asyncio.sleep(0.01)
            assert not task.done()
            b.send(data)
            n = await task
        assert n == len(buf)  # the buffer is smaller than what is available
        assert storage == b"." * offset + data[:n] + b"." * (32 - offset - n)
        # The rest stays in the socket, in order.
        rest = b""
        while len(rest) < len(data) - n:
            rest += await loop.sock_recv(a, 100)
        assert rest == data[n:]

    run(loop, main())


@pytest.mark.parametrize("buf", [b"ab", 123, memoryview(b"ab"), "ab"])
def test_recv_into_rejects_what_is_not_a_writable_buffer(loop, pair, buf):
    """socket.recv_into()'s own TypeError, on the direct path and the waiting one."""
    a, b = pair
    msg = f"recv_into() argument 1 must be read-write bytes-like object, not {type(buf).__name__}"
    for ready in (True, False):
        if ready:
            b.send(b"x")
        with pytest.raises(TypeError) as info:
            run(loop, loop.sock_recv_into(a, buf))
        assert str(info.value) == msg
        if ready:
            assert a.recv(1) == b"x"


@pytest.fixture
def big_dgram_pair():
    """A Unix datagram socket pair that carries 384 KiB datagrams (one recv() each)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    yield a, b
    a.close()
    b.close()


def test_recv_more_than_256k_at_once(loop, big_dgram_pair):
    """sock_recv(n) with n above 256 KiB returns everything up to n that one recv() gives
    (no cap at the transports' 256 KiB read size)."""
    a, b = big_dgram_pair
    size = 384 << 10
    one, two, three = payload(size, seed=8), payload(size, seed=9), payload(size, seed=10)

    async def main():
        assert a.send(one) == size  # precondition: the kernel takes a 384 KiB datagram
        assert await loop.sock_recv(b, 1 << 20) == one
        task = asyncio.ensure_future(loop.sock_recv(b, 1 << 20))  # the waiting path
        await asyncio.sleep(0.01)
        assert not task.done()
        a.send(two)
        assert await task == two
        buf = bytearray(1 << 20)
        a.send(three)
        assert await loop.sock_recv_into(b, buf) == size
        assert buf[:size] == three and buf[size:] == bytes(len(buf) - size)

    run(loop, main())


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "memoryview-slice"])
def test_sendall_several_mib_to_a_slow_reader(loop, tcp_pair, kind):
    """Many partial writes (small buffers, a reader that takes 16 KiB at a time and
    pauses): every byte arrives once, in order."""
    a, b = tcp_pair
    shrink(a)
    shrink(b)
    data = payload(6 << 20, seed=11)
    if kind == "bytes":
        obj = data
    elif kind == "bytearray":
        obj = bytearray(data)
    elif kind == "memoryview":
        obj = memoryview(bytearray(data))
    else:
        obj = memoryview(b"head" + data + b"tail")[4:-4]

    async def slow_reader():
        h = hashlib.sha256()
        total = reads = 0
        while True:
            chunk = await loop.sock_recv(b, 16 << 10)
            if not chunk:
                return total, h.hexdigest(), reads
            total += len(chunk)
            h.update(chunk)
            reads += 1
            if reads % 8 == 0:
                await asyncio.sleep(0.001)

    async def main():
        sender = asyncio.ensure_future(loop.sock_sendall(a, obj))
        await asyncio.sleep(0.01)
        assert not sender.done()  # nothing read yet: the sendall must wait
        reader = asyncio.ensure_future(slow_reader())
        assert await sender is None
        a.shutdown(socket.SHUT_WR)
        total, digest, reads = await reader
        assert total == len(data)
        assert digest == hashlib.sha256(data).hexdigest()
        assert reads >= len(data) // (16 << 10)

    run(loop, main())


# --- the caller's buffers while a call waits -----------------------------------------------------


class _SocketSubclass(socket.socket):
    """Not exactly ``socket.socket``: the loops call its methods. Records what ``send`` got."""

    def send(self, data, *args):
        self.sent.append(type(data))
        return super().send(data, *args)


def _sender(kind, sock):
    """``sock`` itself, or a ``_SocketSubclass`` on its fd (``sock`` is then detached)."""
    if kind == "socket":
        return sock
    sub = _SocketSubclass(sock.family, sock.type, fileno=sock.detach())
    sub.sent = []
    return sub


def _resize(buf, how):
    if how == "clear":
        buf.clear()
    else:
        buf.extend(b"more")


@pytest.mark.parametrize("sock_kind", ["socket", "subclass"])
@pytest.mark.parametrize("how", ["clear", "extend"])
def test_sendall_holds_a_bytearray_while_waiting(loop, pair, sock_kind, how):
    """asyncio keeps a memoryview of the data while sock_sendall waits: resizing the bytearray
    meanwhile raises BufferError and every byte arrives. The first try gets the caller's
    object, the later ones slices of the memoryview; the data is let go when the call ends."""
    a, b = pair
    shrink(a)
    shrink(b)
    a = _sender(sock_kind, a)
    data = payload(4 << 20, seed=12)
    buf = bytearray(data)

    async def main():
        sender = asyncio.ensure_future(loop.sock_sendall(a, buf))
        await asyncio.sleep(0.01)
        assert not sender.done()  # the peer reads nothing: sock_sendall waits
        with pytest.raises(BufferError):
            _resize(buf, how)
        assert buf == data
        reader = asyncio.ensure_future(_recv_to_eof(loop, b))
        assert await sender is None
        a.shutdown(socket.SHUT_WR)
        assert await reader == data
        _resize(buf, how)  # no longer held
        if sock_kind == "subclass":
            assert len(a.sent) > 1
            assert a.sent[0] is bytearray and set(a.sent[1:]) == {memoryview}

    try:
        run(loop, main())
    finally:
        a.close()


def test_sendall_lets_a_bytearray_go_when_cancelled(loop, pair):
    """A waiting sock_sendall of a bytearray that is cancelled no longer holds the bytearray:
    it can be resized at once."""
    a, b = pair
    shrink(a)
    shrink(b)
    buf = bytearray(4 << 20)

    async def main():
        sender = asyncio.ensure_future(loop.sock_sendall(a, buf))
        await asyncio.sleep(0.01)
        assert not sender.done()
        with pytest.raises(BufferError):
            buf.clear()
        sender.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sender
        buf.clear()
        assert loop.remove_writer(a) is False

    run(loop, main())


def test_sendall_of_bytes_sent_at_once_or_waited(loop, pair):
    """An exact bytes (read in place by ferroloop) and a bytearray sent at once are sent whole;
    a bytearray sent at once is not held afterwards."""
    a, b = pair
    buf = bytearray(b"0123456789")

    async def main():
        assert await loop.sock_sendall(a, b"abc") is None
        assert await loop.sock_sendall(a, buf) is None
        buf.clear()
        assert await loop.sock_recv(b, 100) == b"abc0123456789"

    run(loop, main())


@pytest.mark.skipif(not HAS_RECVFROM, reason="sock_sendto is new in 3.11")
def test_sendto_of_a_bytearray_changed_while_waiting(loop, tmp_path):
    """asyncio does not hold sock_sendto's data while it waits: a bytearray can be resized
    meanwhile, and the datagram sent is its content when the socket is ready."""
    path = str(tmp_path / "dgram")
    a = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.bind(path)
    a.connect(path)  # so that a waits for room in b's queue
    a.setblocking(False)
    b.setblocking(False)
    for _ in range(100_000):  # fill b's queue
        try:
            a.sendto(b"x" * 100, path)
        except BlockingIOError:
            break
    buf = bytearray(b"old")

    async def main():
        task = asyncio.ensure_future(loop.sock_sendto(a, buf, path))
        await asyncio.sleep(0.01)
        assert not task.done()
        buf[:] = b"new data"
        while True:
            try:
                assert b.recv(1000) == b"x" * 100
            except BlockingIOError:
                break
        assert await task == len(b"new data")
        assert await loop.sock_recv(b, 1000) == b"new data"

    try:
        run(loop, main())
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("how", ["shrink", "grow"])
@pytest.mark.parametrize("method", ["sock_recv_into", "sock_recvfrom_into"])
def test_recv_into_a_bytearray_resized_while_waiting(loop, pair, method, how):
    """asyncio does not hold the buffer of a waiting sock_recv_into / sock_recvfrom_into: it
    can be resized meanwhile, and the read fills the buffer as it is when the socket is ready.
    sock_recvfrom_into's default byte count is the buffer's length at the call, so a buffer
    that shrank below it fails with recvfrom_into's ValueError."""
    if not hasattr(loop, method):
        pytest.skip(f"loop.{method} is new in 3.11")
    a, b = pair
    buf = bytearray(16)

    async def main():
        if method == "sock_recv_into":
            task = asyncio.ensure_future(loop.sock_recv_into(a, buf))
        else:
            task = asyncio.ensure_future(loop.sock_recvfrom_into(a, buf))
        await asyncio.sleep(0.01)
        assert not task.done()
        buf[:] = bytes(4 if how == "shrink" else 32)  # no BufferError: the buffer is not held
        b.send(b"0123456789abcdefghijklmnopqrstuvwxyz")
        if method == "sock_recvfrom_into" and how == "shrink":
            with pytest.raises(ValueError, match="nbytes is greater"):
                await task
            return
        got = await task
        n = got if method == "sock_recv_into" else got[0]
        # recv_into: the whole (new) buffer; recvfrom_into: the byte count fixed at the call
        expected = {"shrink": 4, "grow": 32 if method == "sock_recv_into" else 16}[how]
        assert n == expected
        assert buf[:n] == b"0123456789abcdefghijklmnopqrstuvwxyz"[:n]

    run(loop, main())


# --- errors -------------------------------------------------------------------------------------


def _reset_pair(family, host):
    """(client, peer) TCP sockets, the client non-blocking."""
    with socket.create_server((host, 0), family=family) as listener:
        c = socket.create_connection(listener.getsockname()[:2], timeout=TIMEOUT)
        p, _ = listener.accept()
    c.setblocking(False)
    return c, p


def _reset(peer):
    """Close with SO_LINGER 0: the other side gets a RST."""
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()


@pytest.mark.parametrize("when", ["before", "while-waiting"])
def test_sendall_on_a_reset_connection(loop, inet, when):
    """The first send after the RST fails with ECONNRESET (ConnectionResetError), later ones
    with EPIPE (BrokenPipeError); the reset was consumed by the send, so a recv then reads
    EOF (what the kernel does; asyncio passes it on)."""
    family, host = inet
    c, p = _reset_pair(family, host)

    async def main():
        if when == "before":
            _reset(p)
            for _ in range(1000):  # until the RST arrived (the socket turns readable)
                if select.select([c], [], [], 0)[0]:
                    break
                await asyncio.sleep(0.001)
            with pytest.raises(ConnectionResetError) as e:
                await loop.sock_sendall(c, b"x" * 100)
        else:
            shrink(c)
            task = asyncio.ensure_future(loop.sock_sendall(c, b"x" * (8 << 20)))
            await asyncio.sleep(0.01)
            assert not task.done()  # the peer reads nothing: waiting for the buffer
            _reset(p)
            with pytest.raises(ConnectionResetError) as e:
                await asyncio.wait_for(task, 5)
            assert loop.remove_writer(c) is False
        assert e.value.errno == errno.ECONNRESET
        with pytest.raises(BrokenPipeError) as e:
            await loop.sock_sendall(c, b"again")
        assert e.value.errno == errno.EPIPE
        assert await loop.sock_recv(c, 100) == b""

    try:
        run(loop, main())
    finally:
        c.close()
        p.close()


@pytest.mark.parametrize("method", METHODS)
def test_sock_call_on_a_closed_socket(loop, method):
    """A closed socket object (fileno() -1): the call fails with OSError(EBADF) from the
    socket method itself, as asyncio tries the operation before anything else."""
    if method not in _calls(loop, None, None):
        pytest.skip(f"loop.{method} is new in 3.11")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.close()
    with pytest.raises(OSError) as e:
        run(loop, _calls(loop, s, ("127.0.0.1", 9))[method]())
    assert type(e.value) is OSError
    assert e.value.errno == errno.EBADF


# --- accept -------------------------------------------------------------------------------------


def test_accept_many_pending_connections(loop, inet):
    """Connections queued before sock_accept is called are all accepted, each a connected,
    non-blocking socket of the listener's family whose peer is the client."""
    family, host = inet
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(100)
    listener.setblocking(False)
    clients = []

    async def main():
        for _ in range(50):
            c = socket.socket(family, socket.SOCK_STREAM)
            clients.append(c)
            c.setblocking(False)
            await loop.sock_connect(c, listener.getsockname())
        by_name = {c.getsockname(): c for c in clients}
        accepted = []
        try:
            for _ in clients:
                conn, addr = await asyncio.wait_for(loop.sock_accept(listener), 5)
                accepted.append(conn)
                assert conn.family == family and conn.type == socket.SOCK_STREAM
                assert conn.gettimeout() == 0
                assert os.get_blocking(conn.fileno()) is False
                assert addr == conn.getpeername()
                assert conn.getsockname() == listener.getsockname()
                client = by_name.pop(addr)
                await loop.sock_sendall(conn, b"hi")
                assert await loop.sock_recv(client, 10) == b"hi"
            assert by_name == {}
            # The queue is empty: the next accept waits.
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(loop.sock_accept(listener), 0.05)
        finally:
            for conn in accepted:
                conn.close()

    try:
        run(loop, main())
    finally:
        listener.close()
        for c in clients:
            c.close()


# --- datagrams with addresses -------------------------------------------------------------------


@pytest.mark.skipif(not HAS_RECVFROM, reason="sock_recvfrom & co. are new in 3.11")
def test_udp_many_senders_and_buffers(loop, inet):
    """One receiver, several senders: each datagram comes with its sender's address (a
    4-tuple on IPv6); sock_recvfrom_into writes into a memoryview slice; nbytes larger
    than the buffer is a ValueError (from socket.recvfrom_into, before any waiting)."""
    family, host = inet
    socks = []
    for _ in range(4):
        s = socket.socket(family, socket.SOCK_DGRAM)
        socks.append(s)
        s.bind((host, 0))
        s.setblocking(False)
    rx, senders = socks[0], socks[1:]

    async def main():
        for i, s in enumerate(senders):
            assert await loop.sock_sendto(s, b"from %d" % i, rx.getsockname()) == 6
        seen = {}
        for _ in senders:
            data, addr = await loop.sock_recvfrom(rx, 100)
            assert len(addr) == (4 if family == socket.AF_INET6 else 2)
            seen[addr] = data
        assert seen == {s.getsockname(): b"from %d" % i for i, s in enumerate(senders)}
        # Replies go back to each address.
        for addr in seen:
            await loop.sock_sendto(rx, b"reply", addr)
        for s in senders:
            assert await loop.sock_recvfrom(s, 100) == (b"reply", rx.getsockname())
        # recvfrom_into a slice of a memoryview, waiting for the datagram.
        storage = bytearray(b"." * 20)
        task = asyncio.ensure_future(loop.sock_recvfrom_into(rx, memoryview(storage)[5:15]))
        await asyncio.sleep(0.01)
        assert not task.done()
        await loop.sock_sendto(senders[0], b"0123456789abcdef", rx.getsockname())
        assert await task == (10, senders[0].getsockname())  # truncated to the slice
        assert storage == b"....." + b"0123456789" + b"....."
        with pytest.raises(ValueError, match="nbytes is greater than the length of the buffer"):
            await loop.sock_recvfrom_into(rx, bytearray(4), 8)
        # A 60000-byte datagram in one piece.
        big = payload(60000, seed=12)
        assert await loop.sock_sendto(senders[1], big, rx.getsockname()) == len(big)
        assert await loop.sock_recvfrom(rx, 65536) == (big, senders[1].getsockname())

    try:
        run(loop, main())
    finally:
        for s in socks:
            s.close()


# --- look-alike sockets and the coroutine protocol ---------------------------------------------


class _NoFdSocket:
    """A socket look-alike that is never ready and has no fd (`fileno()` gives -1)."""

    def __init__(self, fileno=-1):
        self._fileno = fileno

    def fileno(self):
        return self._fileno

    def _wait(self, *args):
        raise BlockingIOError

    recv = recv_into = recvfrom = recvfrom_into = send = sendto = accept = _wait


def _duck_calls(loop, sock):
    calls = {
        "sock_recv": lambda: loop.sock_recv(sock, 1),
        "sock_recv_into": lambda: loop.sock_recv_into(sock, bytearray(1)),
        "sock_sendall": lambda: loop.sock_sendall(sock, b"x"),
        "sock_accept": lambda: loop.sock_accept(sock),
    }
    if HAS_RECVFROM:
        calls["sock_recvfrom"] = lambda: loop.sock_recvfrom(sock, 1)
        calls["sock_recvfrom_into"] = lambda: loop.sock_recvfrom_into(sock, bytearray(1))
        calls["sock_sendto"] = lambda: loop.sock_sendto(sock, b"x", ("127.0.0.1", 9))
    return calls


def test_look_alike_socket_without_fd_must_wait(loop):
    """asyncio's `_add_reader`/`_add_writer` reject the -1 before waiting."""
    for make in _duck_calls(loop, _NoFdSocket()).values():
        with pytest.raises(ValueError, match="^Invalid file descriptor: -1$"):
            run(loop, make())


def test_look_alike_socket_with_an_odd_fileno_must_wait(loop):
    for fileno, exc, msg in [
        (2**31, OverflowError, "^Python int too large to convert to C int$"),
        ("3", ValueError, "^Invalid file object: '3'$"),
        (-(2**70), ValueError, f"^Invalid file descriptor: {-(2**70)}$"),
    ]:
        with pytest.raises(exc, match=msg):
            run(loop, loop.sock_recv(_NoFdSocket(fileno), 1))


_NOT_AN_EXCEPTION = "exceptions must be classes or instances deriving from BaseException, not "
# A coroutine waiting in `await fut` hands `throw()` to the future's iterator, which says:
_NOT_AN_EXCEPTION_FUT = (
    "exceptions must be classes deriving BaseException or instances of such a class"
)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # throw(typ, val, tb), 3.12+
def test_throw_checks_its_arguments_as_a_coroutine(loop, pair):
    """A sock_* coroutine's `throw()` checks and raises as a native coroutine's does: before it
    started (checks leave it unstarted), once waiting (its future's iterator checks, and any
    error ends it), and once finished ("cannot reuse already awaited coroutine")."""
    a, _ = pair
    bad = [
        ((int, "x"), TypeError, _NOT_AN_EXCEPTION + "type", _NOT_AN_EXCEPTION_FUT),
        ((1,), TypeError, _NOT_AN_EXCEPTION + "int", _NOT_AN_EXCEPTION_FUT),
        (
            (ValueError("a"), "b"),
            TypeError,
            "instance exception may not have a separate value",
            None,
        ),
        (
            (ValueError, None, object()),
            TypeError,
            "throw() third argument must be a traceback object",
            "throw() third argument must be a traceback",
        ),
    ]
    for args, exc, fresh_msg, _ in bad:
        coro = loop.sock_recv(a, 1)
        with pytest.raises(exc) as info:
            coro.throw(*args)
        assert str(info.value) == fresh_msg
        coro.close()

    for args, exc, fresh_msg, waiting_msg in bad:

        async def main(args=args, exc=exc, msg=waiting_msg or fresh_msg):
            coro = loop.sock_recv(a, 1)
            task = asyncio.ensure_future(coro)
            await asyncio.sleep(0)
            with pytest.raises(exc) as info:
                coro.throw(*args)
            assert str(info.value) == msg
            with pytest.raises(RuntimeError, match="^cannot reuse already awaited coroutine$"):
                coro.send(None)
            # The task, woken by its cancellation, throws into a finished coroutine.
            task.cancel()
            (outcome,) = await asyncio.gather(task, return_exceptions=True)
            assert isinstance(outcome, RuntimeError), outcome
            assert str(outcome) == "cannot reuse already awaited coroutine"

        run(loop, main())

    coro = loop.sock_recv(a, 1)
    with pytest.raises(ValueError, match="^v$"):
        coro.throw(ValueError, "v")
    with pytest.raises(KeyError) as info:
        loop.sock_recv(a, 1).throw(KeyError, (1, 2))
    assert info.value.args == (1, 2)
    for args in [(ValueError,), (ValueError("a"), None)]:
        with pytest.raises(RuntimeError, match="^cannot reuse already awaited coroutine$"):
            coro.throw(*args)
    with pytest.raises(TypeError, match=_NOT_AN_EXCEPTION + "int"):
        coro.throw(1)
    coro.close()


def test_second_awaiter_of_a_waiting_sock_call(loop, pair):
    """Awaiting a sock_* coroutine that a task already awaits fails at the `await`, as for a
    native coroutine; the first awaiter is unaffected."""
    a, b = pair

    async def main():
        coro = loop.sock_recv(a, 1)
        first = asyncio.ensure_future(coro)
        await asyncio.sleep(0)

        async def second():
            return await coro

        with pytest.raises(RuntimeError, match="^coroutine is being awaited already$"):
            await second()
        b.send(b"z")
        assert await first == b"z"
        with pytest.raises(RuntimeError, match="^cannot reuse already awaited coroutine$"):
            await second()

    run(loop, main())


# --- a sock_* coroutine ended from outside while it waits -----------------------------------
# asyncio's sock_* coroutines wait in `await fut` with a reader (writer) registered that does
# the I/O and resolves `fut`. An exception thrown in, or `close()`, ends the coroutine there,
# but the reader stays: it still does the I/O when the socket is ready, and the task that
# awaited the coroutine then wakes to "cannot reuse already awaited coroutine".


async def _waiting_recv(sock):
    """A `sock_recv(sock, 100)` coroutine, and the task that runs it, now waiting."""
    coro = asyncio.get_running_loop().sock_recv(sock, 100)
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(0)
    return coro, task


async def _ends_reused(task):
    """The task, woken by its future, steps a finished coroutine."""
    (outcome,) = await asyncio.gather(task, return_exceptions=True)
    assert isinstance(outcome, RuntimeError), outcome
    assert str(outcome) == "cannot reuse already awaited coroutine"


def _end(coro, how):
    if how == "close":
        coro.close()
    elif how == "throw":
        with pytest.raises(ValueError, match="^stop$"):
            coro.throw(ValueError("stop"))
    else:  # arguments the future's iterator rejects: that TypeError ends the coroutine too
        with pytest.raises(TypeError):
            coro.throw(1)


@pytest.mark.parametrize("how", ["throw", "close", "bad-throw"])
def test_recv_ended_from_outside_still_reads(loop, pair, how):
    a, b = pair

    async def main():
        coro, task = await _waiting_recv(a)
        _end(coro, how)
        assert coro.cr_await is None
        await asyncio.sleep(0.01)
        assert not task.done()
        b.send(b"hello")
        await _ends_reused(task)
        # The reader read what came, and is gone now.
        with pytest.raises(BlockingIOError):
            a.recv(100)
        b.send(b"again")
        assert await loop.sock_recv(a, 100) == b"again"

    run(loop, main())


@pytest.mark.parametrize("how", ["throw", "close"])
def test_sendall_ended_from_outside_still_sends_everything(loop, pair, how):
    a, b = pair
    shrink(a, 8192)
    data = payload(300_000)

    async def main():
        coro = loop.sock_sendall(a, data)
        task = asyncio.ensure_future(coro)
        await asyncio.sleep(0)
        _end(coro, how)
        got = bytearray()
        while len(got) < len(data):
            got += await loop.sock_recv(b, 65536)
        assert got == data
        await _ends_reused(task)

    run(loop, main())


def test_recv_ended_from_outside_then_cancelled_reads_nothing(loop, pair):
    """Cancelling the task cancels the future: the reader goes, and later data stays."""
    a, b = pair

    async def main():
        coro, task = await _waiting_recv(a)
        _end(coro, "throw")
        task.cancel()
        await _ends_reused(task)
        b.send(b"hello")
        await asyncio.sleep(0.01)
        assert a.recv(100) == b"hello"

    run(loop, main())


def test_recv_ended_from_outside_resolves_its_future_with_the_data(loop, pair):
    """Driven by hand: the future the coroutine yielded gets what the reader read."""
    a, b = pair

    async def main():
        coro = loop.sock_recv(a, 100)
        fut = coro.send(None)
        assert isinstance(fut, asyncio.Future)
        _end(coro, "throw")
        with pytest.raises(RuntimeError, match="^cannot reuse already awaited coroutine$"):
            coro.send(None)
        resolved = loop.create_future()
        fut.add_done_callback(lambda f: resolved.set_result(None))
        b.send(b"hello")
        await asyncio.wait_for(resolved, 5)
        assert fut.result() == b"hello"
        with pytest.raises(RuntimeError, match="^cannot reuse already awaited coroutine$"):
            coro.send(None)
        coro.close()

    run(loop, main())


def test_recv_ended_from_outside_passes_a_failure_to_its_future(loop, inet):
    """A reset seen by the reader left behind goes to the future; thrown into the finished
    coroutine (as the task would throw it) it gives "cannot reuse already awaited coroutine"."""
    family, host = inet

    async def main():
        with socket.socket(family) as lsock:
            lsock.bind((host, 0))
            lsock.listen()
            a = socket.socket(family)
            a.setblocking(False)
            await loop.sock_connect(a, lsock.getsockname())
            b, _ = lsock.accept()
            with a, b:
                coro = loop.sock_recv(a, 100)
                fut = coro.send(None)
                task_done = loop.create_future()
                fut.add_done_callback(lambda f: task_done.set_result(None))
                _end(coro, "throw")
                b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                b.close()
                await asyncio.wait_for(task_done, 5)
                assert isinstance(fut.exception(), ConnectionResetError), fut.exception()
                with pytest.raises(RuntimeError) as info:
                    coro.throw(fut.exception())
                assert str(info.value) == "cannot reuse already awaited coroutine"
                # As from a native coroutine (3.10-3.13): the thrown exception is not chained.
                assert info.value.__context__ is None

    run(loop, main())


_THROW_DEPRECATED = (
    "the (type, exc, tb) signature of throw() is deprecated, use the single-arg signature instead."
)


@pytest.mark.parametrize("state", ["fresh", "waiting", "finished"])
def test_throw_with_several_arguments_warns_as_a_coroutine(loop, pair, state):
    """3.12+: a coroutine warns once, and the future's iterator it waits on once more."""
    a, b = pair
    expected = 0 if sys.version_info < (3, 12) else (2 if state == "waiting" else 1)

    async def main():
        coro = loop.sock_recv(a, 1)
        task = None
        if state == "waiting":
            task = asyncio.ensure_future(coro)
            await asyncio.sleep(0)
        elif state == "finished":
            b.send(b"x")
            assert await coro == b"x"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(RuntimeError if state == "finished" else ValueError):
                coro.throw(ValueError, None)
        warned = [w for w in caught if issubclass(w.category, DeprecationWarning)]
        assert [str(w.message) for w in warned] == [_THROW_DEPRECATED] * expected
        assert all(w.filename == __file__ for w in warned)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        coro.close()

    run(loop, main())


@pytest.mark.skipif(sys.version_info < (3, 12), reason="throw(typ, val) warns from 3.12 on")
def test_throw_deprecation_raised_as_an_error_leaves_the_coroutine(loop, pair):
    """The coroutine's own warning comes before anything else: raised as an error, it leaves
    a waiting operation waiting, and its task gets the data."""
    a, b = pair

    async def main():
        coro, task = await _waiting_recv(a)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            with pytest.raises(DeprecationWarning):
                coro.throw(ValueError, None)
        b.send(b"x")
        assert await task == b"x"

    run(loop, main())


# --- how errors chain ----------------------------------------------------------------------


@pytest.mark.parametrize("when", ["at once", "after waiting"])
def test_a_sock_error_chains_to_the_exception_its_awaiter_handles(loop, when):
    """A sock_* error raised in a coroutine that awaits the operation inside an ``except``
    block has that block's exception as ``__context__``: asyncio raises it in the operation's
    own frame when the first try fails, and throws it in through the awaiting coroutine
    (which chains it) after waiting. ferroloop raised both from Rust, with no context."""

    async def main():
        a, b = _reset_pair(socket.AF_INET, "127.0.0.1")
        try:
            if when == "at once":
                _reset(b)  # before the call
                await asyncio.sleep(0.05)
            else:
                loop.call_later(0.05, _reset, b)  # while the call waits
            try:
                raise KeyError("being handled")
            except KeyError:
                try:
                    await loop.sock_recv(a, 100)
                except OSError as e:
                    return type(e), e.__context__
        finally:
            a.close()
            b.close()

    kind, context = run(loop, main())
    assert issubclass(kind, ConnectionResetError)
    assert isinstance(context, KeyError)


def test_a_connect_error_raised_again_in_an_inner_coroutine_chains_as_on_asyncio(loop):
    """``open_connection`` to a refused port, awaited by a helper coroutine that an outer one
    calls while it handles a ``KeyError``: asyncio's ``create_connection`` catches the connect
    error and raises it again, and it has no ``__context__`` (redis-py's teardown has this
    shape). ferroloop raised the error from Rust while the task's ``send`` had resumed every
    coroutine around it, and that ``raise`` chained it to the outer ``KeyError``."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    srv.close()  # nothing listens there

    async def helper():
        try:
            await asyncio.open_connection("127.0.0.1", port)
        except OSError as e:
            return e

    async def main():
        try:
            raise KeyError("outer")
        except KeyError:
            return await helper()

    err = run(loop, main())
    assert isinstance(err, ConnectionRefusedError)
    assert err.__context__ is None
