"""Stream transports: asyncio's ``_SelectorSocketTransport`` contract over a Rust core.

``StreamTransport`` is an ``asyncio.Transport``. Its per-byte work is ``_ferroloop.StreamCore``:
the core is registered in the loop's reactor (reads go straight from ``recv`` to
``data_received`` / ``buffer_updated``), and ``transport.write`` and ``is_closing`` are C
methods of the class that run on the core, so neither runs a Python frame. This class keeps
the rare paths, with asyncio's names, messages and order: connection set-up, EOF,
close/abort, fatal errors, flow-control callbacks, ``write_eof``, ``set_protocol``, sendfile's
empty waiter.

Writes made by a callback on the loop's thread are held by the core until the callback returns
("corking": the callback's writes then cost one system call). Every method here that could tell
they were not sent yet (buffer size, close, abort, ``write_eof``, limits, sendfile's waiter;
``is_closing`` in the core) sends them first, with ``flush_corked()``.
"""

from __future__ import annotations

import math
import socket
import warnings
from asyncio import (
    base_events,
    constants,
    futures,
    protocols,
    selector_events,
    transports,
    trsock,
)
from asyncio.log import logger

from . import _ferroloop

__all__ = ["DatagramTransport", "StreamTransport"]

# asyncio's socket transport has its own writelines() (own messages) from 3.12 on.
_OWN_WRITELINES = "writelines" in vars(selector_events._SelectorSocketTransport)

# 3.13 passes the transport to Server._attach/_detach; earlier versions take no argument.
_SERVER_TRACKS_TRANSPORTS = "transport" in base_events.Server._attach.__code__.co_varnames

_LOW_WATER = 16 * 1024


_MAX_LIMIT = 2**63 - 1


def _byte_limit(value):
    # `inf` (no limit, which asyncio takes) has no floor: it is the largest size.
    return _MAX_LIMIT if value >= _MAX_LIMIT else math.floor(value)


class _TransportSocket(trsock.TransportSocket):
    """asyncio's ``TransportSocket`` (``get_extra_info('socket')``) whose ``shutdown()`` first
    sends the writes the transport holds until the running callback returns (corked): asyncio
    has sent them already, so a ``write()`` then ``shutdown(SHUT_WR)`` delivers the data, then
    EOF."""

    __slots__ = ("_transport_core",)

    def __init__(self, sock, core):
        super().__init__(sock)
        self._transport_core = core

    def shutdown(self, how):
        self._transport_core.flush_corked()
        super().shutdown(how)


class StreamTransport(transports._FlowControlMixin):
    """A TCP or Unix stream socket transport (the counterpart of asyncio's
    ``_SelectorSocketTransport``). Derives from asyncio's ``_FlowControlMixin`` (a
    ``Transport``) as asyncio's does: its sendfile fallback checks for it. The mixin's
    flow-control state is not used; the core keeps it."""

    # Slots, and a `__dict__` that stays empty until something sets an attribute of its own:
    # asyncio's transport can be given attributes, and tests replace its methods per instance
    # (`mock.patch.object(transport, "write")`, as aiohttp's own do). The empty `__dict__`
    # costs 8-32 bytes per transport, by version; a `__dict__` holding the attributes below
    # would be the largest part of a transport's memory per idle connection. `write` is a C
    # method of the class (set below the class): an instance's own `write` hides it.
    __slots__ = (
        "__dict__",
        "__weakref__",
        "_core",
        "_empty_waiter",
        "_paused",
        "_protocol",
        "_protocol_connected",
        "_server",
        "_sock",
    )

    _start_tls_compatible = True
    _sendfile_compatible = constants._SendfileMode.TRY_NATIVE

    def __init__(self, loop, sock, protocol, waiter=None, extra=None, server=None, peer=None):
        super().__init__(extra, loop)
        # The mixin's limits are not used (the core keeps them); a shared int instead of the
        # one it computes per instance.
        self._low_water = _LOW_WATER
        self._sock = sock
        self._protocol = protocol
        self._protocol_connected = True
        self._paused = False
        self._server = server
        self._core = _ferroloop.StreamCore(
            loop,
            self,
            sock,
            protocol,
            isinstance(protocol, protocols.BufferedProtocol),
            peer,
        )
        if extra is None and self._core.inet:
            # The extras asyncio fills here are made when first asked for (get_extra_info):
            # the core keeps sockname and peername as plain data.
            self._extra = None
        else:
            self._extra["socket"] = _TransportSocket(sock, self._core)
            try:
                self._extra["sockname"] = sock.getsockname()
            except OSError:
                self._extra["sockname"] = None
            if peer is not None:
                self._extra.setdefault("peername", peer.value)
            if "peername" not in self._extra:
                try:
                    self._extra["peername"] = sock.getpeername()
                except OSError:
                    self._extra["peername"] = None
        if server is not None:
            if _SERVER_TRACKS_TRANSPORTS:
                server._attach(self)
            else:
                server._attach()
        loop._transports[self._core.fd] = self
        base_events._set_nodelay(sock)
        loop.call_soon(protocol.connection_made, self)
        loop.call_soon(self._start_reading)
        if waiter is not None:
            loop.call_soon(futures._set_result_unless_cancelled, waiter, None)

    @property
    def _sock_fd(self):
        return self._core.fd

    def _own_get_extra_info(self, name, default=None):
        extra = self._extra
        if extra is not None and name in extra:
            return extra[name]
        # Lazy extras (an IPv4 / IPv6 socket made without `extra`): asyncio's values, made on
        # first request and then kept, so each request returns the same object.
        if name == "socket":
            value = _TransportSocket(self._sock, self._core)
        elif name == "sockname":
            value = self._core.sockname
        elif name == "peername":
            value = self._core.peername
        else:
            if extra is None:
                hash(name)  # asyncio's dict lookup: an unhashable name is a TypeError
            return default
        if extra is None:
            self._extra = extra = {}
        extra[name] = value
        return value

    def __repr__(self):
        info = [self.__class__.__name__]
        if self._sock is None:
            info.append("closed")
        elif self._core.closing:
            info.append("closing")
        info.append(f"fd={self._sock_fd}")
        if self._loop is not None and not self._loop.is_closed() and self._sock is not None:
            info.append("read=polling" if self._core.reading else "read=idle")
            state = "polling" if self._core.writing else "idle"
            info.append(f"write=<{state}, bufsize={self._core.buffer_size}>")
        return "<{}>".format(" ".join(info))

    def __del__(self, _warn=warnings.warn):
        if getattr(self, "_sock", None) is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._sock.close()
            # As each version's asyncio: 3.13's transport leaves its Server here (there,
            # detaching twice is harmless); before, connection_lost alone detaches, since a
            # Server that counts connections asserts on a second detach.
            if _SERVER_TRACKS_TRANSPORTS and self._server is not None:
                self._detach_from_server()

    # --- protocol ----------------------------------------------------------------------

    def set_protocol(self, protocol):
        self._protocol = protocol
        self._protocol_connected = True
        self._core.set_protocol(protocol, isinstance(protocol, protocols.BufferedProtocol))

    def get_protocol(self):
        return self._protocol

    # --- reading -----------------------------------------------------------------------

    def _start_reading(self):
        if self.is_reading():
            self._core.start_reading()

    def is_reading(self):
        return not self.is_closing() and not self._paused

    def pause_reading(self):
        if not self.is_reading():
            return
        self._paused = True
        self._core.stop_reading()
        if self._loop.get_debug():
            logger.debug("%r pauses reading", self)

    def resume_reading(self):
        if self._core.closing or not self._paused:
            return
        self._paused = False
        self._core.start_reading()
        if self._loop.get_debug():
            logger.debug("%r resumes reading", self)

    def _read_ready__on_eof(self):
        if self._loop.get_debug():
            logger.debug("%r received EOF", self)
        try:
            keep_open = self._protocol.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if keep_open:
            # The protocol may still write, but nothing more can be read.
            self._core.stop_reading()
        else:
            self.close()

    # --- writing -----------------------------------------------------------------------

    if _OWN_WRITELINES:

        def writelines(self, list_of_data):
            if self._core.eof:
                raise RuntimeError("Cannot call writelines() after write_eof()")
            if self._empty_waiter_set():
                raise RuntimeError("unable to writelines; sendfile is in progress")
            if not list_of_data:
                return
            self._core.write(b"".join(list_of_data))

    # Otherwise WriteTransport.writelines: join, then self.write() (with write()'s checks).

    def _empty_waiter_set(self):
        return getattr(self, "_empty_waiter", None) is not None

    def write_eof(self):
        self._core.flush_corked()
        if self._core.closing or self._core.eof:
            return
        self._core.eof = True
        if not self._core.buffer_size:
            self._sock.shutdown(socket.SHUT_WR)

    def _shutdown_write(self):
        """Called by the core once the buffer drained after write_eof()."""
        self._sock.shutdown(socket.SHUT_WR)

    def can_write_eof(self):
        return True

    def get_write_buffer_size(self):
        self._core.flush_corked()
        return self._core.buffer_size

    def get_write_buffer_limits(self):
        return (self._core.low_water, self._core.high_water)

    def set_write_buffer_limits(self, high=None, low=None):
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._core.flush_corked()
        # asyncio keeps any real numbers; against whole byte counts, their floors (capped at
        # the core's largest size) compare the same way.
        self._core.set_write_buffer_limits(_byte_limit(high), _byte_limit(low))
        self._maybe_pause_protocol()

    def _maybe_pause_protocol(self):
        if self._core.buffer_size <= self._core.high_water or self._core.protocol_paused:
            return
        self._core.protocol_paused = True
        self._pause_protocol()

    def _pause_protocol(self):
        """The buffer went over the high-water mark (the core set the paused flag)."""
        try:
            self._protocol.pause_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler(
                {
                    "message": "protocol.pause_writing() failed",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )

    def _resume_protocol(self):
        """The buffer drained to the low-water mark (the core cleared the paused flag)."""
        try:
            self._protocol.resume_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler(
                {
                    "message": "protocol.resume_writing() failed",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )

    @property
    def _protocol_paused(self):
        return self._core.protocol_paused

    @_protocol_paused.setter
    def _protocol_paused(self, value):
        # _FlowControlMixin.__init__ assigns it before the core exists.
        core = getattr(self, "_core", None)
        if core is not None:
            core.protocol_paused = value

    # sendfile: asyncio's fallback waits until everything written so far has been sent.
    def _make_empty_waiter(self):
        if self._empty_waiter_set():
            raise RuntimeError("Empty waiter is already set")
        self._core.flush_corked()
        self._empty_waiter = self._loop.create_future()
        # The core refuses writes while a waiter is set, and resolves it once drained.
        self._core.set_empty_waiter(self._empty_waiter)
        if not self._core.buffer_size:
            self._empty_waiter.set_result(None)
        return self._empty_waiter

    def _reset_empty_waiter(self):
        self._empty_waiter = None
        self._core.set_empty_waiter(None)

    # --- closing -----------------------------------------------------------------------

    def close(self):
        self._core.flush_corked()
        if self._core.closing:
            return
        self._core.closing = True
        self._core.stop_reading()
        if not self._core.buffer_size:
            self._core.conn_lost += 1
            self._core.stop_writing()
            self._loop.call_soon(self._call_connection_lost, None)

    def abort(self):
        self._force_close(None)

    def _fatal_error(self, exc, message="Fatal error on transport"):
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._loop.call_exception_handler(
                {
                    "message": message,
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
        self._force_close(exc)

    def _force_close(self, exc):
        self._core.flush_corked()
        if self._core.conn_lost:
            return
        if self._core.buffer_size:
            self._core.clear_buffer()
            self._core.stop_writing()
        if not self._core.closing:
            self._core.closing = True
            self._core.stop_reading()
        self._core.conn_lost += 1
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc):
        try:
            if self._protocol_connected:
                self._protocol.connection_lost(exc)
        finally:
            if self._extra is None or "socket" not in self._extra:
                # The socket extra stays available once the transport lets go of the socket.
                self._own_get_extra_info("socket")
            # A callback someone else left on this fd would outlive the socket and fire for the
            # next one given its number: a loop.sendfile() aborted with the transport (asyncio's
            # cancellation callback asks sock.fileno(), -1 by then). Only the transport's own
            # fd, while the socket still holds it (a caller who closed it may have seen the
            # number reused by a socket of its own).
            fd = self._sock.fileno()
            if fd != -1:
                self._loop._remove_reader(fd)
                self._loop._remove_writer(fd)
            self._sock.close()
            self._sock = None
            self._protocol = None
            self._loop = None
            self._core.detach()
            if self._server is not None:
                self._detach_from_server()
                self._server = None
        if self._empty_waiter_set():
            self._empty_waiter.set_exception(ConnectionError("Connection is closed by peer"))

    def _detach_from_server(self):
        if _SERVER_TRACKS_TRANSPORTS:
            self._server._detach(self)
        else:
            self._server._detach()


# The hot path: transport.write(data) is a C method (a method descriptor, like a built-in
# type's) that runs the core's write on `self._core`: no Python frame, nothing per instance.
StreamTransport.write = _ferroloop.stream_write_method(StreamTransport)
# is_closing() likewise: StreamWriter.drain() calls it once per drain.
StreamTransport.is_closing = _ferroloop.stream_is_closing_method(StreamTransport)


def _fill_extra(transport):
    """Before asyncio's own ``get_extra_info`` (or a patch of it) runs on this transport:
    the extras made on first request go into ``_extra``, where asyncio's code reads them."""
    for name in ("socket", "sockname", "peername"):
        transport._own_get_extra_info(name)


# get_extra_info() follows a patch of asyncio's transport classes, as asyncio's transport does
# by inheritance (`mock.patch("asyncio.BaseTransport.get_extra_info", ...)`, in websockets'
# tests).
StreamTransport.get_extra_info = _ferroloop.AsyncioMethod(
    "get_extra_info",
    selector_events._SelectorSocketTransport,
    StreamTransport._own_get_extra_info,
    _fill_extra,
)


class DatagramTransport(selector_events._SelectorDatagramTransport):
    """asyncio's UDP transport for IPv4 / IPv6 sockets, with its two hot methods in Rust.

    ``_read_ready`` (one datagram to the protocol) and ``sendto`` are C methods of this class
    (``_ferroloop.datagram_methods``) that do asyncio's common case without a Python frame and
    hand anything else to asyncio's own methods; everything else is asyncio's. The attributes
    those two read are slots, at fixed offsets; ``_core`` keeps the fd, the family and recent
    peers' address tuples.
    """

    __slots__ = ("_core", "_conn_lost", "_protocol", "_buffer", "_address")

    def __init__(self, loop, sock, protocol, address=None, waiter=None, extra=None):
        super().__init__(loop, sock, protocol, address, waiter, extra)
        self._core = _ferroloop.DatagramCore(
            sock,
            sock.family == socket.AF_INET6,
            bool(self._extra["peername"]),
            self.max_size,
        )


DatagramTransport._read_ready, DatagramTransport.sendto = _ferroloop.datagram_methods(
    DatagramTransport,
    selector_events._SelectorDatagramTransport._read_ready,
    selector_events._SelectorDatagramTransport.sendto,
)
