"""aiohttp 3.14 (server and client together) on ferroloop, with asyncio's own loop as the spec.

The README says aiohttp runs unchanged on ferroloop. These tests back that claim: each one
starts an aiohttp ``web.Application`` (``web.AppRunner`` with a ``web.TCPSite`` on 127.0.0.1,
a ``web.UnixSite`` in the test's temporary directory, or a TLS ``web.TCPSite``) and talks to it
with an ``aiohttp.ClientSession``, server and client in the same loop. Every test runs on both
loop kinds through the ``loop`` fixture and must pass on both: a test that passes on
``[asyncio]`` and fails on ``[ferroloop]`` is a ferroloop bug.

What is checked: keep-alive connection reuse, bodies of a few MiB echoed byte for byte,
chunked uploads and streamed (chunked) responses read piece by piece, backpressure from a
client that stops reading, files served by ``web.FileResponse`` (which uses
``loop.sendfile``), TLS (certificates from a ``trustme`` CA, client certificates, verification
failures and how debug mode reports them), WebSockets (large messages, close handshakes from
either side, heartbeats), client timeouts and cancellation as the server's handler sees them,
200 concurrent requests through a connector limited to 20 connections, and server shutdown
with connections open. Only loopback addresses and Unix sockets are used; every wait is
bounded. Besides the loop's exception handler (checked by the ``loop`` fixture), no log record
at WARNING or above may be emitted (aiohttp logs handler errors there).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import random
import socket
import ssl
import sys
import time

import aiohttp
import ferroloop
import pytest
import trustme
from aiohttp import web
from aiohttp.client_exceptions import UnixClientConnectorError
from conftest import run

MIB = 1024 * 1024

# The ways a test can reach the server: plain TCP, a Unix socket, TLS over TCP.
FAMILIES = ["tcp", "unix", "tls"]


def payload(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def wait_until(predicate, timeout: float = 3.0, what: str = "condition"):
    """Poll ``predicate`` every few milliseconds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.fixture(autouse=True)
def no_warning_logs(caplog):
    """aiohttp reports handler errors and protocol trouble through logging, not through the
    loop's exception handler: fail the test if anything at WARNING or above was logged."""
    yield
    bad = [r for r in caplog.get_records("call") if r.levelno >= logging.WARNING]
    bad += [r for r in caplog.get_records("teardown") if r.levelno >= logging.WARNING]
    assert not bad, "unexpected log records: " + "; ".join(
        f"{r.name} {r.levelname}: {r.getMessage()}" for r in bad
    )


# --- TLS material --------------------------------------------------------------------------


class Tls:
    """A trustme CA with a server certificate (127.0.0.1 and localhost) and a client one."""

    def __init__(self):
        self.ca = trustme.CA()
        self.server_cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.client_cert = self.ca.issue_cert("client@example.test")

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(ctx)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(ctx)
        return ctx

    def client_context(self, *, with_client_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        if with_client_cert:
            self.client_cert.configure_cert(ctx)
        return ctx


@pytest.fixture(scope="module")
def tls():
    return Tls()


# --- serving an app on one endpoint ----------------------------------------------------------


class Served:
    """A running ``web.AppRunner``; ``stop()`` runs ``runner.cleanup()`` once."""

    def __init__(self, runner: web.AppRunner):
        self.runner = runner
        self.running = True

    async def stop(self):
        if self.running:
            self.running = False
            await self.runner.cleanup()


class Endpoint:
    """Where a test's server listens (``family`` is one of FAMILIES) and how a client reaches
    it. ``serve`` may be entered again after a stop; it reuses the same port or path."""

    def __init__(self, family: str, tmp_path, tls: Tls):
        self.family = family
        self.path = str(tmp_path / "aiohttp.sock")
        self.port = 0
        self.base = ""
        self.server_ctx = tls.server_context() if family == "tls" else None
        self.client_ctx = tls.client_context() if family == "tls" else None

    @contextlib.asynccontextmanager
    async def serve(self, app: web.Application, **runner_kwargs):
        runner = web.AppRunner(app, **runner_kwargs)
        await runner.setup()
        served = Served(runner)
        try:
            if self.family == "unix":
                site = web.UnixSite(runner, self.path)
                await site.start()
                self.base = "http://localhost"
            else:
                site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=self.server_ctx)
                await site.start()
                host, self.port = runner.addresses[0][:2]
                assert host == "127.0.0.1"
                scheme = "https" if self.family == "tls" else "http"
                self.base = f"{scheme}://127.0.0.1:{self.port}"
            yield served
        finally:
            await served.stop()

    def connector(self, **kwargs) -> aiohttp.BaseConnector:
        if self.family == "unix":
            return aiohttp.UnixConnector(path=self.path, **kwargs)
        if self.family == "tls":
            kwargs.setdefault("ssl", self.client_ctx)
        return aiohttp.TCPConnector(**kwargs)

    def session(self, *, total: float = 10, **connector_kwargs) -> aiohttp.ClientSession:
        """A session for this endpoint (call after ``serve`` started), with paths relative to
        the server's base URL, a total timeout per request, and a ``ConnectionCounter``
        (``session.counter``)."""
        counter = ConnectionCounter()
        session = aiohttp.ClientSession(
            base_url=self.base,
            connector=self.connector(**connector_kwargs),
            timeout=aiohttp.ClientTimeout(total=total),
            trace_configs=[counter.config],
        )
        session.counter = counter
        return session


class ConnectionCounter:
    """Counts, through aiohttp's tracing signals, the connections a client session opened and
    the times it reused a pooled one."""

    def __init__(self):
        self.created = 0
        self.reused = 0
        self.config = aiohttp.TraceConfig()
        self.config.on_connection_create_end.append(self._on_create)
        self.config.on_connection_reuseconn.append(self._on_reuse)

    async def _on_create(self, session, ctx, params):
        self.created += 1

    async def _on_reuse(self, session, ctx, params):
        self.reused += 1


def pooled_connections(session: aiohttp.ClientSession) -> list:
    """The protocols of the idle connections in the session's pool. aiohttp has no public way
    to watch a pooled connection get closed by the server, so this reads the connector's
    private pool (aiohttp is pinned to 3.14.5 in requirements.txt)."""
    return [proto for conns in session.connector._conns.values() for proto, _ in conns]


async def wait_pool_disconnected(session: aiohttp.ClientSession, count: int = 1):
    """Wait until the session's pool holds ``count`` connections, all seen closed."""
    pooled = pooled_connections(session)
    assert len(pooled) == count
    await wait_until(
        lambda: not any(p.is_connected() for p in pooled), 3, "the client to see the close"
    )


@pytest.fixture
def endpoint(request, tmp_path, tls):
    return Endpoint(request.param, tmp_path, tls)


# asyncio 3.10's SSL transport (the sslproto that 3.11 rewrote) is left unclosed when a server
# cleanup aborts a TLS connection, and warns from __del__: on asyncio's loop as on ferroloop,
# which runs asyncio's TLS code.
old_sslproto_leaks = (
    pytest.mark.filterwarnings(
        "ignore:unclosed transport <asyncio.sslproto._SSLProtocolTransport:ResourceWarning"
    )
    if sys.version_info < (3, 11)
    else lambda func: func
)


def on_each_family(func):
    return pytest.mark.parametrize("endpoint", FAMILIES, indirect=True)(func)


def tcp_only(func):
    return pytest.mark.parametrize("endpoint", ["tcp"], indirect=True)(func)


# --- the application -------------------------------------------------------------------------


class State:
    """What the server's handlers record, for the test to check. Created inside the loop."""

    def __init__(self):
        self.transports = []  # the transport of each request, in order
        self.loop_types = []
        self.first_chunk_seen = asyncio.Event()
        self.started = asyncio.Event()
        self.outcome = asyncio.get_running_loop().create_future()
        self.in_flight = 0
        self.peak = 0
        self.full = asyncio.Event()
        self.ws_done = asyncio.Event()
        self.ws_close_code = None
        self.ws_pings = 0
        self.file_path = None
        self.written = 0
        self.max_buffered = 0
        self.requests = []  # what each /tls request saw of its TLS connection (a dict)


STREAM_CHUNK = 4096
STREAM_CHUNKS = 256  # 1 MiB in all


FIREHOSE_PIECE = 64 * 1024
FIREHOSE_PIECES = 512  # 32 MiB: more than the kernel's socket buffers hold


def stream_piece(i: int) -> bytes:
    return bytes([i % 251]) * STREAM_CHUNK


def make_app(state: State, **app_kwargs) -> web.Application:
    app = web.Application(client_max_size=16 * MIB, **app_kwargs)
    routes = web.RouteTableDef()

    @routes.get("/info")
    async def info(request):
        state.transports.append(request.transport)
        state.loop_types.append(type(asyncio.get_running_loop()))
        return web.json_response({"n": int(request.query.get("n", 0)), "method": request.method})

    @routes.post("/echo")
    async def echo(request):
        state.transports.append(request.transport)
        body = await request.read()
        return web.Response(
            body=body, content_type=request.content_type, headers={"X-Sha256": sha(body)}
        )

    @routes.post("/digest")
    async def digest(request):
        # Reads the request body piece by piece, as it arrives.
        h = hashlib.sha256()
        size = pieces = 0
        async for piece in request.content.iter_any():
            h.update(piece)
            size += len(piece)
            pieces += 1
        return web.json_response(
            {
                "sha": h.hexdigest(),
                "size": size,
                "pieces": pieces,
                "te": request.headers.get("Transfer-Encoding"),
            }
        )

    @routes.get("/stream")
    async def stream(request):
        resp = web.StreamResponse()
        resp.content_type = "application/octet-stream"
        await resp.prepare(request)
        await resp.write(stream_piece(0))
        # The rest is only written once the client has seen the first piece: the response
        # is really streamed, not collected and sent at the end.
        await asyncio.wait_for(state.first_chunk_seen.wait(), 5)
        for i in range(1, STREAM_CHUNKS):
            await resp.write(stream_piece(i))
        await resp.write_eof()
        return resp

    @routes.get("/firehose")
    async def firehose(request):
        # Writes as fast as the client lets it, awaiting each write (which waits while the
        # transport's buffer is over its high-water mark).
        resp = web.StreamResponse()
        await resp.prepare(request)
        piece = bytes(FIREHOSE_PIECE)
        for _ in range(FIREHOSE_PIECES):
            await resp.write(piece)
            state.written += len(piece)
            state.max_buffered = max(state.max_buffered, request.transport.get_write_buffer_size())
        await resp.write_eof()
        return resp

    @routes.get("/file")
    async def file(request):
        return web.FileResponse(state.file_path)

    @routes.get("/tls")
    async def tls_info(request):
        transport = request.transport
        state.requests.append(
            {
                "secure": request.secure,
                "scheme": request.scheme,
                "peercert": transport.get_extra_info("peercert"),
                "sslcontext": transport.get_extra_info("sslcontext"),
                "ssl_object": transport.get_extra_info("ssl_object"),
            }
        )
        return web.Response(text="secret")

    @routes.get("/hang")
    async def hang(request):
        # Waits until the client goes away (or the handler is cancelled), then records which.
        state.started.set()
        try:
            await wait_until(lambda: request.transport is None, 5, "the client to disconnect")
        except asyncio.CancelledError:
            state.outcome.set_result("cancelled")
            raise
        state.outcome.set_result("saw disconnect")
        return web.Response(text="too late")

    @routes.route("*", "/slow")
    async def slow(request):
        state.started.set()
        try:
            await asyncio.sleep(float(request.query["t"]))
        except asyncio.CancelledError:
            state.outcome.set_result("cancelled")
            raise
        state.outcome.set_result("finished")
        return web.Response(text="slow done")

    @routes.get("/concurrent")
    async def concurrent(request):
        state.transports.append(request.transport)
        state.in_flight += 1
        state.peak = max(state.peak, state.in_flight)
        if state.in_flight >= 20:
            state.full.set()
        try:
            # The first 20 requests are all held here until 20 are in flight at once.
            await asyncio.wait_for(state.full.wait(), 5)
            await asyncio.sleep(0.001)
        finally:
            state.in_flight -= 1
        return web.Response(text=f"answer {request.query['i']}")

    @routes.get("/ws")
    async def ws_echo(request):
        ws = web.WebSocketResponse(max_msg_size=4 * MIB)
        await ws.prepare(request)
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    if msg.data == "close-me":
                        await ws.close(code=4001, message=b"server says bye")
                    else:
                        await ws.send_str("echo:" + msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data[::-1])
        finally:
            state.ws_close_code = ws.close_code
            state.ws_done.set()
        return ws

    @routes.get("/ws-ping")
    async def ws_ping(request):
        # No automatic pong: the handler counts the client's heartbeat pings and answers.
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.PING:
                state.ws_pings += 1
                await ws.pong(msg.data)
            elif msg.type == aiohttp.WSMsgType.CLOSE:
                await ws.close()
        state.ws_close_code = ws.close_code
        state.ws_done.set()
        return ws

    app.add_routes(routes)
    return app


# --- the loop under test ---------------------------------------------------------------------


@tcp_only
def test_server_and_client_run_on_the_loop_under_test(loop, loop_kind, endpoint):
    async def main():
        running = asyncio.get_running_loop()
        assert running is loop
        assert isinstance(running, ferroloop.Loop) == (loop_kind == "ferroloop")
        state = State()
        async with endpoint.serve(make_app(state)), endpoint.session() as session:
            async with session.get("/info") as resp:
                assert resp.status == 200
                assert await resp.json() == {"n": 0, "method": "GET"}
        assert state.loop_types == [type(loop)]
        assert issubclass(state.loop_types[0], ferroloop.Loop) == (loop_kind == "ferroloop")

    run(loop, main())


# --- HTTP round trips ------------------------------------------------------------------------


@on_each_family
def test_get_and_post_reuse_one_keepalive_connection(loop, endpoint):
    async def main():
        state = State()
        async with endpoint.serve(make_app(state)), endpoint.session() as session:
            for n in range(5):
                async with session.get("/info", params={"n": n}) as resp:
                    assert resp.status == 200
                    assert await resp.json() == {"n": n, "method": "GET"}
                body = f"body {n}".encode() * (n + 1)
                async with session.post("/echo", data=body) as resp:
                    assert resp.status == 200
                    assert await resp.read() == body
                    assert resp.headers["X-Sha256"] == sha(body)
                async with session.post("/echo", json={"n": n}) as resp:
                    assert await resp.json() == {"n": n}
            assert resp.headers.get("Connection", "keep-alive").lower() == "keep-alive"
            # One connection carried all 15 requests, on both ends.
            assert (session.counter.created, session.counter.reused) == (1, 14)
            [proto] = pooled_connections(session)
            client_transport = proto.transport
            assert len(state.transports) == 15
            assert all(t is state.transports[0] for t in state.transports)
            if endpoint.family != "unix":
                peer = state.transports[0].get_extra_info("peername")
                assert peer == client_transport.get_extra_info("sockname")
                assert peer[0] == "127.0.0.1"

    run(loop, main())


@on_each_family
def test_large_body_echoed_byte_exact(loop, endpoint):
    async def main():
        state = State()
        data = payload(4 * MIB + 12345)
        async with endpoint.serve(make_app(state)), endpoint.session() as session:
            # A BytesIO, as aiohttp asks for large bodies (raw bytes that large make it warn).
            async with session.post("/echo", data=io.BytesIO(data)) as resp:
                assert resp.status == 200
                assert resp.headers["X-Sha256"] == sha(data)
                assert int(resp.headers["Content-Length"]) == len(data)
                got = await resp.read()
            assert len(got) == len(data)
            assert sha(got) == sha(data)
            # Again with "Expect: 100-continue", on the same connection.
            reverse = io.BytesIO(data[::-1])
            async with session.post("/echo", data=reverse, expect100=True) as resp:
                assert resp.status == 200
                assert sha(await resp.read()) == sha(data[::-1])
        assert len(state.transports) == 2
        assert state.transports[0] is state.transports[1]

    run(loop, main())


@on_each_family
def test_chunked_upload_read_incrementally_by_the_server(loop, endpoint):
    async def main():
        state = State()
        data = payload(3 * MIB, seed=2)
        piece = 64 * 1024

        async def body():
            for i in range(0, len(data), piece):
                yield data[i : i + piece]
                if i % (8 * piece) == 0:
                    await asyncio.sleep(0)

        async with endpoint.serve(make_app(state)), endpoint.session() as session:
            async with session.post("/digest", data=body()) as resp:
                assert resp.status == 200
                result = await resp.json()
        assert result["sha"] == sha(data)
        assert result["size"] == len(data)
        assert result["te"] == "chunked"
        assert result["pieces"] > 1  # the handler saw the body arrive in parts

    run(loop, main())


@on_each_family
def test_streamed_response_read_with_iter_chunked(loop, endpoint):
    async def main():
        state = State()
        expected = b"".join(stream_piece(i) for i in range(STREAM_CHUNKS))
        received = bytearray()
        pieces = 0
        async with endpoint.serve(make_app(state)), endpoint.session() as session:
            async with session.get("/stream") as resp:
                assert resp.status == 200
                assert resp.headers["Transfer-Encoding"] == "chunked"
                assert "Content-Length" not in resp.headers
                async for chunk in resp.content.iter_chunked(STREAM_CHUNK):
                    assert 0 < len(chunk) <= STREAM_CHUNK
                    received += chunk
                    pieces += 1
                    if len(received) >= STREAM_CHUNK:
                        # The server holds the rest back until this point.
                        state.first_chunk_seen.set()
            # The session can still be used after a streamed response.
            async with session.get("/info") as resp:
                assert (await resp.json())["method"] == "GET"
        assert len(received) == len(expected)
        assert sha(bytes(received)) == sha(expected)
        assert pieces >= STREAM_CHUNKS

    run(loop, main())


@on_each_family
def test_slow_reader_pauses_the_writer(loop, endpoint):
    """Backpressure end to end: the client stops reading, its transport stops reading the
    socket, the kernel buffers fill, and the server's writes wait instead of piling up in
    its transport's buffer. Then the client reads everything."""

    async def main():
        state = State()
        total = FIREHOSE_PIECE * FIREHOSE_PIECES
        async with endpoint.serve(make_app(state)), endpoint.session() as session:
            async with session.get("/firehose") as resp:
                assert resp.status == 200
                got = len(await resp.content.readexactly(FIREHOSE_PIECE))
                # Wait until the server makes no progress for a while.
                samples = [-1]
                deadline = time.monotonic() + 5
                while samples[-3:] != [state.written] * 3:
                    assert time.monotonic() < deadline, "the server never stopped writing"
                    samples.append(state.written)
                    await asyncio.sleep(0.02)
                assert state.written < total
                assert state.max_buffered < MIB
                while chunk := await resp.content.read(256 * 1024):
                    assert not any(chunk)
                    got += len(chunk)
        assert got == total
        assert state.written == total
        assert state.max_buffered < MIB

    run(loop, main())


@on_each_family
def test_file_response_whole_and_range(loop, endpoint, tmp_path):
    async def main():
        state = State()
        data = payload(3 * MIB + 777, seed=3)
        path = tmp_path / "data.bin"
        path.write_bytes(data)
        state.file_path = path
        async with endpoint.serve(make_app(state)), endpoint.session() as session:
            async with session.get("/file") as resp:
                assert resp.status == 200
                assert int(resp.headers["Content-Length"]) == len(data)
                assert sha(await resp.read()) == sha(data)
            async with session.get("/file", headers={"Range": "bytes=1000-200999"}) as resp:
                assert resp.status == 206
                assert resp.headers["Content-Range"] == f"bytes 1000-200999/{len(data)}"
                assert await resp.read() == data[1000:201000]
            async with session.get("/file", headers={"Range": f"bytes=-{5000}"}) as resp:
                assert resp.status == 206
                assert await resp.read() == data[-5000:]

    run(loop, main())


@tcp_only
def test_idle_connection_closed_by_keepalive_timeout_then_reconnect(loop, endpoint):
    async def main():
        state = State()
        async with endpoint.serve(make_app(state), keepalive_timeout=0.2):
            async with endpoint.session() as session:
                async with session.get("/info") as resp:
                    assert (await resp.json())["n"] == 0
                idle_since = time.monotonic()
                # The server closes the idle connection after its keep-alive timeout.
                await wait_pool_disconnected(session)
                assert time.monotonic() - idle_since >= 0.15
                assert state.transports[0].is_closing()
                async with session.get("/info", params={"n": 1}) as resp:
                    assert (await resp.json())["n"] == 1
                assert (session.counter.created, session.counter.reused) == (2, 0)
        assert len(state.transports) == 2
        assert state.transports[0] is not state.transports[1]
        assert state.transports[0].is_closing()

    run(loop, main())


# --- TLS -------------------------------------------------------------------------------------


def test_tls_with_client_certificate(loop, tls):
    async def main():
        state = State()
        server_ctx = tls.server_context(require_client_cert=True)
        app = make_app(state)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
            await site.start()
            port = runner.addresses[0][1]
            client_ctx = tls.client_context(with_client_cert=True)
            # "localhost", resolved through the loop's getaddrinfo (IPv4 only: the server
            # listens on 127.0.0.1).
            connector = aiohttp.TCPConnector(ssl=client_ctx, family=socket.AF_INET)
            async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=10)
            ) as session:
                seen = set()
                for url in (f"https://localhost:{port}/tls", f"https://127.0.0.1:{port}/tls"):
                    async with session.get(url) as resp:
                        assert resp.status == 200
                        assert await resp.text() == "secret"
                    # Each host name has its own connection; take the new one from the pool.
                    [proto] = [p for p in pooled_connections(session) if id(p) not in seen]
                    seen.add(id(proto))
                    transport = proto.transport
                    peercert = transport.get_extra_info("peercert")
                    ssl_object = transport.get_extra_info("ssl_object")
                    cipher = transport.get_extra_info("cipher")
                    assert ("DNS", "localhost") in peercert["subjectAltName"]
                    assert ("IP Address", "127.0.0.1") in peercert["subjectAltName"]
                    assert isinstance(ssl_object, ssl.SSLObject)
                    assert ssl_object.version().startswith("TLS")
                    assert ssl_object.getpeercert() == peercert
                    assert cipher == ssl_object.cipher()
                    assert transport.get_extra_info("sslcontext") is client_ctx
        finally:
            await runner.cleanup()
        assert len(state.requests) == 2
        for info in state.requests:
            assert info["secure"] is True
            assert info["scheme"] == "https"
            assert info["sslcontext"] is server_ctx
            assert isinstance(info["ssl_object"], ssl.SSLObject)
            # The server sees the client's certificate.
            assert ("email", "client@example.test") in info["peercert"]["subjectAltName"]

    run(loop, main())


@pytest.mark.parametrize("problem", ["unknown_ca", "wrong_hostname"])
def test_tls_verification_failure(loop, tls, tmp_path, problem):
    endpoint = Endpoint("tls", tmp_path, tls)

    async def main():
        state = State()
        async with endpoint.serve(make_app(state)):
            if problem == "unknown_ca":
                # The default context trusts the system's CAs, not the test CA.
                connector = aiohttp.TCPConnector(ssl=ssl.create_default_context())
                kwargs = {}
                verify_code = 20  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
            else:
                connector = endpoint.connector()
                kwargs = {"server_hostname": "not-this-host.example"}
                verify_code = 62  # X509_V_ERR_HOSTNAME_MISMATCH
            async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=10)
            ) as session:
                with pytest.raises(aiohttp.ClientConnectorCertificateError) as info:
                    await session.get(endpoint.base + "/tls", **kwargs)
            assert type(info.value) is aiohttp.ClientConnectorCertificateError
            assert type(info.value.certificate_error) is ssl.SSLCertVerificationError
            assert info.value.certificate_error.verify_code == verify_code
            # The server is unharmed: a client that trusts the CA gets through.
            async with endpoint.session() as session:
                async with session.get("/tls") as resp:
                    assert await resp.text() == "secret"
        assert len(state.requests) == 1

    run(loop, main())


def test_tls_handshake_failure_reported_in_debug_mode(loop, handler_calls, tls, tmp_path):
    """In debug mode asyncio's loop passes a failed incoming TLS handshake to the exception
    handler (without debug mode it stays silent, as the test above checks)."""
    endpoint = Endpoint("tls", tmp_path, tls)
    loop.set_debug(True)
    loop.slow_callback_duration = 10  # no "Executing ... took" warnings on a busy machine

    async def main():
        async with endpoint.serve(make_app(State())):
            connector = aiohttp.TCPConnector(ssl=ssl.create_default_context())
            async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=10)
            ) as session:
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await session.get(endpoint.base + "/tls")
            await wait_until(lambda: handler_calls, 3, "the exception handler to be called")
            await asyncio.sleep(0.05)  # no further reports follow

    run(loop, main())
    reports = [(c["message"], type(c.get("exception"))) for c in handler_calls]
    assert reports == [
        ("Error on transport creation for incoming connection", ConnectionResetError)
    ]


# --- WebSockets ------------------------------------------------------------------------------


@on_each_family
def test_websocket_echo_and_close_from_client(loop, endpoint):
    async def main():
        state = State()
        big = payload(MIB + 3, seed=4)
        async with endpoint.serve(make_app(state)), endpoint.session() as session:
            async with session.ws_connect("/ws", max_msg_size=4 * MIB) as ws:
                await ws.send_str("hello")
                assert await ws.receive_str(timeout=5) == "echo:hello"
                await ws.send_bytes(b"\x00\x01\x02")
                assert await ws.receive_bytes(timeout=5) == b"\x02\x01\x00"
                await ws.send_bytes(big)
                got = await ws.receive_bytes(timeout=5)
                assert len(got) == len(big)
                assert sha(got) == sha(big[::-1])
                await ws.send_str("é" * 1000)
                assert await ws.receive_str(timeout=5) == "echo:" + "é" * 1000
                assert await ws.close() is True
                assert ws.closed
                assert ws.close_code == aiohttp.WSCloseCode.OK
            await asyncio.wait_for(state.ws_done.wait(), 5)
        assert state.ws_close_code == aiohttp.WSCloseCode.OK

    run(loop, main())


@on_each_family
def test_websocket_close_from_server(loop, endpoint):
    async def main():
        state = State()
        async with endpoint.serve(make_app(state)), endpoint.session() as session:
            async with session.ws_connect("/ws") as ws:
                await ws.send_str("ping")
                assert await ws.receive_str(timeout=5) == "echo:ping"
                await ws.send_str("close-me")
                msg = await ws.receive(timeout=5)
                assert msg.type == aiohttp.WSMsgType.CLOSE
                assert msg.data == 4001
                assert msg.extra == "server says bye"
                assert ws.closed
                assert ws.close_code == 4001
                # Once closed, receive() reports it again without waiting.
                msg = await ws.receive(timeout=5)
                assert msg.type == aiohttp.WSMsgType.CLOSED
            await asyncio.wait_for(state.ws_done.wait(), 5)
        # The server's close_code is the one in the client's answering close frame: aiohttp's
        # client answers with 1000.
        assert state.ws_close_code == aiohttp.WSCloseCode.OK

    run(loop, main())


@tcp_only
def test_websocket_heartbeat_pings_answered(loop, endpoint):
    async def main():
        state = State()
        async with endpoint.serve(make_app(state)), endpoint.session() as session:
            async with session.ws_connect("/ws-ping", heartbeat=0.05, autoping=True) as ws:
                # The client pings every 0.05 s from loop timers; a missing pong would make it
                # close the connection with an error.
                await wait_until(lambda: state.ws_pings >= 4, 3, "four heartbeat pings")
                assert not ws.closed
                assert ws.exception() is None
                await ws.close()
                assert ws.close_code == aiohttp.WSCloseCode.OK
            await asyncio.wait_for(state.ws_done.wait(), 5)
        assert state.ws_close_code == aiohttp.WSCloseCode.OK

    run(loop, main())


# --- timeouts and cancellation ---------------------------------------------------------------


@pytest.mark.parametrize("handler_cancellation", [True, False], ids=["cancel", "nocancel"])
@pytest.mark.parametrize("how", ["total_timeout", "sock_read_timeout", "task_cancel"])
@pytest.mark.parametrize("endpoint", ["tcp", "tls"], indirect=True)
def test_client_gives_up_while_handler_runs(loop, endpoint, how, handler_cancellation):
    """The client stops waiting for a response (a total or read timeout, or its task is
    cancelled). With handler_cancellation the server cancels the handler when the connection
    drops; without, the handler keeps running and sees the transport gone."""

    async def main():
        state = State()
        app = make_app(state)
        async with endpoint.serve(app, handler_cancellation=handler_cancellation):
            async with endpoint.session() as session:
                # Open (and for TLS, handshake) the connection first, so that the client's
                # timeout below only has to cover sending the request on it.
                async with session.get("/info") as resp:
                    assert resp.status == 200
                if how == "task_cancel":
                    task = asyncio.ensure_future(session.get("/hang"))
                    await asyncio.wait_for(state.started.wait(), 5)
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                else:
                    if how == "total_timeout":
                        timeout = aiohttp.ClientTimeout(total=0.25)
                        expected = asyncio.TimeoutError
                    else:
                        timeout = aiohttp.ClientTimeout(sock_read=0.25)
                        expected = aiohttp.SocketTimeoutError
                    started = time.monotonic()
                    with pytest.raises(asyncio.TimeoutError) as info:
                        await session.get("/hang", timeout=timeout)
                    assert type(info.value) is expected
                    assert 0.24 <= time.monotonic() - started < 2
                    assert state.started.is_set()
                outcome = await asyncio.wait_for(state.outcome, 5)
                assert outcome == ("cancelled" if handler_cancellation else "saw disconnect")
                assert (session.counter.created, session.counter.reused) == (1, 1)
                # The server goes on serving on a new connection.
                async with session.get("/info") as resp:
                    assert resp.status == 200

    run(loop, main())


# --- many concurrent requests ----------------------------------------------------------------


@on_each_family
def test_200_concurrent_requests_through_20_connections(loop, endpoint):
    async def main():
        state = State()
        async with endpoint.serve(make_app(state)), endpoint.session(limit=20) as session:

            async def one(i):
                async with session.get("/concurrent", params={"i": i}) as resp:
                    assert resp.status == 200
                    return await resp.text()

            answers = await asyncio.gather(*(one(i) for i in range(200)))
        assert answers == [f"answer {i}" for i in range(200)]
        assert len(state.transports) == 200
        # 20 requests were in flight at once (the handler holds them until then), never more,
        # and the 20 connections were reused for the other 180.
        assert state.peak == 20
        assert len({id(t) for t in state.transports}) == 20

    run(loop, main())


# --- server shutdown -------------------------------------------------------------------------


def check_cannot_connect(endpoint: Endpoint, exc: BaseException):
    """``exc`` is what connecting to ``endpoint`` raises once its server has stopped."""
    if endpoint.family == "unix":
        # asyncio's Unix server removes its socket file on close from 3.13 on.
        if sys.version_info >= (3, 13):
            assert not os.path.exists(endpoint.path)
            expected = (UnixClientConnectorError, FileNotFoundError)
        else:
            assert os.path.exists(endpoint.path)
            expected = (UnixClientConnectorError, ConnectionRefusedError)
    else:
        expected = (aiohttp.ClientConnectorError, ConnectionRefusedError)
    assert (type(exc), type(exc.os_error)) == expected


@on_each_family
@old_sslproto_leaks
def test_cleanup_with_idle_keepalive_connection_then_restart(loop, endpoint):
    async def main():
        state = State()
        async with endpoint.serve(make_app(state)) as served:
            session = endpoint.session()
            async with session:
                async with session.get("/info") as resp:
                    assert (await resp.json())["n"] == 0
                # The connection is idle in the client's pool while the server shuts down.
                await served.stop()
                assert state.transports[0].is_closing()
                await wait_pool_disconnected(session)
                with pytest.raises(aiohttp.ClientConnectorError) as info:
                    await session.get("/info")
                check_cannot_connect(endpoint, info.value)

                # A new server on the same address: the same session reconnects.
                async with endpoint.serve(make_app(state)):
                    async with session.get("/info", params={"n": 7}) as resp:
                        assert (await resp.json())["n"] == 7
                assert (session.counter.created, session.counter.reused) == (2, 0)
        assert len(state.transports) == 2
        assert state.transports[0] is not state.transports[1]

    run(loop, main())


@on_each_family
def test_cleanup_lets_in_flight_request_finish(loop, endpoint):
    async def main():
        state = State()
        async with endpoint.serve(make_app(state), shutdown_timeout=5) as served:
            async with endpoint.session() as session:
                request = asyncio.ensure_future(session.post("/slow", params={"t": 0.2}))
                await asyncio.wait_for(state.started.wait(), 5)
                started = time.monotonic()
                await served.stop()
                # cleanup() waited for the handler to finish (0.2 s), not for the shutdown
                # timeout (5 s).
                assert state.outcome.result() == "finished"
                assert time.monotonic() - started < 3
                async with await request as resp:
                    assert resp.status == 200
                    assert await resp.text() == "slow done"

    run(loop, main())


@pytest.mark.parametrize("method", ["POST", "GET"])
@on_each_family
@old_sslproto_leaks
def test_cleanup_cancels_handler_after_shutdown_timeout(loop, endpoint, method):
    """The handler outlives the shutdown timeout: cleanup() cancels it and the connection
    drops. A POST fails with ServerDisconnectedError; a GET (idempotent) is retried once by
    aiohttp, and that retry finds the server gone."""

    async def main():
        state = State()
        async with endpoint.serve(make_app(state), shutdown_timeout=0.1) as served:
            async with endpoint.session() as session:
                url = "/slow?t=30"
                request = asyncio.ensure_future(session.request(method, url))
                await asyncio.wait_for(state.started.wait(), 5)
                started = time.monotonic()
                await served.stop()
                assert time.monotonic() - started < 3
                assert state.outcome.result() == "cancelled"
                with pytest.raises(aiohttp.ClientConnectionError) as info:
                    await request
                if method == "POST":
                    assert type(info.value) is aiohttp.ServerDisconnectedError
                else:
                    check_cannot_connect(endpoint, info.value)

    run(loop, main())
