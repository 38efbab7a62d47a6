"""Shared fixtures: every behaviour test runs on asyncio's own loop and on ferroloop.

asyncio is the spec: a test that passes on ``[asyncio]`` and fails on ``[ferroloop]`` is a
ferroloop bug.

* ``loop``: a fresh loop of each kind, with a recording exception handler installed. After the
  test body, and again after teardown (which shuts async generators and the default executor
  down like ``asyncio.run`` and closes the loop), the test fails if that handler was called,
  unless the test asked for the ``handler_calls`` fixture (the list of recorded contexts).
* ``loop_factory``: the same two kinds as zero-argument factories, for tests that make their
  own loops (``asyncio.Runner(loop_factory=...)``, ``asyncio.run(..., loop_factory=...)``).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import ferroloop
import pytest

LOOP_KINDS = ["asyncio", "ferroloop"]

# The project's root, for subprocesses (so they import the same ferroloop).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def new_asyncio_loop():
    """asyncio's own default loop, whatever policy a test may have installed."""
    loop = asyncio.new_event_loop()
    if isinstance(loop, ferroloop.Loop):  # a leaked ferroloop policy; never expected
        loop.close()
        raise AssertionError("asyncio.new_event_loop() returned a ferroloop loop")
    return loop


FACTORIES = {"asyncio": new_asyncio_loop, "ferroloop": ferroloop.new_event_loop}

# Source snippets for subprocesses: a zero-argument factory expression per kind.
FACTORY_SOURCE = {"asyncio": "asyncio.new_event_loop", "ferroloop": "ferroloop.new_event_loop"}


def rss() -> int:
    """This process's resident set size, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# The same function as source, for the fresh interpreters of ``run_python`` (needs ``os``).
RSS_SOURCE = inspect.getsource(rss)


class HandlerRecorder:
    """An exception handler that records the contexts it is called with."""

    def __init__(self):
        self.contexts: list[dict] = []
        self.expected = False
        self.reported = 0

    def __call__(self, loop, context):
        self.contexts.append(context)

    def unexpected(self):
        """Contexts recorded since the last check, unless the test declared it expects them."""
        if self.expected:
            return []
        new = self.contexts[self.reported :]
        self.reported = len(self.contexts)
        return new


def _describe(contexts):
    return "; ".join(f"{c.get('message')!r} exception={c.get('exception')!r}" for c in contexts)


@pytest.fixture(params=LOOP_KINDS)
def loop_kind(request):
    """ "asyncio" or "ferroloop"."""
    return request.param


@pytest.fixture
def loop_factory(loop_kind):
    """A zero-argument callable making a new loop of the kind under test."""
    return FACTORIES[loop_kind]


@pytest.fixture
def exc_recorder():
    return HandlerRecorder()


def _cancel_all_tasks(loop):
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not tasks:
        return
    for t in tasks:
        t.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


@pytest.fixture
def loop(loop_factory, exc_recorder):
    """A new loop of the kind under test; closed (after asyncio.run's shutdown steps) on
    teardown. The test fails if the loop's exception handler was called unexpectedly."""
    lp = loop_factory()
    lp.set_exception_handler(exc_recorder)
    try:
        yield lp
    finally:
        try:
            if not lp.is_closed() and not lp.is_running():
                try:
                    _cancel_all_tasks(lp)
                    lp.run_until_complete(lp.shutdown_asyncgens())
                    lp.run_until_complete(lp.shutdown_default_executor())
                finally:
                    lp.close()
        finally:
            asyncio.set_event_loop(None)
    bad = exc_recorder.unexpected()
    if bad:
        pytest.fail(f"exception handler called unexpectedly (during teardown): {_describe(bad)}")


@pytest.fixture
def handler_calls(loop, exc_recorder):
    """The contexts passed to the loop's exception handler; requesting this fixture declares
    that the test expects (and checks) handler calls."""
    exc_recorder.expected = True
    return exc_recorder.contexts


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Fail the test itself (not only its teardown) when the handler was called unexpectedly
    during the test body."""
    result = yield
    rec = item.funcargs.get("exc_recorder")
    if isinstance(rec, HandlerRecorder):
        bad = rec.unexpected()
        if bad:
            pytest.fail(f"exception handler called unexpectedly: {_describe(bad)}")
    return result


@pytest.fixture(autouse=True)
def _restore_policy():
    """Tests may install a policy or set an event loop; put asyncio back as it was."""
    yield
    if sys.version_info < (3, 14):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_event_loop_policy(None)


# --- helpers -----------------------------------------------------------------------------


def scheduled_timer_count(loop) -> int:
    """How many timers the loop keeps scheduled (cancelled ones not yet purged included)."""
    if isinstance(loop, ferroloop.Loop):
        return loop._queue_sizes()[1]
    return len(loop._scheduled)


def ready_count(loop) -> int:
    """How many handles wait in the loop's ready queue."""
    if isinstance(loop, ferroloop.Loop):
        return loop._queue_sizes()[0]
    return len(loop._ready)


TIMEOUT = 20  # seconds, for one run(): below pytest-timeout's 30 s per test


def run(loop, coro, timeout=TIMEOUT):
    """Run ``coro`` on ``loop``, failing (not hanging) after ``timeout`` seconds."""
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


def run_briefly(loop, n: int = 1):
    """Run ``n`` iterations of the loop (each handles what is ready, without blocking long)."""
    for _ in range(n):
        loop.call_soon(loop.stop)
        loop.run_forever()


def child_env(extra=None) -> dict:
    """The environment for a child interpreter: this one's, without asyncio's debug and dev
    modes or pytest options meant for this run, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONASYNCIODEBUG", "PYTHONDEVMODE", "PYTEST_ADDOPTS")
    }
    env.update(extra or {})
    return env


def sigint_default():
    """A ``preexec_fn`` that starts the child as a terminal would: SIGINT at its default.

    A shell without job control starts background commands with SIGINT ignored, and an
    ignored SIGINT is inherited; Python then installs no KeyboardInterrupt handler at start-up
    and a child would sleep through a test's Ctrl+C. Resetting it in the child before exec
    makes a test independent of how the test run itself was started.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_python(code: str, *, env=None, args=(), timeout: float = 20, **kw):
    """Run ``code`` in a fresh interpreter (the one running the tests) from the project root.
    Returns the CompletedProcess (text mode, stdout and stderr captured)."""
    return subprocess.run(
        [sys.executable, *args, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def run_forever_with(loop, action, *args, delay=0.05, on_timeout=None, watchdog=10.0):
    """Run ``loop.run_forever()`` while another thread calls ``action(*args)`` after ``delay``
    seconds. A watchdog thread (``on_timeout``; default: stop the loop thread-safely) turns a
    lost wake-up into a test failure instead of a hang."""
    if on_timeout is None:

        def on_timeout():
            loop.call_soon_threadsafe(loop.stop)

    timer = threading.Timer(delay, action, args=args)
    dog = threading.Timer(watchdog, on_timeout)
    timer.start()
    dog.start()
    try:
        loop.run_forever()
    finally:
        timer.cancel()
        dog.cancel()
        timer.join()
        dog.join()


@pytest.fixture
def pair():
    """A connected non-blocking Unix stream socket pair, closed after the test."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()
