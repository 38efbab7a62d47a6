"""Lifetime: loops and handles are freed, file descriptors are released, and an unclosed
loop warns like asyncio's."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import weakref

import pytest
from conftest import FACTORY_SOURCE, RSS_SOURCE, run, run_briefly, run_python


class Payload:
    """Something to watch with a weak reference."""


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


def _exercise(lp):
    lp.call_soon(lambda: None)
    lp.call_later(3600, lp.stop)  # a cycle: loop -> timer -> bound method -> loop
    lp.run_until_complete(asyncio.sleep(0.001))


def test_closed_loop_is_collected(loop_factory):
    lp = loop_factory()
    _exercise(lp)
    lp.close()
    ref = weakref.ref(lp)
    del lp
    gc.collect()
    assert ref() is None


def _queued_handles_then_close(lp):
    """Handles queued and scheduled (loop -> handle -> loop cycles), then close()."""
    lp.call_soon(lp.stop)
    lp.call_later(3600, lp.stop)
    lp.run_forever()
    lp.close()


def _task_on_a_future_then_close(lp):
    """A task awaiting a future (which looks `loop.call_soon` up and makes futures), and
    `call_soon` looked up before and after close()."""

    async def main():
        fut = lp.create_future()
        lp.call_soon(fut.set_result, None)
        await fut

    lp.run_until_complete(main())
    assert lp.call_soon.__self__ is lp
    lp.close()
    assert lp.call_soon.__self__ is lp


@pytest.mark.parametrize("use", [_queued_handles_then_close, _task_on_a_future_then_close])
def test_closed_loop_freed_without_gc(loop_factory, use):
    """close() drops queued handles and whatever else refers back to the loop, so plain
    reference counting frees it."""
    lp = loop_factory()
    use(lp)
    ref = weakref.ref(lp)
    gc.disable()
    try:
        del lp
        assert ref() is None
    finally:
        gc.enable()


def test_handles_referencing_loop_do_not_leak_it_after_close(loop_factory):
    lp = loop_factory()
    handles = [lp.call_soon(lp.stop), lp.call_later(3600, lp.call_soon, lp.stop)]
    lp.close()
    ref = weakref.ref(lp)
    del lp
    gc.collect()
    # The handles the test still holds keep the loop alive, as in asyncio ...
    assert ref() is not None
    del handles
    gc.collect()
    # ... and once they are gone, so is the loop.
    assert ref() is None


def test_callback_args_released_after_run(loop):
    obj = Payload()
    ref = weakref.ref(obj)
    loop.call_soon(lambda o: None, obj)
    del obj
    run_briefly(loop)
    assert ref() is None


def test_cancelled_timer_releases_args_immediately(loop):
    obj = Payload()
    ref = weakref.ref(obj)
    h = loop.call_later(3600, lambda o: None, obj)
    del obj
    assert ref() is not None
    h.cancel()
    assert ref() is None


def test_fired_timer_releases_args(loop):
    obj = Payload()
    ref = weakref.ref(obj)
    loop.call_later(0, lambda o: None, obj)
    del obj
    loop.run_until_complete(asyncio.sleep(0.01))
    assert ref() is None


def test_close_releases_pending_callbacks(loop):
    objs = [Payload() for _ in range(3)]
    refs = [weakref.ref(o) for o in objs]
    loop.call_soon(lambda o: None, objs[0])
    loop.call_later(3600, lambda o: None, objs[1])
    loop.call_soon_threadsafe(lambda o: None, objs[2])
    del objs
    loop.close()
    assert [r() for r in refs] == [None, None, None]


def test_close_frees_file_descriptors(loop_factory):
    # Warm up (imports, lazily created process-wide fds).
    lp = loop_factory()
    run_briefly(lp)
    lp.close()
    del lp
    gc.collect()
    before = _fd_count()
    for _ in range(200):
        lp = loop_factory()
        run_briefly(lp)
        lp.close()
    del lp
    gc.collect()
    assert _fd_count() <= before


def test_loops_alive_together_release_fds(loop_factory):
    gc.collect()
    before = _fd_count()
    loops = [loop_factory() for _ in range(50)]
    assert _fd_count() > before
    for lp in loops:
        lp.close()
    del loops
    gc.collect()
    assert _fd_count() <= before


def test_unclosed_loop_warns_resource_warning(loop_factory):
    lp = loop_factory()
    lp.call_soon(lambda: None)
    with pytest.warns(ResourceWarning, match="unclosed event loop"):
        del lp
        gc.collect()


def _fill_and_stop(loop):
    for _ in range(100):
        loop.call_soon(loop.time)  # loop -> queue -> handle -> bound method -> loop
    loop.stop()


@pytest.mark.parametrize("queued", ["never run", "left by stop"])
def test_unclosed_loop_in_reference_cycle_warns_and_is_collected(loop_factory, queued):
    """loop -> its timers and queued handles -> bound methods -> loop. "left by stop": a
    running loop queued 100 handles and stopped (ferroloop keeps handles behind a long queue
    off the GC's lists while running, and must put them back when run_forever returns)."""
    lp = loop_factory()
    lp.call_later(3600, lp.stop)  # loop -> timer -> bound method -> loop
    if queued == "never run":
        lp.call_soon(lp.stop)
    else:
        lp.call_soon(_fill_and_stop, lp)
        lp.run_forever()
    ref = weakref.ref(lp)
    with pytest.warns(ResourceWarning, match="unclosed event loop"):
        del lp
        gc.collect()
    gc.collect()
    assert ref() is None


def test_unclosed_loop_is_closed_on_deletion(loop_factory):
    gc.collect()
    before = _fd_count()
    lp = loop_factory()
    run_briefly(lp)
    ref = weakref.ref(lp)
    with pytest.warns(ResourceWarning, match="unclosed event loop"):
        del lp
        gc.collect()
    assert ref() is None
    assert _fd_count() <= before


def test_closed_loop_does_not_warn(loop_factory, recwarn):
    lp = loop_factory()
    lp.close()
    del lp
    gc.collect()
    assert [w for w in recwarn if issubclass(w.category, ResourceWarning)] == []


def test_handle_weakref(loop):
    h = loop.call_soon(lambda: None)
    t = loop.call_later(3600, lambda: None)
    rh, rt = weakref.ref(h), weakref.ref(t)
    t.cancel()
    del h, t
    run_briefly(loop)
    gc.collect()
    assert rh() is None
    assert rt() is None


def test_loop_in_thread_freed(loop_factory):
    import threading

    refs = []

    def in_thread():
        lp = loop_factory()
        lp.run_until_complete(asyncio.sleep(0.001))
        lp.close()
        refs.append(weakref.ref(lp))

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    gc.collect()
    assert refs[0]() is None


_BURST_CODE = """
import asyncio, gc, json, os
import ferroloop

N = 300_000
kind = {kind!r}
loop = {factory}()


{rss_source}

async def main():
    await asyncio.sleep(0)
    gc.collect()
    before = rss()
    done = loop.create_future()
    ran = 0

    def cb():
        nonlocal ran
        ran += 1
        if ran == N:
            done.set_result(None)

    for i in range(N):
        if kind == "timers":
            loop.call_later(0.001 + (i % 1000) * 1e-6, cb)
        else:
            loop.call_soon(cb)
    peak = rss() - before
    await done
    # Idle twice, long enough for a loop that gives room back only now and then.
    for _ in range(2):
        await asyncio.sleep(0.3)
    gc.collect()
    print(json.dumps({{"peak": peak, "retained": rss() - before}}))


loop.run_until_complete(main())
loop.close()
"""


@pytest.mark.parametrize("burst", ["soon", "timers"])
def test_memory_of_a_burst_is_given_back(loop_kind, burst):
    """After 300,000 callbacks (or timers) queued at once have run and the loop has idled,
    the memory they took is given back: asyncio's list and deque shrink as they empty, and
    the process keeps a small part of the burst's peak. (ferroloop's queues once kept their
    largest size for good: 15-22 MB after 500,000.) Run in a fresh interpreter, so other
    tests' memory does not hide the growth."""
    code = _BURST_CODE.format(factory=FACTORY_SOURCE[loop_kind], kind=burst, rss_source=RSS_SOURCE)
    res = run_python(code, timeout=60)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    # The burst itself: tens of MB (handles, their queue).
    assert got["peak"] > 20 * 2**20, got
    assert got["retained"] <= got["peak"] / 8, got


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_closing_its_loop_leaves_the_parents_registrations(loop):
    """After ``fork()`` the epoll instance (or selector) and the fds are shared: a child that
    closes its copy of the loop must not unregister the parent's fds (asyncio just closes its
    selector). The parent's reader and server still work."""
    r, w = socket.socketpair()
    got = []

    async def handle(reader, writer):
        writer.write(b"hi")
        writer.close()

    async def setup():
        return await asyncio.start_server(handle, "127.0.0.1", 0)

    srv = run(loop, setup())
    loop.add_reader(r, lambda: got.append(r.recv(10)))
    pid = os.fork()
    if pid == 0:  # the child: close its copy of the loop, leave at once
        try:
            loop.close()
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0

    async def check():
        w.send(b"x")
        reader, writer = await asyncio.open_connection(*srv.sockets[0].getsockname()[:2])
        answer = await reader.read()
        writer.close()
        while not got:
            await asyncio.sleep(0.001)
        return answer

    try:
        assert run(loop, check(), timeout=5) == b"hi"
        assert got == [b"x"]
    finally:
        loop.remove_reader(r)
        srv.close()
        run(loop, srv.wait_closed())
        r.close()
        w.close()


_OUT_OF_MEMORY_CODE = """
import asyncio, resource, ferroloop
loop = {factory}()
resource.setrlimit(resource.RLIMIT_AS, (448 << 20, 448 << 20))
n = 0
try:
    while True:
        {call}
        n += 1
except MemoryError:
    print("MemoryError after", n)
try:
    loop.close()
except MemoryError:
    pass
print("survived")
"""


@pytest.mark.parametrize(
    "call", ["loop.call_soon(int)", "loop.call_later(3600, int)"], ids=["call_soon", "call_later"]
)
def test_out_of_memory_is_a_memory_error(loop_kind, call):
    """Queueing callbacks until memory runs out (an address-space limit) raises MemoryError,
    as asyncio's deque / heapq do; the process does not abort, and the loop still closes."""
    code = _OUT_OF_MEMORY_CODE.format(factory=FACTORY_SOURCE[loop_kind], call=call)
    res = run_python(code, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "MemoryError after" in res.stdout and res.stdout.strip().endswith("survived")


_LEFT_AS_CURRENT_CODE = """
import asyncio, signal, warnings
import ferroloop
if {ferroloop}:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_event_loop_policy(ferroloop.EventLoopPolicy())
loop = asyncio.new_event_loop()
loop.set_debug(True)
{handlers}
asyncio.set_event_loop(loop)  # never run, never closed: the policy holds it until exit
del loop
print("exiting")
"""


@pytest.mark.parametrize("handlers", [False, True])
def test_a_loop_left_unclosed_as_the_current_loop_closes_quietly_at_exit(loop_kind, handlers):
    """A debug-mode loop made by the policy, left as its current loop and never closed (what
    pytest-asyncio 0.25's fixture leaves behind) is closed by ``__del__`` at interpreter exit.
    asyncio's does so without error; ferroloop's ran after its module's globals were cleared
    and printed "Exception ignored ... 'NoneType' object has no attribute 'debug'"."""
    sig = "loop.add_signal_handler(signal.SIGUSR1, print)" if handlers else ""
    code = _LEFT_AS_CURRENT_CODE.format(ferroloop=loop_kind == "ferroloop", handlers=sig)
    res = run_python(code, args=("-W", "ignore::ResourceWarning"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "exiting"
    assert "Exception ignored" not in res.stderr, res.stderr
    assert "Error" not in res.stderr, res.stderr
