"""call_soon, call_soon_threadsafe and their handles."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
import threading
import time
import unittest.mock
import warnings
import weakref

import pytest
from conftest import TIMEOUT, run, run_briefly, run_forever_with

var = contextvars.ContextVar("var", default="default")

needs_get_context = pytest.mark.skipif(
    sys.version_info < (3, 12), reason="Handle.get_context() is new in Python 3.12"
)


def ctx_of(handle):
    """The handle's context: get_context() (3.12+), else the attribute asyncio keeps."""
    if sys.version_info >= (3, 12):
        return handle.get_context()
    return handle._context


NOT_SAME_THREAD = "Non-thread-safe operation invoked on an event loop other than the current one"


def test_call_soon_runs_in_fifo_order(loop):
    seen = []
    for i in range(100):
        loop.call_soon(seen.append, i)
    run_briefly(loop)
    assert seen == list(range(100))


def test_call_soon_passes_args(loop):
    seen = []
    loop.call_soon(lambda *a: seen.append(a), 1, "two", None)
    loop.call_soon(lambda: seen.append(()))
    run_briefly(loop)
    assert seen == [(1, "two", None), ()]


def test_callback_scheduled_by_callback_runs_next_iteration(loop):
    seen = []

    def first():
        seen.append("first")
        loop.call_soon(seen.append, "nested")

    loop.call_soon(first)
    loop.call_soon(seen.append, "second")
    run_briefly(loop)
    assert seen == ["first", "second"]
    run_briefly(loop)
    assert seen == ["first", "second", "nested"]


def test_call_soon_returns_handle(loop):
    h = loop.call_soon(lambda: None)
    assert not h.cancelled()
    assert isinstance(ctx_of(h), contextvars.Context)
    assert h._loop is loop
    run_briefly(loop)


@needs_get_context
def test_handle_get_context(loop):
    ctx = contextvars.copy_context()
    h = loop.call_soon(lambda: None, context=ctx)
    t = loop.call_later(10, lambda: None, context=ctx)
    assert h.get_context() is ctx
    assert t.get_context() is ctx
    t.cancel()
    run_briefly(loop)


def test_call_soon_context_argument(loop):
    ctx = contextvars.Context()
    ctx.run(var.set, "in ctx")
    seen = []
    h = loop.call_soon(
        lambda: seen.append((var.get(), contextvars.copy_context()[var])), context=ctx
    )
    assert ctx_of(h) is ctx
    run_briefly(loop)
    assert seen == [("in ctx", "in ctx")]
    assert var.get() == "default"


def test_callback_changes_stay_in_its_context(loop):
    ctx = contextvars.Context()
    loop.call_soon(var.set, "changed", context=ctx)
    run_briefly(loop)
    assert ctx[var] == "changed"
    assert var.get() == "default"


def test_call_soon_default_context_is_a_copy_taken_at_scheduling(loop):
    def body():
        var.set("at scheduling")
        seen = []

        def cb():
            seen.append(var.get())
            var.set("set by callback")

        h = loop.call_soon(cb)
        var.set("after scheduling")
        run_briefly(loop)
        assert seen == ["at scheduling"]
        # The callback ran in a copy: its change is visible there only.
        assert var.get() == "after scheduling"
        assert ctx_of(h)[var] == "set by callback"
        assert ctx_of(h) is not contextvars.copy_context()

    contextvars.copy_context().run(body)


def test_call_later_and_call_at_context_argument(loop):
    ctx = contextvars.Context()
    ctx.run(var.set, "timer ctx")
    seen = []
    h1 = loop.call_later(0, lambda: seen.append(var.get()), context=ctx)
    h2 = loop.call_at(loop.time(), lambda: seen.append(var.get()), context=ctx)
    assert ctx_of(h1) is ctx and ctx_of(h2) is ctx
    loop.run_until_complete(asyncio.sleep(0.01))
    assert seen == ["timer ctx", "timer ctx"]


def test_call_soon_threadsafe_context_argument(loop):
    ctx = contextvars.Context()
    ctx.run(var.set, "ts ctx")
    seen = []
    loop.call_soon_threadsafe(lambda: seen.append(var.get()), context=ctx)
    run_briefly(loop)
    assert seen == ["ts ctx"]


def test_call_soon_threadsafe_default_context_is_the_calling_threads(loop):
    # Without context=, each call copies the calling thread's context at that moment: the
    # callback sees what that thread had set, and what one callback sets stays in its own copy.
    seen = []

    def cb():
        seen.append(var.get())
        var.set("set by a callback")

    def producer():
        var.set("thread value")
        loop.call_soon_threadsafe(cb)
        loop.call_soon_threadsafe(cb)
        var.set("set after scheduling")

    t = threading.Thread(target=producer)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive()
    run_briefly(loop)
    assert seen == ["thread value", "thread value"]
    assert var.get() == "default"


# --- the default context, made when needed ---------------------------------------------------
# ferroloop records the caller's context variables and makes a handle's Context copy only when
# it runs or is asked for, reusing the Context of a handle that died unobserved
# (src/py/context.rs). These tests hold that to asyncio's behaviour: one copy per handle, taken
# at scheduling, that keeps what its callback set and keeps no value alive longer.


def test_default_contexts_are_distinct_copies_before_and_after_running(loop):
    def body():
        var.set("scheduled")
        seen = []

        def cb(tag):
            seen.append((tag, var.get()))
            var.set(tag)

        handles = [loop.call_soon(cb, i) for i in range(3)]
        early = ctx_of(handles[1])  # handed out before its callback runs
        var.set("after")
        timer = loop.call_later(0, cb, "timer")
        loop.run_until_complete(asyncio.sleep(0.01))
        assert seen == [(0, "scheduled"), (1, "scheduled"), (2, "scheduled"), ("timer", "after")]
        contexts = [ctx_of(h) for h in handles] + [ctx_of(timer)]
        assert len({id(c) for c in contexts}) == 4
        assert ctx_of(handles[1]) is early
        assert [c[var] for c in contexts] == [0, 1, 2, "timer"]
        assert var.get() == "after"

    contextvars.copy_context().run(body)


def test_callback_sees_its_handles_context_while_running(loop):
    seen = []

    def cb():
        var.set("inside")
        ctx = ctx_of(h)
        seen.append(ctx[var])
        with pytest.raises(RuntimeError):
            ctx.run(lambda: None)  # it is the entered context

    h = loop.call_soon(cb)
    run_briefly(loop)
    assert seen == ["inside"]
    assert ctx_of(h)[var] == "inside"


def test_default_context_keeps_no_value_alive_after_its_handle(loop):
    class Value:
        pass

    def body():
        value = Value()
        ref = weakref.ref(value)
        var.set(value)
        loop.call_soon(lambda: None)
        loop.call_later(0, lambda: None)
        var.set(None)
        del value
        loop.run_until_complete(asyncio.sleep(0.01))
        assert ref() is None  # no cycle: freed with the handles, without a collection

    contextvars.copy_context().run(body)


def test_handle_in_a_cycle_through_its_default_context_is_collected(loop):
    # The handle's context holds a value that holds the handle: only the collector frees the
    # pair, and the loop goes on scheduling and running callbacks afterwards.
    class Holder:
        handle = None

    freed = []

    def body():
        for _ in range(50):
            holder = Holder()
            var.set(holder)
            holder.handle = loop.call_soon(lambda: None)
            weakref.finalize(holder, freed.append, 1)
        # (Not run_briefly: its own stop callback would leave ferroloop a spare Context,
        # and the case to cover is a collection that finds none.)
        loop.run_until_complete(asyncio.sleep(0))

    contextvars.copy_context().run(body)
    gc.collect()
    assert len(freed) == 50
    seen = []
    for i in range(50):
        loop.call_soon(seen.append, i)
        loop.call_later(0, seen.append, i)
    loop.run_until_complete(asyncio.sleep(0.01))
    assert sorted(seen) == sorted(list(range(50)) * 2)


def test_deferred_contexts_are_on():
    """ferroloop defers the default context copy when it found CPython's context fields where
    it expects them at import (src/py/context.rs); a CPython whose layout differs turns it
    off (plain copies, same behaviour), and this test says so."""
    pytest.importorskip("ferroloop")
    from ferroloop import _ferroloop

    assert _ferroloop._deferred_contexts is True


def test_handle_cancel(loop):
    seen = []
    h = loop.call_soon(seen.append, 1)
    loop.call_soon(seen.append, 2)
    assert not h.cancelled()
    h.cancel()
    assert h.cancelled()
    h.cancel()  # idempotent
    assert h.cancelled()
    run_briefly(loop)
    assert seen == [2]


def test_cancel_clears_callback_and_args(loop):
    h = loop.call_soon(print, "x")
    h.cancel()
    assert h._callback is None
    assert h._args is None


def test_callback_may_cancel_its_own_handle(loop):
    seen = []
    holder = []

    def cb():
        holder[0].cancel()
        seen.append("ran")

    holder.append(loop.call_soon(cb))
    run_briefly(loop)
    assert seen == ["ran"]
    assert holder[0].cancelled()


def test_callback_cancels_later_handle_in_same_iteration(loop):
    seen = []
    h2 = None

    def first():
        seen.append(1)
        h2.cancel()

    loop.call_soon(first)
    h2 = loop.call_soon(seen.append, 2)
    loop.call_soon(seen.append, 3)
    run_briefly(loop)
    assert seen == [1, 3]


def test_handle_repr_names_callback(loop):
    def my_little_callback():
        pass

    h = loop.call_soon(my_little_callback)
    r = repr(h)
    assert r.startswith("<Handle ")
    assert "my_little_callback" in r
    h.cancel()
    assert repr(h) == "<Handle cancelled>"


@pytest.mark.parametrize("method", ["call_soon", "call_later", "call_soon_threadsafe"])
def test_handle_with_one_argument(loop, handler_calls, method):
    """One argument (the shape of every Future done callback; ferroloop keeps it without a
    tuple): `_args` is the same one-tuple each time, a tuple argument stays one argument, the
    repr in debug mode shows it, and an error reaches the handler with the handle."""
    schedule = getattr(loop, method)
    if method == "call_later":

        def schedule(cb, *args):
            return loop.call_later(0, cb, *args)

    seen = []
    arg = (1, 2)
    h = schedule(seen.append, arg)
    assert h._args == ((1, 2),)
    assert h._args is h._args
    assert h._args[0] is arg
    h2 = schedule(seen.append, "x")
    loop.set_debug(True)
    assert "append('x')" in repr(h2)
    loop.set_debug(False)

    def boom(x):
        raise ValueError(x)

    h3 = schedule(boom, 7)
    run_briefly(loop)
    assert seen == [(1, 2), "x"]
    assert len(handler_calls) == 1
    assert isinstance(handler_calls[0]["exception"], ValueError)
    assert handler_calls[0]["exception"].args == (7,)
    assert handler_calls[0]["handle"] is h3


class _CallableObject:
    """A callable whose type has no vectorcall: it is called through `tp_call`."""

    def __init__(self, seen, exc=None):
        self.seen = seen
        self.exc = exc

    def __call__(self, *args):
        self.seen.append((args, var.get()))
        if self.exc is not None:
            raise self.exc


def test_callable_object_callbacks(loop, handler_calls):
    """An object with `__call__` as the callback, with and without arguments, in its handle's
    context; an error reaches the exception handler with the handle."""
    seen = []
    ctx = contextvars.copy_context()
    ctx.run(var.set, "in ctx")
    loop.call_soon(_CallableObject(seen))
    loop.call_soon(_CallableObject(seen), 1)
    loop.call_soon(_CallableObject(seen), context=ctx)
    loop.call_later(0, _CallableObject(seen), 2, 3)
    h = loop.call_soon(_CallableObject(seen, ValueError("cb")))
    run_briefly(loop)
    run_briefly(loop)
    # The timer is due at the first iteration, and queued behind what call_soon queued.
    assert seen == [
        ((), "default"),
        ((1,), "default"),
        ((), "in ctx"),
        ((), "default"),
        ((2, 3), "default"),
    ]
    assert len(handler_calls) == 1
    assert isinstance(handler_calls[0]["exception"], ValueError)
    assert handler_calls[0]["handle"] is h


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_callable_object_callback_base_exception_propagates(loop, exc):
    seen = []
    loop.call_soon(_CallableObject(seen, exc()))
    loop.call_soon(_CallableObject(seen))
    with pytest.raises(exc):
        loop.run_forever()
    assert seen == [((), "default")]
    run_briefly(loop)  # the second callback is still queued, and runs
    assert seen == [((), "default"), ((), "default")]


def test_handle_repr_shows_args_in_debug(loop):
    # Python 3.12+ shows the arguments only in debug mode.
    loop.set_debug(True)
    h = loop.call_soon(print, 1, "two")
    assert "print(1, 'two')" in repr(h)
    h.cancel()


def test_handle_run_calls_callback_directly(loop):
    seen = []
    h = loop.call_soon(seen.append, "x")
    h._run()
    assert seen == ["x"]
    h.cancel()
    run_briefly(loop)
    assert seen == ["x"]


def test_handle_run_reports_exception(loop, handler_calls):
    def boom():
        raise ZeroDivisionError("boom")

    h = loop.call_soon(boom)
    h.cancel()  # keep it out of the loop; call it by hand below
    h2 = loop.call_soon(boom)
    h2._run()
    assert len(handler_calls) == 1
    ctx = handler_calls[0]
    assert isinstance(ctx["exception"], ZeroDivisionError)
    assert ctx["handle"] is h2
    assert ctx["message"].startswith("Exception in callback ")
    h2.cancel()


# --- callback checks (asyncio does them in debug mode) ----------------------------------


async def _coro():
    pass


def _schedulers(loop):
    return {
        "call_soon": lambda cb: loop.call_soon(cb),
        "call_soon_threadsafe": lambda cb: loop.call_soon_threadsafe(cb),
        "call_later": lambda cb: loop.call_later(1, cb),
        "call_at": lambda cb: loop.call_at(loop.time() + 1, cb),
    }


# call_later is implemented with call_at, so asyncio names call_at in its message.
METHOD_IN_MESSAGE = {
    "call_soon": "call_soon",
    "call_soon_threadsafe": "call_soon_threadsafe",
    "call_later": "call_at",
    "call_at": "call_at",
}


@pytest.mark.parametrize("method", sorted(METHOD_IN_MESSAGE))
def test_coroutine_object_rejected_in_debug(loop, method):
    loop.set_debug(True)
    coro = _coro()
    try:
        with pytest.raises(TypeError) as ei:
            _schedulers(loop)[method](coro)
    finally:
        coro.close()
    assert str(ei.value) == f"coroutines cannot be used with {METHOD_IN_MESSAGE[method]}()"


@pytest.mark.parametrize("method", sorted(METHOD_IN_MESSAGE))
def test_coroutine_function_rejected_in_debug(loop, method):
    loop.set_debug(True)
    with pytest.raises(TypeError) as ei:
        _schedulers(loop)[method](_coro)
    assert str(ei.value) == f"coroutines cannot be used with {METHOD_IN_MESSAGE[method]}()"


@pytest.mark.parametrize("method", sorted(METHOD_IN_MESSAGE))
def test_non_callable_rejected_in_debug(loop, method):
    loop.set_debug(True)
    with pytest.raises(TypeError) as ei:
        _schedulers(loop)[method](1)
    assert str(ei.value) == (
        f"a callable object was expected by {METHOD_IN_MESSAGE[method]}(), got 1"
    )


def test_non_callable_accepted_without_debug_and_fails_when_run(loop, handler_calls):
    """asyncio checks callbacks only in debug mode: otherwise call_soon accepts anything and
    the TypeError surfaces when the handle runs, through the exception handler."""
    assert not loop.get_debug()
    h = loop.call_soon(1)
    run_briefly(loop)
    assert len(handler_calls) == 1
    assert isinstance(handler_calls[0]["exception"], TypeError)
    assert handler_calls[0]["handle"] is h


def test_async_mock_callback_accepted_without_debug(loop):
    """A realistic case of the above: an AsyncMock used as a loop callback in a unit test.
    asyncio (non-debug) calls it (the call is recorded; its coroutine is never awaited)."""
    cb = unittest.mock.AsyncMock()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "coroutine ... was never awaited"
        loop.call_soon(cb, 1)
        loop.call_later(0, cb, 2)
        loop.run_until_complete(asyncio.sleep(0.01))
        gc.collect()
    assert cb.call_args_list == [unittest.mock.call(1), unittest.mock.call(2)]


@pytest.mark.parametrize("method", sorted(METHOD_IN_MESSAGE))
def test_closed_loop_rejects_scheduling(loop, method):
    loop.close()
    with pytest.raises(RuntimeError, match="^Event loop is closed$"):
        _schedulers(loop)[method](lambda: None)


def test_check_closed_comes_before_callback_check(loop):
    loop.set_debug(True)
    loop.close()
    with pytest.raises(RuntimeError, match="^Event loop is closed$"):
        loop.call_soon(1)


@pytest.mark.parametrize("method", ["call_soon", "call_later", "call_at"])
def test_wrong_thread_in_debug_mode(loop, method):
    loop.set_debug(True)
    errors = []

    def in_thread():
        try:
            _schedulers(loop)[method](lambda: None)
        except BaseException as e:
            errors.append(e)

    async def main():
        t = threading.Thread(target=in_thread)
        t.start()
        t.join()

    loop.run_until_complete(main())
    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError)
    assert str(errors[0]) == NOT_SAME_THREAD


def test_call_soon_threadsafe_allowed_from_other_thread_in_debug(loop):
    loop.set_debug(True)

    async def main():
        fut = loop.create_future()
        threading.Thread(target=loop.call_soon_threadsafe, args=(fut.set_result, 7)).start()
        return await fut

    assert loop.run_until_complete(asyncio.wait_for(main(), 10)) == 7


def test_call_soon_when_not_running_from_other_thread_in_debug(loop):
    """The thread check only applies while the loop runs."""
    loop.set_debug(True)
    errors = []

    def in_thread():
        try:
            loop.call_soon(lambda: None)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert errors == []
    run_briefly(loop)


# --- waking the loop from other threads -----------------------------------------------


def test_call_soon_threadsafe_from_many_threads_wakes_blocked_loop(loop):
    nthreads, per_thread = 8, 50
    total = nthreads * per_thread
    go = threading.Event()
    count = 0

    async def main():
        done = loop.create_future()

        def cb():
            nonlocal count
            count += 1
            if count == total:
                done.set_result(None)

        def worker():
            go.wait(10)
            for i in range(per_thread):
                loop.call_soon_threadsafe(cb)
                if i % 10 == 0:
                    time.sleep(0.005)  # let the loop go back to sleep in the poll

        threads = [threading.Thread(target=worker) for _ in range(nthreads)]
        for t in threads:
            t.start()
        loop.call_soon(go.set)
        # No timer but the safety net of wait_for: the loop blocks in the poll, and only the
        # wake-ups from call_soon_threadsafe get it out before the 10 s safety timeout.
        try:
            await asyncio.wait_for(done, 10)
        finally:
            for t in threads:
                t.join()

    loop.run_until_complete(main())
    assert count == total


def test_call_soon_threadsafe_wakes_loop_with_no_timers(loop):
    results = []

    def worker():
        # The loop is blocked in a poll with no timeout by now.
        loop.call_soon_threadsafe(loop.stop)
        results.append("sent")

    # A lost wake-up shows as "watchdog" in the results instead of a hang.
    run_forever_with(
        loop, worker, on_timeout=lambda: loop.call_soon_threadsafe(results.append, "watchdog")
    )
    assert results == ["sent"]


def test_call_soon_threadsafe_wakes_loop_sleeping_on_long_timer(loop):
    async def main():
        fut = loop.create_future()
        long_timer = loop.call_later(20, fut.set_exception, TimeoutError("not woken up"))

        def worker():
            time.sleep(0.05)
            loop.call_soon_threadsafe(fut.set_result, "woken")

        t = threading.Thread(target=worker)
        t.start()
        start = time.monotonic()
        try:
            result = await fut
        finally:
            long_timer.cancel()
            t.join()
        return result, time.monotonic() - start

    result, elapsed = loop.run_until_complete(main())
    assert result == "woken"
    assert elapsed < 10  # far below the 20 s timer


def test_call_soon_threadsafe_wakeups_are_not_lost(loop):
    """Many rounds of: the loop goes to sleep in the poll (or is about to), a thread schedules
    a callback at a slightly different moment each time. A lost wake-up stalls a round."""
    rounds = 300
    go = threading.Event()
    stop = False
    state = {"fut": None}

    def worker():
        i = 0
        while True:
            go.wait(10)
            go.clear()
            if stop:
                return
            # Spin for a varying few microseconds, to hit different points of the loop.
            end = time.perf_counter() + (i % 7) * 20e-6
            while time.perf_counter() < end:
                pass
            loop.call_soon_threadsafe(state["fut"].set_result, i)
            i += 1

    async def main():
        nonlocal stop
        t = threading.Thread(target=worker)
        t.start()
        try:
            for i in range(rounds):
                state["fut"] = loop.create_future()
                go.set()
                assert await asyncio.wait_for(state["fut"], 5) == i
        finally:
            stop = True
            go.set()
            t.join()

    loop.run_until_complete(main())


def test_call_soon_threadsafe_bursts_run_in_order_with_their_arguments(loop):
    """Another thread schedules bursts of thousands of callbacks while the loop runs the
    previous ones (ferroloop recycles the handles the loop frees for the thread's next
    burst): every callback runs once, in the order scheduled, with its own argument, and a
    handle kept by the caller still says what it was made for."""
    bursts, per_burst = 4, 6000
    total = bursts * per_burst
    seen = []
    kept = []

    async def main():
        done = loop.create_future()

        def cb(i):
            seen.append(i)
            if len(seen) == total:
                done.set_result(None)

        def producer():
            for b in range(bursts):
                for i in range(b * per_burst, (b + 1) * per_burst):
                    h = loop.call_soon_threadsafe(cb, i)
                    if i % 997 == 0:
                        kept.append((i, h))
                time.sleep(0.01)

        t = threading.Thread(target=producer)
        t.start()
        try:
            await asyncio.wait_for(done, 30)
        finally:
            t.join()

    loop.run_until_complete(main())
    assert seen == list(range(total))
    for i, h in kept:
        assert not h.cancelled()
        assert h._args == (i,)


def test_call_soon_threadsafe_handle_can_be_cancelled(loop):
    seen = []
    h = loop.call_soon_threadsafe(seen.append, 1)
    h.cancel()
    run_briefly(loop)
    assert seen == []


@pytest.mark.parametrize("kind", ["call_soon", "call_later", "call_at"])
def test_handle_in_reference_cycle_is_collected(loop, kind):
    """object -> its handle -> bound method -> object: once the loop has let go of the handle,
    the cycle is garbage. Handles are made after thousands of others were freed, so they come
    from ferroloop's freelist, which must still hand them to the cyclic GC."""
    import weakref

    for _ in range(3):
        for _ in range(3000):
            loop.call_soon(lambda: None)
            loop.call_later(0, lambda: None)
        run_briefly(loop)

    class Owner:
        def cb(self):
            pass

    refs = []
    for _ in range(50):
        o = Owner()
        if kind == "call_soon":
            o.handle = loop.call_soon(o.cb)
        elif kind == "call_later":
            o.handle = loop.call_later(0, o.cb)
        else:
            o.handle = loop.call_at(loop.time(), o.cb)
        refs.append(weakref.ref(o))
        del o
    run_briefly(loop)
    gc.collect()
    assert [r() for r in refs] == [None] * 50


@pytest.mark.parametrize("kind", ["call_soon", "call_soon_threadsafe"])
@pytest.mark.parametrize("then", ["run", "stop-run", "stop-close"])
def test_handle_made_behind_long_queue_in_reference_cycle_is_collected(loop_factory, kind, then):
    """object -> its handle -> bound method -> object, made by a callback of the running loop
    behind a long ready queue (ferroloop keeps such handles off the GC's lists while they
    wait): garbage once the handle has run, or has been dropped by close(), including when
    stop() left it queued."""
    import weakref

    lp = loop_factory()

    class Owner:
        def cb(self):
            pass

    refs = []

    def fill():
        schedule = getattr(lp, kind)
        for _ in range(100):
            schedule(lambda: None)
        for _ in range(50):
            o = Owner()
            o.handle = schedule(o.cb)
            refs.append(weakref.ref(o))
            del o
        if then != "run":
            lp.stop()

    lp.call_soon(fill)
    if then == "run":
        lp.call_later(0.01, lp.stop)
    lp.run_forever()
    if then == "stop-run":
        run_briefly(lp)
    lp.close()
    gc.collect()
    assert [r() for r in refs] == [None] * 50


def _call_errors(loop):
    """The TypeError message of each bad call, as a dict (method -> message)."""
    bad = {
        "call_soon()": lambda: loop.call_soon(),
        "call_soon(cb, x=1)": lambda: loop.call_soon(print, x=1),
        "call_soon_threadsafe()": lambda: loop.call_soon_threadsafe(),
        "call_soon_threadsafe(cb, x=1)": lambda: loop.call_soon_threadsafe(print, x=1),
        "call_later()": lambda: loop.call_later(),
        "call_later(1)": lambda: loop.call_later(1),
        "call_later(1, cb, x=1)": lambda: loop.call_later(1, print, x=1),
        "call_at()": lambda: loop.call_at(),
        "call_at(1, cb, x=1)": lambda: loop.call_at(1, print, x=1),
        "call_soon(cb, callback=cb)": lambda: loop.call_soon(print, callback=print),
        "call_later(1, delay=1)": lambda: loop.call_later(1, delay=1),
        "call_soon(cb, context=None, context=None)": lambda: loop.call_soon(
            print, **{"context": None}, **{"conte" + "xt": None}
        ),
    }
    out = {}
    for what, fn in bad.items():
        with pytest.raises(TypeError) as ei:
            fn()
        out[what] = str(ei.value)
    return out


def test_bad_arguments_are_type_errors_naming_the_argument(loop):
    """Missing positionals and unknown keywords: a TypeError with asyncio's wording, which
    names the method as ``BaseEventLoop.name()``."""
    errors = _call_errors(loop)
    expected = {
        "call_soon()": "call_soon() missing 1 required positional argument: 'callback'",
        "call_soon(cb, x=1)": "call_soon() got an unexpected keyword argument 'x'",
        "call_soon_threadsafe(cb, x=1)": (
            "call_soon_threadsafe() got an unexpected keyword argument 'x'"
        ),
        "call_later()": (
            "call_later() missing 2 required positional arguments: 'delay' and 'callback'"
        ),
        "call_later(1)": "call_later() missing 1 required positional argument: 'callback'",
        "call_at(1, cb, x=1)": "call_at() got an unexpected keyword argument 'x'",
        "call_soon(cb, callback=cb)": "call_soon() got multiple values for argument 'callback'",
        "call_later(1, delay=1)": "call_later() got multiple values for argument 'delay'",
    }
    assert {k: errors[k] for k in expected} == {
        k: "BaseEventLoop." + v for k, v in expected.items()
    }


def test_fixed_parameters_by_keyword(loop):
    """asyncio's signatures are `call_soon(self, callback, *args, context=None)` etc., so the
    fixed parameters may be passed by keyword (with no extra positionals)."""
    ctx = contextvars.copy_context()
    ctx.run(var.set, "kw")
    seen = []
    loop.call_soon(callback=lambda: seen.append(("soon", var.get())), context=ctx)
    loop.call_soon_threadsafe(callback=lambda: seen.append(("threadsafe", var.get())))
    loop.call_later(delay=0, callback=lambda: seen.append(("later", var.get())))
    loop.call_at(callback=lambda: seen.append(("at", var.get())), when=loop.time())
    loop.call_later(0, callback=lambda: seen.append(("later2", var.get())))
    run_briefly(loop)
    run_briefly(loop)
    assert sorted(seen) == [
        ("at", "default"),
        ("later", "default"),
        ("later2", "default"),
        ("soon", "kw"),
        ("threadsafe", "default"),
    ]


def test_positional_args_and_context_reach_the_callback(loop):
    """Any number of positional arguments, with and without context=, by position and order."""
    ctx = contextvars.copy_context()
    ctx.run(var.set, "ctx")
    seen = []

    def cb(*args):
        seen.append((args, var.get()))

    loop.call_soon(cb)
    loop.call_soon(cb, 1)
    loop.call_soon(cb, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, context=ctx)
    loop.call_soon(cb, context=None)
    loop.call_later(0, cb, "a", "b", context=ctx)
    loop.call_at(loop.time(), cb, "c")
    loop.call_soon_threadsafe(cb, "d", context=ctx)
    run_briefly(loop)
    run_briefly(loop)
    assert sorted(seen, key=repr) == sorted(
        [
            ((), "default"),
            ((1,), "default"),
            ((1, 2, 3, 4, 5, 6, 7, 8, 9, 10), "ctx"),
            ((), "default"),
            (("a", "b"), "ctx"),
            (("c",), "default"),
            (("d",), "ctx"),
        ],
        key=repr,
    )


@pytest.mark.parametrize("drop", ["run", "close"])
def test_context_of_queued_handle_in_reference_cycle_is_collected(loop_factory, drop):
    """A handle's own context copy, reached while the handle waits in the ready queue and
    put in a cycle (context -> value -> context), is garbage once the loop has run or dropped
    the handle. (ferroloop keeps queued context copies off the GC's lists until then.)"""
    import weakref

    lp = loop_factory()

    class Box:
        pass

    refs = []

    def fill():
        # A long queue, made while the loop runs: ferroloop parks handles behind 32 others.
        for _ in range(100):
            h = lp.call_soon(lambda: None)
            ctx = ctx_of(h)
            b = Box()
            b.ctx = ctx
            ctx.run(var.set, b)
            refs.append(weakref.ref(b))
            del b, ctx, h
        lp.stop()  # the 100 handles stay queued

    lp.call_soon(fill)
    lp.run_forever()
    if drop == "run":
        run_briefly(lp)
    lp.close()
    gc.collect()
    assert [r() for r in refs] == [None] * 100


@pytest.mark.parametrize("debug", [False, True])
def test_queued_handle_in_reference_cycle_is_collected_after_it_runs(loop_factory, debug):
    """Handles queued behind a long ready queue whose argument refers back to the handle
    (handle -> args -> box -> handle) are garbage once they have run, and a handle nobody
    else holds is freed as soon as it has run. (ferroloop keeps such handles off the GC's
    lists while they wait and run.)"""

    class Box:
        pass

    lp = loop_factory()
    lp.set_debug(debug)
    cycles, singles = [], []

    def cb(box):
        box.ran = True

    def fill():
        for _ in range(100):
            box = Box()
            box.h = lp.call_soon(cb, box)
            cycles.append(weakref.ref(box))
            single = Box()
            lp.call_soon(cb, single)
            singles.append(weakref.ref(single))
            del box, single
        lp.call_soon(lp.stop)

    try:
        lp.call_soon(fill)
        lp.run_forever()
        assert [r() for r in singles] == [None] * 100
        gc.collect()
        assert [r() for r in cycles] == [None] * 100
    finally:
        lp.close()


def test_handle_weakref_callback_runs_when_the_handle_is_freed(loop):
    """Handles support weak references; the callback runs once the loop has run the handle
    and nobody holds it, and the handle's callback and args are released with it."""
    import weakref

    class Arg:
        pass

    freed = []
    arg = Arg()
    arg_ref = weakref.ref(arg)
    h = loop.call_soon(lambda a: None, arg)
    ref = weakref.ref(h, lambda r: freed.append("handle"))
    del h, arg
    assert ref() is not None  # the ready queue holds it
    run_briefly(loop)
    assert freed == ["handle"]
    assert arg_ref() is None


def test_handle_fast_paths_are_on():
    """ferroloop makes and frees `Handle` objects without PyO3's generic paths when PyO3's
    object layout is the one it measured at import (handles/raw.rs); a PyO3 upgrade that
    changes the layout turns them off, and this test says so."""
    pytest.importorskip("ferroloop")
    from ferroloop import _ferroloop

    assert _ferroloop._handle_fast_paths is True


# --- `loop.call_soon` as an attribute ---------------------------------------------------------
# asyncio's C Task and Future look `loop.call_soon` up as an attribute for every step and done
# callback. On 3.10/3.11 ferroloop hands out one bound method per loop there (CachedCallSoon);
# these tests hold attribute lookup to a plain method's rules on every version.


async def _one_step_and_one_callback(loop):
    """A task that suspends once on a future another callback resolves."""
    fut = loop.create_future()
    loop.call_soon(fut.set_result, 1)
    assert await fut == 1


def test_call_soon_attribute_is_bound_to_the_loop(loop):
    m = loop.call_soon
    assert m.__self__ is loop
    assert m.__name__ == "call_soon"
    assert m == loop.call_soon
    assert "call_soon" not in vars(loop)
    seen = []
    m(seen.append, 1)
    type(loop).call_soon(loop, seen.append, 2)
    run_briefly(loop)
    assert seen == [1, 2]


def test_call_soon_assigned_on_the_instance_shadows_it(loop):
    """`loop.call_soon = f` lands in vars(loop); Tasks and Futures then call f; `del` restores
    the method, and a second `del` is an AttributeError."""
    real = loop.call_soon
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    loop.call_soon = spy
    assert vars(loop)["call_soon"] is spy
    assert loop.call_soon is spy
    loop.run_until_complete(_one_step_and_one_callback(loop))
    assert len(calls) >= 2  # at least the task's first step and the future's wake-up
    del loop.call_soon
    assert "call_soon" not in vars(loop)
    assert loop.call_soon.__self__ is loop
    n = len(calls)
    loop.run_until_complete(_one_step_and_one_callback(loop))
    assert len(calls) == n
    with pytest.raises(AttributeError, match="call_soon"):
        del loop.call_soon


def test_call_soon_patched_with_mock_on_the_instance(loop):
    with unittest.mock.patch.object(loop, "call_soon", wraps=loop.call_soon) as m:
        loop.run_until_complete(_one_step_and_one_callback(loop))
    assert m.call_count >= 2
    assert "call_soon" not in vars(loop)
    assert loop.call_soon.__self__ is loop
    n = m.call_count
    loop.run_until_complete(_one_step_and_one_callback(loop))
    assert m.call_count == n


def test_call_soon_patched_on_the_class(loop):
    """A patch on the loop's class reaches Tasks and Futures, and is undone by the patch."""
    cls = type(loop)
    original = cls.__dict__.get("call_soon")
    calls = []
    real = cls.call_soon

    def spy(self, *args, **kwargs):
        calls.append(args[0])
        return real(self, *args, **kwargs)

    with unittest.mock.patch.object(cls, "call_soon", spy):
        loop.run_until_complete(_one_step_and_one_callback(loop))
    assert len(calls) >= 2
    assert cls.__dict__.get("call_soon") is original
    n = len(calls)
    loop.run_until_complete(_one_step_and_one_callback(loop))
    assert len(calls) == n
    assert loop.call_soon.__self__ is loop


def test_call_soon_overridden_by_a_subclass(loop_factory):
    """A subclass's `call_soon` is what Tasks and Futures call; `super().call_soon` is the
    loop's own."""
    probe = loop_factory()
    base = type(probe)
    probe.close()
    calls = []

    class Sub(base):
        def call_soon(self, callback, *args, context=None):
            calls.append(callback)
            return super().call_soon(callback, *args, context=context)

    lp = Sub()
    try:
        lp.run_until_complete(_one_step_and_one_callback(lp))
        assert len(calls) >= 2
        assert lp.call_soon.__func__ is Sub.call_soon
    finally:
        lp.close()


def test_dropped_loop_is_freed_after_call_soon_was_looked_up(loop_factory):
    """A loop whose `call_soon` was looked up (a cached bound method refers back to it) is
    still freed once dropped."""
    lp = loop_factory()
    lp.run_until_complete(_one_step_and_one_callback(lp))
    assert lp.call_soon.__self__ is lp
    lp.close()
    ref = weakref.ref(lp)
    del lp
    gc.collect()
    assert ref() is None


def test_call_soon_cache_is_installed_where_it_pays():
    """ferroloop hands out one bound `call_soon` per loop on 3.10/3.11, where `_asyncio` looks
    it up per Task step (docs/DESIGN.md, "Speed notes"), and leaves the plain method on 3.12+,
    where it would only add a call. A refactor that drops either way shows here."""
    import ferroloop
    from ferroloop import _ferroloop

    lp = ferroloop.new_event_loop()
    try:
        if sys.version_info < (3, 12):
            assert isinstance(ferroloop.Loop.__dict__["call_soon"], _ferroloop.CachedCallSoon)
            assert lp.call_soon is lp.call_soon
        else:
            assert "call_soon" not in ferroloop.Loop.__dict__
            assert lp.call_soon is not lp.call_soon
        assert lp.call_soon.__self__ is lp
    finally:
        lp.close()


def test_threadsafe_flood_does_not_outrun_the_running_loop(loop):
    """A thread calling ``call_soon_threadsafe`` in a tight loop while the loop runs: the loop
    keeps up (asyncio's self-pipe write per call lets the loop's thread in; ferroloop pauses
    the caller behind a long queue), so timers stay on time and the backlog stays bounded."""
    calls = 0
    runs = 0
    stop = threading.Event()

    def cb():
        nonlocal runs
        runs += 1
        sum(range(20))  # a little work: running a callback costs more than queueing one

    def producer():
        nonlocal calls
        while not stop.is_set():
            loop.call_soon_threadsafe(cb)
            calls += 1

    async def main():
        t = threading.Thread(target=producer)
        t.start()
        try:
            lateness = []
            for _ in range(5):
                t0 = time.monotonic()
                await asyncio.sleep(0.1)
                lateness.append(time.monotonic() - t0 - 0.1)
            backlog = calls - runs
        finally:
            stop.set()
            await loop.run_in_executor(None, t.join)
        return max(lateness), backlog

    worst, backlog = run(loop, main())
    assert worst < 0.5
    assert backlog < 200_000


def test_threadsafe_calls_while_the_loop_waits_for_the_caller_are_not_slowed(loop):
    """A callback holds the loop's thread until another thread has made 30,000
    ``call_soon_threadsafe`` calls (Twisted's ``test_wakerOverflow``: the reactor waits for a
    pool thread's ``callFromThread`` calls). asyncio's calls never wait. ferroloop's pause
    behind a long queue (back-pressure for a flood while the loop runs) paused every call past
    the 8,192nd for 100 µs, at least 2.2 s here, though the loop could drain nothing."""
    n = 30_000
    ran = 0

    def noop():
        nonlocal ran
        ran += 1

    def producer(done):
        for _ in range(n):
            loop.call_soon_threadsafe(noop)
        done.set()

    def wait_for_the_producer():
        done = threading.Event()
        t0 = time.monotonic()
        threading.Thread(target=producer, args=(done,)).start()
        assert done.wait(TIMEOUT)
        return time.monotonic() - t0

    async def main():
        fut = loop.create_future()
        loop.call_soon(lambda: fut.set_result(wait_for_the_producer()))
        took = await fut
        while ran < n:
            await asyncio.sleep(0.001)
        return took

    assert run(loop, main()) < 1.5


# --- asyncio's Handle as a plain object --------------------------------------------------------


class _RunOnly:
    """A `context=` that is not a `contextvars.Context`, only something with `run()`."""

    def __init__(self):
        self.calls = []

    def run(self, callback, *args):
        self.calls.append((callback, args))
        return callback(*args)


@pytest.mark.parametrize("method", ["call_soon", "call_later", "call_soon_threadsafe"])
def test_context_of_another_type_has_its_run_called(loop, handler_calls, method):
    """asyncio's `Handle._run` calls `self._context.run(callback, *args)`, whatever the
    context is: a duck-typed one runs the callback; one without `run` fails there, for the
    exception handler."""
    schedule = getattr(loop, method)
    pre = (0,) if method == "call_later" else ()
    ctx = _RunOnly()
    seen = []
    h = schedule(*pre, seen.append, "ran", context=ctx)
    assert h._context is ctx
    h2 = schedule(*pre, seen.append, "never", context=1)
    schedule(*pre, lambda *a: seen.append(a), 1, 2, context=ctx)
    run_briefly(loop, 2)
    assert seen == ["ran", (1, 2)]
    assert [c[1] for c in ctx.calls] == [("ran",), (1, 2)]
    assert len(handler_calls) == 1
    assert isinstance(handler_calls[0]["exception"], AttributeError)
    assert handler_calls[0]["handle"] is h2


def test_handle_cancelled_attribute_is_writable(loop):
    """asyncio's loop skips a handle whose `_cancelled` was set to True (its callback is
    kept, and cancel() then does nothing more)."""
    seen = []
    h = loop.call_soon(seen.append, 1)
    t = loop.call_later(0, seen.append, 2)
    h._cancelled = True
    t._cancelled = True
    assert h.cancelled() and h._cancelled is True and t.cancelled()
    assert h._callback is not None
    h.cancel()
    assert h._callback is not None
    loop.call_soon(seen.append, 3)
    run_briefly(loop, 2)
    assert seen == [3]


def test_copy_of_a_handle(loop):
    """`copy.copy()` of a handle works on asyncio's (it has slots): a handle in no queue with
    the same callback, arguments and context."""
    import copy

    seen = []
    ctx = contextvars.Context()
    h = loop.call_soon(seen.append, "h", context=ctx)
    c = copy.copy(h)
    assert type(c) is type(h) and c is not h
    assert c._callback is h._callback and c._args is h._args and c._context is ctx
    assert c._loop is loop and not c.cancelled()
    c.cancel()
    assert c.cancelled() and not h.cancelled()
    h2 = loop.call_soon(seen.append, "h2")
    c2 = copy.copy(h2)
    assert c2._context is h2._context
    c2._run()
    run_briefly(loop)
    assert seen == ["h2", "h", "h2"]

    t = loop.call_later(100, seen.append, "t")
    ct = copy.copy(t)
    assert type(ct) is type(t) and ct.when() == t.when() and ct == t
    assert ct._scheduled == t._scheduled
    t.cancel()


def test_timer_handle_class_can_be_subclassed(loop):
    """asyncio's TimerHandle, like its Handle, is an ordinary base class."""
    t = loop.call_later(100, lambda: None)
    h = loop.call_soon(lambda: None)
    for handle in (t, h):
        sub = type("Sub", (type(handle),), {})
        assert issubclass(sub, type(handle))
    t.cancel()
    run_briefly(loop)
