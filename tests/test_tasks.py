"""Tasks on the loop: create_task, task factories, eager tasks, cancellation, gather,
TaskGroup and timeouts."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys

import pytest

py311 = pytest.mark.skipif(sys.version_info < (3, 11), reason="new in Python 3.11")
py312 = pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are new in Python 3.12")

var = contextvars.ContextVar("var", default="default")


async def _value(v, delay=0):
    await asyncio.sleep(delay)
    return v


def test_create_task_returns_asyncio_task(loop):
    task = loop.create_task(_value(1))
    assert type(task) is asyncio.Task
    assert task.get_loop() is loop
    assert loop.run_until_complete(task) == 1


def test_create_task_name(loop):
    t1 = loop.create_task(_value(1), name="my task")
    t2 = loop.create_task(_value(2))
    assert t1.get_name() == "my task"
    assert t2.get_name().startswith("Task-")
    assert "my task" in repr(t1)
    loop.run_until_complete(asyncio.gather(t1, t2))


@py311
def test_create_task_context(loop):
    ctx = contextvars.Context()
    ctx.run(var.set, "task ctx")

    async def read():
        await asyncio.sleep(0)
        var.set("changed in task")
        return ctx.get(var)

    task = loop.create_task(read(), context=ctx)
    assert loop.run_until_complete(task) == "changed in task"
    assert var.get() == "default"


def test_task_context_default_is_copy(loop):
    async def main():
        var.set("main")
        child = asyncio.get_running_loop().create_task(child_reads())
        var.set("main changed after create_task")
        return await child

    async def child_reads():
        return var.get()

    assert contextvars.copy_context().run(loop.run_until_complete, main()) == "main"


def test_current_task_and_all_tasks(loop):
    async def main():
        me = asyncio.current_task()
        other = asyncio.get_running_loop().create_task(_value(1, 0.01))
        tasks = asyncio.all_tasks()
        await other
        return me, other, tasks

    task = loop.create_task(main())
    me, other, tasks = loop.run_until_complete(task)
    assert me is task
    assert tasks == {task, other}
    assert asyncio.all_tasks(loop) == set()


def test_create_future_type(loop):
    fut = loop.create_future()
    assert type(fut) is asyncio.Future
    assert fut.get_loop() is loop
    fut.cancel()


class _MyFuture(asyncio.Future):
    pass


class _MyTask(asyncio.Task):
    pass


@pytest.mark.parametrize("how", ["replaced", "module __getattr__"])
def test_create_future_and_task_use_what_the_modules_hold_now(loop, monkeypatch, how):
    """asyncio's create_future/create_task look up `futures.Future` and `tasks.Task` at each
    call: a class put there later is used, also when it comes from a module `__getattr__`
    (PEP 562) because the name was removed."""
    if how == "replaced":
        monkeypatch.setattr(asyncio.futures, "Future", _MyFuture)
        monkeypatch.setattr(asyncio.tasks, "Task", _MyTask)
    else:
        monkeypatch.delattr(asyncio.futures, "Future")
        monkeypatch.delattr(asyncio.tasks, "Task")

        def getattr_for(name, cls):
            def module_getattr(attr):
                if attr == name:
                    return cls
                raise AttributeError(attr)

            return module_getattr

        monkeypatch.setattr(
            asyncio.futures, "__getattr__", getattr_for("Future", _MyFuture), raising=False
        )
        monkeypatch.setattr(
            asyncio.tasks, "__getattr__", getattr_for("Task", _MyTask), raising=False
        )

    async def coro():
        return 5

    fut = loop.create_future()
    task = loop.create_task(coro())
    assert type(fut) is _MyFuture
    assert type(task) is _MyTask
    assert loop.run_until_complete(task) == 5
    fut.cancel()


# --- task factories ----------------------------------------------------------------------


def test_default_task_factory_is_none(loop):
    assert loop.get_task_factory() is None


def test_set_task_factory(loop):
    made = []

    def factory(lp, coro, **kwargs):
        task = asyncio.Task(coro, loop=lp, **kwargs)
        made.append(task)
        return task

    loop.set_task_factory(factory)
    assert loop.get_task_factory() is factory
    task = loop.create_task(_value("via factory"), name="named")
    assert made == [task]
    assert task.get_name() == "named"
    assert loop.run_until_complete(task) == "via factory"
    # Tasks created by asyncio functions go through it too.

    async def main():
        return await asyncio.gather(_value(1), _value(2))

    loop.run_until_complete(main())  # the task for main() and one per gathered coroutine
    assert len(made) == 4
    loop.set_task_factory(None)
    assert loop.get_task_factory() is None


def test_legacy_two_argument_task_factory(loop):
    """Without context=, the factory is called as factory(loop, coro); the name is set on the
    task afterwards."""
    calls = []

    def factory(lp, coro):
        calls.append(lp)
        return asyncio.Task(coro, loop=lp)

    loop.set_task_factory(factory)
    task = loop.create_task(_value(3), name="legacy")
    assert calls == [loop]
    assert task.get_name() == "legacy"
    assert loop.run_until_complete(task) == 3


@py311
def test_task_factory_receives_context(loop):
    seen = []

    def factory(lp, coro, **kwargs):
        seen.append(kwargs)
        return asyncio.Task(coro, loop=lp, **kwargs)

    loop.set_task_factory(factory)
    ctx = contextvars.copy_context()
    task = loop.create_task(_value(4), context=ctx)
    assert seen == [{"context": ctx}]
    assert loop.run_until_complete(task) == 4


def test_create_task_rejects_non_coroutine(loop):
    with pytest.raises(TypeError, match="a coroutine was expected, got 1"):
        loop.create_task(1)


def test_set_task_factory_rejects_non_callable(loop):
    with pytest.raises(TypeError, match="^task factory must be a callable or None$"):
        loop.set_task_factory(1)
    assert loop.get_task_factory() is None


@py312
def test_eager_task_factory(loop):
    loop.set_task_factory(asyncio.eager_task_factory)
    order = []

    async def no_suspend():
        order.append("ran eagerly")
        return "eager"

    async def main():
        task = asyncio.get_running_loop().create_task(no_suspend())
        order.append("after create_task")
        assert task.done()
        return await task

    assert loop.run_until_complete(main()) == "eager"
    assert order == ["ran eagerly", "after create_task"]


@py312
def test_eager_task_factory_suspending_task(loop):
    loop.set_task_factory(asyncio.eager_task_factory)
    order = []

    async def suspends():
        order.append("start")
        assert asyncio.current_task() is not None
        await asyncio.sleep(0.001)
        order.append("end")
        return "later"

    async def main():
        task = asyncio.get_running_loop().create_task(suspends())
        order.append("after create_task")
        assert not task.done()
        return await task

    assert loop.run_until_complete(main()) == "later"
    assert order == ["start", "after create_task", "end"]


@py312
def test_task_eager_start_argument(loop):
    order = []

    async def child():
        order.append("child")
        return 5

    async def main():
        task = asyncio.Task(child(), loop=asyncio.get_running_loop(), eager_start=True)
        order.append("after Task()")
        return await task

    assert loop.run_until_complete(main()) == 5
    assert order == ["child", "after Task()"]


@py312
def test_create_task_eager_start(loop, loop_kind):
    if loop_kind == "asyncio" and sys.version_info < (3, 14):
        pytest.skip("asyncio's loop.create_task(eager_start=) is new in Python 3.14")
    order = []

    async def child():
        order.append("child")

    async def main():
        task = asyncio.get_running_loop().create_task(child(), eager_start=True)
        order.append("after")
        await task

    loop.run_until_complete(main())
    assert order == ["child", "after"]


# --- cancellation ------------------------------------------------------------------------


def test_cancel_sleeping_task(loop):
    async def sleeper():
        await asyncio.sleep(3600)

    async def main():
        task = asyncio.get_running_loop().create_task(sleeper())
        await asyncio.sleep(0)
        assert task.cancel("stop it")
        with pytest.raises(asyncio.CancelledError):
            await task
        return task

    task = loop.run_until_complete(main())
    assert task.cancelled()


def test_cancel_message_propagates(loop):
    async def sleeper():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError as e:
            return e.args

    async def main():
        task = asyncio.get_running_loop().create_task(sleeper())
        await asyncio.sleep(0)
        task.cancel("the message")
        return await task

    assert loop.run_until_complete(main()) == ("the message",)


@py311
def test_cancelling_and_uncancel(loop):
    async def main():
        task = asyncio.get_running_loop().create_task(asyncio.sleep(3600))
        await asyncio.sleep(0)
        task.cancel()
        task.cancel()
        assert task.cancelling() == 2
        assert task.uncancel() == 1
        with pytest.raises(asyncio.CancelledError):
            await task

    loop.run_until_complete(main())


def test_cancel_task_blocked_on_future_from_callback(loop):
    async def main():
        fut = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(asyncio.wait_for(fut, 3600))
        asyncio.get_running_loop().call_later(0.01, task.cancel)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fut.cancelled()

    loop.run_until_complete(main())


def test_shield(loop):
    async def main():
        inner = asyncio.get_running_loop().create_task(_value("inner", 0.02))
        outer = asyncio.ensure_future(asyncio.shield(inner))
        await asyncio.sleep(0)
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        return await inner

    assert loop.run_until_complete(main()) == "inner"


def test_unretrieved_task_exception_reported(loop, handler_calls):
    async def fails():
        raise KeyError("lost")

    task = loop.create_task(fails())
    loop.run_until_complete(asyncio.sleep(0.01))
    assert task.done()
    del task
    gc.collect()
    assert len(handler_calls) == 1
    assert handler_calls[0]["message"] == "Task exception was never retrieved"
    assert isinstance(handler_calls[0]["exception"], KeyError)


# --- many tasks, gather, wait ------------------------------------------------------------


def test_gather_10k_tasks(loop):
    async def work(i):
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return i * 2

    async def main():
        return await asyncio.gather(*(work(i) for i in range(10_000)))

    assert loop.run_until_complete(main()) == [i * 2 for i in range(10_000)]


def test_gather_return_exceptions(loop):
    async def fails():
        raise ValueError("x")

    async def main():
        return await asyncio.gather(_value(1), fails(), return_exceptions=True)

    res = loop.run_until_complete(main())
    assert res[0] == 1 and isinstance(res[1], ValueError)


def test_wait_first_completed(loop):
    async def main():
        lp = asyncio.get_running_loop()
        fast = lp.create_task(_value("fast", 0.001))
        slow = lp.create_task(_value("slow", 3600))
        done, pending = await asyncio.wait({fast, slow}, return_when=asyncio.FIRST_COMPLETED)
        slow.cancel()
        return done == {fast}, pending == {slow}

    assert loop.run_until_complete(main()) == (True, True)


def test_wait_for_timeout(loop):
    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.sleep(3600), 0.01)
        return await asyncio.wait_for(_value("in time"), 10)

    assert loop.run_until_complete(main()) == "in time"


def test_as_completed_order(loop):
    async def main():
        aws = [_value(i, 0.01 * (3 - i)) for i in range(3)]
        return [await f for f in asyncio.as_completed(aws)]

    assert loop.run_until_complete(main()) == [2, 1, 0]


# --- TaskGroup and timeout (3.11+) -------------------------------------------------------


@py311
def test_task_group(loop):
    async def main():
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(_value(i, 0.001 * i)) for i in range(10)]
        return [t.result() for t in tasks]

    assert loop.run_until_complete(main()) == list(range(10))


@py311
def test_task_group_error_cancels_siblings(loop):
    cancelled = []

    async def sibling():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def fails():
        await asyncio.sleep(0.001)
        raise ValueError("boom")

    async def main():
        async with asyncio.TaskGroup() as tg:
            tg.create_task(sibling())
            tg.create_task(fails())

    with pytest.raises(ExceptionGroup) as ei:  # noqa: F821 - 3.11+ builtin
        loop.run_until_complete(main())
    assert ei.group_contains(ValueError) if hasattr(ei, "group_contains") else True
    assert [type(e) for e in ei.value.exceptions] == [ValueError]
    assert cancelled == [True]


@py311
def test_timeout_expires(loop):
    async def main():
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await asyncio.sleep(3600)
        return "after"

    assert loop.run_until_complete(main()) == "after"


@py311
def test_timeout_not_expired_and_reschedule(loop):
    async def main():
        async with asyncio.timeout(10) as cm:
            assert cm.when() is not None
            cm.reschedule(None)
            assert cm.when() is None
            await asyncio.sleep(0.001)
        assert not cm.expired()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + 0.01) as cm2:
                await asyncio.sleep(3600)
        assert cm2.expired()

    loop.run_until_complete(main())
