"""The public ``Loop`` class: asyncio's event loop API over the Rust ``LoopCore``.

Division of labour (see docs/DESIGN.md):

* ``LoopCore`` (Rust) owns everything that runs per callback, timer or I/O event:
  ``call_soon``/``call_later``/``call_at``/``call_soon_threadsafe``, ``time``, the ready queue,
  the timer heap, the poller, readers/writers and ``_run_once``.
* This class adds the per-run and rare paths: run/stop set-up, close, signals, debug logging
  and exception reporting.
* Where asyncio's own ``BaseEventLoop`` method is the spec and touches only state that this
  loop also keeps under asyncio's names, the method is *borrowed*: the very function object
  from ``asyncio.base_events`` is placed on this class, so each CPython version gets its own
  version's behaviour (messages, arguments, warnings) without a copy of the code.
"""

from __future__ import annotations

import asyncio
import collections.abc
import errno
import inspect
import os
import selectors
import signal
import socket
import sys
import threading
import types
import warnings
import weakref
from asyncio import (
    base_events,
    constants,
    coroutines,
    events,
    format_helpers,
    futures,
    tasks,
    trsock,
)
from asyncio.log import logger

from . import _ferroloop, _transports

__all__ = ["Loop"]

_BEL = base_events.BaseEventLoop

# asyncio's own implementations, used as they are (see the module docstring). Each one reads
# only attributes this class keeps with asyncio's names and meanings.
_BORROWED = (
    "__repr__",
    "__del__",
    "set_task_factory",
    "get_task_factory",
    "run_until_complete",
    "run_in_executor",
    "set_default_executor",
    "_check_closed",
    "_check_default_executor",
    "_check_running",
    "_asyncgen_firstiter_hook",
    "_asyncgen_finalizer_hook",
    "shutdown_asyncgens",
    "get_exception_handler",
    "set_exception_handler",
    "default_exception_handler",
    "call_exception_handler",
    "set_debug",
    "_set_coroutine_origin_tracking",
    "getnameinfo",
    "_getaddrinfo_debug",
)


# asyncio's networking layer, used as it is for now: address resolution, connection and
# server set-up (BaseEventLoop), accept, sock_connect and readers/writers
# (BaseSelectorEventLoop), Unix sockets, pipes and sendfile (_UnixSelectorEventLoop).
# sock_recv/_into, sock_recvfrom/_into, sock_sendall, sock_sendto and sock_accept are Rust
# (`LoopCore`, src/sockops.rs). Looked up on asyncio's
# SelectorEventLoop, so each name resolves to the most derived implementation of the running
# version. They run on this loop's Rust reactor through `_add_reader`/`_add_writer`.
# The per-connection paths move to Rust next (docs/DESIGN.md, "Networking").
_BORROWED_NETWORKING = (
    # BaseEventLoop
    "create_connection",
    "_create_connection_transport",
    "_connect_sock",
    "_ensure_resolved",
    "_create_server_getaddrinfo",
    "create_server",
    "connect_accepted_socket",
    "create_datagram_endpoint",
    "sendfile",
    "_sendfile_fallback",
    "sock_sendfile",
    "_sock_sendfile_fallback",
    "_check_sendfile_params",
    "start_tls",
    "connect_read_pipe",
    "connect_write_pipe",
    "subprocess_shell",
    "subprocess_exec",
    "_log_subprocess",
    # BaseSelectorEventLoop
    "_make_ssl_transport",
    "_accept_connection",
    "_accept_connection2",
    "_stop_serving",
    "_ensure_fd_no_transport",
    "add_reader",
    "remove_reader",
    "add_writer",
    "remove_writer",
    "_sendfile_native",
    # _UnixSelectorEventLoop
    "_make_read_pipe_transport",
    "_make_write_pipe_transport",
    "_make_subprocess_transport",
    "_child_watcher_callback",
    "create_unix_connection",
    "create_unix_server",
    "_sock_sendfile_native",
    "_sock_sendfile_native_impl",
    "_sock_sendfile_update_filepos",
    "_sock_add_cancellation_callback",
)


def _borrowable(names, source):
    """``{name: function}`` for the borrowed methods that exist in this Python version."""
    return {n: getattr(source, n) for n in names if hasattr(source, n)}


def _uses_super(func):
    code = getattr(func, "__code__", None)
    return code is not None and "__class__" in code.co_freevars


def _parent_implementations(borrowed):
    """For borrowed methods that call zero-argument ``super()`` (3.13's Unix
    ``_stop_serving``), the implementation that ``super()`` finds in asyncio's class
    hierarchy; ``Loop`` puts these on a base class so the same call finds them there."""
    parents = {}
    for name, func in borrowed.items():
        if _uses_super(func):
            owner = func.__closure__[func.__code__.co_freevars.index("__class__")].cell_contents
            for klass in owner.__mro__[1:]:
                if name in vars(klass):
                    parents[name] = vars(klass)[name]
                    break
    return parents


def _copy_function(func, scope, closure):
    """A copy of ``func`` that reads its globals from ``scope`` and its free variables from
    ``closure``, with the same defaults, name and docstring."""
    new = types.FunctionType(func.__code__, scope, func.__name__, func.__defaults__, closure)
    new.__kwdefaults__ = func.__kwdefaults__
    new.__qualname__ = func.__qualname__
    new.__doc__ = func.__doc__
    return new


def _rebind_super(func, cls):
    """A copy of ``func`` whose zero-argument ``super()`` starts from ``cls``."""
    index = func.__code__.co_freevars.index("__class__")
    cells = list(func.__closure__)
    cells[index] = types.CellType(cls)
    return _copy_function(func, func.__globals__, tuple(cells))


def _socket_transport_for_tls(loop, sock, protocol, waiter=None, extra=None, server=None):
    """What asyncio's ``_make_ssl_transport`` calls ``_SelectorSocketTransport`` for: the
    stream transport under its ``SSLProtocol``, the loop's own (Rust, unless
    FERROLOOP_TRANSPORTS=selector)."""
    return loop._make_socket_transport(sock, protocol, waiter, extra=extra, server=server)


def _with_own_socket_transport(func):
    """A copy of asyncio's ``_make_ssl_transport`` in which ``_SelectorSocketTransport``, a
    name it calls directly (not through ``_make_socket_transport``), is the loop's own
    transport: TLS connections (``create_connection``/``create_server`` with ``ssl=``) run over
    the same stream transport as plain ones and as ``start_tls``."""
    scope = dict(func.__globals__)
    scope["_SelectorSocketTransport"] = _socket_transport_for_tls
    return _copy_function(func, scope, func.__closure__)


_BORROWED_FUNCS = {
    **_borrowable(_BORROWED, _BEL),
    **_borrowable(_BORROWED_NETWORKING, asyncio.SelectorEventLoop),
}
_BORROWED_FUNCS["_make_ssl_transport"] = _with_own_socket_transport(
    _BORROWED_FUNCS["_make_ssl_transport"]
)

# What borrowed methods reach through super(); a base class of Loop.
_SuperTargets = type("_SuperTargets", (), _parent_implementations(_BORROWED_FUNCS))


class _SelectorView:
    """The part of a ``selectors`` selector that asyncio's transports consult (their reprs
    ask whether their fd is being polled), answered from the loop's registry."""

    __slots__ = ("_loop",)

    def __init__(self, loop):
        self._loop = weakref.proxy(loop)

    def get_key(self, fileobj):
        fd = selectors._fileobj_to_fd(fileobj)
        try:
            events = self._loop._fd_events(fd)
        except OverflowError:  # too large for an fd: never registered
            events = None
        if events is None:
            raise KeyError(f"{fileobj!r} is not registered")
        return selectors.SelectorKey(fileobj, fd, events, None)

    def get_map(self):
        return {fd: self.get_key(fd) for fd in self._loop._watched_fds()}


# `sock_*` calls return `_ferroloop.SockOp` objects: coroutines as far as asyncio can tell
# (`asyncio.iscoroutine`, `create_task`, `wait_for`), like uvloop's compiled coroutines.
collections.abc.Coroutine.register(_ferroloop.SockOp)

# Stream sockets use the Rust transport (`_transports.StreamTransport`).
# FERROLOOP_TRANSPORTS=selector selects asyncio's own `_SelectorSocketTransport` instead:
# an escape hatch, and the A/B switch for benchmarks.
_RUST_TRANSPORTS = os.environ.get("FERROLOOP_TRANSPORTS", "rust") != "selector"
_SELECTOR_SOCKET_TRANSPORT = asyncio.SelectorEventLoop._make_socket_transport
_SELECTOR_DATAGRAM_TRANSPORT = asyncio.SelectorEventLoop._make_datagram_transport
_SELECTOR_START_SERVING = asyncio.SelectorEventLoop._start_serving

# `debug=` arrived in a patch release (3.12.1 lacks it): ask the function itself.
_FORMAT_TAKES_DEBUG = "debug" in format_helpers._format_callback_source.__code__.co_varnames


# 3.12+'s asyncio refuses a transport for a socket whose fd another open transport holds
# (`_make_socket_transport` / `_make_datagram_transport` call `_ensure_fd_no_transport`).
_ONE_TRANSPORT_PER_FD = sys.version_info >= (3, 12)

# The socket methods asyncio's transports and accept path do their I/O with. A socket whose
# class (or instance) replaces one of them gets asyncio's transport, or accept path, which
# calls them; ferroloop's work on the fd and would not (a `socket.socket` subclass that
# counts or shapes its traffic, as websockets' tests use).
_STREAM_IO = ("recv", "recv_into", "send", "sendmsg")
_DATAGRAM_IO = ("recvfrom", "sendto", "send")
_ACCEPT_IO = ("accept",)


def _replaces_io(sock, names):
    cls = type(sock)
    if cls is socket.socket:
        return False
    own = getattr(sock, "__dict__", None) or ()
    return any(n in own or getattr(cls, n, None) is not getattr(socket.socket, n) for n in names)


# getaddrinfo flags under which the C library never consults a resolver.
_NUMERIC_ONLY = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


def _sighandler_noop(signum, frame):
    """Python-level handler installed for ``add_signal_handler`` signals: the C-level handler
    has already written the signal number to the wake-up fd, which the loop reads."""


class Loop(_ferroloop.LoopCore, _SuperTargets, asyncio.AbstractEventLoop):
    """An asyncio event loop whose core runs in Rust."""

    if sys.version_info < (3, 12):
        # 3.10/3.11's _asyncio looks `loop.call_soon` up for every Task step and Future
        # callback; this hands out one bound method per loop instead of a new one each time.
        call_soon = _ferroloop.CachedCallSoon(_ferroloop.LoopCore.call_soon)

    def __init__(self):
        self._default_executor = None
        self._exception_handler = None
        self._task_factory = None
        self._old_agen_hooks = None
        self._coroutine_origin_tracking_enabled = False
        self._coroutine_origin_tracking_saved_depth = None
        self._asyncgens = weakref.WeakSet()
        self._asyncgens_shutdown_called = False
        self._executor_shutdown_called = False
        self._signal_handlers = {}
        self._transports = weakref.WeakValueDictionary()
        self._selector = _SelectorView(self)
        self._internal_fds = 0
        self._unix_server_sockets = {}  # 3.13's create_unix_server(cleanup_socket=...)
        self._owns_wakeup_fd = False
        self._check_clock()
        self.set_debug(coroutines._is_debug_mode())

    locals().update(_BORROWED_FUNCS)

    # --- transports ---------------------------------------------------------------------

    def _make_socket_transport(
        self, sock, protocol, waiter=None, *, extra=None, server=None, peer=None
    ):
        # peer: an accepted socket's address as a _ferroloop.SockAddr (ours, not asyncio's).
        if _RUST_TRANSPORTS and not _replaces_io(sock, _STREAM_IO):
            if _ONE_TRANSPORT_PER_FD:
                self._ensure_fd_no_transport(sock)
            return _transports.StreamTransport(self, sock, protocol, waiter, extra, server, peer)
        if peer is not None:
            extra = {"peername": peer.value}
        return _SELECTOR_SOCKET_TRANSPORT(self, sock, protocol, waiter, extra=extra, server=server)

    def _make_datagram_transport(self, sock, protocol, address=None, waiter=None, extra=None):
        # UDP over IPv4 / IPv6: asyncio's transport with Rust reads and sends
        # (`_transports.DatagramTransport`); other families keep asyncio's.
        if (
            _RUST_TRANSPORTS
            and sock.family in (socket.AF_INET, socket.AF_INET6)
            and not _replaces_io(sock, _DATAGRAM_IO)
        ):
            if _ONE_TRANSPORT_PER_FD:
                self._ensure_fd_no_transport(sock)
            return _transports.DatagramTransport(self, sock, protocol, address, waiter, extra)
        return _SELECTOR_DATAGRAM_TRANSPORT(self, sock, protocol, address, waiter, extra)

    # --- servers ------------------------------------------------------------------------

    def _start_serving(
        self, protocol_factory, sock, sslcontext=None, server=None, backlog=100, *args
    ):
        """asyncio's ``_start_serving``: TLS servers keep asyncio's accept path (a task per
        connection runs the handshake), and so do sockets that replace ``accept``; plain ones
        accept in Rust (``_start_accepting``)."""
        if sslcontext or _replaces_io(sock, _ACCEPT_IO):
            _SELECTOR_START_SERVING(
                self, protocol_factory, sock, sslcontext, server, backlog, *args
            )
        else:
            self._start_accepting(protocol_factory, sock, server, backlog)

    def _accept_connection_plain(self, protocol_factory, conn, peer, server):
        """One accepted connection of a plain server (scheduled by the Rust accept loop in a
        copy of the server's context): asyncio's ``_accept_connection2`` without TLS, whose
        waiter only ever resolves to None, so it needs no task. ``peer``: the address accept()
        returned, a ``_ferroloop.SockAddr`` for IPv4 / IPv6 (the transport keeps it as plain
        data), else its Python form."""
        protocol = transport = None
        try:
            protocol = protocol_factory()
            if type(peer) is _ferroloop.SockAddr:
                transport = self._make_socket_transport(conn, protocol, server=server, peer=peer)
            else:
                transport = self._make_socket_transport(
                    conn, protocol, extra={"peername": peer}, server=server
                )
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            if self._debug:
                context = {
                    "message": "Error on transport creation for incoming connection",
                    "exception": exc,
                }
                if protocol is not None:
                    context["protocol"] = protocol
                if transport is not None:
                    context["transport"] = transport
                self.call_exception_handler(context)

    def _accept_out_of_resources(self, exc, sock, protocol_factory, server, backlog):
        """accept() failed with EMFILE/ENFILE/ENOBUFS/ENOMEM: log, stop accepting, retry after
        ``ACCEPT_RETRY_DELAY`` (Linux keeps reporting the socket readable)."""
        self.call_exception_handler(
            {
                "message": "socket.accept() out of system resource",
                "exception": exc,
                "socket": trsock.TransportSocket(sock),
            }
        )
        self._remove_reader(sock.fileno())
        self.call_later(
            constants.ACCEPT_RETRY_DELAY,
            self._start_serving,
            protocol_factory,
            sock,
            None,
            server,
            backlog,
        )

    def _log_new_connection(self, server, addr, conn):
        logger.debug("%r got a new connection from %r: %r", server, addr, conn)

    async def sock_connect(self, sock, address):
        """asyncio's ``sock_connect``: checks and address resolution here, the connect and the
        wait for it in Rust (``_sock_connect_op``)."""
        base_events._check_ssl_socket(sock)
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")
        if sock.family == socket.AF_INET or (
            base_events._HAS_IPv6 and sock.family == socket.AF_INET6
        ):
            resolved = await self._ensure_resolved(
                address, family=sock.family, type=sock.type, proto=sock.proto, loop=self
            )
            _, _, _, _, address = resolved[0]
        return await self._sock_connect_op(sock, address)

    # --- DNS ----------------------------------------------------------------------------

    async def getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):
        """asyncio's ``getaddrinfo``, except that IP literals with a numeric (or no) port are
        resolved here on the loop thread: with ``AI_NUMERICHOST | AI_NUMERICSERV`` the C library
        answers without any lookup, or fails at once for a name, which then goes to the
        executor as in asyncio. ``AI_CANONNAME`` requests, flags that are not an ``int`` and
        debug mode (which logs the lookup's duration) always take asyncio's path."""
        if not self._debug and isinstance(flags, int) and not flags & socket.AI_CANONNAME:
            try:
                return socket.getaddrinfo(host, port, family, type, proto, flags | _NUMERIC_ONLY)
            except (socket.gaierror, UnicodeError):
                pass
        return await _BEL.getaddrinfo(
            self, host, port, family=family, type=type, proto=proto, flags=flags
        )

    # --- tasks --------------------------------------------------------------------------

    def _create_task_slow(self, coro, name, context, kwargs):
        """``create_task`` with a task factory, extra keywords or in debug mode (the common
        case is ``LoopCore.create_task`` in Rust). Extra keyword arguments go to the task (or
        the factory): ``eager_start`` works where ``asyncio.Task`` has it (3.12+), as
        ``loop.create_task`` does from 3.14."""
        if context is not None:
            kwargs["context"] = context
        if self._task_factory is None:
            task = tasks.Task(coro, loop=self, name=name, **kwargs)
            if task._source_traceback:
                del task._source_traceback[-1]
        else:
            task = self._task_factory(self, coro, **kwargs)
            if name is not None:
                task.set_name(name)
        return task

    # --- running ------------------------------------------------------------------------

    def run_forever(self):
        """Run until stop() is called."""
        self._run_forever_setup()
        try:
            self._run_forever_inner()
        finally:
            self._run_forever_cleanup()

    def _run_forever_setup(self):
        self._check_closed()
        self._check_running()
        # A `time` patched since the last look (the class, or the loop's __dict__ directly).
        self._check_clock()
        self._set_coroutine_origin_tracking(self._debug)
        self._old_agen_hooks = sys.get_asyncgen_hooks()
        self._thread_id = threading.get_ident()
        sys.set_asyncgen_hooks(
            firstiter=self._asyncgen_firstiter_hook, finalizer=self._asyncgen_finalizer_hook
        )
        events._set_running_loop(self)
        # Python-level signal handlers must run promptly while we block in epoll, even when
        # the signal is delivered to another thread: route signals to our wake-up socket,
        # unless someone else (another loop's add_signal_handler, the application) already
        # routes them somewhere; we never take a wake-up fd away from its owner.
        self._owns_wakeup_fd = False
        if threading.current_thread() is threading.main_thread():
            ours = self._wakeup_fd()
            try:
                previous = signal.set_wakeup_fd(ours, warn_on_full_buffer=False)
            except (ValueError, OSError):
                previous = None
            if previous == -1:
                self._owns_wakeup_fd = True
            elif previous is not None and previous != ours:
                signal.set_wakeup_fd(previous)

    def _run_forever_cleanup(self):
        self._stopping = False
        self._thread_id = None
        events._set_running_loop(None)
        self._set_coroutine_origin_tracking(False)
        if self._old_agen_hooks is not None:
            sys.set_asyncgen_hooks(*self._old_agen_hooks)
            self._old_agen_hooks = None
        if self._owns_wakeup_fd:
            self._owns_wakeup_fd = False
            if not self._signal_handlers:
                self._release_wakeup_fd()

    # close() may run from `__del__` at interpreter exit after this module's globals were
    # cleared: a loop left unclosed as the policy's current loop goes when asyncio.events is
    # torn down, after this module (asyncio's loop, in a reference cycle, goes earlier, by the
    # garbage collector). What it needs is kept on the class.
    _sys = sys
    _warnings = warnings
    _logger = logger

    def close(self):
        """Close the loop: drop pending callbacks, stop watching fds, shut the executor down
        without waiting. The loop must not be running."""
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self._closed:
            return
        if self._signal_handlers:
            if self._sys.is_finalizing():
                self._warnings.warn(
                    f"Closing the loop {self!r} on interpreter shutdown "
                    f"stage, skipping signal handlers removal",
                    ResourceWarning,
                    stacklevel=2,
                    source=self,
                )
                self._signal_handlers.clear()
                self._set_signal_handlers_present(False)
            else:
                for sig in list(self._signal_handlers):
                    self.remove_signal_handler(sig)
        if self._debug:
            self._logger.debug("Close %r", self)
        self._close_core()
        # As asyncio's selector loop does: transports' reprs then read "open"/"closed".
        self._selector = None
        self._executor_shutdown_called = True
        executor = self._default_executor
        if executor is not None:
            self._default_executor = None
            executor.shutdown(wait=False)

    async def shutdown_default_executor(self, timeout=None):
        """Shut the default executor down, waiting for its threads to finish (at most
        ``timeout`` seconds, then warn and stop waiting). ``timeout`` is accepted on every
        Python version (asyncio itself has it from 3.12 on)."""
        self._executor_shutdown_called = True
        if self._default_executor is None:
            return
        future = self.create_future()
        thread = threading.Thread(target=self._do_shutdown, args=(future,))
        thread.start()
        try:
            done, _ = await asyncio.wait({future}, timeout=timeout)
            if not done:
                warnings.warn(
                    f"The executor did not finishing joining its threads within {timeout} seconds.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._default_executor.shutdown(wait=False)
            else:
                future.result()
                thread.join()
        finally:
            if not future.done():
                future.cancel()

    def _do_shutdown(self, future):
        # Runs in its own thread. The future may have been cancelled (timeout) or the loop
        # closed meanwhile; neither may turn into an error on the loop.
        try:
            self._default_executor.shutdown(wait=True)
            if not self.is_closed():
                self.call_soon_threadsafe(futures._set_result_unless_cancelled, future, None)
        except Exception as ex:
            if not self.is_closed() and not future.cancelled():
                self.call_soon_threadsafe(future.set_exception, ex)

    # --- callbacks from the Rust core ---------------------------------------------------

    def _report_callback_error(self, handle, callback, args, exc):
        if _FORMAT_TAKES_DEBUG:
            cb = format_helpers._format_callback_source(callback, args, debug=self._debug)
        else:
            cb = format_helpers._format_callback_source(callback, args)
        context = {"message": f"Exception in callback {cb}", "exception": exc}
        if handle is not None:  # None: a transport callback run by the Rust core
            context["handle"] = handle
            if handle._source_traceback:
                context["source_traceback"] = handle._source_traceback
        self.call_exception_handler(context)

    def _log_slow_callback(self, handle, dt):
        logger.warning("Executing %s took %.3f seconds", base_events._format_handle(handle), dt)

    # --- signals (asyncio's Unix rules) -------------------------------------------------

    def _check_signal(self, sig):
        if not isinstance(sig, int):
            raise TypeError(f"sig must be an int, not {sig!r}")
        if sig not in signal.valid_signals():
            raise ValueError(f"invalid signal number {sig}")

    def add_signal_handler(self, sig, callback, *args):
        """Call ``callback(*args)`` from the loop when signal ``sig`` arrives (main thread
        only). Raises ValueError for an invalid signal, RuntimeError when it cannot be set."""
        if coroutines.iscoroutine(callback) or coroutines.iscoroutinefunction(callback):
            raise TypeError("coroutines cannot be used with add_signal_handler()")
        self._check_signal(sig)
        self._check_closed()
        try:
            # Raises ValueError when not on the main thread of the main interpreter.
            signal.set_wakeup_fd(self._wakeup_fd(), warn_on_full_buffer=False)
        except (ValueError, OSError) as exc:
            raise RuntimeError(str(exc))
        handle = self._make_handle(callback, args)
        self._signal_handlers[sig] = handle
        self._set_signal_handlers_present(True)
        try:
            # The Python-level handler does nothing; the C-level one writes the signal number
            # to the wake-up fd, and the loop dispatches it (see _handle_signal).
            signal.signal(sig, _sighandler_noop)
            # Restart interrupted system calls, as asyncio does.
            signal.siginterrupt(sig, False)
        except OSError as exc:
            del self._signal_handlers[sig]
            if not self._signal_handlers:
                self._set_signal_handlers_present(False)
                self._reset_wakeup_fd()
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught")
            raise

    def remove_signal_handler(self, sig):
        """Remove the handler for ``sig``; True if one was set."""
        self._check_signal(sig)
        try:
            del self._signal_handlers[sig]
        except KeyError:
            return False
        handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        try:
            signal.signal(sig, handler)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught")
            raise
        if not self._signal_handlers:
            self._set_signal_handlers_present(False)
            self._reset_wakeup_fd()
        return True

    def _reset_wakeup_fd(self):
        try:
            signal.set_wakeup_fd(-1)
        except (ValueError, OSError) as exc:
            logger.info("set_wakeup_fd(-1) failed: %s", exc)

    def _release_wakeup_fd(self):
        """Unset the wake-up fd if it is still ours (someone may have replaced it since)."""
        try:
            current = signal.set_wakeup_fd(-1)
        except (ValueError, OSError):
            return
        if current != self._wakeup_fd() and current != -1:
            try:
                signal.set_wakeup_fd(current)
            except (ValueError, OSError):
                pass

    def _handle_signal(self, sig):
        """Called by the core for each signal number read from the wake-up fd."""
        handle = self._signal_handlers.get(sig)
        if handle is None:
            return
        if handle._cancelled:
            self.remove_signal_handler(sig)
        else:
            self._add_callback(handle)


for _name, _func in _BORROWED_FUNCS.items():
    if _uses_super(_func):
        setattr(Loop, _name, _rebind_super(_func, Loop))
del _name, _func

# The loop's public methods follow a patch of asyncio's loop classes, as asyncio's loop does
# through inheritance (`mock.patch("asyncio.BaseEventLoop.create_connection", ...)` in a test
# suite): see `_ferroloop.AsyncioMethod`. Not the hot ones, which every task step, future or
# `sock_*` call looks up: for those a patch of asyncio's classes does not reach ferroloop
# (docs/DESIGN.md, "Deviations").
_NOT_FOLLOWING_PATCHES = frozenset(
    {
        "call_soon",
        "call_soon_threadsafe",
        "call_later",
        "call_at",
        "time",
        "create_future",
        "create_task",
        "get_debug",
        "is_running",
        "is_closed",
        "sock_recv",
        "sock_recv_into",
        "sock_recvfrom",
        "sock_recvfrom_into",
        "sock_sendall",
        "sock_sendto",
        "sock_accept",
    }
)
for _name in dir(asyncio.SelectorEventLoop):
    _own = inspect.getattr_static(Loop, _name, None)
    if _name.startswith("_") or _name in _NOT_FOLLOWING_PATCHES or not callable(_own):
        continue
    setattr(Loop, _name, _ferroloop.AsyncioMethod(_name, asyncio.SelectorEventLoop, _own))
del _name, _own
