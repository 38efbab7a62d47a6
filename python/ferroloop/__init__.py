"""ferroloop: a fast, faithful drop-in replacement for asyncio's event loop, written in Rust.

    import ferroloop
    ferroloop.run(main())

or ``asyncio.Runner(loop_factory=ferroloop.new_event_loop)``, or
``uvicorn app:app --loop ferroloop:new_event_loop``.
"""

from __future__ import annotations

import asyncio as _asyncio
import sys as _sys
import warnings as _warnings

from ._ferroloop import Handle, TimerHandle, __version__
from ._loop import Loop

__all__ = [
    "Loop",
    "new_event_loop",
    "run",
    "EventLoopPolicy",
    "install",
    "Handle",
    "TimerHandle",
    "__version__",
]


def new_event_loop() -> Loop:
    """Return a new ferroloop event loop."""
    return Loop()


def run(main, *, loop_factory=new_event_loop, debug=None, **run_kwargs):
    """Run the coroutine ``main`` on a new ferroloop loop and return its result, like
    ``asyncio.run`` (and ``uvloop.run``): async generators and the default executor are shut
    down and the loop closed afterwards; Ctrl+C cancels ``main`` and raises KeyboardInterrupt.
    """
    if _sys.version_info >= (3, 12):
        return _asyncio.run(main, loop_factory=loop_factory, debug=debug, **run_kwargs)
    if _asyncio._get_running_loop() is not None:
        raise RuntimeError("asyncio.run() cannot be called from a running event loop")
    if _sys.version_info >= (3, 11):
        with _asyncio.Runner(loop_factory=loop_factory, debug=debug, **run_kwargs) as runner:
            return runner.run(main)
    from ._compat import run_310

    return run_310(main, loop_factory=loop_factory, debug=debug)


if _sys.version_info < (3, 16):

    class EventLoopPolicy(_asyncio.DefaultEventLoopPolicy):
        """Deprecated: an event loop policy whose loops are ferroloop loops.

        Policies are deprecated from Python 3.14; use ``ferroloop.run()`` or
        ``asyncio.Runner(loop_factory=ferroloop.new_event_loop)`` instead.
        """

        def __init__(self):
            _warnings.warn(
                "ferroloop.EventLoopPolicy is deprecated; use ferroloop.run() or "
                "asyncio.Runner(loop_factory=ferroloop.new_event_loop)",
                DeprecationWarning,
                stacklevel=2,
            )
            super().__init__()

        def _loop_factory(self):
            return new_event_loop()

    def install() -> None:
        """Deprecated: make ferroloop the loop that asyncio's policy creates."""
        _warnings.warn(
            "ferroloop.install() is deprecated; use ferroloop.run() or "
            "asyncio.Runner(loop_factory=ferroloop.new_event_loop)",
            DeprecationWarning,
            stacklevel=2,
        )
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore", DeprecationWarning)
            _asyncio.set_event_loop_policy(EventLoopPolicy())
