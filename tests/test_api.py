"""The loop as an object (type, construction, subclassing, attributes) and ferroloop's
module-level API."""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import os
import sys
import warnings
from unittest import mock

import ferroloop
import pytest
from conftest import ROOT, run_briefly


def test_is_abstract_event_loop(loop):
    assert isinstance(loop, asyncio.AbstractEventLoop)
    assert issubclass(type(loop), asyncio.AbstractEventLoop)


def test_construct_with_no_args(loop):
    cls = type(loop)
    other = cls()
    try:
        assert isinstance(other, cls)
        assert other.run_until_complete(asyncio.sleep(0, "works")) == "works"
    finally:
        other.close()


def test_repr(loop):
    name = type(loop).__name__
    assert repr(loop) == f"<{name} running=False closed=False debug=False>"
    loop.set_debug(True)
    seen = []
    loop.call_soon(lambda: seen.append(repr(loop)))
    run_briefly(loop)
    assert seen == [f"<{name} running=True closed=False debug=True>"]
    loop.close()
    assert repr(loop) == f"<{name} running=False closed=True debug=True>"


def test_attribute_assignment(loop):
    loop.custom_attribute = {"x": 1}
    assert loop.custom_attribute == {"x": 1}
    del loop.custom_attribute
    assert not hasattr(loop, "custom_attribute")
    loop.slow_callback_duration = 0.25
    assert loop.slow_callback_duration == 0.25


def test_instance_method_patching_is_honoured(loop):
    """Futures schedule their callbacks through ``loop.call_soon``, looked up on the
    instance: patching it there (as some test tools do) takes effect."""
    original = loop.call_soon
    calls = []

    def call_soon(callback, *args, context=None):
        calls.append(callback)
        return original(callback, *args, context=context)

    loop.call_soon = call_soon

    async def main():
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.001, fut.set_result, 1)
        return await fut

    try:
        assert loop.run_until_complete(main()) == 1
    finally:
        del loop.call_soon
    assert calls


def test_instance_exception_handler_patching(loop, handler_calls):
    seen = []
    original = loop.call_exception_handler

    def call_exception_handler(context):
        seen.append(context["message"])
        original(context)

    loop.call_exception_handler = call_exception_handler
    try:
        loop.call_soon(lambda: 1 / 0)
        run_briefly(loop)
    finally:
        del loop.call_exception_handler
    assert len(seen) == 1 and seen[0].startswith("Exception in callback")
    assert len(handler_calls) == 1


# Methods that test suites replace on asyncio's classes (public code does this for these
# and more): asyncio's loop sees the patch through inheritance, ferroloop's through
# `_ferroloop.AsyncioMethod`. `create_connection`, `run_until_complete` and `add_reader` are
# asyncio's functions borrowed by ferroloop, `getaddrinfo` and `shutdown_default_executor`
# ferroloop's own Python, `stop` its Rust.
PATCHABLE = [
    "create_connection",
    "create_server",
    "run_in_executor",
    "getaddrinfo",
    "add_reader",
    "stop",
    "shutdown_default_executor",
]


@pytest.mark.parametrize("where", ["BaseEventLoop", "SelectorEventLoop"])
@pytest.mark.parametrize("name", PATCHABLE)
def test_patch_of_asyncios_loop_class_is_seen(loop, name, where):
    """``mock.patch("asyncio.BaseEventLoop.<name>", f)``: ``loop.<name>`` is ``f`` bound to
    the loop while the patch lasts, and the loop's own method again afterwards."""
    if name == "add_reader" and where == "BaseEventLoop":
        where = "selector_events.BaseSelectorEventLoop"  # which defines it
    own = getattr(type(loop), name)

    def fake(self, *args, **kwargs):
        return ("fake", self, args, kwargs)

    with mock.patch(f"asyncio.{where}.{name}", fake):
        assert getattr(loop, name)(1, key=2) == ("fake", loop, (1,), {"key": 2})
        assert getattr(type(loop), name) is fake
    assert getattr(type(loop), name) is own
    assert getattr(loop, name).__name__ == name


def test_mock_patch_of_asyncios_loop_class(loop):
    """A ``MagicMock`` or ``AsyncMock`` (``patch`` without ``new``) is not a descriptor: the
    loop's attribute is the mock itself, called without the loop."""
    with mock.patch("asyncio.BaseEventLoop.get_exception_handler") as get_exception_handler:
        get_exception_handler.return_value = "handler"
        assert loop.get_exception_handler() == "handler"
        get_exception_handler.assert_called_once_with()

    async def main():
        with mock.patch("asyncio.BaseEventLoop.run_in_executor", mock.AsyncMock(return_value=7)):
            return await asyncio.get_running_loop().run_in_executor(None, sum, [1])

    assert loop.run_until_complete(main()) == 7
    assert loop.run_until_complete(loop.run_in_executor(None, sum, [1, 2])) == 3


def test_own_overrides_win_over_a_patch_of_asyncios_loop_class(loop):
    """A subclass's method, and one set on the instance, come before a patch of asyncio's
    class, as methods of a subclass do."""

    class Sub(type(loop)):
        def create_connection(self, *args, **kwargs):
            return "sub"

    sub = Sub()
    try:
        with mock.patch("asyncio.BaseEventLoop.create_connection", lambda self: "patched"):
            assert sub.create_connection() == "sub"
            assert loop.create_connection() == "patched"
            with mock.patch.object(loop, "create_connection", lambda: "instance"):
                assert loop.create_connection() == "instance"
            assert loop.create_connection() == "patched"
    finally:
        sub.close()


def test_subclass(loop):
    base = type(loop)
    scheduled = []
    reported = []

    class MyLoop(base):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def call_soon(self, callback, *args, context=None):
            scheduled.append(callback)
            return super().call_soon(callback, *args, context=context)

        def call_exception_handler(self, context):
            reported.append(context["exception"])

    sub = MyLoop("mine")
    try:
        assert sub.tag == "mine"
        assert isinstance(sub, base) and isinstance(sub, asyncio.AbstractEventLoop)

        async def main():
            assert asyncio.get_running_loop() is sub
            await asyncio.sleep(0)
            asyncio.get_running_loop().call_soon(lambda: 1 / 0)
            await asyncio.sleep(0)
            return "sub"

        assert sub.run_until_complete(main()) == "sub"
        assert scheduled  # asyncio's machinery went through the override
        assert len(reported) == 1 and isinstance(reported[0], ZeroDivisionError)
    finally:
        sub.close()


def test_set_event_loop_and_get_event_loop(loop):
    asyncio.set_event_loop(loop)
    try:
        assert asyncio.get_event_loop() is loop
    finally:
        asyncio.set_event_loop(None)


def test_coroutine_methods(loop):
    for name in ("shutdown_asyncgens", "shutdown_default_executor"):
        assert inspect.iscoroutinefunction(getattr(loop, name)), name


def test_public_methods_of_abstract_loop_exist(loop):
    missing = [
        name
        for name in dir(asyncio.AbstractEventLoop)
        if not name.startswith("_") and not hasattr(loop, name)
    ]
    assert missing == []


# --- ferroloop's module API (no asyncio counterpart) -------------------------------------


def test_new_event_loop_makes_ferroloop_loops():
    lp = ferroloop.new_event_loop()
    try:
        assert type(lp) is ferroloop.Loop
        assert isinstance(lp, asyncio.AbstractEventLoop)
    finally:
        lp.close()


def test_new_event_loop_returns_distinct_loops():
    a, b = ferroloop.new_event_loop(), ferroloop.new_event_loop()
    try:
        assert a is not b
    finally:
        a.close()
        b.close()


def test_loop_class_no_args():
    lp = ferroloop.Loop()
    try:
        assert not lp.is_closed()
        assert lp.get_debug() is False
    finally:
        lp.close()


@pytest.mark.skipif(sys.version_info >= (3, 16), reason="policies are gone in Python 3.16")
def test_event_loop_policy_warns_and_makes_ferroloop_loops():
    with pytest.warns(DeprecationWarning, match="EventLoopPolicy is deprecated"):
        policy = ferroloop.EventLoopPolicy()
    assert isinstance(policy, asyncio.AbstractEventLoopPolicy)
    lp = policy.new_event_loop()
    try:
        assert isinstance(lp, ferroloop.Loop)
    finally:
        lp.close()


@pytest.mark.skipif(sys.version_info >= (3, 16), reason="policies are gone in Python 3.16")
def test_install_warns_and_makes_asyncio_use_ferroloop():
    with pytest.warns(DeprecationWarning, match="install\\(\\) is deprecated"):
        ferroloop.install()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert isinstance(asyncio.get_event_loop_policy(), ferroloop.EventLoopPolicy)
    lp = asyncio.new_event_loop()
    try:
        assert isinstance(lp, ferroloop.Loop)
    finally:
        lp.close()

    async def main():
        return type(asyncio.get_running_loop())

    assert asyncio.run(main()) is ferroloop.Loop
    # (the autouse fixture in conftest puts the default policy back)


def test_version():
    assert isinstance(ferroloop.__version__, str)
    assert ferroloop.__version__ == importlib.metadata.version("ferroloop")
    if sys.version_info >= (3, 11):
        import tomllib

        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            assert tomllib.load(f)["project"]["version"] == ferroloop.__version__


def test_all_exports_exist():
    for name in ferroloop.__all__:
        assert hasattr(ferroloop, name), name
    lp = ferroloop.new_event_loop()
    try:
        h = lp.call_soon(print)
        t = lp.call_later(1, print)
        assert type(h) is ferroloop.Handle
        assert type(t) is ferroloop.TimerHandle
        assert isinstance(t, ferroloop.Handle)
    finally:
        lp.close()
