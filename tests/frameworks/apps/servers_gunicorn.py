"""gunicorn worker classes for tests/frameworks/test_servers.py.

``FerroWorker`` is the README's recipe. ``AsyncioWorker`` is the reference: uvicorn-worker's
plain ``UvicornWorker`` picks uvloop when it is installed (``"loop": "auto"``), so the reference
asks for asyncio's own loop by name.
"""

from __future__ import annotations

import uvicorn_worker


class FerroWorker(uvicorn_worker.UvicornWorker):
    CONFIG_KWARGS = {"loop": "ferroloop:new_event_loop"}


class AsyncioWorker(uvicorn_worker.UvicornWorker):
    CONFIG_KWARGS = {"loop": "asyncio"}
