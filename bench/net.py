"""Network workloads, server side: echo servers in four styles and an ASGI app.

Each echo style is one coroutine function ``fn(loop, listener)`` that starts serving on
``listener`` (a bound, listening, non-blocking TCP or Unix stream socket; for ``datagram``, a
bound non-blocking UDP socket) with nothing but the public asyncio API, and returns once it
serves. ``_server.py`` runs one of them in a fresh
process on the loop under test; the load comes from ``loadgen`` (bench/loadgen/), and
``netbench.py`` drives both. Every style echoes each chunk (datagram) it reads, as it reads it.

``app`` is the raw ASGI app that ``uvicorn`` serves for the HTTP rows
(``uvicorn net:app --app-dir bench``).
"""

from __future__ import annotations

import asyncio
import socket

READ_SIZE = 65536  # sock_recv / reader.read size: one 64 KiB read at most per call


def _is_tcp(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)


# --- echo servers ---------------------------------------------------------------------------


async def echo_sock(loop, listener):
    """`sock_*` style: an accept loop on `loop.sock_accept`; per connection a task doing
    `await loop.sock_recv(conn, 64 KiB)` then `await loop.sock_sendall(conn, data)` until
    EOF. Accepted TCP sockets get TCP_NODELAY, as transports set it. Returns the accept task."""

    async def serve(conn):
        recv, sendall = loop.sock_recv, loop.sock_sendall
        with conn:
            try:
                while True:
                    data = await recv(conn, READ_SIZE)
                    if not data:
                        return
                    await sendall(conn, data)
            except ConnectionError:
                return

    async def accept_loop():
        tasks = set()
        while True:
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            if _is_tcp(conn):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(serve(conn))
            tasks.add(task)
            task.add_done_callback(_fatal_if_failed)
            task.add_done_callback(tasks.discard)

    return loop.create_task(accept_loop())


async def echo_streams(loop, listener):
    """Streams style: `asyncio.start_server` (`start_unix_server` for Unix sockets) with a
    handler doing `data = await reader.read(64 KiB)`, `writer.write(data)`,
    `await writer.drain()` until EOF. Returns the server."""

    async def handle(reader, writer):
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    if _is_tcp(listener):
        return await asyncio.start_server(handle, sock=listener)
    return await asyncio.start_unix_server(handle, sock=listener)


class EchoProtocol(asyncio.Protocol):
    """`data_received(data)` -> `transport.write(data)`."""

    __slots__ = ("transport",)

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def connection_lost(self, exc):
        self.transport = None


async def echo_protocol(loop, listener):
    """Protocol style: `loop.create_server` (`create_unix_server` for Unix sockets) with a
    Protocol whose `data_received` calls `transport.write(data)`. Returns the server."""
    if _is_tcp(listener):
        return await loop.create_server(EchoProtocol, sock=listener)
    return await loop.create_unix_server(EchoProtocol, sock=listener)


class EchoDatagramProtocol(asyncio.DatagramProtocol):
    """`datagram_received(data, addr)` -> `transport.sendto(data, addr)`."""

    __slots__ = ("transport",)

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)

    def connection_lost(self, exc):
        self.transport = None


async def echo_datagram(loop, sock):
    """Datagram style (UDP): `loop.create_datagram_endpoint(sock=sock)` with a DatagramProtocol
    whose `datagram_received` sends each datagram back to its sender. Returns the transport."""
    transport, _ = await loop.create_datagram_endpoint(EchoDatagramProtocol, sock=sock)
    return transport


STYLES = {
    "sock": echo_sock,
    "streams": echo_streams,
    "protocol": echo_protocol,
    "datagram": echo_datagram,
}
#: the styles that serve a UDP socket (``_server.py --udp``); the others serve streams
DATAGRAM_STYLES = {"datagram"}


def _fatal_if_failed(task: asyncio.Task) -> None:
    """A connection task that failed is a broken measurement: hand it to the loop's exception
    handler (``_server.py`` makes that fatal, so the client sees the failure at once)."""
    if not task.cancelled() and task.exception() is not None:
        task.get_loop().call_exception_handler(
            {"message": "echo connection task failed", "exception": task.exception()}
        )


# --- HTTP -----------------------------------------------------------------------------------

BODY = b"Hello, World!\n"
_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())],
}
_BODY = {"type": "http.response.body", "body": BODY}


async def app(scope, receive, send):
    """Raw ASGI: 200 with a fixed 14-byte text body for every request (lifespan is off)."""
    if scope["type"] == "http":
        await send(_START)
        await send(_BODY)
