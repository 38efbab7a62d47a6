"""Callback order: random programs of callbacks, zero-delay timers, futures, tasks,
cancellation and asyncio's synchronisation primitives run on asyncio's loop and on ferroloop,
and every step each one logs must come in the same order on both.

Differential by design, so not written with the ``loop`` fixture: each test runs the same
programs on a new asyncio loop and a new ferroloop loop in the same process and compares the
logs. The programs make no I/O and read no clock: timers are due at once (``call_later(0)``,
``call_at`` in the past), and a program that ends up waiting forever is stopped after a fixed
number of loop iterations (a callback that counts them), so the logs do not depend on timing.

Left out: anything whose order follows a ``set`` (``asyncio.wait``'s result sets,
``TaskGroup``'s cancellation of its children), since it follows the tasks' addresses, and what
finalizers report once the loop is closed, since it follows the garbage collector. Both differ
from run to run on asyncio's loop alone.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import random
import sys
import weakref

import pytest
from conftest import FACTORIES

PY311 = sys.version_info >= (3, 11)
var = contextvars.ContextVar("order_var", default=0)

#: Steps a program body may take (some more than once, to weight them).
STEPS = (
    "log sleep0 sleep0 sleep0 soon soon soon_args soon_ctx later0 at_past threadsafe "
    "cancel_handle spawn spawn spawn await_task cancel_task fut_new fut_result fut_exception "
    "fut_cancel fut_await fut_callback gather shield event_wait event_set queue_put queue_get "
    "lock current raise var_set wait_for"
).split() + (["timeout_none", "uncancel"] if PY311 else [])

#: Loop iterations after which a program still waiting is stopped.
TICKS = 600
#: Steps after which a program's bodies stop doing anything.
MAX_STEPS = 300


def make_program(seed: int) -> list[list[tuple]]:
    """Bodies of coroutines; body 0 is the main one. Each step names what it acts on by a
    small integer (a slot for a task, future, handle, event, queue or lock)."""
    r = random.Random(seed)
    n = r.randint(2, 6)
    bodies = []
    for _ in range(n):
        steps = []
        for _ in range(r.randint(2, 10)):
            kind = r.choice(STEPS)
            if kind == "gather":
                steps.append(
                    (kind, [r.randrange(5) for _ in range(r.randint(0, 3))], r.random() < 0.5)
                )
            else:
                steps.append((kind, r.randrange(n), r.randrange(5), r.randrange(100)))
        bodies.append(steps)
    return bodies


class Program:
    """One run of a program on one loop, logging what happens in `self.log`."""

    def __init__(self, loop, bodies, eager: bool):
        self.loop = loop
        self.bodies = bodies
        self.log: list[tuple] = []
        self.tasks: dict[int, asyncio.Task] = {}
        # Task -> name, and -> spawn number (main: 0). Weak: a task is kept alive by what
        # the program does with it, not by being named.
        self.names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.order: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.futures: dict[int, asyncio.Future] = {}
        self.handles: dict[int, asyncio.Handle] = {}
        self.events: dict[int, asyncio.Event] = {}
        self.queues: dict[int, asyncio.Queue] = {}
        self.locks: dict[int, asyncio.Lock] = {}
        self.steps = 0
        self.spawned = 0
        loop.set_exception_handler(self.handler)
        if eager:
            loop.set_task_factory(asyncio.eager_task_factory)

    def handler(self, loop, context):
        exc = context.get("exception")
        self.log.append(("handler", context["message"][:30], type(exc).__name__))

    def callback(self, n: int, depth: int = 0):
        def cb(*args):
            self.log.append(("callback", n, args, var.get()))
            if n % 7 == 0 and depth < 3:
                self.loop.call_soon(self.callback(n + 1, depth + 1), "again")
            if n % 11 == 0:
                raise ValueError(n)

        return cb

    def name(self, task) -> str:
        return self.names.get(task, "?")

    def spawn(self, body: int, depth: int, name: str):
        self.spawned += 1
        num = self.spawned  # an eager task's first steps may spawn more before it returns
        name = f"{name}#{num}"
        task = self.loop.create_task(self.run_body(body, depth + 1, name, num))
        self.names[task] = name
        self.order[task] = num
        return task

    def others(self, slots, num: int):
        """The tasks in `slots` spawned after task number `num`: a task waits only for later
        ones, so no two tasks wait for each other (asyncio's cancellation of such a cycle
        recurses without end)."""
        return [self.tasks[s] for s in slots if s in self.tasks and self.order[self.tasks[s]] > num]

    async def step(self, kind, args, depth, me, num):
        log, loop = self.log.append, self.loop
        a, b, c = (list(args) + [0, 0, 0])[:3]
        if kind == "log":
            log(("log", me, c))
        elif kind == "sleep0":
            await asyncio.sleep(0)
            log(("woke", me))
        elif kind == "soon":
            self.handles[b] = loop.call_soon(self.callback(c))
        elif kind == "soon_args":
            self.handles[b] = loop.call_soon(self.callback(c), *range(a % 3 + 1))
        elif kind == "soon_ctx":
            ctx = contextvars.copy_context()
            ctx.run(var.set, c)
            self.handles[b] = loop.call_soon(self.callback(c), context=ctx)
        elif kind == "later0":
            self.handles[b] = loop.call_later(0, self.callback(c), a)
        elif kind == "at_past":
            self.handles[b] = loop.call_at(loop.time() - 1, self.callback(c))
        elif kind == "threadsafe":
            self.handles[b] = loop.call_soon_threadsafe(self.callback(c))
        elif kind == "cancel_handle":
            if b in self.handles:
                self.handles[b].cancel()
                log(("handle cancelled", b))
        elif kind == "spawn":
            if depth < 4:
                self.tasks[b] = self.spawn(a, depth, f"{me}.{b}")
                log(("spawned", me, self.name(self.tasks[b]), self.tasks[b].done()))
        elif kind == "await_task":
            for t in self.others([b], num):
                log(("awaited", me, await t))
        elif kind == "cancel_task":
            for t in self.others([b], num):
                log(("cancel", me, self.name(t), t.cancel(f"from {me}")))
        elif kind == "uncancel":
            t = asyncio.current_task()
            log(("uncancel", me, t.cancelling(), t.uncancel()))
        elif kind == "fut_new":
            self.futures[b] = loop.create_future()
        elif kind in ("fut_result", "fut_exception", "fut_cancel"):
            f = self.futures.get(b)
            if f is not None and not f.done():
                if kind == "fut_result":
                    f.set_result(c)
                elif kind == "fut_exception":
                    f.set_exception(KeyError(c))
                else:
                    f.cancel()
                log((kind, me, b))
        elif kind == "fut_await":
            if b in self.futures:
                log(("future", me, await self.futures[b]))
        elif kind == "fut_callback":
            f = self.futures.get(b)
            if f is not None:
                f.add_done_callback(lambda fut, n=c: log(("done callback", n, fut.cancelled())))
        elif kind == "gather":
            results = await asyncio.gather(*self.others(a, num), return_exceptions=b)
            log(
                (
                    "gathered",
                    me,
                    [type(x).__name__ if isinstance(x, BaseException) else x for x in results],
                )
            )
        elif kind == "shield":
            if b in self.futures:
                log(("shielded", me, await asyncio.shield(self.futures[b])))
        elif kind == "event_wait":
            await self.events.setdefault(b, asyncio.Event()).wait()
            log(("event", me, b))
        elif kind == "event_set":
            self.events.setdefault(b, asyncio.Event()).set()
        elif kind == "queue_put":
            await self.queues.setdefault(b % 2, asyncio.Queue(2)).put(c)
            log(("put", me, c))
        elif kind == "queue_get":
            log(("got", me, await self.queues.setdefault(b % 2, asyncio.Queue(2)).get()))
        elif kind == "lock":
            async with self.locks.setdefault(b % 2, asyncio.Lock()):
                log(("locked", me, b % 2))
                await asyncio.sleep(0)
            log(("unlocked", me))
        elif kind == "current":
            log(("current", me, self.name(asyncio.current_task())))
        elif kind == "raise":
            raise RuntimeError(me)
        elif kind == "var_set":
            var.set(c)
            log(("var", me, var.get()))
        elif kind == "wait_for":
            if b in self.futures:
                log(("wait_for", me, await asyncio.wait_for(self.futures[b], None)))
        elif kind == "timeout_none":
            async with asyncio.timeout(None):
                await asyncio.sleep(0)
            log(("timeout", me))

    async def run_body(self, body: int, depth: int, me: str, num: int):
        for kind, *args in self.bodies[body]:
            self.steps += 1
            if self.steps > MAX_STEPS:
                return "step limit"
            try:
                await self.step(kind, args, depth, me, num)
            except (asyncio.CancelledError, Exception) as e:
                self.log.append(("raised", me, kind, type(e).__name__, str(e)[:20]))
                # Some bodies swallow a cancellation and go on; the task raising stays raised.
                if kind == "raise" or (isinstance(e, asyncio.CancelledError) and len(me) % 2):
                    raise
        self.log.append(("end", me))
        return me

    def run(self) -> list[tuple]:
        loop = self.loop
        ticks = [0]

        def tick():
            ticks[0] += 1
            if ticks[0] == TICKS:
                loop.stop()
            elif ticks[0] < TICKS:
                loop.call_soon(tick)

        def main_done(_):
            if ticks[0] < TICKS:
                ticks[0] = TICKS + 1  # the pending tick does nothing more
                loop.stop()

        main = loop.create_task(self.run_body(0, 0, "m", 0))
        self.names[main] = "m"
        main.add_done_callback(main_done)
        loop.call_soon(tick)
        loop.run_forever()
        self.log.append(("main", main.done() and not main.cancelled() and main.exception() is None))
        # Then cancel whatever still waits, in a fixed order, a few rounds (some bodies
        # swallow one cancellation), as asyncio.run's cleanup would.
        for _ in range(20):
            pending = [t for t in self.tasks.values() if not t.done()]
            if main not in pending and not main.done():
                pending.append(main)
            if not pending:
                break
            for t in sorted(pending, key=self.name):
                t.cancel()
            for _ in range(3):
                loop.run_until_complete(asyncio.sleep(0))
        self.log.append(("left", sum(not t.done() for t in self.tasks.values())))
        return self.log


def run_program(kind: str, bodies, eager: bool) -> list[tuple]:
    # No garbage collection while the program runs: when a collection comes depends on every
    # allocation (the loops make different objects), and what it frees reports ("was never
    # retrieved", "destroyed but it is pending") at that point. Freeing by reference counts,
    # which the program's steps decide, still happens.
    gc.collect()
    gc.disable()
    loop = FACTORIES[kind]()
    log: list[tuple] = []
    try:
        log = Program(loop, bodies, eager).run()
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        task = None  # noqa: F841 (the last one is freed now, as the others are)
        loop.close()
        # What finalizers report later ("exception was never retrieved", "destroyed but it
        # is pending") depends on when the garbage collector gets to each object, which the
        # runs before this one decide as much as the loop does (reports move between runs
        # that way on asyncio's loop alone): the log is taken before collections resume.
        log = list(log)
        gc.enable()
    return log


SEEDS_PER_TEST = 100


@pytest.mark.parametrize("eager", [False, True], ids=["tasks", "eager tasks"])
@pytest.mark.parametrize("first", range(0, 300, SEEDS_PER_TEST))
def test_random_programs_log_in_asyncio_order(first, eager):
    if eager and not hasattr(asyncio, "eager_task_factory"):
        pytest.skip("asyncio.eager_task_factory is new in Python 3.12")
    checked = 0
    for seed in range(first, first + SEEDS_PER_TEST):
        bodies = make_program(seed)
        expected = run_program("asyncio", bodies, eager)
        got = run_program("ferroloop", bodies, eager)
        if got != expected:
            at = next(
                (i for i, (x, y) in enumerate(zip(expected, got, strict=False)) if x != y),
                min(len(expected), len(got)),
            )
            pytest.fail(
                f"seed {seed}: step {at} differs\n"
                f"  asyncio:   {expected[max(0, at - 3) : at + 3]}\n"
                f"  ferroloop: {got[max(0, at - 3) : at + 3]}"
            )
        checked += len(expected)
    assert checked > SEEDS_PER_TEST * 5  # the programs did something
