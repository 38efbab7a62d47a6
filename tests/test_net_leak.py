"""No leaks over many connect / echo / close cycles: the process's open fds come back to the
same count, the loop's registrations and transports are gone, Python objects do not pile
up, and RSS stays roughly flat. On both loops (asyncio's numbers are the reference).

``CYCLES`` is sized for CI (a few seconds per case on a debug build). The issue asks for
100k cycles; run them by hand with, e.g.::

    FERROLOOP_LEAK_CYCLES=100000 python -m pytest -s tests/test_net_leak.py -k tcp

(``-s`` shows the figures). Over TCP, closed client ports sit in TIME_WAIT; 100k cycles
need the kernel to reuse them for loopback (``net.ipv4.tcp_tw_reuse`` 1 or 2).
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import socket
import tempfile
import time

import pytest
from conftest import rss

CYCLES = int(os.environ.get("FERROLOOP_LEAK_CYCLES", "5000"))
WARMUP = max(200, CYCLES // 10)
# Allowed RSS growth over the measured cycles: allocator noise, not a per-cycle leak
# (a 200-byte leak per cycle would pass at 5000 cycles; the object count and fd checks are
# exact, and the 100k manual run shows the trend).
RSS_SLACK = 8 * 1024 * 1024 + 64 * CYCLES
# Python objects tracked by the GC may grow by this much (caches, interned strings...).
OBJECT_SLACK = 200


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class EchoServer(asyncio.Protocol):
    open = 0

    def connection_made(self, transport):
        EchoServer.open += 1
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def connection_lost(self, exc):
        EchoServer.open -= 1


class Client(asyncio.Protocol):
    def __init__(self, done):
        self.done = done

    def connection_made(self, transport):
        self.transport = transport
        transport.write(b"ping")

    def data_received(self, data):
        assert data == b"ping"
        self.transport.close()

    def connection_lost(self, exc):
        self.done.set_result(exc)


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_connect_echo_close_cycles_do_not_leak(loop, family):
    d = tempfile.mkdtemp(prefix="fl-", dir="/tmp")
    EchoServer.open = 0

    async def start():
        if family == "unix":
            path = os.path.join(d, "s.sock")
            srv = await loop.create_unix_server(EchoServer, path)

            async def connect(factory):
                return await loop.create_unix_connection(factory, path)

        else:
            srv = await loop.create_server(EchoServer, "127.0.0.1", 0)
            port = srv.sockets[0].getsockname()[1]

            async def connect(factory):
                return await loop.create_connection(factory, "127.0.0.1", port)

        return srv, connect

    async def cycles(connect, n):
        for _ in range(n):
            done = loop.create_future()
            await connect(lambda done=done: Client(done))
            assert await done is None
        while EchoServer.open:  # the server side closes on the client's EOF
            await asyncio.sleep(0.001)

    def measure():
        gc.collect()
        return fd_count(), rss(), len(gc.get_objects())

    try:
        srv, connect = loop.run_until_complete(start())
        registered = len(loop._selector.get_map())
        loop.run_until_complete(asyncio.wait_for(cycles(connect, WARMUP), 60))
        fds0, rss0, objs0 = measure()
        t0 = time.monotonic()
        loop.run_until_complete(asyncio.wait_for(cycles(connect, CYCLES), 600))
        elapsed = time.monotonic() - t0
        fds1, rss1, objs1 = measure()
        print(
            f"\n[{type(loop).__module__} {family}] {CYCLES} cycles in {elapsed:.1f}s "
            f"({CYCLES / elapsed:.0f}/s): fds {fds0} -> {fds1}, "
            f"RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB ({(rss1 - rss0) / 2**10:+.0f} KiB), "
            f"GC objects {objs0} -> {objs1}"
        )
        assert fds1 == fds0
        assert len(loop._selector.get_map()) == registered  # listener (+ asyncio's self-pipe)
        assert len(loop._transports) == 0
        assert objs1 - objs0 < OBJECT_SLACK
        assert rss1 - rss0 < RSS_SLACK
        srv.close()
        loop.run_until_complete(srv.wait_closed())
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_fd_count_sees_sockets():
    """The fd measure itself works here (``/proc/self/fd`` is per process)."""
    before = fd_count()
    a, b = socket.socketpair()
    try:
        assert fd_count() == before + 2
    finally:
        a.close()
        b.close()
    assert fd_count() == before
