"""Loop microbenchmarks: one function per workload, loop-agnostic.

A throughput workload is ``fn(loop, n, lat) -> ops``: it does ``n`` units of work on ``loop``
(which it drives itself with ``run_forever``/``run_until_complete``), checks that the work
really happened (callbacks counted, futures resolved) and returns the number of logical
operations done, as named by ``Workload.op``. ``lat`` is a list that latency workloads append
per-op latencies to, in nanoseconds. The worker (``_worker.py``) picks ``n`` so that one call
takes a few tens of milliseconds and calls the function repeatedly for the time budget.

A memory workload is ``fn(loop) -> dict`` and runs once in a fresh process.

Only the public asyncio event-loop API is used, so every loop gets the same code.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

BATCH = 1000  # operations per unit of ``n`` unless a workload says otherwise


@dataclass(frozen=True)
class Workload:
    name: str
    fn: Callable
    op: str  # what one counted operation is
    bar: float | None  # ferroloop ÷ uvloop must be >= bar (throughput workloads)
    kind: str = "throughput"  # "throughput" or "memory"
    latency: bool = False  # reports per-op latency percentiles
    unit: int = 1000  # operations per unit of ``n``
    doc: str = ""
    min_chunk: float = 0.0  # seconds per call at least, whatever --chunk says
    heavy: bool = False  # a run takes seconds whatever --duration says: fewer rounds in --quick


WORKLOADS: dict[str, Workload] = {}


def workload(
    name, op, bar=None, kind="throughput", latency=False, unit=BATCH, min_chunk=0.0, heavy=False
):
    def register(fn):
        doc = " ".join((fn.__doc__ or "").split())
        WORKLOADS[name] = Workload(name, fn, op, bar, kind, latency, unit, doc, min_chunk, heavy)
        return fn

    return register


class SanityError(AssertionError):
    """The workload did not do the work it claims (a loop bug, or a harness bug)."""


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise SanityError(what)


# --- callbacks ------------------------------------------------------------------------------


@workload("call_soon", op="callback", bar=2.0)
def call_soon(loop, n, lat):
    """A driver callback schedules 1000 callbacks with loop.call_soon(cb), then itself after
    them; repeated n times. Counts callbacks run (each cb increments a counter)."""
    ran = 0
    batches = 0

    def cb():
        nonlocal ran
        ran += 1

    def driver():
        nonlocal batches
        if batches == n:
            loop.stop()
            return
        batches += 1
        soon = loop.call_soon
        for _ in range(BATCH):
            soon(cb)
        soon(driver)

    loop.call_soon(driver)
    loop.run_forever()
    _check(ran == n * BATCH, f"call_soon: {ran} callbacks ran, expected {n * BATCH}")
    return ran


@workload("call_soon chain", op="callback", bar=3.5)
def call_soon_chain(loop, n, lat):
    """One callback that reschedules itself with loop.call_soon, n*1000 times: only one handle
    is ever ready, so this is the cost of one whole loop iteration per callback."""
    target = n * BATCH
    ran = 0
    soon = loop.call_soon

    def cb():
        nonlocal ran
        ran += 1
        if ran < target:
            soon(cb)
        else:
            loop.stop()

    soon(cb)
    loop.run_forever()
    _check(ran == target, f"chain: {ran} callbacks ran, expected {target}")
    return ran


# --- timers ---------------------------------------------------------------------------------


@workload("timer churn", op="call_later+cancel", bar=1.5)
def timer_churn(loop, n, lat):
    """`loop.call_later(10, cb).cancel()` 1000 times per loop iteration (a driver callback
    re-queued with call_soon), so the loop purges cancelled timers as it would under a
    server's per-request timeouts. No cb may run."""
    fired = 0
    batches = 0

    def cb():
        nonlocal fired
        fired += 1

    def driver():
        nonlocal batches
        if batches == n:
            loop.stop()
            return
        batches += 1
        later = loop.call_later
        for _ in range(BATCH):
            later(10, cb).cancel()
        loop.call_soon(driver)

    loop.call_soon(driver)
    loop.run_forever()
    _check(fired == 0, f"timer churn: {fired} cancelled timers fired")
    return n * BATCH


# 1000 delays scattered over [1 ms, 2 ms): long enough that uvloop keeps them as real libuv
# timers (it turns delays under 0.5 ms into call_soon), scattered so the heap is exercised.
_DELAYS = [0.001 + ((i * 7919) % BATCH) * 1e-6 for i in range(BATCH)]
_TIMERS_IN_FLIGHT = 20_000


# Each call starts with 20,000 timers scheduled at once and ends draining them, which takes
# up to ~50 ms for the slowest loop: a call must be long against that (min_chunk), or the
# figure measures the ramp and not the saturated loop the docstring describes.
@workload("timers firing", op="timer fired", bar=3.5, min_chunk=0.5, heavy=True)
def timers_firing(loop, n, lat):
    """20,000 timers in flight, half call_later(d), half call_at(loop.time() + d), d scattered
    over 1-2 ms; each timer that fires schedules the next until n*1000 have been scheduled.
    The population is larger than any loop can fire in 2 ms, so the loop is saturated
    (never idle) and the figure is timers scheduled+fired per second. Counts timers fired."""
    total = n * BATCH
    fired = 0
    scheduled = 0
    later = loop.call_later
    at = loop.call_at
    now = loop.time
    delays = _DELAYS

    def schedule():
        nonlocal scheduled
        scheduled += 1
        if scheduled & 1:
            later(delays[scheduled % BATCH], cb)
        else:
            at(now() + delays[scheduled % BATCH], cb)

    def cb():
        nonlocal fired
        fired += 1
        if scheduled < total:
            schedule()
        elif fired == total:
            loop.stop()

    def start():
        for _ in range(min(total, _TIMERS_IN_FLIGHT)):
            schedule()

    loop.call_soon(start)
    loop.run_forever()
    _check(fired == total, f"timers firing: {fired} fired, expected {total}")
    return fired


# --- futures and tasks ----------------------------------------------------------------------

_LAT_EVERY = 8  # latency sampled on every 8th op of the hot futures workloads


@workload("future ping-pong", op="round trip", bar=1.8, latency=True)
def future_ping_pong(loop, n, lat):
    """Two tasks: A resolves the future B awaits, handing B a new future, and awaits it; B
    wakes, resolves it and awaits its next future. One op = one round trip A->B->A (2 futures,
    2 set_result, 2 task wake-ups). Latency: one round trip, sampled 1 in 8."""
    total = n * BATCH
    box = [None]
    clock = time.perf_counter_ns

    async def b_side():
        served = 0
        while True:
            req = loop.create_future()
            box[0] = req
            reply = await req
            if reply is None:
                return served
            served += 1
            reply.set_result(served)

    async def a_side():
        got = 0
        for i in range(total):
            reply = loop.create_future()
            if i % _LAT_EVERY:
                box[0].set_result(reply)
                got = await reply
            else:
                t0 = clock()
                box[0].set_result(reply)
                got = await reply
                lat.append(clock() - t0)
        box[0].set_result(None)
        return got

    async def main():
        b = loop.create_task(b_side())
        await asyncio.sleep(0)  # let B publish its first future
        got = await loop.create_task(a_side())
        return got, await b

    got, served = loop.run_until_complete(main())
    _check(got == served == total, f"ping-pong: {got}/{served} round trips, expected {total}")
    return total


_GATHER = 100_000


async def _trivial(i):
    return i


@workload("gather 100k", op="task", bar=1.5, unit=_GATHER, heavy=True)
def gather_100k(loop, n, lat):
    """loop.create_task() of 100,000 trivial coroutines, then asyncio.gather() of them; n times.
    Counts tasks completed (results summed and checked)."""

    async def main():
        done = 0
        for _ in range(n):
            tasks = [loop.create_task(_trivial(i)) for i in range(_GATHER)]
            results = await asyncio.gather(*tasks)
            _check(sum(results) == _GATHER * (_GATHER - 1) // 2, "gather: wrong results")
            done += len(results)
        return done

    done = loop.run_until_complete(main())
    _check(done == n * _GATHER, f"gather: {done} tasks, expected {n * _GATHER}")
    return done


async def _sleeper(k):
    sleep = asyncio.sleep
    for _ in range(k):
        await sleep(0)
    return k


@workload("sleep(0)", op="sleep(0)", bar=2.3)
def sleep0(loop, n, lat):
    """One task doing `await asyncio.sleep(0)` n*1000 times (one task step, one call_soon and
    one loop iteration each). Counts sleeps."""
    done = loop.run_until_complete(_sleeper(n * BATCH))
    _check(done == n * BATCH, "sleep(0): wrong count")
    return done


@workload("sleep(0) x100", op="sleep(0)", bar=1.3)
def sleep0_x100(loop, n, lat):
    """100 tasks each doing `await asyncio.sleep(0)` n*10 times, under asyncio.gather. Counts
    sleeps (n*1000 in all)."""

    async def main():
        return await asyncio.gather(*(loop.create_task(_sleeper(n * 10)) for _ in range(100)))

    done = sum(loop.run_until_complete(main()))
    _check(done == n * BATCH, "sleep(0) x100: wrong count")
    return done


# --- threads ----------------------------------------------------------------------------------


@workload("call_soon_threadsafe", op="callback", bar=2.8)
def call_soon_threadsafe(loop, n, lat):
    """Another thread calls loop.call_soon_threadsafe(cb) n*1000 times, as fast as it can,
    into the running loop; the loop runs them. Counts callbacks run, timed until the last has
    run (so the figure includes the wake-ups and the contention for the GIL)."""
    total = n * BATCH
    ran = 0
    done = loop.create_future()

    def cb():
        nonlocal ran
        ran += 1
        if ran == total:
            done.set_result(None)

    def producer():
        threadsafe = loop.call_soon_threadsafe
        for _ in range(total):
            threadsafe(cb)

    t = threading.Thread(target=producer)
    loop.call_soon(t.start)
    loop.run_until_complete(done)
    t.join()
    _check(ran == total, f"threadsafe: {ran} callbacks ran, expected {total}")
    return ran


@workload("call_soon_threadsafe rtt", op="round trip", latency=True, unit=50)
def call_soon_threadsafe_rtt(loop, n, lat):
    """Round trip thread -> loop -> thread: a thread calls
    loop.call_soon_threadsafe(lock.release) and blocks on lock.acquire(); the idle loop wakes
    and runs the callback, which lets the thread go on. n*50 round trips; latency is every
    round trip."""
    total = n * 50
    lock = threading.Lock()
    lock.acquire()
    done = loop.create_future()
    clock = time.perf_counter_ns
    trips = 0

    def client():
        nonlocal trips
        try:
            threadsafe = loop.call_soon_threadsafe
            release, acquire = lock.release, lock.acquire
            for _ in range(total):
                t0 = clock()
                threadsafe(release)
                acquire()
                lat.append(clock() - t0)
                trips += 1
        finally:
            loop.call_soon_threadsafe(done.set_result, None)

    t = threading.Thread(target=client)
    loop.call_soon(t.start)
    loop.run_until_complete(done)
    t.join()
    _check(trips == total, f"threadsafe rtt: {trips} round trips, expected {total}")
    return total


# --- memory ---------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_MEM_TIMERS = 500_000


@workload("memory: 500k cancelled timers", op="MB RSS growth", kind="memory", heavy=True)
def memory_cancelled_timers(loop):
    """RSS growth after 500,000 `loop.call_later(3600, cb).cancel()` (handles dropped), then a
    few loop iterations (asyncio purges its heap there) and gc.collect(). Bar: ferroloop's
    growth <= asyncio's. Also reports the growth before those iterations (peak)."""

    def cb():
        raise AssertionError("a cancelled timer ran")

    async def warm():
        await asyncio.sleep(0)

    loop.run_until_complete(warm())
    gc.collect()
    before = rss_bytes()
    mid = 0

    async def main():
        nonlocal mid
        later = loop.call_later
        for _ in range(_MEM_TIMERS):
            later(3600, cb).cancel()
        mid = rss_bytes()
        for _ in range(3):
            await asyncio.sleep(0)

    t0 = time.perf_counter()
    loop.run_until_complete(main())
    elapsed = time.perf_counter() - t0
    gc.collect()
    after = rss_bytes()
    mb = 1024 * 1024
    return {
        "value": (after - before) / mb,  # retained MB: the bar's figure
        "peak_mb": (mid - before) / mb,
        "bytes_per_timer": (after - before) / _MEM_TIMERS,
        "wall_s": elapsed,
        "timers": _MEM_TIMERS,
    }


#: rows reported as "n/a" until their workloads exist: (name, note). None now: the network
#: workloads, the idle-connections memory row among them, are in netbench.py.
PENDING: list[tuple[str, str]] = []
