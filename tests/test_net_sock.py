"""The loop's ``sock_*`` coroutines on plain (non-blocking) sockets: asyncio's behaviour, on
both loops. Loopback TCP/UDP and Unix sockets only; every wait is bounded."""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import socket
import ssl
import sys

import pytest

TIMEOUT = 20


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


def run(loop, coro, timeout=TIMEOUT):
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


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
