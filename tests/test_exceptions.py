"""Errors in callbacks: the exception handler, the default handler's logging, and the
exceptions (KeyboardInterrupt, SystemExit) that escape the loop."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from asyncio import format_helpers

import pytest
from conftest import run, run_briefly


def _boom():
    raise ZeroDivisionError("boom")


def test_callback_exception_goes_to_handler(loop, handler_calls):
    seen = []
    h = loop.call_soon(_boom)
    loop.call_soon(seen.append, "still runs")
    run_briefly(loop)
    assert seen == ["still runs"]
    assert len(handler_calls) == 1
    ctx = handler_calls[0]
    assert set(ctx) == {"message", "exception", "handle"}
    assert ctx["message"].startswith("Exception in callback _boom()")
    assert isinstance(ctx["exception"], ZeroDivisionError)
    assert ctx["handle"] is h


@pytest.mark.parametrize("debug", [False, True])
def test_callback_exception_message_format(loop, handler_calls, debug):
    loop.set_debug(debug)

    def failing(*args):
        raise ValueError("x")

    loop.call_soon(failing, 1, "a")
    run_briefly(loop)
    # `debug=` arrived in a patch release (3.12.1 lacks it).
    if "debug" in format_helpers._format_callback_source.__code__.co_varnames:
        src = format_helpers._format_callback_source(failing, (1, "a"), debug=debug)
    else:
        src = format_helpers._format_callback_source(failing, (1, "a"))
    assert handler_calls[0]["message"] == f"Exception in callback {src}"


def test_timer_callback_exception_goes_to_handler(loop, handler_calls):
    h = loop.call_later(0, _boom)
    loop.run_until_complete(asyncio.sleep(0.01))
    assert len(handler_calls) == 1
    assert handler_calls[0]["handle"] is h
    assert isinstance(handler_calls[0]["exception"], ZeroDivisionError)


def test_threadsafe_callback_exception_goes_to_handler(loop, handler_calls):
    h = loop.call_soon_threadsafe(_boom)
    run_briefly(loop)
    assert [c["handle"] for c in handler_calls] == [h]


def test_handler_called_with_loop_and_context(loop):
    calls = []
    loop.set_exception_handler(lambda lp, ctx: calls.append((lp, ctx)))
    loop.call_soon(_boom)
    run_briefly(loop)
    assert len(calls) == 1
    assert calls[0][0] is loop
    assert isinstance(calls[0][1], dict)


def test_exception_handler_get_set(loop):
    loop.set_exception_handler(None)
    assert loop.get_exception_handler() is None

    def handler(lp, ctx):
        pass

    loop.set_exception_handler(handler)
    assert loop.get_exception_handler() is handler
    loop.set_exception_handler(None)
    assert loop.get_exception_handler() is None


def test_set_exception_handler_rejects_non_callable(loop):
    with pytest.raises(TypeError, match="^A callable object or None is expected, got 1$"):
        loop.set_exception_handler(1)


def test_call_exception_handler_passes_context(loop, handler_calls):
    context = {"message": "custom", "extra": 1}
    loop.call_exception_handler(context)
    assert handler_calls == [context]


def test_default_exception_handler_logs(loop, caplog):
    loop.set_exception_handler(None)
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        loop.call_soon(_boom)
        run_briefly(loop)
    records = [r for r in caplog.records if r.name == "asyncio"]
    assert len(records) == 1
    rec = records[0]
    assert rec.levelno == logging.ERROR
    msg = rec.getMessage()
    assert msg.startswith("Exception in callback _boom()")
    assert "handle: <Handle _boom()" in msg
    assert rec.exc_info is not None and rec.exc_info[0] is ZeroDivisionError


def test_default_exception_handler_direct_call(loop, caplog):
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.default_exception_handler({"message": "direct", "k": "v"})
    msgs = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert msgs == ["direct\nk: 'v'"]


def test_default_exception_handler_without_message(loop, caplog):
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.default_exception_handler({"exception": ValueError("x")})
    recs = [r for r in caplog.records if r.name == "asyncio"]
    assert recs[0].getMessage() == "Unhandled exception in event loop"
    assert recs[0].exc_info[0] is ValueError


def test_custom_handler_raising_is_logged(loop, caplog):
    def bad_handler(lp, ctx):
        raise RuntimeError("handler is broken")

    loop.set_exception_handler(bad_handler)
    seen = []
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.call_soon(_boom)
        loop.call_soon(seen.append, "next")
        run_briefly(loop)
    assert seen == ["next"]
    recs = [r for r in caplog.records if r.name == "asyncio"]
    assert len(recs) == 1
    assert recs[0].getMessage().startswith("Unhandled error in exception handler")
    assert recs[0].exc_info[0] is RuntimeError


def test_custom_handler_raising_keyboardinterrupt_propagates(loop):
    def handler(lp, ctx):
        raise KeyboardInterrupt

    loop.set_exception_handler(handler)
    loop.call_soon(_boom)
    with pytest.raises(KeyboardInterrupt):
        run_briefly(loop)
    assert not loop.is_running()


def test_exception_handler_for_unhandled_future_exception(loop, handler_calls):
    import gc

    fut = loop.create_future()
    fut.set_exception(OSError("never retrieved"))
    del fut
    gc.collect()
    assert len(handler_calls) == 1
    assert handler_calls[0]["message"] == "Future exception was never retrieved"


# --- exceptions that escape the loop -----------------------------------------------------


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_callback_escapes_run_forever(loop, exc_type):
    seen = []

    def raiser():
        raise exc_type("out")

    hooks_before = sys.get_asyncgen_hooks()
    loop.call_soon(seen.append, "before")
    loop.call_soon(raiser)
    loop.call_soon(seen.append, "after")
    with pytest.raises(exc_type):
        loop.run_forever()
    assert seen == ["before"]
    assert not loop.is_running()
    assert asyncio._get_running_loop() is None
    assert sys.get_asyncgen_hooks() == hooks_before
    # The rest of the iteration is still queued and runs next time; the loop is usable.
    run_briefly(loop)
    assert seen == ["before", "after"]
    assert loop.run_until_complete(asyncio.sleep(0, "usable")) == "usable"


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_timer_escapes(loop, exc_type):
    def raiser():
        raise exc_type()

    loop.call_later(0, raiser)
    with pytest.raises(exc_type):
        loop.run_until_complete(asyncio.sleep(0.05))
    assert not loop.is_running()
    assert loop.run_until_complete(asyncio.sleep(0, "usable")) == "usable"


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_coroutine_escapes_run_until_complete(loop, exc_type):
    async def main():
        await asyncio.sleep(0)
        raise exc_type()

    with pytest.raises(exc_type):
        loop.run_until_complete(main())
    assert not loop.is_running()
    assert loop.run_until_complete(asyncio.sleep(0, "usable")) == "usable"


def test_base_exception_in_callback_during_run_until_complete(loop):
    async def main():
        asyncio.get_running_loop().call_soon(_raise_ki)
        await asyncio.sleep(3600)

    def _raise_ki():
        raise KeyboardInterrupt

    task = loop.create_task(main())
    with pytest.raises(KeyboardInterrupt):
        loop.run_until_complete(task)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        loop.run_until_complete(task)


def test_keyboardinterrupt_from_handle_run(loop):
    def raiser():
        raise KeyboardInterrupt

    h = loop.call_soon(raiser)
    h.cancel()
    h2 = loop.call_soon(raiser)
    with pytest.raises(KeyboardInterrupt):
        h2._run()
    h2.cancel()


def test_handler_runs_while_the_exception_is_being_handled(loop):
    """asyncio calls the exception handler from inside the callback's ``except`` block:
    ``sys.exc_info()`` there is the callback's exception (``logger.exception()`` in a handler
    logs its traceback), for a plain callback and for a protocol callback of a transport."""
    seen = []

    def handler(lp, context):
        seen.append((context["exception"], sys.exc_info()[1]))

    loop.set_exception_handler(handler)

    def boom():
        raise ZeroDivisionError("in a callback")

    class Failing(asyncio.Protocol):
        def data_received(self, data):
            raise ValueError("in data_received")

    async def main():
        loop.call_soon(boom)
        await asyncio.sleep(0.01)
        a, b = socket.socketpair()
        with b:
            t, _ = await loop.create_connection(Failing, sock=a)
            b.send(b"x")
            for _ in range(500):
                if len(seen) == 2:
                    break
                await asyncio.sleep(0.002)
            t.close()

    run(loop, main())
    assert [type(given) for given, _ in seen] == [ZeroDivisionError, ValueError]
    assert all(handled is given for given, handled in seen)
    assert sys.exc_info() == (None, None, None)
