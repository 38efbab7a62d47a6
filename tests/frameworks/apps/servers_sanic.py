"""The servers_asgi app's routes as a Sanic app, for tests/frameworks/test_servers.py.

Sanic makes its loops itself with ``asyncio.new_event_loop()``, so the README's recipe is
``app.config.USE_UVLOOP = False`` plus ``ferroloop.install()`` at import, done here when the
environment variable ``SERVERS_TEST_LOOP`` is ``ferroloop``. The reference run (``asyncio``)
sets ``USE_UVLOOP = False`` too, since Sanic would otherwise pick uvloop when it is installed.
"""

from __future__ import annotations

import asyncio
import os
import warnings

from sanic import Sanic
from sanic.response import json, raw
from servers_asgi import CHUNKS, LIFESPAN_SHUTDOWN, loop_name, stream_chunk

if os.environ["SERVERS_TEST_LOOP"] == "ferroloop":
    import ferroloop

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # install() is deprecated; it works
        ferroloop.install()

app = Sanic("servers_sanic")
app.config.USE_UVLOOP = False

state = {"lifespan": "not run"}


@app.before_server_start
async def started(app):
    state["lifespan"] = "started on " + loop_name()


@app.after_server_stop
async def stopped(app):
    print(LIFESPAN_SHUTDOWN, flush=True)


@app.get("/loop")
async def get_loop(request):
    await asyncio.sleep(0.001)
    return json({"loop": loop_name(), "lifespan": state["lifespan"]})


@app.post("/echo")
async def echo(request):
    return raw(request.body, content_type="application/octet-stream")


@app.get("/stream")
async def stream(request):
    response = await request.respond(content_type="text/plain")
    for i in range(CHUNKS):
        await response.send(stream_chunk(i))
        if i % 10 == 0:
            await asyncio.sleep(0)
    await response.eof()


@app.websocket("/ws")
async def ws_echo(request, ws):
    async for message in ws:
        await ws.send(message)
