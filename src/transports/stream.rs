//! `StreamCore`: the per-byte half of a TCP / Unix stream transport.
//!
//! The transport users see is `ferroloop._transports.StreamTransport`, a Python subclass of
//! `asyncio.Transport` (so `isinstance` holds and rare paths stay readable). It owns a
//! `StreamCore`, registered directly in the reactor: readiness runs `read_ready` /
//! `write_ready` here with no Python handle, and `transport.write` runs `StreamCore::write`
//! (`write_method.rs`).
//!
//! Ground rules:
//! - Mirrors asyncio's `_SelectorSocketTransport`: one `recv` per readiness event (256 KiB at
//!   most), `data_received(bytes)` or `get_buffer`/`buffer_updated` for a BufferedProtocol;
//!   `write` sends at once when nothing is buffered and buffers the rest; the writer is
//!   registered only while data waits.
//! - Rare outcomes (EOF, errors, flow-control callbacks, connection lost) are delegated to
//!   methods of the Python transport with asyncio's names (`_read_ready__on_eof`,
//!   `_fatal_error`, `_pause_protocol`, `_resume_protocol`, `_call_connection_lost`).
//! - `reading`/`writing` say whether the fd is registered for that direction; queued
//!   readiness for a direction no longer registered is dropped (asyncio cancels the handle).
//! - No GilCell borrow is held across a call into Python.

use std::cell::RefCell;
use std::io::IoSlice;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyMemoryView};
use pyo3::{intern, PyTraverseError};

use crate::event_loop::ready::sparse_capacity;
use crate::event_loop::LoopCore;
use crate::py::{self, ByteView, GilCell, SockFd};
use crate::reactor::Which;
use crate::sys;
use crate::transports::addr::{InetAddr, SockAddr};
use crate::transports::stream_reader;

/// asyncio's `max_size` for one read: the shared read buffer, and the most `sock_recv` reads
/// through it.
pub(crate) const MAX_READ: usize = 256 * 1024;

/// The most room a drained write buffer keeps (`State::consume`); past it, the buffer is
/// freed once empty, or shrunk while it drains.
const WRITE_BUF_KEEP: usize = 256 * 1024;

/// What a stream transport asks one `recv` for: asyncio's `max_size`, as uvloop reads (250,000
/// bytes). With 64 KiB reads, a 100 KiB message over TCP was echoed in two writes (65,536 bytes
/// go out as a full segment and a 53-byte one), and on Linux 6.18 a few connections a second
/// then stalled for a delayed ACK (40-50 ms) with the rest of an echo unsent: p99 of the
/// `Protocol` 100 KiB row 20+ ms, 100-300 delayed ACKs in 2 s (`nstat`), none with 256 KiB
/// reads (docs/DESIGN.md, 2026-12-06). 64 KiB had been chosen because 256 KiB reads made glibc
/// trim and regrow the heap on every 100 KiB streams echo; `sys::raise_heap_thresholds` now
/// stops that for any read size. `data_received` chunk sizes are unspecified.
pub(crate) const TRANSPORT_READ: usize = MAX_READ;
/// asyncio's `constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES`.
const LOG_THRESHOLD_FOR_CONNLOST_WRITES: u32 = 5;

thread_local! {
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; MAX_READ]);
}

struct State {
    transport: Option<Py<PyAny>>,
    protocol: Option<Py<PyAny>>,
    buffered: bool,
    /// The context protocol callbacks run in (copied when reading starts, as asyncio's
    /// reader handle does).
    context: Option<Py<PyAny>>,
    buf: Vec<u8>,
    head: usize,
    reading: bool,
    writing: bool,
    closing: bool,
    eof: bool,
    conn_lost: u32,
    /// The error of a read made after data in the same `read_ready` (`read_rest`),
    /// for the next `read_ready` to report, as the next read would have.
    read_error: Option<std::io::Error>,
    protocol_paused: bool,
    high_water: usize,
    low_water: usize,
    empty_waiter: Option<Py<PyAny>>,
    /// While writing (data buffered, the fd watched for writability): a copy of the context
    /// of the callback whose write started the buffering, as asyncio's writer handle copies
    /// it in `write()`. `write_ready` runs in it: `resume_writing()`, the fatal error of a
    /// failed send, `connection_lost()` after a close that waited for the buffer.
    write_context: Option<Py<PyAny>>,
    /// `bytes` written during the running callback and not sent yet ("corked"), in order;
    /// only while `buf` is empty. Sent when the callback returns (`uncork`), or sooner by
    /// anything that could tell the difference (`flush_corked`).
    corked: Vec<Py<PyBytes>>,
    /// Their total length.
    corked_len: usize,
    /// The loop's `callback_seq` at the last write made in a callback.
    last_write_seq: u64,
    /// Whether writes are corked: `CORK_SCORE` after a callback wrote twice, less one for
    /// every corked send of a single write; corking stops at 0.
    cork_score: u8,
}

impl State {
    fn pending(&self) -> &[u8] {
        &self.buf[self.head..]
    }

    /// `n` bytes of the buffer were sent. The room a backlog took is given back as it
    /// drains, as asyncio's `bytearray` (3.10/3.11) and `deque` (3.12+) buffers do: a
    /// transport that once held a large write does not keep that much memory for the rest of
    /// its connection (`WRITE_BUF_KEEP`).
    fn consume(&mut self, n: usize) {
        self.head += n;
        if self.head == self.buf.len() {
            if self.buf.capacity() > WRITE_BUF_KEEP {
                self.buf = Vec::new();
            } else {
                self.buf.clear();
            }
            self.head = 0;
        } else if self.head > 64 * 1024 && self.head * 2 > self.buf.len() {
            self.buf.drain(..self.head);
            self.head = 0;
            if let Some(cap) = sparse_capacity(self.buf.capacity(), self.buf.len(), WRITE_BUF_KEEP) {
                self.buf.shrink_to(cap);
            }
        }
    }

    /// Drop what is corked, unsent (abort, a lost connection, detach).
    fn discard_corked(&mut self, py: Python<'_>) {
        self.corked_len = 0;
        release(py, &mut self.corked);
    }

    /// After data went to `buf`: whether to start watching for writability, and whether the
    /// buffer just went over the high-water mark (the protocol is then marked paused).
    #[inline]
    fn buffered(&mut self) -> Sent {
        let start_writing = !self.writing && !self.pending().is_empty();
        if start_writing {
            self.writing = true;
        }
        let over_high = !self.protocol_paused && self.pending().len() > self.high_water;
        if over_high {
            self.protocol_paused = true;
        }
        Sent::Buffered { start_writing, over_high }
    }
}

/// What a write did with its data.
enum Sent {
    /// Sent whole.
    Done,
    /// Held until the running callback returns (`first`: the transport's first such write).
    Corked { first: bool },
    /// Sent, and whatever the socket did not take is in `buf` (see `State::buffered`).
    Buffered { start_writing: bool, over_high: bool },
}

/// At most this many writes are corked at once (one `sendmsg` sends them all).
const MAX_CORKED: usize = 16;

/// A transport corks its writes until this many callbacks in a row sent a single corked
/// write (holding it gained nothing), and again from the next callback that writes twice.
const CORK_SCORE: u8 = 16;

/// Send the corked writes, then `tail`, with one system call, from an empty buffer; what the
/// socket does not take goes to `buf`. The corked `bytes` are released (`corked` is left empty,
/// with its capacity). `Ok(true)`: all of it went; `Err`: a send error other than "would
/// block".
#[inline(always)]
fn send_now(py: Python<'_>, fd: RawFd, st: &mut State, tail: &[u8]) -> std::io::Result<bool> {
    debug_assert!(st.pending().is_empty());
    let State { corked, buf, corked_len, .. } = st;
    let total = std::mem::take(corked_len) + tail.len();
    let r = match (corked.len(), tail.is_empty()) {
        (0, _) => sys::send(fd, tail),
        (1, true) => sys::send(fd, corked[0].as_bytes(py)),
        (n, _) => {
            let mut iov = [IoSlice::new(&[]); MAX_CORKED + 1];
            for (slot, b) in iov.iter_mut().zip(corked.iter()) {
                *slot = IoSlice::new(b.as_bytes(py));
            }
            iov[n] = IoSlice::new(tail);
            sys::send_vectored(fd, &iov[..n + 1])
        }
    };
    let sent = match r {
        Ok(n) => n,
        Err(e) if sys::would_block(&e) => 0,
        Err(e) => {
            release(py, corked);
            return Err(e);
        }
    };
    let all = sent == total;
    if !all {
        let mut skip = sent;
        for part in corked.iter().map(|b| b.as_bytes(py)).chain(std::iter::once(tail)) {
            if skip >= part.len() {
                skip -= part.len();
            } else {
                buf.extend_from_slice(&part[skip..]);
                skip = 0;
            }
        }
    }
    release(py, corked);
    Ok(all)
}

/// Empty `objs` (keeping its capacity), each `bytes` dropped as a plain decref (a `Py` drop asks
/// PyO3's thread-local first). A `bytes` runs no Python code when freed.
#[inline]
fn release(py: Python<'_>, objs: &mut Vec<Py<PyBytes>>) {
    while let Some(b) = objs.pop() {
        drop(b.into_bound(py));
    }
}

#[pyclass(frozen, module = "ferroloop._ferroloop")]
pub struct StreamCore {
    loop_: Py<LoopCore>,
    /// The socket object and its fd: system calls use the fd only while the object still
    /// holds it (`SockFd`).
    sock: SockFd,
    /// The socket's name when it is an IPv4 / IPv6 socket (`None`: another family, or
    /// `getsockname` failed; the Python transport then keeps its extras as Python objects).
    sockname: Option<InetAddr>,
    /// The peer's name (from `accept`, else `getpeername` at construction; `None` if that
    /// failed). Meaningful only when `sockname` is set.
    peername: Option<InetAddr>,
    /// The peer is (or may be) a socket of this same loop (`LoopCore::transport_made`).
    linked: bool,
    st: GilCell<State>,
}

impl StreamCore {
    /// `transport.is_closing()`.
    pub(crate) fn closing(&self, py: Python<'_>) -> bool {
        self.st.borrow(py).closing
    }

    fn transport(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.st.borrow(py).transport.as_ref().map(|t| t.clone_ref(py))
    }

    /// Call a method of the Python transport (errors: see `report_callback_error`).
    fn call_transport<'py>(
        &self,
        py: Python<'py>,
        name: &Bound<'py, pyo3::types::PyString>,
        args: impl pyo3::call::PyCallArgs<'py>,
    ) -> PyResult<()> {
        let Some(t) = self.transport(py) else { return Ok(()) };
        let method = t.bind(py).getattr(name)?;
        match method.call1(args) {
            Ok(_) => Ok(()),
            Err(e) => self.report_callback_error(py, &method, e),
        }
    }

    /// An exception escaping a transport callback goes to the loop's exception handler as
    /// "Exception in callback ..." (asyncio runs these paths inside a loop handle);
    /// KeyboardInterrupt/SystemExit propagate.
    fn report_callback_error(&self, py: Python<'_>, callback: &Bound<'_, PyAny>, err: PyErr) -> PyResult<()> {
        py::report_callback_error(self.loop_.bind(py).as_any(), callback, err)
    }

    /// `_fatal_error(exc, "Fatal write error on socket transport")` for a failed send, in the
    /// current context, as asyncio's `write()` and writer handle call it: every send runs in
    /// the context of the callback that wrote (held writes are sent before it is left;
    /// `write_ready` runs in the writing context).
    fn fatal_write_error(&self, py: Python<'_>, err: PyErr) -> PyResult<()> {
        self.fatal_error(py, err, "Fatal write error on socket transport")
    }

    /// The send of `writes` writes held together failed: asyncio's first of them would have
    /// failed (the fatal write error), and each later one found the connection lost
    /// (`writes_after_loss`), so `_conn_lost` and the warnings come out as asyncio's.
    fn held_writes_failed(&self, py: Python<'_>, err: PyErr, writes: usize) -> PyResult<()> {
        self.fatal_write_error(py, err)?;
        self.writes_after_loss(py, writes.saturating_sub(1))
    }

    /// `n` writes after the connection was lost: asyncio's `write()` counts each in
    /// `_conn_lost` and, from `LOG_THRESHOLD_FOR_CONNLOST_WRITES` on, warns.
    fn writes_after_loss(&self, py: Python<'_>, n: usize) -> PyResult<()> {
        for _ in 0..n {
            let conn_lost = self.st.borrow(py).conn_lost;
            if conn_lost >= LOG_THRESHOLD_FOR_CONNLOST_WRITES {
                py.import("asyncio.log")?
                    .getattr("logger")?
                    .call_method1("warning", ("socket.send() raised exception.",))?;
            }
            self.st.borrow_mut(py).conn_lost += 1;
        }
        Ok(())
    }

    /// The transport's `_fatal_error(exc, message)`, in the current context: the read path
    /// runs in the reading context (`read_ready`), as asyncio's reader handle does.
    fn fatal_error(&self, py: Python<'_>, err: PyErr, message: &str) -> PyResult<()> {
        if py::is_fatal(py, &err) {
            return Err(err);
        }
        let exc = err.into_value(py).into_bound(py);
        let args = (&exc, message).into_pyobject(py)?;
        py::while_handling(&exc, || self.call_transport(py, intern!(py, "_fatal_error"), &args))
    }

    fn loop_core(&self) -> &LoopCore {
        self.loop_.get()
    }

    fn set_watch(slf: &Bound<'_, Self>, which: Which, on: bool) -> PyResult<()> {
        let py = slf.py();
        let me = slf.get();
        if on {
            me.loop_core().watch(py, me.sock.fd(), which, slf.clone().into_any().unbind())
        } else {
            me.loop_core().unwatch(py, me.sock.fd(), which)
        }
    }

    /// `protocol.name(*args)` (no bound method, no tuple).
    fn call_protocol<'py>(
        &self,
        protocol: &Bound<'py, PyAny>,
        name: &Bound<'py, pyo3::types::PyString>,
        args: &[&Bound<'py, PyAny>],
    ) -> PyResult<Bound<'py, PyAny>> {
        py::call_method_fast(protocol, name, args)
    }

    /// `protocol.data_received(data)`; asyncio's own `StreamReaderProtocol` is fed without
    /// its Python frames (`stream_reader::target`).
    fn data_received(&self, py: Python<'_>, protocol: &Bound<'_, PyAny>, data: &Bound<'_, PyBytes>) -> PyResult<()> {
        match stream_reader::target(protocol) {
            Some(target) => target.feed(data.as_bytes()),
            None => py::call_method_fast(protocol, intern!(py, "data_received"), &[data.as_any()]).map(drop),
        }
    }

    /// Run `f` inside `ctx` (the reading or the writing context), if there is one.
    fn within<R>(py: Python<'_>, ctx: Option<Py<PyAny>>, f: impl FnOnce() -> PyResult<R>) -> PyResult<R> {
        match ctx {
            Some(ctx) => py::in_context(py, &ctx, f),
            None => f(),
        }
    }

    fn after_drain(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let me = slf.get();
        let resume = {
            let mut st = me.st.borrow_mut(py);
            let resume = st.protocol_paused && st.pending().len() <= st.low_water;
            if resume {
                st.protocol_paused = false;
            }
            resume
        };
        if resume {
            // resume_writing() may write again; emptiness is decided after it returns, with
            // what it wrote sent or buffered, not held until this callback returns: a close()
            // that waits for the buffer to drain would otherwise go ahead without it (asyncio
            // sends it first; SSLProtocol writes its close_notify there).
            me.call_transport(py, intern!(py, "_resume_protocol"), ())?;
            Self::flush_corked(slf)?;
            if me.st.borrow(py).conn_lost > 0 {
                return Ok(()); // sending it failed: the fatal error closes the transport
            }
        }
        let (empty, closing, eof, waiter) = {
            let st = me.st.borrow(py);
            let empty = st.pending().is_empty();
            let waiter = if empty { st.empty_waiter.as_ref().map(|w| w.clone_ref(py)) } else { None };
            (empty, st.closing, st.eof, waiter)
        };
        if empty {
            Self::stop_writing_inner(slf)?;
            if let Some(w) = waiter {
                settle_waiter(w.bind(py), intern!(py, "set_result"), py.None().into_bound(py))?;
            }
            if closing {
                me.call_transport(py, intern!(py, "_call_connection_lost"), (py.None(),))?;
            } else if eof {
                me.call_transport(py, intern!(py, "_shutdown_write"), ())?;
            }
        }
        Ok(())
    }

    /// Send the corked writes: one `send` (`sendmsg` for several), the rest buffered as a
    /// write's rest is; a send error is the fatal write error asyncio's `write()` would have
    /// raised at once. Called in the context of the callback that wrote them (the loop sends
    /// them before it leaves that context, `run::send_corked`), so what follows from the
    /// send (`_fatal_error`, the writing context) is as asyncio's `write()` has it.
    pub(crate) fn uncork(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let me = slf.get();
        let fd = me.sock.get(py);
        let outcome = {
            let mut st = me.st.borrow_mut(py);
            if st.corked.is_empty() {
                return Ok(());
            }
            if st.conn_lost > 0 {
                // (Cannot happen: whatever loses the connection sends first. Were it so, the
                // data is dropped, as a write after the loss is.)
                st.discard_corked(py);
                return Ok(());
            }
            st.cork_score = if st.corked.len() > 1 { CORK_SCORE } else { st.cork_score.saturating_sub(1) };
            let writes = st.corked.len();
            send_now(py, fd, &mut st, &[])
                .map(|all| if all { Sent::Done } else { st.buffered() })
                .map_err(|e| (e, writes))
        };
        match outcome {
            Ok(Sent::Buffered { start_writing, over_high }) => Self::after_buffered(slf, start_writing, over_high),
            Ok(Sent::Corked { .. } | Sent::Done) => Ok(()),
            Err((e, writes)) => me.held_writes_failed(py, py::os_err(e), writes),
        }
    }

    /// Data went to the buffer: watch for writability, pause the protocol over the high-water
    /// mark (`State::buffered` decided both).
    #[inline]
    fn after_buffered(slf: &Bound<'_, Self>, start_writing: bool, over_high: bool) -> PyResult<()> {
        if start_writing {
            // The writer handle asyncio's `write()` adds copies the current context.
            let ctx = py::copy_context(slf.py())?;
            drop(slf.get().st.borrow_mut(slf.py()).write_context.replace(ctx));
            if let Err(e) = Self::set_watch(slf, Which::Writer, true) {
                // asyncio registers the writer before it buffers: when that fails (the loop is
                // closed), the data is not kept. The buffer was empty before this write.
                let mut st = slf.get().st.borrow_mut(slf.py());
                st.writing = false;
                st.write_context = None;
                st.buf.clear();
                st.head = 0;
                if over_high {
                    st.protocol_paused = false;
                }
                return Err(e);
            }
        }
        if over_high {
            let me = slf.get();
            me.call_transport(slf.py(), intern!(slf.py(), "_pause_protocol"), ())?;
        }
        Ok(())
    }

    fn stop_writing_inner(slf: &Bound<'_, Self>) -> PyResult<()> {
        let (was, ctx) = {
            let mut st = slf.get().st.borrow_mut(slf.py());
            (std::mem::replace(&mut st.writing, false), st.write_context.take())
        };
        drop(ctx);
        if was {
            Self::set_watch(slf, Which::Writer, false)?;
        }
        Ok(())
    }
}

/// Resolve sendfile's empty waiter (`set_result` / `set_exception`) unless it is done already.
fn settle_waiter<'py>(
    waiter: &Bound<'py, PyAny>,
    method: &Bound<'py, pyo3::types::PyString>,
    value: Bound<'py, PyAny>,
) -> PyResult<()> {
    let py = waiter.py();
    if !waiter.call_method0(intern!(py, "done"))?.is_truthy()? {
        waiter.call_method1(method, (value,))?;
    }
    Ok(())
}

/// Reads larger than this go straight into a new `bytes` (no copy) once the previous read on
/// this thread was that large; smaller ones use the shared buffer and copy what arrived (cheaper
/// than allocating the whole `limit` for a few bytes). At 10 KiB the direct read is cheaper:
/// 0.97x the server CPU per request of the `Protocol` echo (ab_echo.py, 2026-12-07); at 1 KiB
/// the two are level.
const BIG_READ: usize = 4 * 1024;
/// ...but a read that an asyncio `StreamReader` takes (`recv_into_reader`) goes into its
/// `bytearray` (no copy over 4 KiB either), so it reads into a `bytes` only when larger than
/// this (100 KiB messages: 0.92x the CPU per request, docs/DESIGN.md).
const BIG_READER_READ: usize = 16 * 1024;
const _: () = assert!(BIG_READER_READ > BIG_READ && TRANSPORT_READ > BIG_READ); // `reader_reads_direct`
/// ...but only for limits the allocator serves from its heap: a block it serves with `mmap`
/// faults its pages in on every read, which costs more than the copy (measured: 3x the CPU per
/// request for 100 KiB echoes with 256 KiB reads, before `sys::raise_heap_thresholds`). Set
/// once at import (`set_direct_read_max`): `MAX_READ` when the heap serves blocks that large
/// (glibc does once its thresholds are raised), else 64 KiB (glibc's default mmap threshold is
/// 128 KiB). Direct reads of 100 KiB messages save the copy: 0.87x the CPU per request of the
/// `Protocol` echo over Unix sockets, 0.92x for streams (docs/DESIGN.md).
static DIRECT_READ_MAX: AtomicUsize = AtomicUsize::new(DIRECT_READ_FALLBACK);
const DIRECT_READ_FALLBACK: usize = 64 * 1024;

/// Called once at import, after `sys::raise_heap_thresholds`.
pub(crate) fn set_direct_read_max() -> usize {
    let max = if sys::heap_serves(MAX_READ) { MAX_READ } else { DIRECT_READ_FALLBACK };
    DIRECT_READ_MAX.store(max, Ordering::Relaxed);
    max
}

thread_local! {
    /// The size of this thread's last read (`note_read`).
    static LAST_READ: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Run `f` on the first `limit` bytes of the thread's shared read buffer (`MAX_READ` bytes);
/// a re-entrant call (a finalizer run by an allocation inside `f`) or a larger `limit` gets a
/// temporary buffer.
pub(crate) fn with_read_buf<R>(limit: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    READ_BUF.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) if limit <= buf.len() => f(&mut buf[..limit]),
        _ => f(&mut vec![0u8; limit]),
    })
}

/// One `recv` of at most `limit` (capped at `MAX_READ`) bytes into a new `bytes`.
pub(crate) fn recv_bytes(py: Python<'_>, fd: RawFd, limit: usize) -> std::io::Result<Bound<'_, PyBytes>> {
    let limit = limit.min(MAX_READ);
    let r = if reads_direct(limit) {
        // SAFETY: `ptr` is writable for `cap` bytes for the duration of the call.
        py::bytes_filled_by(py, limit, |ptr, cap| unsafe { sys::recv_raw(fd, ptr, cap) })
    } else {
        None
    };
    let r = match r {
        Some(r) => r,
        None => with_read_buf(limit, |buf| sys::recv(fd, buf).map(|n| PyBytes::new(py, &buf[..n]))),
    };
    if let Ok(b) = &r {
        note_read(b.as_bytes().len());
    }
    r
}

/// Remember the size of this thread's last read (`reads_direct`).
fn note_read(n: usize) {
    LAST_READ.set(n);
}

/// Whether `recv_bytes(.., limit)` reads straight into a new `bytes` (`limit` at most
/// `MAX_READ`).
fn reads_direct(limit: usize) -> bool {
    limit > BIG_READ && limit <= DIRECT_READ_MAX.load(Ordering::Relaxed) && LAST_READ.get() > BIG_READ
}

/// Whether a stream transport's read skips an asyncio `StreamReader`'s own path
/// (`recv_into_reader`) for a direct read into a new `bytes`.
fn reader_reads_direct() -> bool {
    // `reads_direct(TRANSPORT_READ)`, with the larger threshold.
    LAST_READ.get() > BIG_READER_READ && TRANSPORT_READ <= DIRECT_READ_MAX.load(Ordering::Relaxed)
}

/// One `recv` into the `bytearray` of an asyncio `StreamReader` (`target`, found before the
/// read), then the rest of `feed_data`: what `recv_bytes` and `data_received` do, less a
/// `bytes` object. Once the thread's last read was over 4 KiB, the read goes straight into
/// room made at the end of the `bytearray` for one byte more than that read (no copy; a read
/// that fills it has the rest read through the shared buffer, `read_rest`); after a smaller
/// one, or when the room cannot be made (an exported `bytearray`: `extend` then raises as
/// asyncio's does), it goes into the shared buffer and is copied. `Ok(None)` at EOF.
fn recv_into_reader(
    py: Python<'_>,
    me: &StreamCore,
    target: &stream_reader::Target<'_>,
) -> std::io::Result<Option<PyResult<()>>> {
    let fd = me.sock.get(py);
    let last = LAST_READ.get();
    if last > BIG_READ {
        let room = (last + 1).min(TRANSPORT_READ);
        // SAFETY: `extend_from` passes the room it made, writable for `len` bytes for the call.
        if let Some(r) = target.extend_from(room, |ptr, len| unsafe { sys::recv_raw(fd, ptr, len) }) {
            let n = r?;
            let (fed, m) = if n == room {
                read_rest(py, me, fd, TRANSPORT_READ.saturating_sub(n), |rest| (target.extend(rest), rest.len()))
            } else {
                (Ok(()), 0)
            };
            note_read(n + m);
            return Ok((n > 0).then(|| fed.and_then(|()| target.after_extend())));
        }
    }
    let fed = with_read_buf(TRANSPORT_READ, |buf| -> std::io::Result<_> {
        let n = sys::recv(fd, buf)?;
        note_read(n);
        Ok((n > 0).then(|| target.extend(&buf[..n])))
    })?;
    Ok(fed.map(|fed| fed.and_then(|()| target.after_extend())))
}

/// The rest of a read that filled the room it had: one more `recv`, of at most `limit` bytes,
/// through the shared buffer, handed to `take` (empty if nothing more was waiting, or `limit`
/// is 0: the first read was a whole `TRANSPORT_READ`). Together they are what one larger read
/// would have returned; so an error of this `recv` comes after the data before it, kept for
/// the next `read_ready` (`State::read_error`).
fn read_rest<R>(py: Python<'_>, me: &StreamCore, fd: RawFd, limit: usize, take: impl FnOnce(&[u8]) -> R) -> R {
    if limit == 0 {
        return take(&[]);
    }
    with_read_buf(limit, |buf| {
        let m = match sys::recv(fd, buf) {
            Ok(m) => m,
            Err(e) => {
                if !sys::would_block(&e) {
                    me.st.borrow_mut(py).read_error = Some(e);
                }
                0
            }
        };
        take(&buf[..m])
    })
}

/// Readable: one `recv`, handed to the protocol. All of it runs in the reading context, as
/// asyncio's reader handle does, and what the protocol wrote is sent before that context is
/// left (`run::send_corked`): a failed send and the writer it may start see that context.
pub(crate) fn read_ready(slf: &Bound<'_, StreamCore>) -> PyResult<()> {
    let py = slf.py();
    let me = slf.get();
    let (protocol, buffered, ctx, failed) = {
        let st = me.st.borrow(py);
        if !st.reading || st.conn_lost > 0 {
            return Ok(());
        }
        match &st.protocol {
            Some(p) => {
                let ctx = st.context.as_ref().map(|c| c.clone_ref(py));
                (p.clone_ref(py), st.buffered, ctx, st.read_error.is_some())
            }
            None => return Ok(()),
        }
    };
    let protocol = protocol.bind(py);
    let error = if failed { me.st.borrow_mut(py).read_error.take() } else { None };
    StreamCore::within(py, ctx, || {
        if let Some(e) = error {
            return me.fatal_error(py, py::os_err(e), "Fatal read error on socket transport");
        }
        let mut delivered = None;
        let r = read_in_context(me, protocol, buffered, &mut delivered);
        let r = r.and(crate::event_loop::send_corked_if_any(me.loop_.bind(py)));
        if let Some((data, cap)) = delivered {
            if let Some(spare) = py::SpareBytes::take_back(data, cap) {
                *me.loop_.get().spare.borrow_mut(py) = Some(spare);
            }
        }
        r
    })
}

/// `recv_bytes` for a protocol's `data_received`, with the `bytes` and its block's size: while
/// the thread's last read would fit the loop's spare `bytes`, the read goes straight into the
/// spare (`recv_into_spare`), even where `recv_bytes` would read into a new one
/// (docs/DESIGN.md).
fn recv_for_protocol<'py>(py: Python<'py>, me: &StreamCore) -> std::io::Result<(Bound<'py, PyBytes>, usize)> {
    let fd = me.sock.get(py);
    let spare = {
        let mut slot = me.loop_.get().spare.borrow_mut(py);
        if slot.as_ref().is_some_and(|s| s.fits(LAST_READ.get())) {
            slot.take()
        } else {
            None
        }
    };
    match spare {
        Some(spare) => recv_into_spare(py, me, fd, spare),
        None => recv_bytes(py, fd, TRANSPORT_READ).map(|b| {
            let n = b.as_bytes().len();
            (b, n)
        }),
    }
}

/// One read into the spare `bytes`' block: `cap + 1` bytes at most, so a read that fills it
/// shows that more may be waiting. Then the rest is read (`read_rest`) and both go into a new
/// `bytes`: what one `TRANSPORT_READ` read would have returned.
fn recv_into_spare<'py>(
    py: Python<'py>,
    me: &StreamCore,
    fd: RawFd,
    mut spare: py::SpareBytes,
) -> std::io::Result<(Bound<'py, PyBytes>, usize)> {
    // SAFETY: `read_into` passes its block's data area, writable for `len` bytes for the call.
    let n = spare.read_into(|ptr, len| unsafe { sys::recv_raw(fd, ptr, len) })?;
    let r = if n <= spare.cap() {
        Ok(spare.filled(py, n))
    } else {
        read_rest(py, me, fd, TRANSPORT_READ.saturating_sub(n), |rest| {
            spare.joined(py, rest).ok_or_else(|| std::io::Error::from(std::io::ErrorKind::OutOfMemory))
        })
    };
    if let Ok((b, _)) = &r {
        note_read(b.as_bytes().len());
    }
    r
}

/// `delivered`: the `bytes` handed to `data_received` and its block's size, for
/// `LoopCore::spare` once what the protocol wrote is sent.
fn read_in_context<'py>(
    me: &StreamCore,
    protocol: &Bound<'py, PyAny>,
    buffered: bool,
    delivered: &mut Option<(Bound<'py, PyBytes>, usize)>,
) -> PyResult<()> {
    let py = protocol.py();
    if buffered {
        let minus_one = (-1i32).into_pyobject(py)?;
        let buf = match me.call_protocol(protocol, intern!(py, "get_buffer"), &[minus_one.as_any()]) {
            Ok(b) => b,
            Err(e) => return me.fatal_error(py, e, "Fatal error: protocol.get_buffer() call failed."),
        };
        // asyncio's order: the length check belongs to get_buffer(), the rest to recv_into().
        match buf.len() {
            Ok(0) => {
                let e = PyRuntimeError::new_err("get_buffer() returned an empty buffer");
                return me.fatal_error(py, e, "Fatal error: protocol.get_buffer() call failed.");
            }
            Ok(_) => {}
            Err(e) => return me.fatal_error(py, e, "Fatal error: protocol.get_buffer() call failed."),
        }
        let view = match ByteView::for_recv_into(&buf) {
            Ok(v) => v,
            Err(e) => return me.fatal_error(py, e, "Fatal read error on socket transport"),
        };
        // SAFETY: the exported writable view stays valid until `view` is dropped below.
        let r = unsafe { sys::recv_raw(me.sock.get(py), view.as_mut_ptr(), view.len()) };
        drop(view);
        match r {
            Ok(0) => me.call_transport(py, intern!(py, "_read_ready__on_eof"), ()),
            Ok(n) => {
                let n = n.into_pyobject(py)?;
                match me.call_protocol(protocol, intern!(py, "buffer_updated"), &[n.as_any()]) {
                    Ok(_) => Ok(()),
                    Err(e) => me.fatal_error(py, e, "Fatal error: protocol.buffer_updated() call failed."),
                }
            }
            Err(e) if sys::would_block(&e) => Ok(()),
            Err(e) => me.fatal_error(py, py::os_err(e), "Fatal read error on socket transport"),
        }
    } else {
        // asyncio's `StreamReaderProtocol` is found before the read, unless the read goes
        // straight into a `bytes` anyway. `Ok(None)`: EOF; else what delivering the data gave.
        let looked = !reader_reads_direct();
        let target = if looked { stream_reader::target(protocol) } else { None };
        let r = match &target {
            Some(target) => recv_into_reader(py, me, target),
            None => recv_for_protocol(py, me).map(|(data, cap)| {
                (!data.as_bytes().is_empty()).then(|| {
                    // Looked for a reader before the read and found none: the protocol's own.
                    let r = if looked {
                        py::call_method_fast(protocol, intern!(py, "data_received"), &[data.as_any()]).map(drop)
                    } else {
                        me.data_received(py, protocol, &data)
                    };
                    *delivered = Some((data, cap));
                    r
                })
            }),
        };
        match r {
            Ok(None) => me.call_transport(py, intern!(py, "_read_ready__on_eof"), ()),
            Ok(Some(Ok(()))) => Ok(()),
            Ok(Some(Err(e))) => me.fatal_error(py, e, "Fatal error: protocol.data_received() call failed."),
            Err(e) if sys::would_block(&e) => Ok(()),
            Err(e) => me.fatal_error(py, py::os_err(e), "Fatal read error on socket transport"),
        }
    }
}

/// Writable: send what is buffered, in the writing context (`State::write_context`).
pub(crate) fn write_ready(slf: &Bound<'_, StreamCore>) -> PyResult<()> {
    let py = slf.py();
    let ctx = slf.get().st.borrow(py).write_context.as_ref().map(|c| c.clone_ref(py));
    StreamCore::within(py, ctx, || write_in_context(slf))
}

fn write_in_context(slf: &Bound<'_, StreamCore>) -> PyResult<()> {
    let py = slf.py();
    let me = slf.get();
    let fd = me.sock.get(py);
    let r = {
        let mut st = me.st.borrow_mut(py);
        if !st.writing || st.conn_lost > 0 {
            return Ok(());
        }
        let r = sys::send(fd, st.pending());
        if let Ok(n) = r {
            st.consume(n);
        }
        r
    };
    match r {
        Ok(_) => StreamCore::after_drain(slf),
        Err(e) if sys::would_block(&e) => Ok(()),
        Err(e) => {
            StreamCore::stop_writing_inner(slf)?;
            let waiter = {
                let mut st = me.st.borrow_mut(py);
                st.buf = Vec::new();
                st.head = 0;
                st.empty_waiter.as_ref().map(|w| w.clone_ref(py))
            };
            let err = py::os_err(e);
            let exc = err.value(py).clone();
            me.fatal_write_error(py, err)?;
            if let Some(w) = waiter {
                settle_waiter(w.bind(py), intern!(py, "set_exception"), exc.into_any())?;
            }
            Ok(())
        }
    }
}

#[pymethods]
impl StreamCore {
    /// `peer`: the address `accept` returned, if the socket was accepted.
    #[new]
    #[pyo3(signature = (loop_, transport, sock, protocol, buffered, peer=None))]
    fn py_new(
        py: Python<'_>,
        loop_: &Bound<'_, LoopCore>,
        transport: Py<PyAny>,
        sock: &Bound<'_, PyAny>,
        protocol: Py<PyAny>,
        buffered: bool,
        peer: Option<PyRef<'_, SockAddr>>,
    ) -> PyResult<Self> {
        let fd: RawFd = sock.call_method0(intern!(py, "fileno"))?.extract()?;
        // What asyncio's transport asks the socket for at creation, kept as plain data.
        let sockname = InetAddr::of_socket(fd, false).ok().flatten();
        let peername = match (&sockname, peer) {
            (None, _) => None,
            (Some(_), Some(peer)) => Some(peer.0),
            (Some(_), None) => InetAddr::of_socket(fd, true).ok().flatten(),
        };
        // A Unix peer made by this process may be a socket of this loop.
        let in_process = sockname.is_none() && sys::peer_is_this_process(fd);
        let linked = loop_.get().transport_made(py, sockname, peername, in_process);
        Ok(Self {
            loop_: loop_.clone().unbind(),
            sock: SockFd::new(sock, fd),
            sockname,
            peername,
            linked,
            st: GilCell::new(State {
                transport: Some(transport),
                protocol: Some(protocol),
                buffered,
                context: None,
                buf: Vec::new(),
                head: 0,
                reading: false,
                writing: false,
                closing: false,
                eof: false,
                conn_lost: 0,
                read_error: None,
                protocol_paused: false,
                high_water: 64 * 1024,
                low_water: 16 * 1024,
                empty_waiter: None,
                write_context: None,
                corked: Vec::new(),
                corked_len: 0,
                last_write_seq: 0,
                cork_score: CORK_SCORE,
            }),
        })
    }

    /// `transport.write(data)`: asyncio's checks and messages, then send or buffer.
    pub(crate) fn write(slf: &Bound<'_, Self>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let me = slf.get();
        if !(data.is_instance_of::<PyBytes>()
            || data.is_instance_of::<PyByteArray>()
            || data.is_instance_of::<PyMemoryView>())
        {
            return Err(PyTypeError::new_err(format!(
                "data argument must be a bytes-like object, not {}",
                data.get_type().name()?.repr()?
            )));
        }
        {
            let st = me.st.borrow(py);
            if st.eof {
                return Err(PyRuntimeError::new_err("Cannot call write() after write_eof()"));
            }
            if st.empty_waiter.is_some() {
                return Err(PyRuntimeError::new_err("unable to write; sendfile is in progress"));
            }
        }
        let view = match ByteView::new(data, false) {
            Ok(v) => v,
            Err(e) => {
                // asyncio's `if not data` comes first (a released memoryview raises there).
                if !data.is_truthy()? {
                    return Ok(());
                }
                // Then, like asyncio's send() of such data: a fatal write error when it would be
                // sent at once, an error from write() when it would be buffered.
                let sent_at_once = {
                    let st = me.st.borrow(py);
                    st.pending().is_empty() && st.conn_lost == 0
                };
                if sent_at_once {
                    return me.fatal_write_error(py, e);
                }
                return Err(e);
            }
        };
        let bytes = view.as_slice();
        if bytes.is_empty() {
            return Ok(());
        }
        if me.st.borrow(py).conn_lost > 0 {
            return me.writes_after_loss(py, 1);
        }
        let seq = me.loop_core().cork_seq(py);
        let fd = me.sock.get(py);
        let outcome = {
            let mut st = me.st.borrow_mut(py);
            // Only `bytes` are corked: they cannot change, so holding them is as good as a copy.
            let corkable = match seq {
                Some(seq) => {
                    if st.last_write_seq == seq {
                        st.cork_score = CORK_SCORE;
                    }
                    st.last_write_seq = seq;
                    if st.cork_score > 0 {
                        data.cast_exact::<PyBytes>().ok()
                    } else {
                        None
                    }
                }
                None => None,
            };
            if st.pending().is_empty() {
                let total = st.corked_len + bytes.len();
                match corkable {
                    // Never more than the high-water mark: what asyncio would have sent by now
                    // could not have paused the protocol either.
                    Some(b) if total <= st.high_water && st.corked.len() < MAX_CORKED => {
                        st.corked.push(b.clone().unbind());
                        st.corked_len = total;
                        Ok(Sent::Corked { first: st.corked.len() == 1 })
                    }
                    // Send at once (asyncio's path), after what is corked.
                    _ => {
                        let writes = st.corked.len() + 1;
                        send_now(py, fd, &mut st, bytes)
                            .map(|all| if all { Sent::Done } else { st.buffered() })
                            .map_err(|e| (e, writes))
                    }
                }
            } else {
                st.buf.extend_from_slice(bytes);
                Ok(st.buffered())
            }
        };
        drop(view);
        match outcome {
            Ok(Sent::Done) => Ok(()),
            Ok(Sent::Corked { first }) => {
                if first {
                    me.loop_core().add_corked(py, slf.clone().unbind());
                }
                Ok(())
            }
            Ok(Sent::Buffered { start_writing, over_high }) => Self::after_buffered(slf, start_writing, over_high),
            Err((e, writes)) => me.held_writes_failed(py, py::os_err(e), writes),
        }
    }

    /// Send what is corked now, before the callback that wrote it returns (`run_ready` sends
    /// it then): `is_closing()` and every method of the Python transport that could tell it
    /// was not sent yet call this first. The transport leaves the loop's list too, when it is
    /// the last one there (the usual case; otherwise the loop finds nothing left to send).
    pub(crate) fn flush_corked(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let me = slf.get();
        if me.st.borrow(py).corked.is_empty() {
            return Ok(());
        }
        me.loop_core().forget_corked(py, slf);
        Self::uncork(slf)
    }

    /// Start (or resume) reading: register the fd and capture the callbacks' context.
    fn start_reading(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let me = slf.get();
        let ctx = py::copy_context(py)?;
        let old = {
            let mut st = me.st.borrow_mut(py);
            if st.reading || st.closing {
                return Ok(());
            }
            st.reading = true;
            st.context.replace(ctx)
        };
        drop(old);
        Self::set_watch(slf, Which::Reader, true)
    }

    fn stop_reading(slf: &Bound<'_, Self>) -> PyResult<()> {
        let was = std::mem::replace(&mut slf.get().st.borrow_mut(slf.py()).reading, false);
        if was {
            Self::set_watch(slf, Which::Reader, false)?;
        }
        Ok(())
    }

    fn stop_writing(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::stop_writing_inner(slf)
    }

    /// Drop buffered data (abort / fatal error).
    fn clear_buffer(&self, py: Python<'_>) {
        let mut st = self.st.borrow_mut(py);
        st.buf = Vec::new();
        st.head = 0;
        st.discard_corked(py);
    }

    fn set_protocol(&self, py: Python<'_>, protocol: Py<PyAny>, buffered: bool) {
        let old = {
            let mut st = self.st.borrow_mut(py);
            st.buffered = buffered;
            st.protocol.replace(protocol)
        };
        drop(old);
    }

    /// Forget the Python objects (after connection_lost, which closed the socket), breaking
    /// the reference cycle; the loop forgets the socket's name.
    fn detach(&self, py: Python<'_>) {
        let old = {
            let mut st = self.st.borrow_mut(py);
            st.discard_corked(py);
            (
                st.transport.take(),
                st.protocol.take(),
                st.context.take(),
                st.empty_waiter.take(),
                st.write_context.take(),
            )
        };
        // The transport is held from construction until the first detach: only that one tells
        // the loop (`LoopCore::transport_made`).
        if old.0.is_some() {
            self.loop_core().transport_gone(py, self.sockname, self.linked);
        }
        drop(old);
    }

    fn set_write_buffer_limits(&self, py: Python<'_>, high: usize, low: usize) {
        let mut st = self.st.borrow_mut(py);
        st.high_water = high;
        st.low_water = low;
    }

    fn set_empty_waiter(&self, py: Python<'_>, waiter: Option<Py<PyAny>>) {
        let old = std::mem::replace(&mut self.st.borrow_mut(py).empty_waiter, waiter);
        drop(old);
    }

    #[getter]
    fn fd(&self) -> RawFd {
        self.sock.fd()
    }

    /// Whether `sockname` / `peername` are kept here (an IPv4 / IPv6 socket).
    #[getter]
    fn inet(&self) -> bool {
        self.sockname.is_some()
    }

    /// The socket's name as `socket.getsockname()` gave it at construction (`None`: see
    /// `inet`).
    #[getter]
    fn sockname<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.sockname.map(|a| a.to_py(py)).transpose()
    }

    /// The peer's name: `accept`'s address or `socket.getpeername()` at construction, `None`
    /// if that failed.
    #[getter]
    fn peername<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.peername.map(|a| a.to_py(py)).transpose()
    }

    #[getter]
    fn buffer_size(&self, py: Python<'_>) -> usize {
        self.st.borrow(py).pending().len()
    }

    #[getter]
    fn high_water(&self, py: Python<'_>) -> usize {
        self.st.borrow(py).high_water
    }

    #[getter]
    fn low_water(&self, py: Python<'_>) -> usize {
        self.st.borrow(py).low_water
    }

    #[getter]
    fn reading(&self, py: Python<'_>) -> bool {
        self.st.borrow(py).reading
    }

    #[getter]
    fn writing(&self, py: Python<'_>) -> bool {
        self.st.borrow(py).writing
    }

    #[getter]
    fn get_closing(&self, py: Python<'_>) -> bool {
        self.st.borrow(py).closing
    }
    #[setter]
    fn set_closing(&self, py: Python<'_>, v: bool) {
        self.st.borrow_mut(py).closing = v;
    }

    #[getter]
    fn get_eof(&self, py: Python<'_>) -> bool {
        self.st.borrow(py).eof
    }
    #[setter]
    fn set_eof(&self, py: Python<'_>, v: bool) {
        self.st.borrow_mut(py).eof = v;
    }

    #[getter]
    fn get_conn_lost(&self, py: Python<'_>) -> u32 {
        self.st.borrow(py).conn_lost
    }
    #[setter]
    fn set_conn_lost(&self, py: Python<'_>, v: u32) {
        self.st.borrow_mut(py).conn_lost = v;
    }

    #[getter]
    fn get_protocol_paused(&self, py: Python<'_>) -> bool {
        self.st.borrow(py).protocol_paused
    }
    #[setter]
    fn set_protocol_paused(&self, py: Python<'_>, v: bool) {
        self.st.borrow_mut(py).protocol_paused = v;
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.loop_)?;
        visit.call(self.sock.sock())?;
        if let Some(st) = self.st.try_borrow_unguarded() {
            visit.call(&st.transport)?;
            visit.call(&st.protocol)?;
            visit.call(&st.context)?;
            visit.call(&st.empty_waiter)?;
            visit.call(&st.write_context)?;
        }
        Ok(())
    }

    fn __clear__(&self) {
        Python::attach(|py| self.detach(py));
    }
}
