"""Bad arguments: each loop method, given one bad value at a time in each position, fails as
asyncio's loop fails (the same exception type) or succeeds where it succeeds: never a crash, a
Rust panic (``pyo3_runtime.PanicException`` is a ``BaseException``) or a hang.

Differential by design, so not written with the ``loop`` fixture: each test makes the same calls
on a new asyncio loop and a new ferroloop loop, in the same process, and compares the lists of
outcomes. A call that waits is given ``WAIT`` seconds and counts as "waits" on both. Only
loopback addresses, Unix sockets in a temporary directory and refused ports are used.

Differences that docs/DESIGN.md ("Deviations from asyncio") describes are left out of the
matrix: ``call_at`` of something that is not a number (asyncio takes it and fails later, in its
heap) and ``create_server`` with a backlog of 0 or less (asyncio's server never accepts).
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import signal
import socket
import sys
import warnings

import pytest
from conftest import FACTORIES

WAIT = 0.1


class BadIndex:
    """An int-like whose conversions fail."""

    def __index__(self):
        raise ZeroDivisionError("index")

    def __float__(self):
        raise ZeroDivisionError("float")


class BadFileno:
    def fileno(self):
        raise ZeroDivisionError("fileno")


class NegFileno:
    def fileno(self):
        return -1


class BadBuffer:
    """Refuses the buffer protocol through ``__buffer__`` (3.12+; an object before)."""

    def __buffer__(self, flags):
        raise ZeroDivisionError("buffer")


def _closed_socket():
    s = socket.socket()
    s.close()
    return s


def bad_values():
    """Fresh bad values (sockets among them) for one call."""
    return {
        "None": None,
        "-1": -1,
        "2**63": 2**63,
        "1.5": 1.5,
        "nan": math.nan,
        "inf": math.inf,
        "str": "x",
        "bytes": b"x",
        "bytearray": bytearray(b"x"),
        "strided memoryview": memoryview(b"abcd")[::2],
        "object": object(),
        "BadIndex": BadIndex(),
        "BadFileno": BadFileno(),
        "NegFileno": NegFileno(),
        "BadBuffer": BadBuffer(),
        "closed socket": _closed_socket(),
        "list": [1],
        "1-tuple": ("127.0.0.1",),
        "port out of range": ("127.0.0.1", 70000),
    }


def _refused_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Ctx:
    """What one call's good arguments are made of; everything it opens is closed by
    ``close()``."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.opened = []
        self.port = _refused_port()

    def keep(self, obj):
        self.opened.append(obj)
        return obj

    def pair(self, family=socket.AF_UNIX, kind=socket.SOCK_STREAM, data=b"hello"):
        if family == socket.AF_UNIX:
            a, b = socket.socketpair(family, kind)
        else:  # UDP over IPv4
            a = socket.socket(family, kind)
            b = socket.socket(family, kind)
            a.bind(("127.0.0.1", 0))
            b.bind(("127.0.0.1", 0))
            a.connect(b.getsockname())
            b.connect(a.getsockname())
        for s in (a, b):
            s.setblocking(False)
            self.keep(s)
        if data:
            b.send(data)  # so a read completes at once
        return a

    def listener(self):
        lst = self.keep(socket.socket())
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        lst.setblocking(False)
        self.keep(socket.create_connection(lst.getsockname()))  # waits to be accepted
        return lst

    def path(self):
        return os.path.join(self.tmp, f"s{len(self.opened)}.sock")

    def close(self):
        for obj in reversed(self.opened):
            try:
                obj.close()
            except Exception:
                pass
        self.opened.clear()


def _cb(*args):
    pass


# One entry per method: the method's name and a function making its good arguments (a list
# of positional arguments, and a dict of keyword arguments) from a Ctx. Each positional and
# each keyword argument is replaced by each bad value in turn.
CASES = {
    "call_soon": lambda c: ([_cb], {}),
    "call_later": lambda c: ([0.001, _cb], {}),
    "call_soon_threadsafe": lambda c: ([_cb], {}),
    # asyncio checks that the callback is callable in debug mode only
    "call_soon (debug)": lambda c: ([_cb], {}),
    "call_later (debug)": lambda c: ([0.001, _cb], {}),
    "call_soon_threadsafe (debug)": lambda c: ([_cb], {}),
    "add_reader": lambda c: ([c.pair(), _cb], {}),
    "add_writer": lambda c: ([c.pair(), _cb], {}),
    "remove_reader": lambda c: ([c.pair()], {}),
    "remove_writer": lambda c: ([c.pair()], {}),
    "add_signal_handler": lambda c: ([signal.SIGUSR1, _cb], {}),
    "remove_signal_handler": lambda c: ([signal.SIGUSR1], {}),
    "set_exception_handler": lambda c: ([None], {}),
    "set_task_factory": lambda c: ([None], {}),
    "run_in_executor": lambda c: ([None, _cb], {}),
    "sock_recv": lambda c: ([c.pair(), 10], {}),
    "sock_recv_into": lambda c: ([c.pair(), bytearray(10)], {}),
    "sock_recvfrom": lambda c: ([c.pair(socket.AF_INET, socket.SOCK_DGRAM), 10], {}),
    "sock_recvfrom_into": lambda c: (
        [c.pair(socket.AF_INET, socket.SOCK_DGRAM), bytearray(10), 10],
        {},
    ),
    "sock_sendall": lambda c: ([c.pair(data=None), b"abc"], {}),
    "sock_sendto": lambda c: (
        [c.pair(socket.AF_INET, socket.SOCK_DGRAM, data=None), b"abc", ("127.0.0.1", c.port)],
        {},
    ),
    "sock_connect": lambda c: ([c.keep(_nonblocking(socket.socket())), ("127.0.0.1", c.port)], {}),
    "sock_accept": lambda c: ([c.listener()], {}),
    "getaddrinfo": lambda c: (
        ["127.0.0.1", 80],
        {"family": 0, "type": 0, "proto": 0, "flags": 0},
    ),
    "getnameinfo": lambda c: ([("127.0.0.1", 80), socket.NI_NUMERICHOST], {}),
    "create_connection": lambda c: (
        [asyncio.Protocol, "127.0.0.1", c.port],
        {"local_addr": None, "happy_eyeballs_delay": None, "interleave": None},
    ),
    "create_server": lambda c: (
        [asyncio.Protocol, "127.0.0.1", 0],
        {"reuse_address": None, "reuse_port": None, "start_serving": True},
    ),
    "create_datagram_endpoint": lambda c: (
        [asyncio.DatagramProtocol],
        {"local_addr": ("127.0.0.1", 0), "remote_addr": None, "family": 0},
    ),
    "create_unix_connection": lambda c: ([asyncio.Protocol, c.path()], {}),
    "create_unix_server": lambda c: ([asyncio.Protocol, c.path()], {}),
    "connect_accepted_socket": lambda c: ([asyncio.Protocol, c.pair()], {}),
}


def _nonblocking(sock):
    sock.setblocking(False)
    return sock


def _slots(args, kwargs):
    """Each argument in turn, with its label: ``(index, None, "[i]")`` for a positional one,
    ``(None, name, "(name=)")`` for a keyword one."""
    return [(i, None, f"[{i}]") for i in range(len(args))] + [(None, k, f"({k}=)") for k in kwargs]


def _replaced(args, kwargs, pos, key, value):
    """Copies of ``args`` and ``kwargs`` with one argument (``_slots``) set to ``value``."""
    args, kwargs = list(args), dict(kwargs)
    if key is None:
        args[pos] = value
    else:
        kwargs[key] = value
    return args, kwargs


def _release(result):
    """Close or cancel what a call that succeeded made."""
    items = result if isinstance(result, tuple) else (result,)
    for item in items:
        if isinstance(item, (asyncio.Handle, asyncio.Future)):
            item.cancel()
        elif isinstance(item, (asyncio.BaseTransport, asyncio.AbstractServer, socket.socket)):
            item.close()


async def _outcome(loop, fn, args, kwargs):
    try:
        result = fn(*args, **kwargs)
        if asyncio.iscoroutine(result) or asyncio.isfuture(result):
            try:
                result = await asyncio.wait_for(result, WAIT)
            except asyncio.TimeoutError:
                return "waits"
        _release(result)
        return "ok"
    except Exception as e:  # a BaseException (a Rust panic) fails the test
        return type(e).__name__
    finally:
        loop.set_exception_handler(None)
        loop.set_task_factory(None)
        try:
            loop.remove_signal_handler(signal.SIGUSR1)
        except Exception:
            pass


def _outcomes(factory, name, tmp):
    """The outcome of every call of the matrix for method ``name`` on a new loop."""
    loop = factory()
    loop.set_debug(name.endswith("(debug)"))
    name = name.split()[0]
    errors = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx.get("message")))
    build = CASES[name]

    async def main():
        out = {}
        ctx = Ctx(tmp)
        fn = getattr(loop, name)
        try:
            good_args, good_kwargs = build(ctx)
            out["good arguments"] = await _outcome(loop, fn, good_args, good_kwargs)
            ctx.close()
            for pos, key, where in _slots(good_args, good_kwargs):
                for vname, value in bad_values().items():
                    if isinstance(value, socket.socket):
                        ctx.keep(value)
                    args, kwargs = _replaced(*build(ctx), pos, key, value)
                    out[f"{name}{where} {vname}"] = await _outcome(loop, fn, args, kwargs)
                    ctx.close()
                    await asyncio.sleep(0)
            await asyncio.sleep(0.01)
        finally:
            ctx.close()
        return out

    # asyncio's own code leaks some sockets on these paths (create_datagram_endpoint binds its
    # socket before calling the protocol factory, and does not close it when that fails), on
    # both loops alike: their ResourceWarnings are not what this test is about. The cyclic GC
    # runs only at the end: the never-awaited `Event.wait()` coroutines of asyncio's
    # happy-eyeballs race warn when finalized, and a collection that happens to start inside a
    # namedtuple's `__new__` (a lambda whose globals have empty builtins) turns that warning
    # into an unraisable `KeyError: '__import__'` (seen once on a busy machine).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            return loop.run_until_complete(main()), errors
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
            if gc_was_enabled:
                gc.enable()
            gc.collect()


# asyncio's happy-eyeballs race (create_connection with a bad happy_eyeballs_delay) leaves an
# `Event.wait()` coroutine it never awaits, on both loops.
@pytest.mark.filterwarnings("ignore:coroutine 'Event.wait' was never awaited:RuntimeWarning")
@pytest.mark.parametrize("name", list(CASES))
def test_bad_arguments_fail_as_on_asyncio(name, tmp_path, monkeypatch):
    if not hasattr(asyncio.AbstractEventLoop, name.split()[0]):
        pytest.skip(f"asyncio {sys.version_info[0]}.{sys.version_info[1]} has no loop.{name}")
    monkeypatch.chdir(tmp_path)  # relative Unix socket paths ("x") land here
    expected, _ = _outcomes(FACTORIES["asyncio"], name, str(tmp_path))
    got, errors = _outcomes(FACTORIES["ferroloop"], name, str(tmp_path))
    assert len(expected) > 10 and set(got) == set(expected)
    differ = {k: (expected[k], got.get(k)) for k in expected if got.get(k) != expected[k]}
    assert not differ, f"asyncio's outcome, then ferroloop's: {differ}"
    # The matrix means something: the good arguments are taken (a refused connection, a
    # Unix socket path that does not exist), and bad values change the outcome.
    good = ("ok", "waits", "ConnectionRefusedError", "FileNotFoundError")
    assert expected["good arguments"] in good
    if name not in ("call_soon", "call_soon_threadsafe"):  # these check nothing outside debug
        assert sum(v != expected["good arguments"] for v in expected.values()) > 5
    assert not errors, errors  # nothing reached ferroloop's exception handler


@pytest.mark.skipif(sys.version_info < (3, 12), reason="BadBuffer needs 3.12's __buffer__")
def test_the_buffer_protocol_value_is_refused():
    """``BadBuffer`` does refuse the buffer protocol where the matrix relies on it."""
    with pytest.raises(ZeroDivisionError):
        memoryview(BadBuffer())


# --- transports --------------------------------------------------------------------------------

# method: (good positional arguments, good keyword arguments, how many bad values at least
# change the outcome on asyncio's transport)
TRANSPORT_CASES = {
    "write": ([b"abc"], {}, 5),
    "writelines": ([[b"a", b"b"]], {}, 5),
    "set_write_buffer_limits": ([], {"high": 64, "low": 16}, 5),
    "get_extra_info": (["peername", None], {}, 1),  # unhashable names; others give the default
    "set_protocol": ([asyncio.Protocol()], {}, 0),  # takes anything
}


async def _stream_transport(loop, family):
    """A transport of ``family`` (AF_UNIX or AF_INET) on one end of a connected pair, and the
    other end (a plain socket)."""
    if family == socket.AF_UNIX:
        a, b = socket.socketpair()
    else:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            b = socket.create_connection(listener.getsockname())
            a, _ = listener.accept()
    a.setblocking(False)
    tr, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
    return tr, b


def _transport_outcomes(factory, family, method):
    loop = factory()
    errors = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx.get("message")))
    good_args, good_kwargs, _ = TRANSPORT_CASES[method]

    async def one(args, kwargs):
        tr, peer = await _stream_transport(loop, family)
        try:
            getattr(tr, method)(*args, **kwargs)
            await asyncio.sleep(0)
            return "ok" if not tr.is_closing() else "ok, closing"
        except Exception as e:
            return type(e).__name__
        finally:
            tr.abort()
            peer.close()
            await asyncio.sleep(0)

    async def main():
        out = {"good arguments": await one(list(good_args), dict(good_kwargs))}
        for pos, key, where in _slots(good_args, good_kwargs):
            for vname, value in bad_values().items():
                args, kwargs = _replaced(good_args, good_kwargs, pos, key, value)
                out[f"{method}{where} {vname}"] = await one(args, kwargs)
                if isinstance(value, socket.socket):
                    value.close()
        await asyncio.sleep(0.01)
        return out

    try:
        return loop.run_until_complete(main()), errors
    finally:
        loop.close()


@pytest.mark.parametrize("family", [socket.AF_UNIX, socket.AF_INET], ids=["unix", "tcp"])
@pytest.mark.parametrize("method", list(TRANSPORT_CASES))
def test_transport_bad_arguments_fail_as_on_asyncio(method, family):
    """Stream transports: ferroloop's own (Rust) against asyncio's ``_SelectorSocketTransport``.
    A value that makes the transport fail (a write of a non-contiguous buffer is a fatal
    error) shows as "ok, closing" on both."""
    expected, _ = _transport_outcomes(FACTORIES["asyncio"], family, method)
    got, _ = _transport_outcomes(FACTORIES["ferroloop"], family, method)
    assert set(got) == set(expected)
    differ = {k: (expected[k], got[k]) for k in expected if got[k] != expected[k]}
    assert not differ, f"asyncio's outcome, then ferroloop's: {differ}"
    assert expected["good arguments"] == "ok"
    assert sum(v != "ok" for v in expected.values()) >= TRANSPORT_CASES[method][2]
