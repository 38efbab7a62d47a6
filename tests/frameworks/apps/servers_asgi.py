"""A small raw ASGI app for tests/frameworks/test_servers.py (served by uvicorn, gunicorn with
uvicorn-worker, hypercorn and granian).

* ``GET /loop``: JSON with the running loop's type (``module.qualname``) and lifespan state.
* ``POST /echo``: the request body, byte for byte.
* ``GET /stream``: ``CHUNKS`` numbered lines, each sent as its own ``more_body`` message.
* websocket ``/ws``: every message echoed back, text as text and bytes as bytes.

On lifespan shutdown it prints ``LIFESPAN_SHUTDOWN`` to stdout, so the test can check the
server shut the app down cleanly when signalled.
"""

from __future__ import annotations

import asyncio
import json

CHUNKS = 200
LIFESPAN_SHUTDOWN = "servers_asgi: lifespan shutdown complete"

state = {"lifespan": "not run"}


def loop_name() -> str:
    cls = type(asyncio.get_running_loop())
    return f"{cls.__module__}.{cls.__qualname__}"


def stream_chunk(i: int) -> bytes:
    return b"chunk %05d " % i + b"x" * 500 + b"\n"


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    elif scope["type"] == "websocket":
        await websocket_echo(receive, send)
    elif scope["path"] == "/loop":
        await asyncio.sleep(0.001)  # a timer on the loop under test
        body = json.dumps({"loop": loop_name(), "lifespan": state["lifespan"]}).encode()
        await respond(send, 200, body, b"application/json")
    elif scope["path"] == "/echo" and scope["method"] == "POST":
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await respond(send, 200, b"".join(parts), b"application/octet-stream")
    elif scope["path"] == "/stream":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        for i in range(CHUNKS):
            await send({"type": "http.response.body", "body": stream_chunk(i), "more_body": True})
            if i % 10 == 0:
                await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    else:
        await respond(send, 404, b"not found", b"text/plain")


async def respond(send, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            state["lifespan"] = "started on " + loop_name()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            print(LIFESPAN_SHUTDOWN, flush=True)
            return


async def websocket_echo(receive, send) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"]})
