"""Signals: Python-level handlers while the loop blocks, Ctrl+C, add_signal_handler."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import (
    FACTORY_SOURCE,
    LOOP_KINDS,
    ROOT,
    child_env,
    run_briefly,
    run_forever_with,
    sigint_default,
)

pytestmark = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal tests need the main thread",
)


@pytest.fixture(autouse=True)
def _restore_signals():
    """Put the signal dispositions and the wake-up fd back as they were."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    signal.set_wakeup_fd(wakeup)


def _main_thread_ident():
    return threading.main_thread().ident


SENDERS = {
    "pthread_kill-main": lambda sig: signal.pthread_kill(_main_thread_ident(), sig),
    "os.kill": lambda sig: os.kill(os.getpid(), sig),
}


# --- Python-level handlers (signal.signal) -------------------------------------------------


@pytest.mark.parametrize("sender", sorted(SENDERS))
def test_python_handler_runs_while_loop_blocked_on_timer(loop, sender):
    ran_at = []

    async def main():
        lp = asyncio.get_running_loop()
        fut = lp.create_future()

        def handler(signum, frame):
            ran_at.append(time.monotonic())
            lp.call_soon_threadsafe(fut.set_result, signum)

        signal.signal(signal.SIGUSR1, handler)
        # The only timer is 10 s away: the loop blocks in the poll until the signal comes.
        guard = lp.call_later(10, lambda: fut.done() or fut.set_result("timer"))
        t = threading.Timer(0.05, SENDERS[sender], args=(signal.SIGUSR1,))
        start = time.monotonic()
        t.start()
        try:
            return await fut, start
        finally:
            guard.cancel()
            t.join()

    result, start = loop.run_until_complete(main())
    assert result == signal.SIGUSR1
    assert ran_at and ran_at[0] - start < 5  # long before the 10 s timer


@pytest.mark.parametrize("sender", sorted(SENDERS))
def test_python_handler_runs_while_loop_blocked_without_timer(loop, sender):
    ran = []

    def handler(signum, frame):
        ran.append(signum)
        loop.call_soon_threadsafe(loop.stop)

    signal.signal(signal.SIGUSR1, handler)
    run_forever_with(loop, SENDERS[sender], signal.SIGUSR1)
    assert ran == [signal.SIGUSR1]


@pytest.mark.parametrize("sender", sorted(SENDERS))
def test_sigint_interrupts_run_until_complete(loop, sender):
    """With Python's default SIGINT handler, Ctrl+C raises KeyboardInterrupt out of the loop
    while it waits, and the loop can be used again."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    t = threading.Timer(0.05, SENDERS[sender], args=(signal.SIGINT,))
    start = time.monotonic()
    t.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(asyncio.sleep(10))
    finally:
        t.cancel()
        t.join()
    assert time.monotonic() - start < 5
    assert not loop.is_running()
    assert loop.run_until_complete(asyncio.sleep(0, "usable")) == "usable"


def test_python_handler_exception_escapes_loop(loop):
    """An exception raised by a Python-level signal handler while the loop waits comes out
    of run_until_complete, and the loop stays usable."""

    def handler(signum, frame):
        raise LookupError("from signal handler")

    signal.signal(signal.SIGUSR1, handler)
    t = threading.Timer(0.05, signal.pthread_kill, args=(_main_thread_ident(), signal.SIGUSR1))
    t.start()
    try:
        with pytest.raises(LookupError, match="from signal handler"):
            loop.run_until_complete(asyncio.sleep(10))
    finally:
        t.cancel()
        t.join()
    assert not loop.is_running()
    assert loop.run_until_complete(asyncio.sleep(0, "usable")) == "usable"


def test_foreign_wakeup_fd_is_left_alone(loop):
    """Running the loop does not take over ``signal.set_wakeup_fd``: an fd installed by the
    application (a GUI toolkit, another loop) still receives the signal numbers."""
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    try:
        signal.set_wakeup_fd(w.fileno())
        ran = []
        signal.signal(signal.SIGUSR1, lambda s, f: ran.append(s))

        async def main():
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(100):
                if ran:
                    break
                await asyncio.sleep(0.001)

        loop.run_until_complete(main())
        assert ran == [signal.SIGUSR1]
        assert signal.set_wakeup_fd(-1) == w.fileno()
        assert r.recv(100) == bytes([signal.SIGUSR1])
    finally:
        signal.set_wakeup_fd(-1)
        r.close()
        w.close()


def test_wakeup_fd_closed_during_run(loop):
    """Another loop that owned the wake-up fd is closed while this loop runs (from one of its
    callbacks): running ends normally and no stale fd is put back as the wake-up fd."""
    other = asyncio.new_event_loop()
    other.add_signal_handler(signal.SIGUSR2, lambda: None)
    loop.call_soon(other.close)
    run_briefly(loop)
    assert signal.set_wakeup_fd(-1) == -1


def test_signal_for_other_loop_is_not_lost(loop, loop_kind):
    """A signal that arrives while this loop runs, for a handler another loop registered with
    add_signal_handler, is handled when that loop runs again."""
    other = asyncio.new_event_loop()  # asyncio's own loop owns the handler
    got = []
    try:
        other.add_signal_handler(signal.SIGUSR2, got.append, "other")

        async def main():
            os.kill(os.getpid(), signal.SIGUSR2)
            await asyncio.sleep(0.01)

        loop.run_until_complete(main())
        assert got == []

        async def wait_for_it():
            for _ in range(200):
                if got:
                    return
                await asyncio.sleep(0.001)

        other.run_until_complete(wait_for_it())
        assert got == ["other"]
    finally:
        other.close()


# --- Ctrl+C in a child process -----------------------------------------------------------

_CHILD = """
import asyncio, sys
import ferroloop

factory = {factory}
entry, wait = sys.argv[1], sys.argv[2]

async def main():
    print("ready", flush=True)
    try:
        if wait == "sleep":
            await asyncio.sleep(30)
        else:
            await asyncio.Event().wait()
    except asyncio.CancelledError:
        print("cancelled", flush=True)
        if stubborn:
            await asyncio.sleep(30)  # ignore the first Ctrl+C
        raise

stubborn = len(sys.argv) > 3

if entry == "Runner":
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
elif entry == "asyncio.run":
    asyncio.run(main(), loop_factory=factory)
else:
    ({run})(main())
"""

ENTRIES = [
    pytest.param(
        "Runner",
        marks=pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.Runner is 3.11+"),
    ),
    pytest.param(
        "asyncio.run",
        marks=pytest.mark.skipif(
            sys.version_info < (3, 12), reason="asyncio.run(loop_factory=) is 3.12+"
        ),
    ),
    pytest.param("run", id="asyncio.run-or-ferroloop.run"),
]


def _spawn_child(code, *args):
    """Start the child as a terminal would: SIGINT at its default disposition."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_default,
    )


@pytest.mark.parametrize("wait", ["sleep", "event"])
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_ctrl_c_in_child(kind, entry, wait):
    code = _CHILD.format(
        factory=FACTORY_SOURCE[kind],
        run="ferroloop.run" if kind == "ferroloop" else "asyncio.run",
    )
    proc = _spawn_child(code, entry, wait)
    try:
        assert proc.stdout.readline() == "ready\n"
        time.sleep(0.05)  # let it block in the poll
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # asyncio's behaviour: main() is cancelled, then KeyboardInterrupt escapes and the
    # interpreter exits through SIGINT.
    assert out == "cancelled\n"
    assert err.rstrip().splitlines()[-1] == "KeyboardInterrupt"
    assert proc.returncode == -signal.SIGINT


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_second_ctrl_c_when_main_ignores_cancellation(kind):
    """asyncio.Runner: the first Ctrl+C cancels main(); if main() keeps waiting, the second
    one raises KeyboardInterrupt right away."""
    code = _CHILD.format(
        factory=FACTORY_SOURCE[kind],
        run="ferroloop.run" if kind == "ferroloop" else "asyncio.run",
    )
    proc = _spawn_child(code, "run", "sleep", "stubborn")
    try:
        assert proc.stdout.readline() == "ready\n"
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline() == "cancelled\n"
        time.sleep(0.05)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert time.monotonic() - start < 10  # not after the 30 s sleep
    assert err.rstrip().splitlines()[-1] == "KeyboardInterrupt"
    assert proc.returncode == -signal.SIGINT


# --- add_signal_handler / remove_signal_handler ------------------------------------------


def _wait_until(loop, pred, timeout=10):
    async def waiter():
        deadline = loop.time() + timeout
        while not pred() and loop.time() < deadline:
            await asyncio.sleep(0.002)

    loop.run_until_complete(waiter())


def test_add_signal_handler_called_with_args(loop):
    got = []
    loop.add_signal_handler(signal.SIGUSR1, lambda *a: got.append(a), "a", 2)
    os.kill(os.getpid(), signal.SIGUSR1)
    _wait_until(loop, lambda: got)
    assert got == [("a", 2)]
    assert loop.remove_signal_handler(signal.SIGUSR1) is True


def test_signal_handler_runs_in_loop(loop):
    got = []

    def cb():
        got.append(asyncio.get_running_loop())

    loop.add_signal_handler(signal.SIGUSR1, cb)
    threading.Timer(0.02, os.kill, args=(os.getpid(), signal.SIGUSR1)).start()
    _wait_until(loop, lambda: got)
    assert got == [loop]


def test_signal_handler_wakes_blocked_loop(loop):
    got = []

    def cb():
        got.append(1)
        loop.stop()

    loop.add_signal_handler(signal.SIGUSR1, cb)
    run_forever_with(loop, signal.pthread_kill, _main_thread_ident(), signal.SIGUSR1)
    assert got == [1]


def test_signal_handler_called_for_each_signal(loop):
    got = []
    loop.add_signal_handler(signal.SIGUSR1, got.append, "x")
    for n in range(1, 4):
        os.kill(os.getpid(), signal.SIGUSR1)
        _wait_until(loop, lambda n=n: len(got) >= n)
    assert got == ["x", "x", "x"]


def test_signal_handler_replaced(loop):
    got = []
    loop.add_signal_handler(signal.SIGUSR1, got.append, "first")
    loop.add_signal_handler(signal.SIGUSR1, got.append, "second")
    os.kill(os.getpid(), signal.SIGUSR1)
    _wait_until(loop, lambda: got)
    assert got == ["second"]


def test_signal_handler_exception_goes_to_handler(loop, handler_calls):
    def cb():
        raise ValueError("in signal handler")

    loop.add_signal_handler(signal.SIGUSR1, cb)
    os.kill(os.getpid(), signal.SIGUSR1)
    _wait_until(loop, lambda: handler_calls)
    assert isinstance(handler_calls[0]["exception"], ValueError)


def test_remove_signal_handler(loop):
    loop.add_signal_handler(signal.SIGUSR1, lambda: None)
    assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN)
    assert loop.remove_signal_handler(signal.SIGUSR1) is True
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert loop.remove_signal_handler(signal.SIGUSR1) is False
    assert loop.remove_signal_handler(signal.SIGUSR2) is False


def test_remove_sigint_handler_restores_default_int_handler(loop):
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    assert loop.remove_signal_handler(signal.SIGINT) is True
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_remove_last_handler_resets_wakeup_fd(loop):
    loop.add_signal_handler(signal.SIGUSR1, lambda: None)
    loop.add_signal_handler(signal.SIGUSR2, lambda: None)
    assert loop.remove_signal_handler(signal.SIGUSR1) is True
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    assert fd != -1
    assert loop.remove_signal_handler(signal.SIGUSR2) is True
    assert signal.set_wakeup_fd(-1) == -1


@pytest.mark.parametrize("bad", [0, -1, signal.NSIG, 100000])
def test_invalid_signal(loop, bad):
    with pytest.raises(ValueError, match=f"^invalid signal number {bad}$"):
        loop.add_signal_handler(bad, lambda: None)
    with pytest.raises(ValueError, match=f"^invalid signal number {bad}$"):
        loop.remove_signal_handler(bad)


@pytest.mark.parametrize("bad", ["2", 2.0, None])
def test_non_int_signal(loop, bad):
    with pytest.raises(TypeError, match="^sig must be an int, not "):
        loop.add_signal_handler(bad, lambda: None)
    with pytest.raises(TypeError, match="^sig must be an int, not "):
        loop.remove_signal_handler(bad)


def test_coroutine_callback_rejected(loop):
    async def coro_fn():
        pass

    with pytest.raises(TypeError, match=r"^coroutines cannot be used with add_signal_handler\(\)$"):
        loop.add_signal_handler(signal.SIGUSR1, coro_fn)
    coro = coro_fn()
    with pytest.raises(TypeError, match=r"^coroutines cannot be used with add_signal_handler\(\)$"):
        loop.add_signal_handler(signal.SIGUSR1, coro)
    coro.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_uncatchable_signal(loop, sig):
    with pytest.raises(RuntimeError, match=f"^sig {int(sig)} cannot be caught$"):
        loop.add_signal_handler(sig, lambda: None)
    assert loop.remove_signal_handler(sig) is False
    assert signal.set_wakeup_fd(-1) == -1  # no handler left: the wake-up fd was reset


def test_add_signal_handler_from_other_thread(loop):
    errors = []

    def in_thread():
        try:
            loop.add_signal_handler(signal.SIGUSR1, lambda: None)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError)
    assert "main thread" in str(errors[0])
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_add_signal_handler_closed_loop(loop):
    loop.close()
    with pytest.raises(RuntimeError, match="^Event loop is closed$"):
        loop.add_signal_handler(signal.SIGUSR1, lambda: None)


def test_close_removes_signal_handlers(loop):
    loop.add_signal_handler(signal.SIGUSR1, lambda: None)
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    loop.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.set_wakeup_fd(-1) == -1


def test_signal_handler_survives_runs(loop):
    """A handler added outside run_forever works in later runs (and between them the
    signal is remembered)."""
    got = []
    loop.add_signal_handler(signal.SIGUSR1, got.append, 1)
    run_briefly(loop)
    os.kill(os.getpid(), signal.SIGUSR1)  # while not running
    _wait_until(loop, lambda: got)
    assert got == [1]
