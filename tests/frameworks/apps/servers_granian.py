"""Serve servers_asgi:app with granian, registering ferroloop as the README shows, for
tests/frameworks/test_servers.py.

Usage: ``python servers_granian.py UDS_PATH LOOP_KIND`` (LOOP_KIND ``asyncio`` or
``ferroloop``). The reference run names granian's ``asyncio`` loop explicitly: its default
(``auto``) picks uvloop when it is installed. The loop is registered at module level so that
worker processes started with the ``spawn`` method register it too.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import ferroloop
import granian


@granian.loops.register("ferroloop")
def build():
    loop = ferroloop.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


if __name__ == "__main__":
    uds, loop_kind = sys.argv[1:]
    granian.Granian("servers_asgi:app", interface="asgi", loop=loop_kind, uds=Path(uds)).serve()
