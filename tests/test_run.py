"""Running and stopping: run_until_complete, run_forever, stop, close, Runner, run()."""

from __future__ import annotations

import asyncio
import sys
import threading
from asyncio import base_events

import ferroloop
import pytest
from conftest import FACTORIES, LOOP_KINDS, run_briefly, run_forever_with

needs_runner = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="asyncio.Runner is new in Python 3.11"
)


async def _answer(value=42):
    await asyncio.sleep(0)
    return value


# --- run_until_complete ------------------------------------------------------------------


def test_run_until_complete_coroutine(loop):
    assert loop.run_until_complete(_answer()) == 42


def test_run_until_complete_future(loop):
    fut = loop.create_future()
    loop.call_soon(fut.set_result, "fut")
    assert loop.run_until_complete(fut) == "fut"


def test_run_until_complete_task(loop):
    task = loop.create_task(_answer("task"))
    assert loop.run_until_complete(task) == "task"
    assert task.done()


def test_run_until_complete_done_future(loop):
    fut = loop.create_future()
    fut.set_result(1)
    assert loop.run_until_complete(fut) == 1


def test_run_until_complete_awaitable_object(loop):
    class Awaitable:
        def __await__(self):
            return _answer("awaitable").__await__()

    assert loop.run_until_complete(Awaitable()) == "awaitable"


def test_run_until_complete_rejects_non_awaitable(loop):
    with pytest.raises(TypeError):
        loop.run_until_complete(42)


def test_run_until_complete_propagates_exception(loop):
    async def fails():
        await asyncio.sleep(0)
        raise ValueError("from coroutine")

    with pytest.raises(ValueError, match="from coroutine"):
        loop.run_until_complete(fails())
    assert not loop.is_running()
    assert loop.run_until_complete(_answer()) == 42


def test_run_until_complete_cancelled_future(loop):
    fut = loop.create_future()
    loop.call_soon(fut.cancel)
    with pytest.raises(asyncio.CancelledError):
        loop.run_until_complete(fut)


def test_run_until_complete_future_of_other_loop(loop, loop_kind):
    other = FACTORIES[loop_kind]()
    try:
        fut = other.create_future()
        with pytest.raises(ValueError, match="The future belongs to a different loop"):
            loop.run_until_complete(fut)
    finally:
        other.close()


def test_run_until_complete_stopped_before_future_done(loop):
    fut = loop.create_future()
    loop.call_soon(loop.stop)
    with pytest.raises(RuntimeError, match="^Event loop stopped before Future completed.$"):
        loop.run_until_complete(fut)


def test_run_until_complete_uses_asyncio_done_callback(loop):
    """anyio (and others) look for asyncio.base_events._run_until_complete_cb among the
    callbacks of the future that run_until_complete runs."""

    async def main():
        task = asyncio.current_task()
        return [cb for cb, _ctx in task._callbacks]

    callbacks = loop.run_until_complete(main())
    assert base_events._run_until_complete_cb in callbacks


def test_run_until_complete_callback_on_future(loop):
    fut = loop.create_future()
    seen = []

    def inspect():
        seen.extend(cb for cb, _ctx in fut._callbacks)
        fut.set_result(None)

    loop.call_soon(inspect)
    loop.run_until_complete(fut)
    assert base_events._run_until_complete_cb in seen
    assert not fut._callbacks  # removed afterwards


# --- run_forever and stop ----------------------------------------------------------------


def test_run_forever_until_stop(loop):
    seen = []
    loop.call_soon(seen.append, 1)
    loop.call_later(0.01, seen.append, 2)
    loop.call_later(0.02, loop.stop)
    loop.run_forever()
    assert seen == [1, 2]
    assert not loop.is_running()


def test_stop_before_run_forever_runs_one_iteration(loop):
    seen = []

    def cb():
        seen.append("first")
        loop.call_soon(seen.append, "next iteration")

    loop.call_soon(cb)
    loop.stop()
    loop.run_forever()
    assert seen == ["first"]
    # The stop request was consumed: the next run_forever runs until the next stop().
    loop.call_later(0.02, loop.stop)
    loop.run_forever()
    assert seen == ["first", "next iteration"]


def test_stop_in_callback_finishes_the_iteration(loop):
    seen = []
    loop.call_soon(loop.stop)
    loop.call_soon(seen.append, "same iteration")
    loop.run_forever()
    assert seen == ["same iteration"]


def test_stop_twice(loop):
    loop.stop()
    loop.stop()
    loop.run_forever()
    assert not loop.is_running()


def test_stop_from_other_thread(loop):
    def stopper():
        loop.call_soon_threadsafe(loop.stop)

    run_forever_with(loop, stopper)


def test_is_running_and_is_closed(loop):
    states = []

    def cb():
        states.append((loop.is_running(), loop.is_closed()))

    assert not loop.is_running()
    assert not loop.is_closed()
    loop.call_soon(cb)
    run_briefly(loop)
    assert states == [(True, False)]
    assert not loop.is_running()
    loop.close()
    assert loop.is_closed()
    assert not loop.is_running()


def test_get_running_loop_inside(loop):
    seen = []

    async def main():
        seen.append(asyncio.get_running_loop())
        seen.append(asyncio.get_event_loop())
        seen.append(asyncio._get_running_loop())

    loop.call_soon(lambda: seen.append(asyncio.get_running_loop()))
    loop.run_until_complete(main())
    assert all(x is loop for x in seen)
    assert len(seen) == 4
    assert asyncio._get_running_loop() is None
    with pytest.raises(RuntimeError, match="no running event loop"):
        asyncio.get_running_loop()


def test_asyncgen_hooks_restored_after_run(loop):
    before = sys.get_asyncgen_hooks()
    inside = []

    async def main():
        inside.append(sys.get_asyncgen_hooks())

    loop.run_until_complete(main())
    assert sys.get_asyncgen_hooks() == before
    assert inside[0].firstiter is not None and inside[0].finalizer is not None


# --- re-entrancy and other loops --------------------------------------------------------


def test_nested_run_forever(loop):
    errors = []

    def cb():
        try:
            loop.run_forever()
        except RuntimeError as e:
            errors.append(str(e))

    loop.call_soon(cb)
    run_briefly(loop)
    assert errors == ["This event loop is already running"]


def test_nested_run_until_complete(loop):
    errors = []

    async def main():
        coro = _answer()
        try:
            loop.run_until_complete(coro)
        except RuntimeError as e:
            errors.append(str(e))
        finally:
            coro.close()

    loop.run_until_complete(main())
    assert errors == ["This event loop is already running"]


@pytest.mark.parametrize("method", ["run_forever", "run_until_complete"])
@pytest.mark.parametrize("other_kind", LOOP_KINDS)
def test_run_while_another_loop_runs_in_thread(loop, other_kind, method):
    # One attempt per test: CPython 3.13.0's run_forever runs its clean-up even when its
    # set-up refused to start, which forgets the outer running loop.
    other = FACTORIES[other_kind]()
    errors = []

    def cb():
        try:
            if method == "run_forever":
                other.run_forever()
            else:
                other.run_until_complete(other.create_future())
        except RuntimeError as e:
            errors.append(str(e))

    try:
        loop.call_soon(cb)
        run_briefly(loop)
        assert errors == ["Cannot run the event loop while another loop is running"]
        assert not other.is_running()
        assert other.run_until_complete(_answer()) == 42  # and it still works
    finally:
        other.close()


def test_loops_in_two_threads(loop, loop_factory):
    results = []

    def in_thread():
        lp = loop_factory()
        try:
            results.append(lp.run_until_complete(_answer("thread")))
        finally:
            lp.close()

    async def main():
        t = threading.Thread(target=in_thread)
        t.start()
        while t.is_alive():
            await asyncio.sleep(0.005)
        t.join()
        return "main"

    assert loop.run_until_complete(main()) == "main"
    assert results == ["thread"]


# --- closing ----------------------------------------------------------------------------


def test_closed_loop_cannot_run(loop):
    loop.close()
    with pytest.raises(RuntimeError, match="^Event loop is closed$"):
        loop.run_forever()
    coro = _answer()
    with pytest.raises(RuntimeError, match="^Event loop is closed$"):
        loop.run_until_complete(coro)
    coro.close()


def test_close_while_running(loop):
    errors = []

    def cb():
        try:
            loop.close()
        except RuntimeError as e:
            errors.append(str(e))

    loop.call_soon(cb)
    run_briefly(loop)
    assert errors == ["Cannot close a running event loop"]
    assert not loop.is_closed()


def test_close_twice(loop):
    loop.close()
    loop.close()
    assert loop.is_closed()


def test_close_drops_pending_callbacks(loop):
    seen = []
    loop.call_soon(seen.append, 1)
    loop.call_later(0, seen.append, 2)
    loop.close()
    assert seen == []


def test_create_future_and_task_on_closed_loop(loop):
    loop.close()
    fut = loop.create_future()  # allowed, as in asyncio
    assert fut.get_loop() is loop
    coro = _answer()
    with pytest.raises(RuntimeError, match="^Event loop is closed$"):
        loop.create_task(coro)
    coro.close()


# --- Runner, asyncio.run, ferroloop.run -------------------------------------------------


@needs_runner
def test_asyncio_runner_with_loop_factory(loop_factory, loop_kind):
    async def main():
        return type(asyncio.get_running_loop())

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        kind = runner.run(main())
        lp = runner.get_loop()
        assert runner.run(_answer()) == 42
    assert lp.is_closed()
    if loop_kind == "ferroloop":
        assert issubclass(kind, ferroloop.Loop)
    else:
        assert not issubclass(kind, ferroloop.Loop)


@needs_runner
def test_asyncio_runner_debug(loop_factory):
    async def main():
        return asyncio.get_running_loop().get_debug()

    with asyncio.Runner(loop_factory=loop_factory, debug=True) as runner:
        assert runner.run(main()) is True


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.run(loop_factory=) is 3.12+")
def test_asyncio_run_with_loop_factory(loop_factory):
    assert asyncio.run(_answer(7), loop_factory=loop_factory) == 7


def _run_function(loop_kind):
    """asyncio.run for the asyncio kind, ferroloop.run for ferroloop: same contract."""
    return asyncio.run if loop_kind == "asyncio" else ferroloop.run


def test_run_returns_result(loop_kind):
    assert _run_function(loop_kind)(_answer("result")) == "result"


def test_run_uses_expected_loop(loop_kind):
    async def main():
        return isinstance(asyncio.get_running_loop(), ferroloop.Loop)

    assert _run_function(loop_kind)(main()) is (loop_kind == "ferroloop")


@pytest.mark.parametrize("debug", [True, False])
def test_run_debug_flag(loop_kind, debug):
    async def main():
        return asyncio.get_running_loop().get_debug()

    assert _run_function(loop_kind)(main(), debug=debug) is debug


def test_run_propagates_exception(loop_kind):
    async def main():
        raise LookupError("inner")

    with pytest.raises(LookupError, match="inner"):
        _run_function(loop_kind)(main())


def test_run_rejects_non_coroutine(loop_kind):
    run = _run_function(loop_kind)
    with pytest.raises(ValueError, match="^a coroutine was expected, got 42$"):
        run(42)

    def not_a_coroutine_function():
        pass

    with pytest.raises(ValueError, match="a coroutine was expected"):
        run(not_a_coroutine_function)


def test_run_inside_running_loop(loop, loop_kind):
    run = _run_function(loop_kind)
    errors = []

    async def main():
        coro = _answer()
        try:
            run(coro)
        except RuntimeError as e:
            errors.append(str(e))
        finally:
            coro.close()

    loop.run_until_complete(main())
    assert errors == ["asyncio.run() cannot be called from a running event loop"]


def test_run_closes_loop_and_cleans_up(loop_kind):
    record = {}

    async def agen():
        try:
            yield 1
            yield 2
        finally:
            record["agen closed"] = True

    async def forever():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            record["task cancelled"] = True
            raise

    async def main():
        lp = asyncio.get_running_loop()
        record["loop"] = lp
        lp.create_task(forever())
        g = agen()
        await g.__anext__()
        record["agen"] = g  # keep it alive: run() must close it
        await lp.run_in_executor(None, lambda: None)
        await asyncio.sleep(0)
        return "ok"

    assert _run_function(loop_kind)(main()) == "ok"
    lp = record["loop"]
    assert lp.is_closed()
    assert record.get("task cancelled")
    assert record.get("agen closed")
    assert lp._default_executor is None
    assert asyncio._get_running_loop() is None
