"""Serve servers_asgi.app with hypercorn from Python, as the README shows, for
tests/frameworks/test_servers.py.

Usage: ``python servers_hypercorn.py BIND LOOP_KIND`` (BIND as hypercorn takes it, e.g.
``unix:/path/to.sock``; LOOP_KIND ``asyncio`` or ``ferroloop``). No shutdown trigger is given,
so hypercorn installs its own SIGINT/SIGTERM handlers on the running loop.
"""

from __future__ import annotations

import asyncio
import sys

import ferroloop
import hypercorn.asyncio
from hypercorn.config import Config
from servers_asgi import app

if __name__ == "__main__":
    bind, loop_kind = sys.argv[1:]
    config = Config()
    config.bind = [bind]
    if loop_kind == "ferroloop":
        ferroloop.run(hypercorn.asyncio.serve(app, config))
    else:
        asyncio.run(hypercorn.asyncio.serve(app, config))
