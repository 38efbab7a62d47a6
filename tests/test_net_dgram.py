"""UDP transports (``create_datagram_endpoint``): asyncio's behaviour, on both loops. On
ferroloop, IPv4 / IPv6 endpoints get ``_transports.DatagramTransport``, asyncio's transport with
its read and ``sendto`` paths in Rust; these tests hold it to asyncio's results. Loopback and
Unix sockets only; every wait is bounded."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import random
import socket
import sys
import tempfile
from asyncio import selector_events

import pytest
from conftest import run
from test_net_sock import HAS_IPV6

FAMILIES = [
    pytest.param(socket.AF_INET, "127.0.0.1", id="ipv4"),
    pytest.param(
        socket.AF_INET6,
        "::1",
        id="ipv6",
        marks=pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback on this machine"),
    ),
]


class Collector(asyncio.DatagramProtocol):
    """Queues what arrives: ("data", bytes, addr) and ("error", exc)."""

    def __init__(self):
        self.transport = None
        self.queue = asyncio.Queue()
        self.lost = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.queue.put_nowait(("data", data, addr))

    def error_received(self, exc):
        self.queue.put_nowait(("error", exc))

    def connection_lost(self, exc):
        self.lost = exc

    async def get(self, timeout=5):
        return await asyncio.wait_for(self.queue.get(), timeout)


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


@pytest.mark.parametrize("family, host", FAMILIES)
@pytest.mark.parametrize("connected", [True, False], ids=["connected", "unconnected"])
def test_udp_echo_carries_every_datagram_in_order(loop, family, host, connected):
    """3,000 datagrams of random sizes (0 to 60,000 bytes; asyncio before 3.13 does not send
    empty ones, so they are left out there), up to 8 in flight: each comes back whole, in
    order, from the server's address."""
    rng = random.Random(7)
    sizes = [
        rng.choice((1, 2, 100, 1400, 9000, 60000, rng.randrange(1, 60001))) for _ in range(3000)
    ]
    if sys.version_info >= (3, 13):
        sizes[10] = sizes[500] = 0
    datagrams = [rng.randbytes(n) for n in sizes]

    async def main():
        server, _ = await loop.create_datagram_endpoint(Echo, local_addr=(host, 0))
        saddr = server.get_extra_info("sockname")
        if connected:
            client, proto = await loop.create_datagram_endpoint(Collector, remote_addr=saddr[:2])
        else:
            client, proto = await loop.create_datagram_endpoint(Collector, local_addr=(host, 0))
        got = []
        try:
            sent = 0
            while len(got) < len(datagrams):
                # At most 8 in flight and 64 KiB beyond the first: the receivers' socket
                # buffers (about 200 KiB by default) must not overflow, or the kernel drops.
                while sent < len(datagrams) and sent - len(got) < 8:
                    if sent > len(got) and sum(sizes[len(got) : sent + 1]) > 65536:
                        break
                    if connected:
                        client.sendto(datagrams[sent])
                    else:
                        client.sendto(datagrams[sent], saddr)
                    sent += 1
                kind, data, addr = await proto.get()
                assert kind == "data"
                assert addr == saddr
                got.append(data)
        finally:
            client.close()
            server.close()
        return got

    got = run(loop, main())
    assert [len(d) for d in got] == sizes
    assert hashlib.sha256(b"".join(got)).digest() == hashlib.sha256(b"".join(datagrams)).digest()


@pytest.mark.parametrize("family, host", FAMILIES)
def test_datagram_addresses_are_pythons_forms(loop, family, host):
    """The sender's address is what ``socket.recvfrom`` gives (a 4-tuple for IPv6), even after
    ``sendto`` was given that peer as a shorter tuple; ``sendto`` takes either form."""

    async def main():
        a, pa = await loop.create_datagram_endpoint(Collector, local_addr=(host, 0))
        b, pb = await loop.create_datagram_endpoint(Collector, local_addr=(host, 0))
        aaddr = a.get_extra_info("sockname")
        baddr = b.get_extra_info("sockname")
        seen = []
        try:
            for short in (True, False, True):
                b_as_given = (baddr[0], baddr[1]) if short else baddr
                a.sendto(b"ping", b_as_given)
                kind, data, addr = await pb.get()
                assert (kind, data, addr) == ("data", b"ping", aaddr)
                b.sendto(b"pong", addr)
                kind, data, addr = await pa.get()
                seen.append(addr)
                assert (kind, data) == ("data", b"pong")
        finally:
            a.close()
            b.close()
        return seen, baddr

    seen, baddr = run(loop, main())
    assert seen == [baddr] * 3
    assert all(type(x) is tuple and len(x) == (4 if family == socket.AF_INET6 else 2) for x in seen)


def test_sendto_argument_checks_match_asyncio(loop, handler_calls):
    """Bad data and addresses: asyncio's exceptions and messages, raised or (for what the
    socket rejects) passed to the exception handler as a fatal write error."""

    async def main():
        server, _ = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
        saddr = server.get_extra_info("sockname")
        conn, _ = await loop.create_datagram_endpoint(Collector, remote_addr=saddr)
        out = []
        for data in ("text", 12, None, [b"x"]):
            with pytest.raises(TypeError) as info:
                conn.sendto(data)
            out.append(str(info.value))
        with pytest.raises(ValueError) as info:
            conn.sendto(b"x", ("127.0.0.1", saddr[1] + 1 if saddr[1] < 65535 else 1))
        out.append(str(info.value))
        with pytest.raises(TypeError):
            conn.sendto(b"x", saddr, 0)
        with pytest.raises(TypeError):
            conn.sendto(b"x", address=saddr)
        conn.close()
        for addr in (None, ("127.0.0.1", 70000), ("127.0.0.1",)):
            t, _ = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
            t.sendto(b"x", addr)
            out.append(t.is_closing())
            await asyncio.sleep(0)
        server.close()
        await asyncio.sleep(0.01)
        return out

    out = run(loop, main())
    assert out[:4] == [
        "data argument must be a bytes-like object, not 'str'",
        "data argument must be a bytes-like object, not 'int'",
        "data argument must be a bytes-like object, not 'NoneType'",
        "data argument must be a bytes-like object, not 'list'",
    ]
    assert out[4].startswith("Invalid address: must be None or ('127.0.0.1', ")
    assert out[5:] == [True, True, True]
    errors = [(c["message"], type(c["exception"])) for c in handler_calls]
    assert errors == [
        ("Fatal write error on datagram transport", TypeError),
        ("Fatal write error on datagram transport", OverflowError),
        ("Fatal write error on datagram transport", TypeError),
    ]


def test_sendto_takes_any_bytes_like_and_keywords(loop):
    async def main():
        server, sp = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
        saddr = server.get_extra_info("sockname")
        t, _ = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
        t.sendto(bytearray(b"one"), saddr)
        t.sendto(memoryview(b"xtwox")[1:4], saddr)
        t.sendto(data=b"three", addr=saddr)
        t.sendto(b"four", addr=list(saddr) and saddr)
        t.sendto(b"five", ("localhost", saddr[1]))
        got = [(await sp.get())[1] for _ in range(5)]
        t.close()
        server.close()
        return got

    assert run(loop, main()) == [b"one", b"two", b"three", b"four", b"five"]


def test_refused_datagrams_reach_error_received(loop):
    """A connected UDP socket whose peer port is closed: the ICMP error comes back as
    ConnectionRefusedError to ``error_received``, from a later send or from reading."""

    async def main():
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()
        probe.close()
        t, p = await loop.create_datagram_endpoint(Collector, remote_addr=dead)
        kinds = []
        for _ in range(3):
            t.sendto(b"anyone?")
            try:
                item = await p.get(timeout=0.5)
            except asyncio.TimeoutError:
                continue
            kinds.append((item[0], type(item[1])))
        t.close()
        return kinds

    kinds = run(loop, main())
    assert kinds and set(kinds) == {("error", ConnectionRefusedError)}


def test_callback_errors_do_not_stop_the_transport(loop, handler_calls):
    """An exception from ``datagram_received`` goes to the exception handler; the next datagram
    is still delivered."""

    class Flaky(Collector):
        def datagram_received(self, data, addr):
            if data == b"boom":
                raise RuntimeError("boom")
            super().datagram_received(data, addr)

    async def main():
        server, sp = await loop.create_datagram_endpoint(Flaky, local_addr=("127.0.0.1", 0))
        saddr = server.get_extra_info("sockname")
        t, _ = await loop.create_datagram_endpoint(Collector, remote_addr=saddr)
        t.sendto(b"boom")
        t.sendto(b"after")
        item = await sp.get()
        t.close()
        server.close()
        return item[1]

    assert run(loop, main()) == b"after"
    assert [type(c["exception"]) for c in handler_calls] == [RuntimeError]
    assert "_read_ready" in handler_calls[0]["message"]


def test_writes_after_close_are_counted_and_logged(loop, caplog):
    """A connected transport closed: sendto() is dropped silently, and from the fifth on asyncio
    logs 'socket.send() raised exception.'."""

    async def main():
        server, sp = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
        t, p = await loop.create_datagram_endpoint(
            Collector, remote_addr=server.get_extra_info("sockname")
        )
        t.close()
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            for _ in range(7):
                t.sendto(b"late")
        await asyncio.sleep(0.01)
        server.close()
        return p.lost, sp.queue.qsize()

    lost, queued = run(loop, main())
    assert lost is None and queued == 0
    assert [r.getMessage() for r in caplog.records] == ["socket.send() raised exception."] * 3


@pytest.mark.skipif(sys.version_info < (3, 11), reason="datagram pause_reading() is new in 3.11")
def test_pause_reading_holds_datagrams_until_resumed(loop):
    async def main():
        server, sp = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
        t, _ = await loop.create_datagram_endpoint(
            Collector, remote_addr=server.get_extra_info("sockname")
        )
        server.pause_reading()
        for i in range(3):
            t.sendto(b"%d" % i)
        await asyncio.sleep(0.05)
        held = sp.queue.qsize()
        server.resume_reading()
        got = [(await sp.get())[1] for _ in range(3)]
        t.close()
        server.close()
        return held, got

    assert run(loop, main()) == (0, [b"0", b"1", b"2"])


def test_transport_classes(loop, loop_kind):
    """IPv4 endpoints are asyncio's selector datagram transport, or on ferroloop its subclass;
    Unix datagram endpoints are asyncio's own class on both loops, and work."""

    async def main():
        t, _ = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
        with tempfile.TemporaryDirectory() as d:
            a_path, b_path = os.path.join(d, "a"), os.path.join(d, "b")
            ua, pa = await loop.create_datagram_endpoint(
                Collector, family=socket.AF_UNIX, local_addr=a_path
            )
            ub, pb = await loop.create_datagram_endpoint(
                Collector, family=socket.AF_UNIX, local_addr=b_path
            )
            ub.sendto(b"over unix", a_path)
            item = await pa.get()
            classes = type(t), type(ua)
            for x in (t, ua, ub):
                x.close()
            await asyncio.sleep(0)
        return classes, item

    (inet_cls, unix_cls), item = run(loop, main())
    assert item[:2] == ("data", b"over unix") and item[2].endswith("/b")
    assert issubclass(inet_cls, selector_events._SelectorDatagramTransport)
    assert unix_cls is selector_events._SelectorDatagramTransport
    assert (inet_cls is selector_events._SelectorDatagramTransport) == (loop_kind == "asyncio")


@pytest.mark.skipif(
    sys.version_info < (3, 12),
    reason="asyncio 3.10/3.11 make a second transport for the fd (the check is 3.12's)",
)
def test_no_second_transport_for_a_socket_an_open_transport_holds(loop):
    """3.12+: ``create_datagram_endpoint(sock=)`` of a socket an open transport holds is
    asyncio's ``RuntimeError``."""
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))

    async def main():
        t, p = await loop.create_datagram_endpoint(Collector, sock=a)
        with pytest.raises(RuntimeError, match=r"^File descriptor .* is used by transport"):
            await loop.create_datagram_endpoint(Collector, sock=a)
        assert not t.is_closing()
        t.close()
        await asyncio.sleep(0.01)

    run(loop, main())


def test_socket_closed_by_its_caller_is_not_used_through_a_reused_fd(loop):
    """The caller closes the socket it gave to ``create_datagram_endpoint(sock=)`` and a new
    socket gets the same fd number: ``sendto`` fails with EBADF (to ``error_received``), as
    asyncio's does through the closed socket object; nothing leaves through the new socket."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    fd = a.fileno()

    async def main():
        t, p = await loop.create_datagram_endpoint(Collector, sock=a)
        await asyncio.sleep(0.01)
        a.close()
        new = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        assert new.fileno() == fd  # the number is reused
        t.sendto(b"from the closed socket", sink.getsockname())
        item = await p.get()
        t.abort()
        await asyncio.sleep(0)
        return new, item

    new, item = run(loop, main())
    new.close()
    try:
        assert item[0] == "error" and item[1].errno == errno.EBADF
        with pytest.raises(BlockingIOError):
            sink.recv(100)
    finally:
        sink.close()


# --- several datagrams waiting ---------------------------------------------------------------


async def _queued_to(loop, factory, count):
    """A server endpoint with ``count`` datagrams already waiting in its socket."""
    server, proto = await loop.create_datagram_endpoint(factory, local_addr=("127.0.0.1", 0))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(count):
            s.sendto(b"%d" % i, server.get_extra_info("sockname"))
    return server, proto


def test_callbacks_scheduled_by_datagram_received_run_before_the_next_datagram(loop):
    """asyncio reads one datagram per iteration: what ``datagram_received`` schedules with
    ``call_soon`` runs before the next datagram is delivered, even with many waiting."""
    order = []

    class P(Collector):
        def datagram_received(self, data, addr):
            order.append(data.decode())
            loop.call_soon(order.append, "after " + data.decode())

    async def main():
        server, _ = await _queued_to(loop, P, 6)
        for _ in range(500):
            if len(order) == 12:
                break
            await asyncio.sleep(0.002)
        server.close()

    run(loop, main())
    assert order == [x for i in range(6) for x in (str(i), f"after {i}")]


def test_closing_in_datagram_received_stops_delivery(loop):
    async def main():
        class P(Collector):
            def datagram_received(self, data, addr):
                super().datagram_received(data, addr)
                self.transport.close()

        server, proto = await _queued_to(loop, P, 5)
        await asyncio.sleep(0.05)
        return proto.queue.qsize()

    assert run(loop, main()) == 1


@pytest.mark.skipif(sys.version_info < (3, 11), reason="datagram pause_reading() is new in 3.11")
def test_pausing_in_datagram_received_stops_delivery_at_once(loop):
    async def main():
        class P(Collector):
            def datagram_received(self, data, addr):
                super().datagram_received(data, addr)
                self.transport.pause_reading()

        server, proto = await _queued_to(loop, P, 5)
        await asyncio.sleep(0.05)
        held = proto.queue.qsize()
        server.resume_reading()
        await asyncio.sleep(0.05)
        after = proto.queue.qsize()
        server.close()
        return held, after

    assert run(loop, main()) == (1, 2)


# --- when a datagram from this same loop is seen -------------------------------------------


class _Notifier(asyncio.DatagramProtocol):
    """Answers a request at once, then sends a second datagram `delay` iterations later (a
    CoAP server's notification after its answer)."""

    def __init__(self, delay):
        self.delay = delay

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        loop = asyncio.get_running_loop()
        self.transport.sendto(b"answer", addr)

        def later(n):
            if n:
                loop.call_soon(later, n - 1)
            else:
                self.transport.sendto(b"notification", addr)

        later(self.delay)


class _Watcher(asyncio.DatagramProtocol):
    def __init__(self):
        self.got = []
        self.answered = asyncio.get_running_loop().create_future()

    def datagram_received(self, data, addr):
        self.got.append(data)
        if not self.answered.done():
            self.answered.set_result(None)


async def _raw_endpoint(loop, protocol):
    """A datagram endpoint made of a raw socket and add_reader: aiocoap's own transport sends
    with `sock.sendmsg` and reads with `loop.add_reader`, which the loop cannot see into."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))

    class Raw:
        def sendto(self, data, addr):
            sock.sendto(data, addr)

        def close(self):
            loop.remove_reader(sock)
            sock.close()

    def readable():
        try:
            data, addr = sock.recvfrom(100)
        except BlockingIOError:
            return
        protocol.datagram_received(data, addr)

    transport = Raw()
    protocol.connection_made(transport)
    loop.add_reader(sock, readable)
    return transport, sock.getsockname()


@pytest.mark.parametrize("how", ["endpoints", "add_reader"])
@pytest.mark.parametrize("delay", [0, 1, 2, 3])
def test_a_datagram_sent_within_this_loop_is_seen_when_asyncio_sees_it(loop, how, delay):
    """aiocoap's test_late_subscription_eventual_consistency: the client takes the answer,
    yields once more, and expects the notification sent up to two iterations after the answer
    (asyncio's loop polls in every iteration). ferroloop skips polls only where no peer in the
    loop can tell (DESIGN.md), so the iteration a datagram is seen in is asyncio's."""

    async def main():
        if how == "endpoints":
            st, _ = await loop.create_datagram_endpoint(
                lambda: _Notifier(delay), local_addr=("127.0.0.1", 0)
            )
            ct, client = await loop.create_datagram_endpoint(
                _Watcher, remote_addr=st.get_extra_info("sockname")
            )
            ct.sendto(b"request")
        else:
            st, server_addr = await _raw_endpoint(loop, _Notifier(delay))
            client = _Watcher()
            ct, _ = await _raw_endpoint(loop, client)
            ct.sendto(b"request", server_addr)
        await client.answered
        one_more = loop.create_future()
        loop.call_soon(one_more.set_result, None)
        await one_more
        seen = b"notification" in client.got
        ct.close()
        st.close()
        return seen

    assert run(loop, main()) is (delay <= 2)
