"""add_reader / add_writer and their removal (level-triggered readiness callbacks)."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from conftest import run_briefly


class FileLike:
    """Not a socket: only has fileno()."""

    def __init__(self, fd):
        self._fd = fd

    def fileno(self):
        return self._fd


def test_reader_called_when_readable(loop, pair):
    a, b = pair
    got = []

    def on_readable(sock, tag):
        got.append((tag, sock.recv(100)))

    loop.add_reader(a, on_readable, a, "tag")
    run_briefly(loop)
    assert got == []  # nothing to read yet
    b.send(b"hello")
    run_briefly(loop)
    assert got == [("tag", b"hello")]
    assert loop.remove_reader(a) is True


def test_reader_is_level_triggered(loop, pair):
    a, b = pair
    calls = []
    loop.add_reader(a.fileno(), calls.append, "ready")  # never drains
    b.send(b"x")
    run_briefly(loop, 3)
    assert calls == ["ready"] * 3
    a.recv(1)
    run_briefly(loop, 2)
    assert calls == ["ready"] * 3
    loop.remove_reader(a.fileno())


def test_reader_wakes_loop_blocked_in_poll(loop, pair):
    a, b = pair

    async def main():
        fut = loop.create_future()

        def on_readable():
            loop.remove_reader(a)
            fut.set_result(a.recv(10))

        loop.add_reader(a, on_readable)
        t = threading.Timer(0.05, b.send, args=(b"wake",))
        t.start()
        try:
            return await asyncio.wait_for(fut, 10)
        finally:
            t.cancel()
            t.join()

    assert loop.run_until_complete(main()) == b"wake"


def test_remove_reader_return_value(loop, pair):
    a, _ = pair
    assert loop.remove_reader(a) is False
    loop.add_reader(a, lambda: None)
    assert loop.remove_reader(a) is True
    assert loop.remove_reader(a) is False
    assert loop.remove_reader(a.fileno()) is False


def test_remove_reader_by_fd_after_add_by_object(loop, pair):
    a, b = pair
    calls = []
    loop.add_reader(a, calls.append, 1)
    assert loop.remove_reader(a.fileno()) is True
    b.send(b"x")
    run_briefly(loop)
    assert calls == []


def test_reader_removed_by_earlier_callback_in_same_iteration(loop):
    (a1, b1), (a2, b2) = socket.socketpair(), socket.socketpair()
    try:
        calls = []

        def first():
            calls.append("first")
            loop.remove_reader(a1)
            loop.remove_reader(a2)

        def second():
            calls.append("second")
            loop.remove_reader(a1)
            loop.remove_reader(a2)

        loop.add_reader(a1, first)
        loop.add_reader(a2, second)
        b1.send(b"x")
        b2.send(b"x")
        run_briefly(loop, 2)
        # Both were ready in the same poll; whichever ran first removed the other.
        assert calls in (["first"], ["second"])
    finally:
        for s in (a1, b1, a2, b2):
            s.close()


def test_removed_reader_not_called(loop, pair):
    a, b = pair
    calls = []

    def reader():
        calls.append(1)
        loop.remove_reader(a)  # from inside its own callback

    loop.add_reader(a, reader)
    b.send(b"x")
    run_briefly(loop, 3)
    assert calls == [1]


def test_writer_called_when_writable(loop, pair):
    a, _ = pair
    calls = []
    loop.add_writer(a, calls.append, "w")
    run_briefly(loop, 2)
    assert calls == ["w", "w"]  # a socket with buffer space is always writable
    assert loop.remove_writer(a) is True
    assert loop.remove_writer(a) is False
    run_briefly(loop)
    assert calls == ["w", "w"]


def test_remove_writer_never_added(loop, pair):
    a, _ = pair
    assert loop.remove_writer(a) is False


def test_reader_and_writer_on_same_fd(loop, pair):
    a, b = pair
    calls = []
    loop.add_reader(a, calls.append, "r")
    loop.add_writer(a, calls.append, "w")
    run_briefly(loop)
    assert calls == ["w"]
    b.send(b"x")
    calls.clear()
    run_briefly(loop)
    assert sorted(calls) == ["r", "w"]
    # Removing one direction leaves the other in place.
    assert loop.remove_writer(a) is True
    calls.clear()
    run_briefly(loop)
    assert calls == ["r"]
    assert loop.remove_writer(a) is False
    assert loop.remove_reader(a) is True
    calls.clear()
    run_briefly(loop)
    assert calls == []


def test_remove_reader_keeps_writer(loop, pair):
    a, _ = pair
    calls = []
    loop.add_reader(a, calls.append, "r")
    loop.add_writer(a, calls.append, "w")
    assert loop.remove_reader(a) is True
    run_briefly(loop)
    assert calls == ["w"]
    assert loop.remove_writer(a) is True


def test_object_with_fileno(loop, pair):
    a, b = pair
    obj = FileLike(a.fileno())
    calls = []
    loop.add_reader(obj, calls.append, "obj")
    b.send(b"x")
    run_briefly(loop)
    assert calls == ["obj"]
    assert loop.remove_reader(obj) is True
    assert loop.remove_reader(a) is False


def test_replacing_reader(loop, pair):
    a, b = pair
    calls = []
    loop.add_reader(a, calls.append, "old")
    loop.add_reader(a, calls.append, "new")
    b.send(b"x")
    run_briefly(loop)
    assert calls == ["new"]
    assert loop.remove_reader(a) is True


def test_replacing_reader_cancels_old_handle(loop, pair):
    a, _ = pair
    # _add_reader (what transports call) returns the handle on both loops.
    h1 = loop._add_reader(a.fileno(), lambda: None)
    h2 = loop._add_reader(a.fileno(), lambda: None)
    assert h1.cancelled()
    assert not h2.cancelled()
    assert loop._remove_reader(a.fileno()) is True
    assert h2.cancelled()


def test_replacing_writer_cancels_old_handle(loop, pair):
    a, _ = pair
    h1 = loop._add_writer(a.fileno(), lambda: None)
    h2 = loop._add_writer(a.fileno(), lambda: None)
    assert h1.cancelled() and not h2.cancelled()
    assert loop._remove_writer(a.fileno()) is True
    assert h2.cancelled()


def test_remove_reader_for_closed_socket(loop, pair):
    a, b = pair
    calls = []
    loop.add_reader(a, calls.append, 1)
    a.close()
    assert a.fileno() == -1
    # Found by identity although it has no fd any more, as selectors does.
    assert loop.remove_reader(a) is True
    run_briefly(loop)
    assert calls == []


def test_remove_reader_for_closed_socket_second_time(loop, pair):
    a, _ = pair
    loop.add_reader(a, lambda: None)
    a.close()
    assert loop.remove_reader(a) is True
    with pytest.raises(ValueError, match="^Invalid file descriptor: -1$"):
        loop.remove_reader(a)  # no longer known: a closed socket is an invalid object


def test_reader_on_closed_socket_rejected(loop, pair):
    a, _ = pair
    a.close()
    with pytest.raises(ValueError, match="^Invalid file descriptor: -1$"):
        loop.add_reader(a, lambda: None)


@pytest.mark.parametrize("method", ["add_reader", "add_writer", "remove_reader", "remove_writer"])
def test_invalid_file_object(loop, method):
    obj = object()
    args = (lambda: None,) if method.startswith("add") else ()
    with pytest.raises(ValueError, match=r"^Invalid file object: <object object at 0x"):
        getattr(loop, method)(obj, *args)


@pytest.mark.parametrize("method", ["add_reader", "add_writer", "remove_reader", "remove_writer"])
def test_negative_fd(loop, method):
    args = (lambda: None,) if method.startswith("add") else ()
    with pytest.raises(ValueError, match="^Invalid file descriptor: -1$"):
        getattr(loop, method)(-1, *args)


@pytest.mark.parametrize("bad_fileno", ["x", None, object()])
def test_fileno_returning_junk(loop, bad_fileno):
    with pytest.raises(ValueError, match="^Invalid file object: "):
        loop.add_reader(FileLike(bad_fileno), lambda: None)


def test_regular_file_rejected_by_epoll(loop, tmp_path):
    path = tmp_path / "regular"
    path.write_bytes(b"data")
    with open(path, "rb") as f:
        with pytest.raises(PermissionError):
            loop.add_reader(f, lambda: None)
        with pytest.raises(PermissionError):
            loop.add_writer(f.fileno(), lambda: None)
        assert loop.remove_reader(f) is False  # the failed registration left nothing behind
        assert loop.remove_writer(f) is False


def test_closed_loop_add_raises_remove_returns_false(loop, pair):
    a, _ = pair
    loop.add_reader(a, lambda: None)
    loop.close()
    with pytest.raises(RuntimeError, match="^Event loop is closed$"):
        loop.add_reader(a, lambda: None)
    with pytest.raises(RuntimeError, match="^Event loop is closed$"):
        loop.add_writer(a, lambda: None)
    assert loop.remove_reader(a) is False
    assert loop.remove_writer(a) is False


def test_closed_loop_checked_before_fd(loop):
    """asyncio checks for a closed loop before it validates an int fd."""
    loop.close()
    with pytest.raises(RuntimeError, match="^Event loop is closed$"):
        loop.add_reader(-1, lambda: None)


def test_reader_exception_goes_to_handler(loop, pair, handler_calls):
    a, b = pair

    def bad_reader():
        a.recv(10)
        raise RuntimeError("reader failed")

    loop.add_reader(a, bad_reader)
    b.send(b"x")
    run_briefly(loop)
    loop.remove_reader(a)
    assert len(handler_calls) == 1
    assert isinstance(handler_calls[0]["exception"], RuntimeError)
    assert handler_calls[0]["message"].startswith("Exception in callback")


def test_peer_close_makes_reader_ready(loop, pair):
    a, b = pair
    got = []

    def reader():
        got.append(a.recv(10))
        if got[-1] == b"":
            loop.remove_reader(a)

    loop.add_reader(a, reader)
    b.close()
    run_briefly(loop, 2)
    assert got == [b""]


def test_close_unregisters_fds(loop, pair):
    a, b = pair
    calls = []
    loop.add_reader(a, calls.append, 1)
    b.send(b"x")
    loop.close()
    assert calls == []
    # The socket is still usable and not owned by the loop.
    assert a.recv(1) == b"x"


def test_many_fds(loop):
    pairs = [socket.socketpair() for _ in range(100)]
    try:
        seen = set()
        for i, (a, _b) in enumerate(pairs):
            a.setblocking(False)

            def reader(i=i, a=a):
                a.recv(10)
                seen.add(i)
                loop.remove_reader(a)

            loop.add_reader(a, reader)
        for _, b in pairs:
            b.send(b"x")
        run_briefly(loop, 2)
        assert seen == set(range(100))
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_ready_fds_are_polled_while_callbacks_keep_the_loop_busy(loop, pair):
    """A callback that always reschedules itself never lets the ready queue empty; readiness
    must still be seen. With an add_reader callback registered, every iteration polls on both
    loops (ferroloop skips no poll while one is: whatever makes its fd ready is code the loop
    cannot see, DESIGN.md), so a never-drained reader runs in every iteration."""
    a, b = pair
    ticks = 0
    seen = []

    def tick():
        nonlocal ticks
        ticks += 1
        if ticks == 1:
            b.send(b"x")  # readable from now on: the reader never drains it
        if ticks == 40:
            loop.stop()
        else:
            loop.call_soon(tick)

    loop.add_reader(a, lambda: seen.append(ticks))
    loop.call_soon(tick)
    loop.run_forever()
    loop.remove_reader(a)
    assert seen == list(range(2, 41)), seen  # after each tick, from the iteration after the send


def test_a_transport_reads_while_callbacks_keep_the_loop_busy(loop):
    """The same with a stream transport whose peer is a plain socket outside the loop, which
    sends a byte in every iteration: it is read at least every third iteration (asyncio: every
    iteration; ferroloop skips two non-blocking polls after each poll while no peer in the loop
    can tell, DESIGN.md)."""
    listener = socket.create_server(("127.0.0.1", 0))
    ticks = 0
    seen = []

    class Reader(asyncio.Protocol):
        def data_received(self, data):
            seen.append(ticks)

    async def connect():
        return await loop.create_connection(Reader, *listener.getsockname())

    transport, _ = loop.run_until_complete(connect())
    peer, _ = listener.accept()
    try:

        def tick():
            nonlocal ticks
            ticks += 1
            peer.send(b"x")
            if ticks == 40:
                loop.stop()
            else:
                loop.call_soon(tick)

        loop.call_soon(tick)
        loop.run_forever()
        assert seen, "nothing was read"
        assert seen[0] <= 4, seen
        gaps = [seen[i + 1] - seen[i] for i in range(len(seen) - 1)]
        assert max(gaps) <= 3, seen
        assert len(seen) >= 12, seen
    finally:
        transport.close()
        peer.close()
        listener.close()
        run_briefly(loop, 2)


# --- fd numbers as asyncio's selectors take them -------------------------------------------


@pytest.mark.parametrize("fd", [2**31, 2**63, 2**100], ids=["2**31", "2**63", "2**100"])
@pytest.mark.parametrize("method", ["remove_reader", "remove_writer"])
def test_remove_of_an_fd_too_large_returns_false(loop, method, fd):
    """No fd that large can be registered: asyncio's selector lookup misses it (no range check
    but the sign), so removal finds nothing."""
    assert getattr(loop, method)(fd) is False
    assert getattr(loop, method)(FileLike(fd)) is False


@pytest.mark.parametrize("fd", [2**31, 2**63, 2**100], ids=["2**31", "2**63", "2**100"])
@pytest.mark.parametrize("method", ["add_reader", "add_writer"])
def test_add_of_an_fd_too_large_overflows(loop, method, fd):
    """asyncio's `epoll.register` takes a C int."""
    for fileobj in (fd, FileLike(fd)):
        with pytest.raises(OverflowError, match="^Python int too large to convert to C int$"):
            getattr(loop, method)(fileobj, lambda: None)
    assert loop.remove_reader(fd) is False and loop.remove_writer(fd) is False


@pytest.mark.parametrize("method", ["add_reader", "add_writer", "remove_reader", "remove_writer"])
def test_hugely_negative_fd(loop, method):
    args = (lambda: None,) if method.startswith("add") else ()
    fd = -(2**100)
    with pytest.raises(ValueError, match=f"^Invalid file descriptor: {fd}$"):
        getattr(loop, method)(fd, *args)


def test_fd_too_large_on_a_closed_loop(loop):
    loop.close()
    assert loop.remove_reader(2**63) is False
    with pytest.raises(RuntimeError, match="^Event loop is closed$"):
        loop.add_reader(2**63, lambda: None)


@pytest.mark.parametrize(
    "convert", [str, float, lambda n: str(n).encode()], ids=["str", "float", "bytes"]
)
def test_fileno_converted_by_int(loop, pair, convert):
    """asyncio takes `int(fileobj.fileno())`: a `fileno()` giving "7", 7.0 or b"7" names fd 7."""
    a, b = pair
    calls = []
    loop.add_reader(FileLike(convert(a.fileno())), calls.append, "read")
    b.send(b"x")
    run_briefly(loop)
    assert calls == ["read"]
    assert loop.remove_reader(FileLike(convert(a.fileno()))) is True
    assert loop.remove_reader(a) is False
    assert loop.remove_writer(FileLike(convert(a.fileno()))) is False
    with pytest.raises(ValueError, match="^Invalid file descriptor: -5$"):
        loop.remove_reader(FileLike(convert(-5)))
