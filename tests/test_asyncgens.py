"""Async generator hooks: finalization while running, shutdown_asyncgens, late generators."""

from __future__ import annotations

import asyncio
import gc

import pytest


def _make_agen(log, name="agen"):
    async def agen():
        try:
            for i in range(10):
                yield i
        finally:
            await asyncio.sleep(0)  # an await in finally: needs the loop to finalize
            log.append(f"{name} closed")

    return agen()


def test_shutdown_asyncgens_closes_unfinished_generator(loop):
    log = []
    keep = []

    async def main():
        g = _make_agen(log)
        keep.append(g)
        assert await g.__anext__() == 0

    loop.run_until_complete(main())
    assert log == []
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert log == ["agen closed"]


def test_shutdown_asyncgens_closes_several(loop):
    log = []
    keep = []

    async def main():
        for name in ("a", "b", "c"):
            g = _make_agen(log, name)
            keep.append(g)
            await g.__anext__()

    loop.run_until_complete(main())
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert sorted(log) == ["a closed", "b closed", "c closed"]


def test_exhausted_generator_not_closed_again(loop):
    log = []
    keep = []

    async def main():
        g = _make_agen(log)
        keep.append(g)
        async for _ in g:
            pass

    loop.run_until_complete(main())
    assert log == ["agen closed"]
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert log == ["agen closed"]


def test_shutdown_asyncgens_without_generators(loop):
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_asyncgens())


def test_finalizer_hook_closes_collected_generator(loop):
    """A generator dropped while the loop runs is finalized through the loop's hook, which
    schedules its aclose() as a task."""
    log = []

    async def main():
        g = _make_agen(log)
        await g.__anext__()
        del g
        gc.collect()
        for _ in range(10):
            await asyncio.sleep(0)
            if log:
                break

    loop.run_until_complete(main())
    assert log == ["agen closed"]


def test_error_while_closing_generator_reported(loop, handler_calls):
    keep = []

    async def bad_agen():
        try:
            yield 1
        finally:
            raise ValueError("cannot close")

    async def main():
        g = bad_agen()
        keep.append(g)
        await g.__anext__()

    loop.run_until_complete(main())
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert len(handler_calls) == 1
    ctx = handler_calls[0]
    assert ctx["message"].startswith("an error occurred during closing of asynchronous generator")
    assert isinstance(ctx["exception"], ValueError)
    assert ctx["asyncgen"] is keep[0]


def test_generator_started_after_shutdown_warns(loop):
    log = []
    keep = []
    loop.run_until_complete(loop.shutdown_asyncgens())

    async def main():
        g = _make_agen(log)
        keep.append(g)
        with pytest.warns(ResourceWarning, match="was scheduled after loop.shutdown_asyncgens"):
            assert await g.__anext__() == 0
        await g.aclose()

    loop.run_until_complete(main())
    assert log == ["agen closed"]


def test_generator_outside_loop_is_not_tracked(loop):
    """A generator first iterated on another loop is not the concern of this one."""
    log = []
    keep = []
    other = asyncio.new_event_loop()
    try:

        async def start():
            g = _make_agen(log)
            keep.append(g)
            await g.__anext__()

        other.run_until_complete(start())
        loop.run_until_complete(loop.shutdown_asyncgens())
        assert log == []
        other.run_until_complete(other.shutdown_asyncgens())
        assert log == ["agen closed"]
    finally:
        other.close()
