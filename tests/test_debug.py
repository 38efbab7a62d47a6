"""Debug mode: the flag, how the environment turns it on, slow callbacks, source tracebacks."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import pytest
from conftest import FACTORY_SOURCE, LOOP_KINDS, run_briefly, run_python


def _cb():
    pass


def test_debug_default_off(loop):
    # The test process runs without PYTHONASYNCIODEBUG / -X dev.
    if sys.flags.dev_mode:
        pytest.skip("the test process runs in development mode")
    assert loop.get_debug() is False


def test_set_debug(loop):
    loop.set_debug(True)
    assert loop.get_debug() is True
    loop.set_debug(False)
    assert loop.get_debug() is False


@pytest.mark.parametrize("value", [1, 0, None, "yes", ""], ids=repr)
def test_set_debug_takes_any_object(loop, value):
    # asyncio keeps what it is given; debug mode follows its truth.
    loop.set_debug(value)
    assert loop.get_debug() is value
    h = loop.call_soon(_cb)
    assert (h._source_traceback is not None) == bool(value)
    h.cancel()
    loop.set_debug(False)
    assert loop.get_debug() is False


def test_set_debug_while_running(loop):
    seen = []

    async def main():
        lp = asyncio.get_running_loop()
        lp.set_debug(True)
        seen.append(lp.get_debug())
        await asyncio.sleep(0)
        seen.append(sys.get_coroutine_origin_tracking_depth() > 0)
        lp.set_debug(False)  # applied by a callback when the loop is running
        await asyncio.sleep(0)
        seen.append(sys.get_coroutine_origin_tracking_depth())

    loop.run_until_complete(main())
    assert seen == [True, True, 0]


def test_coroutine_origin_tracking_in_debug(loop):
    loop.set_debug(True)
    before = sys.get_coroutine_origin_tracking_depth()

    async def main():
        return sys.get_coroutine_origin_tracking_depth()

    assert loop.run_until_complete(main()) > 0
    assert sys.get_coroutine_origin_tracking_depth() == before


# --- the environment ---------------------------------------------------------------------

_DEBUG_PROBE = """
import asyncio, sys
import ferroloop

async def main():
    return asyncio.get_running_loop().get_debug()

factory = {factory}
fresh = factory()
print("new loop:", fresh.get_debug())
fresh.close()
if {kind!r} == "ferroloop":
    print("run:", ferroloop.run(main(){debug_arg}))
else:
    with asyncio.Runner(loop_factory=factory{debug_arg}) as runner:
        print("run:", runner.run(main()))
if sys.version_info >= (3, 12):
    print("asyncio.run:", asyncio.run(main(), loop_factory=factory{debug_arg}))
"""


def _probe(kind, *, env=None, args=(), debug_arg=""):
    code = _DEBUG_PROBE.format(factory=FACTORY_SOURCE[kind], kind=kind, debug_arg=debug_arg)
    proc = run_python(code, env=env, args=args)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # asyncio.run(loop_factory=) exists from 3.12 on: it must agree with the other runner.
    if sys.version_info >= (3, 12):
        assert lines[2] == lines[1].replace("run:", "asyncio.run:"), lines
    return lines[:2]


needs_runner = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="the probe uses asyncio.Runner (3.11+)"
)


@needs_runner
@pytest.mark.parametrize("kind", LOOP_KINDS)
@pytest.mark.parametrize(
    "how",
    [
        pytest.param({}, id="plain"),
        pytest.param({"env": {"PYTHONASYNCIODEBUG": "1"}}, id="PYTHONASYNCIODEBUG"),
        pytest.param({"args": ("-X", "dev")}, id="X-dev"),
        pytest.param({"env": {"PYTHONDEVMODE": "1"}}, id="PYTHONDEVMODE"),
    ],
)
def test_debug_from_environment(kind, how):
    expected = "False" if not how else "True"
    assert _probe(kind, **how) == [f"new loop: {expected}", f"run: {expected}"]


@needs_runner
@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_debug_false_overrides_environment(kind):
    out = _probe(kind, env={"PYTHONASYNCIODEBUG": "1"}, debug_arg=", debug=False")
    assert out == ["new loop: True", "run: False"]


# --- slow callbacks ----------------------------------------------------------------------


def test_slow_callback_duration_default(loop):
    assert loop.slow_callback_duration == 0.1
    loop.slow_callback_duration = 0.5
    assert loop.slow_callback_duration == 0.5


@pytest.mark.parametrize("value", [1, None, "x"], ids=repr)
def test_slow_callback_duration_takes_any_object(loop, value):
    loop.slow_callback_duration = value
    assert loop.slow_callback_duration == value
    assert type(loop.slow_callback_duration) is type(value)


def test_slow_callback_duration_not_comparable_fails_the_run(loop):
    # asyncio compares each callback's duration with it in debug mode: `float >= None` is a
    # TypeError out of the loop's iteration.
    loop.set_debug(True)
    loop.slow_callback_duration = None
    loop.call_soon(_cb)
    with pytest.raises(TypeError, match="'>=' not supported"):
        run_briefly(loop)
    loop.slow_callback_duration = 0.1
    run_briefly(loop)


def test_slow_callback_warning_names_callback(loop, caplog):
    loop.set_debug(True)
    loop.slow_callback_duration = 0.01

    def my_slow_callback():
        time.sleep(0.05)

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        loop.call_soon(my_slow_callback)
        loop.call_soon(_cb)  # fast: not reported
        run_briefly(loop)
    msgs = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(msgs) == 1, msgs
    assert msgs[0].startswith("Executing <Handle ")
    assert "my_slow_callback" in msgs[0]
    took = float(msgs[0].rsplit(" took ", 1)[1].split()[0])
    assert took >= 0.04


@pytest.mark.parametrize("where", ["before", "in the callback"])
def test_slow_callback_duration_is_measured_with_loop_time(loop, caplog, where):
    """asyncio times each callback with ``self.time()``: a clock replaced on the loop (a test
    helper that advances time, as aioimaplib's does) is what the warning measures, even when
    the callback itself replaces it. ferroloop timed callbacks with its own clock."""
    loop.set_debug(True)
    real = loop.time
    offset = 0.0

    def fake():
        return real() + offset

    def jump():
        nonlocal offset
        if where == "in the callback":
            loop.time = fake
        offset += 2.0

    if where == "before":
        loop.time = fake
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        loop.call_soon(jump)
        loop.call_soon(_cb)  # fast, on either clock: not reported
        run_briefly(loop)
    del loop.time
    msgs = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(msgs) == 1, msgs
    assert "jump" in msgs[0]
    took = float(msgs[0].rsplit(" took ", 1)[1].split()[0])
    assert 2.0 <= took < 3.0


def test_slow_task_step_warning(loop, caplog):
    loop.set_debug(True)
    loop.slow_callback_duration = 0.01

    async def my_slow_coroutine():
        time.sleep(0.05)

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        loop.run_until_complete(my_slow_coroutine())
    msgs = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert any(m.startswith("Executing <Task") and "my_slow_coroutine" in m for m in msgs), msgs


def test_no_slow_callback_warning_without_debug(loop, caplog):
    loop.slow_callback_duration = 0.001

    def slow():
        time.sleep(0.01)

    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        loop.call_soon(slow)
        run_briefly(loop)
    assert [r for r in caplog.records if r.name == "asyncio"] == []


# --- source tracebacks -------------------------------------------------------------------


def _schedule_all(loop):
    return [
        loop.call_soon(_cb),
        loop.call_later(10, _cb),
        loop.call_at(loop.time() + 10, _cb),
        loop.call_soon_threadsafe(_cb),
    ]


def test_source_traceback_in_debug(loop):
    loop.set_debug(True)
    handles = _schedule_all(loop)
    for h in handles:
        tb = h._source_traceback
        assert tb, h
        # The innermost frame is the code that scheduled the callback.
        assert tb[-1].name == "_schedule_all"
        assert tb[-1].filename == __file__
        assert tb[-2].name == "test_source_traceback_in_debug"
        r = repr(h)
        assert f"created at {__file__}:" in r
        h.cancel()


def test_no_source_traceback_without_debug(loop):
    for h in _schedule_all(loop):
        assert not h._source_traceback
        assert "created at" not in repr(h)
        h.cancel()


def test_cancelled_handle_repr_kept_in_debug(loop):
    loop.set_debug(True)

    def named_callback():
        pass

    h = loop.call_soon(named_callback)
    h.cancel()
    r = repr(h)
    assert "cancelled" in r
    assert "named_callback" in r  # debug mode keeps the description after cancel


def test_callback_error_context_has_source_traceback(loop, handler_calls):
    loop.set_debug(True)

    def boom():
        raise ValueError("x")

    h = loop.call_soon(boom)
    run_briefly(loop)
    assert len(handler_calls) == 1
    ctx = handler_calls[0]
    assert ctx["handle"] is h
    assert ctx["source_traceback"] is h._source_traceback
    assert ctx["source_traceback"]


def test_default_handler_logs_creation_traceback(loop, caplog):
    loop.set_debug(True)
    loop.set_exception_handler(None)

    def boom():
        raise ValueError("x")

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.call_soon(boom)
        run_briefly(loop)
    msgs = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(msgs) == 1
    assert "Object created at (most recent call last):" in msgs[0]
    assert "test_default_handler_logs_creation_traceback" in msgs[0]


def test_task_source_traceback_in_debug(loop):
    loop.set_debug(True)

    async def main():
        return asyncio.current_task()._source_traceback

    tb = loop.run_until_complete(main())
    assert tb
    assert any(f.name == "test_task_source_traceback_in_debug" for f in tb)


def test_close_logs_in_debug(loop, caplog):
    loop.set_debug(True)
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        loop.close()
    msgs = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert any(m.startswith("Close <") for m in msgs), msgs
