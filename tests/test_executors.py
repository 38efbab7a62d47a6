"""run_in_executor, the default executor and its shutdown, asyncio.to_thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import sys
import threading

import pytest

var = contextvars.ContextVar("var", default="default")


def _join_new_threads(before, timeout=10):
    for t in threading.enumerate():
        if t not in before and t is not threading.current_thread():
            t.join(timeout)


def test_run_in_executor_default(loop):
    async def main():
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda a, b: (a + b, threading.current_thread().name), 1, 2
        )

    result, thread_name = loop.run_until_complete(main())
    assert result == 3
    assert thread_name != threading.current_thread().name
    assert thread_name.startswith("asyncio")
    assert isinstance(loop._default_executor, concurrent.futures.ThreadPoolExecutor)


def test_run_in_executor_returns_asyncio_future(loop):
    async def main():
        fut = asyncio.get_running_loop().run_in_executor(None, int, "5")
        assert isinstance(fut, asyncio.Future)
        assert fut.get_loop() is asyncio.get_running_loop()
        return await fut

    assert loop.run_until_complete(main()) == 5


def test_run_in_executor_exception(loop):
    def fails():
        raise KeyError("in thread")

    async def main():
        await asyncio.get_running_loop().run_in_executor(None, fails)

    with pytest.raises(KeyError, match="in thread"):
        loop.run_until_complete(main())


def test_run_in_executor_custom_executor(loop):
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="custom") as ex:

        async def main():
            return await asyncio.get_running_loop().run_in_executor(
                ex, lambda: threading.current_thread().name
            )

        assert loop.run_until_complete(main()).startswith("custom")
    assert loop._default_executor is None


def test_run_in_executor_many_concurrent(loop):
    async def main():
        lp = asyncio.get_running_loop()
        return await asyncio.gather(*(lp.run_in_executor(None, pow, i, 2) for i in range(200)))

    assert loop.run_until_complete(main()) == [i * i for i in range(200)]


def test_run_in_executor_rejects_coroutine_function_in_debug(loop):
    loop.set_debug(True)

    async def coro_fn():
        pass

    with pytest.raises(TypeError, match=r"^coroutines cannot be used with run_in_executor\(\)$"):
        loop.run_in_executor(None, coro_fn)


def test_run_in_executor_closed_loop(loop):
    loop.close()
    with pytest.raises(RuntimeError, match="^Event loop is closed$"):
        loop.run_in_executor(None, int)


def test_set_default_executor(loop):
    ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mine")
    loop.set_default_executor(ex)

    async def main():
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: threading.current_thread().name
        )

    assert loop.run_until_complete(main()).startswith("mine")
    loop.run_until_complete(loop.shutdown_default_executor())
    assert ex._shutdown


@pytest.mark.parametrize(
    "bad",
    [None, 1, "executor", pytest.param("process", id="ProcessPoolExecutor")],
)
def test_set_default_executor_type_check(loop, bad):
    if bad == "process":
        bad = concurrent.futures.ProcessPoolExecutor(1)
    try:
        if sys.version_info >= (3, 11):
            with pytest.raises(TypeError, match="^executor must be ThreadPoolExecutor instance$"):
                loop.set_default_executor(bad)
            assert loop._default_executor is None
        else:  # pragma: no cover - 3.10 only warns
            with pytest.warns(DeprecationWarning):
                loop.set_default_executor(bad)
            loop._default_executor = None
    finally:
        if isinstance(bad, concurrent.futures.Executor):
            bad.shutdown(wait=True)


def test_set_default_executor_subclass_accepted(loop):
    class MyPool(concurrent.futures.ThreadPoolExecutor):
        pass

    ex = MyPool(1)
    loop.set_default_executor(ex)
    assert loop._default_executor is ex
    loop.run_until_complete(loop.shutdown_default_executor())
    assert ex._shutdown


def test_shutdown_default_executor_waits_for_jobs(loop):
    done = []

    def job():
        threading.Event().wait(0.05)
        done.append(True)

    async def main():
        lp = asyncio.get_running_loop()
        fut = lp.run_in_executor(None, job)
        await asyncio.sleep(0)
        await lp.shutdown_default_executor()
        assert done == [True]
        await fut

    loop.run_until_complete(main())


def test_shutdown_default_executor_without_executor(loop):
    loop.run_until_complete(loop.shutdown_default_executor())
    assert loop._default_executor is None


def test_run_in_executor_after_shutdown(loop):
    loop.run_until_complete(loop.run_in_executor(None, int))
    loop.run_until_complete(loop.shutdown_default_executor())
    with pytest.raises(RuntimeError, match="^Executor shutdown has been called$"):
        loop.run_in_executor(None, int)
    # An explicit executor is still fine.
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        assert loop.run_until_complete(loop.run_in_executor(ex, int, "3")) == 3


def test_run_in_executor_after_shutdown_without_executor(loop):
    """shutdown_default_executor marks the loop even when no executor was ever created."""
    loop.run_until_complete(loop.shutdown_default_executor())
    with pytest.raises(RuntimeError, match="^Executor shutdown has been called$"):
        loop.run_in_executor(None, int)


def test_run_in_executor_after_close_shutdown(loop):
    loop.run_until_complete(loop.run_in_executor(None, int))
    ex = loop._default_executor
    loop.close()
    assert loop._default_executor is None
    assert ex._shutdown


def _asyncio_timeout_stops_waiting():
    # Early 3.12 releases (3.12.1 here) await the executor's shutdown before the timeout
    # applies, so the timeout never cuts the wait short; later releases fixed that.
    src = inspect.getsource(asyncio.base_events.BaseEventLoop.shutdown_default_executor)
    return "timeout" in src and "timeouts.timeout" in src


def test_shutdown_default_executor_timeout(loop, loop_kind):
    if loop_kind == "asyncio" and sys.version_info < (3, 12):
        pytest.skip("asyncio's shutdown_default_executor(timeout=) is new in Python 3.12")
    if loop_kind == "asyncio" and not _asyncio_timeout_stops_waiting():
        pytest.skip("this asyncio release waits for the executor before applying timeout=")
    release = threading.Event()
    before = set(threading.enumerate())

    async def main():
        lp = asyncio.get_running_loop()
        fut = lp.run_in_executor(None, release.wait, 10)
        with pytest.warns(RuntimeWarning, match="did not finishing joining its threads within"):
            await lp.shutdown_default_executor(timeout=0.05)
        release.set()
        assert await fut is True
        # Let the executor's threads (and the shutdown thread) finish while the loop runs, so
        # whatever they send back to the loop is handled within the test.
        deadline = lp.time() + 10
        while lp.time() < deadline and any(
            t.is_alive() for t in threading.enumerate() if t not in before
        ):
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.01)

    try:
        loop.run_until_complete(main())
    finally:
        release.set()
        _join_new_threads(before)


def test_shutdown_default_executor_timeout_not_reached(loop, loop_kind):
    if loop_kind == "asyncio" and sys.version_info < (3, 12):
        pytest.skip("asyncio's shutdown_default_executor(timeout=) is new in Python 3.12")

    async def main():
        lp = asyncio.get_running_loop()
        await lp.run_in_executor(None, int)
        await lp.shutdown_default_executor(timeout=10)

    loop.run_until_complete(main())


def test_to_thread(loop):
    async def main():
        var.set("copied into the thread")
        return await asyncio.to_thread(
            lambda x: (x, var.get(), threading.current_thread().name), "arg"
        )

    x, value, name = contextvars.copy_context().run(loop.run_until_complete, main())
    assert x == "arg"
    assert value == "copied into the thread"
    assert name != threading.current_thread().name


def test_wrap_future_from_thread_pool(loop):
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        cf = ex.submit(sum, [1, 2, 3])

        async def main():
            return await asyncio.wrap_future(cf)

        assert loop.run_until_complete(main()) == 6


def test_run_coroutine_threadsafe(loop):
    results = []

    async def add(a, b):
        await asyncio.sleep(0)
        return a + b

    def in_thread():
        results.append(asyncio.run_coroutine_threadsafe(add(2, 3), loop).result(10))

    async def main():
        t = threading.Thread(target=in_thread)
        t.start()
        while t.is_alive():
            await asyncio.sleep(0.005)
        t.join()

    loop.run_until_complete(main())
    assert results == [5]
