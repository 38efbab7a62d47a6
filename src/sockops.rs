//! asyncio's low-level socket API (`sock_recv`, `sock_recv_into`, `sock_recvfrom`,
//! `sock_recvfrom_into`, `sock_sendall`, `sock_sendto`, `sock_accept`, and the connect step of
//! `sock_connect`, whose checks and address resolution stay in Python) in Rust.
//!
//! Each call returns a `SockOp`: a coroutine-like object (registered as a
//! `collections.abc.Coroutine`), so `await`, `create_task()` and `wait_for()` treat it as they
//! treat asyncio's coroutines. Its first step tries the operation at once; only when the socket
//! is not ready does it create an `asyncio.Future`, put itself in the reactor's slot for the fd
//! and yield the future to the task. Readiness runs the operation here (no Python handle, no
//! `functools.partial`), keeps the outcome and resolves the future with `None`; the task's next
//! step hands the outcome back.
//!
//! Ground rules:
//! - Same order of checks, same exceptions as asyncio's `selector_events` (SSL socket check,
//!   debug-mode blocking check, try, then wait; "is used by transport" and "Event loop is
//!   closed" only when it has to wait).
//! - Objects whose type is exactly `socket.socket` get direct non-blocking syscalls on their fd
//!   for recv / recv_into / sendall; any other object has its own methods called, as asyncio
//!   does (so subclasses and look-alikes behave as they do under asyncio).
//! - Reads register lazily: a finished read stays in its reactor slot as an idle marker, so the
//!   next read of the same socket (checked by weak reference and fd) re-arms without an
//!   `epoll_ctl`; readiness that finds an idle marker removes it. Writes unregister when done,
//!   since a socket is nearly always writable.
//! - A cancelled operation (its future done before readiness) does nothing; the task then
//!   throws `CancelledError` in, which unregisters the operation if the slot is still its own.
//!   A future resolved from outside (not a public API) ends the operation at the task's next
//!   step, which returns the future's result, as asyncio's `await fut` does.
//! - An exception thrown in by hand, or `close()`, while the future is not done ends the
//!   coroutine, not the operation (`orphaned`): as asyncio's reader or writer, it still does
//!   the I/O when the socket is ready and resolves the future with the result itself.
//! - `sock_sendall` holds a `memoryview` of its data from the moment it waits until it ends,
//!   as asyncio does, so a `bytearray` cannot be resized under it. Other operations hold the
//!   caller's objects as given (asyncio does not pin `recv_into`'s buffer or `sendto`'s data).
//! - No GilCell borrow is held across a call into Python.

use std::os::fd::RawFd;

use pyo3::exceptions::{
    PyBaseException, PyBlockingIOError, PyInterruptedError, PyRuntimeError, PyStopIteration, PyTypeError, PyValueError,
};
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyMemoryView, PySlice, PyTuple, PyType, PyWeakrefReference};
use pyo3::{ffi, intern, PyTraverseError};

use crate::event_loop::LoopCore;
use crate::py::{self, ByteView, GilCell};
use crate::reactor::Which;
use crate::sys;
use crate::transports::stream::{recv_bytes, MAX_READ};

/// What one operation does, with the objects it needs until it finishes.
pub(crate) enum Kind {
    /// `sock.recv(n)`; `n` as given (asyncio passes it on unchanged).
    Recv(Py<PyAny>),
    RecvInto(Py<PyAny>),
    RecvFrom(Py<PyAny>),
    /// Buffer and byte count (`len(buf)` when the caller gave 0).
    RecvFromInto(Py<PyAny>, Py<PyAny>),
    /// Data and bytes sent. The caller's object until the operation has to wait; from then on
    /// a `memoryview` of it (but for an exact `bytes` on the direct path), held until the
    /// operation ends, as asyncio holds one: a `bytearray` cannot be resized meanwhile.
    SendAll(Py<PyAny>, usize),
    SendTo(Py<PyAny>, Py<PyAny>),
    Accept,
    /// `sock.connect(address)` (already resolved by the Python caller), then `SO_ERROR` once
    /// writable.
    Connect(Py<PyAny>),
    /// Finished: nothing held.
    Spent,
}

impl Kind {
    /// The same operation holding new references to its objects.
    fn clone_ref(&self, py: Python<'_>) -> Kind {
        match self {
            Kind::Recv(n) => Kind::Recv(n.clone_ref(py)),
            Kind::RecvInto(b) => Kind::RecvInto(b.clone_ref(py)),
            Kind::RecvFrom(n) => Kind::RecvFrom(n.clone_ref(py)),
            Kind::RecvFromInto(b, n) => Kind::RecvFromInto(b.clone_ref(py), n.clone_ref(py)),
            Kind::SendAll(d, pos) => Kind::SendAll(d.clone_ref(py), *pos),
            Kind::SendTo(d, a) => Kind::SendTo(d.clone_ref(py), a.clone_ref(py)),
            Kind::Accept => Kind::Accept,
            Kind::Connect(a) => Kind::Connect(a.clone_ref(py)),
            Kind::Spent => Kind::Spent,
        }
    }

    /// The loop method that made it (for reprs), and the direction it waits for.
    fn describe(&self) -> (&'static str, Which) {
        match self {
            Kind::Recv(_) => ("sock_recv", Which::Reader),
            Kind::RecvInto(_) => ("sock_recv_into", Which::Reader),
            Kind::RecvFrom(_) => ("sock_recvfrom", Which::Reader),
            Kind::RecvFromInto(..) => ("sock_recvfrom_into", Which::Reader),
            Kind::SendAll(..) => ("sock_sendall", Which::Writer),
            Kind::SendTo(..) => ("sock_sendto", Which::Writer),
            Kind::Accept => ("sock_accept", Which::Reader),
            Kind::Connect(_) => ("sock_connect", Which::Writer),
            Kind::Spent => ("sock_op", Which::Reader),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Created, not yet stepped.
    Init,
    /// Registered in the reactor, future yielded to the task.
    Waiting,
    /// Outcome stored, future resolved; the task's next step returns it.
    Completed,
    /// Returned or raised; in the reactor at most as an idle marker.
    Done,
}

struct OpState {
    phase: Phase,
    sock: Option<Py<PyAny>>,
    /// Weak reference to the socket, kept after the end so the next read of the same socket
    /// can reuse the idle registration.
    sock_ref: Option<Py<PyAny>>,
    /// Direct syscalls on `fd` (an exact `socket.socket`).
    direct: bool,
    fd: RawFd,
    kind: Kind,
    fut: Option<Py<PyAny>>,
    outcome: Option<PyResult<Py<PyAny>>>,
    /// Its last direct read got fewer bytes than asked (but some): the socket was drained. Kept
    /// on the idle marker, where it lets the next read of a stream socket wait first.
    drained: bool,
    /// Whether the socket is a byte stream, once known (carried from marker to marker).
    stream: Option<bool>,
    /// The coroutine ended while the operation waited on a future nobody had resolved (an
    /// exception thrown in, or `close()`, at asyncio's `await fut`). As in asyncio, the
    /// operation stays registered and does its I/O when the socket is ready, then resolves the
    /// future; every later step raises "cannot reuse already awaited coroutine".
    orphaned: bool,
}

#[pyclass(frozen, module = "ferroloop._ferroloop")]
pub struct SockOp {
    loop_: Py<LoopCore>,
    name: &'static str,
    which: Which,
    st: GilCell<OpState>,
}

/// What one attempt at the operation gave.
enum Attempt {
    Done(Py<PyAny>),
    WouldBlock,
}

fn is_retry(py: Python<'_>, e: &PyErr) -> bool {
    e.is_instance_of::<PyBlockingIOError>(py) || e.is_instance_of::<PyInterruptedError>(py)
}

fn stop_iteration(value: Py<PyAny>) -> PyErr {
    PyStopIteration::new_err((value,))
}

/// What one step of the coroutine gives: a future to wait on, or the operation's result.
pub(crate) enum Step {
    Yield(Py<PyAny>),
    Return(Py<PyAny>),
}

impl SockOp {
    fn new(loop_: &Bound<'_, LoopCore>, sock: &Bound<'_, PyAny>, kind: Kind) -> Self {
        let (name, which) = kind.describe();
        Self {
            loop_: loop_.clone().unbind(),
            name,
            which,
            st: GilCell::new(OpState {
                phase: Phase::Init,
                sock: Some(sock.clone().unbind()),
                sock_ref: None,
                direct: false,
                fd: -1,
                kind,
                fut: None,
                outcome: None,
                drained: false,
                stream: None,
                orphaned: false,
            }),
        }
    }

    /// True when the operation no longer waits: its reactor slot is only an idle marker.
    pub(crate) fn is_idle(&self, py: Python<'_>) -> bool {
        matches!(self.st.borrow(py).phase, Phase::Completed | Phase::Done)
    }

    /// Whether an idle `self` may be replaced by `other` without telling the kernel: same
    /// socket object, still open on the same fd.
    pub(crate) fn same_socket(&self, py: Python<'_>, sock: &Bound<'_, PyAny>, fd: RawFd) -> bool {
        let st = self.st.borrow(py);
        if st.fd != fd {
            return false;
        }
        match &st.sock_ref {
            Some(r) => match r.bind(py).cast::<PyWeakrefReference>() {
                Ok(r) => r.upgrade().is_some_and(|s| s.is(sock)),
                Err(_) => false,
            },
            None => false,
        }
    }

    /// The idle marker's socket was drained by its last read and is a byte stream: the next
    /// read may wait for readiness instead of trying first.
    pub(crate) fn drained_stream(&self, py: Python<'_>) -> bool {
        let st = self.st.borrow(py);
        st.drained && st.stream == Some(true)
    }

    /// Record on this idle marker that a read of its socket came back short.
    pub(crate) fn mark_drained(&self, py: Python<'_>) {
        let mut st = self.st.borrow_mut(py);
        st.drained = true;
        if st.stream.is_none() {
            st.stream = Some(sys::is_stream_socket(st.fd));
        }
    }

    /// Take over what is known about the socket from the idle marker this operation replaces.
    pub(crate) fn inherit(&self, py: Python<'_>, prev: &SockOp) {
        let stream = prev.st.borrow(py).stream;
        self.st.borrow_mut(py).stream = stream;
    }

    /// Forget everything held (the outcome is taken by the caller first).
    fn finish(&self, py: Python<'_>) -> (Option<Py<PyAny>>, Kind, Option<Py<PyAny>>) {
        let mut st = self.st.borrow_mut(py);
        st.phase = Phase::Done;
        (st.sock.take(), std::mem::replace(&mut st.kind, Kind::Spent), st.fut.take())
    }

    /// The first step: asyncio's checks, then one attempt.
    fn start(slf: &Bound<'_, Self>) -> PyResult<Step> {
        let py = slf.py();
        let me = slf.get();
        let sock = me.st.borrow(py).sock.as_ref().map(|s| s.clone_ref(py));
        let Some(sock) = sock else { return Err(reuse_error()) };
        let sock = sock.bind(py);
        let cached = py::cached(py)?;
        let direct = sock.get_type().is(cached.socket_type.bind(py));
        // `sock_connect` (Python) made these checks before resolving the address.
        let checked = matches!(me.st.borrow(py).kind, Kind::Connect(_));
        if !direct && !checked {
            cached.check_ssl_socket.bind(py).call1((sock,))?;
        }
        let core = me.loop_.get();
        if core.debug(py) && !checked {
            let timeout = sock.call_method0(intern!(py, "gettimeout"))?;
            if !timeout.eq(0)? {
                return Err(PyValueError::new_err("the socket must be non-blocking"));
            }
        }
        if direct {
            let fd: RawFd = sock.call_method0(intern!(py, "fileno"))?.extract()?;
            let mut st = me.st.borrow_mut(py);
            st.direct = true;
            st.fd = fd;
        } else if matches!(me.st.borrow(py).kind, Kind::Accept) {
            // asyncio's `_sock_accept` asks `fileno()` before `accept()` (a look-alike whose
            // `fileno()` raises fails with that error).
            sock.call_method0(intern!(py, "fileno"))?;
        }
        Self::prepare(slf)?;
        if direct && Self::wait_first(slf, sock)? {
            return Self::wait(slf, sock, false).map(Step::Yield);
        }
        match Self::attempt(slf, sock, true)? {
            Attempt::Done(v) => {
                let (drained, fd) = {
                    let st = me.st.borrow(py);
                    (st.drained, st.fd)
                };
                if drained {
                    if let Some(marker) = core.idle_sock_reader(py, fd, sock) {
                        marker.get().mark_drained(py);
                    }
                }
                drop(me.finish(py));
                Ok(Step::Return(v))
            }
            Attempt::WouldBlock => Self::wait(slf, sock, true).map(Step::Yield),
        }
    }

    /// Whether a direct read may skip its first try and wait for readiness at once: the
    /// previous read of this stream socket came back short (so the socket was drained then),
    /// and its idle marker is still in the reader slot, so the kernel still watches the fd
    /// (level-triggered: data that came in since is reported by the next poll) and no
    /// readiness has been seen since (readiness removes an idle marker). The try would most
    /// likely fail with `EAGAIN`; asyncio does not promise it. Not for a read that returns at
    /// once whatever the socket holds (a zero byte count, an empty buffer), nor for arguments
    /// the try would reject (it raises as asyncio does), nor for an fd a transport holds.
    fn wait_first(slf: &Bound<'_, Self>, sock: &Bound<'_, PyAny>) -> PyResult<bool> {
        let py = slf.py();
        let me = slf.get();
        let fd = {
            let st = me.st.borrow(py);
            let wants_bytes = match &st.kind {
                Kind::Recv(n) => n.bind(py).extract::<isize>().is_ok_and(|n| n > 0),
                Kind::RecvInto(buf) => ByteView::new(buf.bind(py), true).is_ok_and(|v| !v.is_empty()),
                _ => false,
            };
            if !wants_bytes {
                return Ok(false);
            }
            st.fd
        };
        let loop_ = me.loop_.bind(py);
        let drained = loop_.get().idle_sock_reader(py, fd, sock).is_some_and(|m| m.get().drained_stream(py));
        Ok(drained && !transport_holds(loop_, fd)?)
    }

    /// Argument handling asyncio does before the first attempt: `recvfrom_into`'s default
    /// byte count.
    fn prepare(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let me = slf.get();
        let (buf, n) = match &me.st.borrow(py).kind {
            Kind::RecvFromInto(buf, n) => (buf.clone_ref(py), n.clone_ref(py)),
            _ => return Ok(()),
        };
        // The calls below may run Python code (`__len__`, `__bool__`): no borrow held.
        if !n.bind(py).is_truthy()? {
            let len = buf.bind(py).len()?.into_pyobject(py)?.into_any().unbind();
            if let Kind::RecvFromInto(_, n) = &mut me.st.borrow_mut(py).kind {
                *n = len;
            }
        }
        Ok(())
    }

    /// `sock_sendall` is about to wait: from now on it sends from a `memoryview` of the data,
    /// which asyncio makes at this point and holds until the operation ends (its handle's
    /// arguments). The view keeps the buffer exported, so a `bytearray` cannot be resized
    /// (`BufferError`) while bytes of it are still to be sent. An exact `bytes` on the direct
    /// path is immutable and read in place: nothing to make.
    fn hold_data(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let me = slf.get();
        let data = {
            let st = me.st.borrow(py);
            match &st.kind {
                Kind::SendAll(data, _) if !(st.direct && data.bind(py).is_exact_instance_of::<PyBytes>()) => {
                    data.clone_ref(py)
                }
                _ => return Ok(()),
            }
        };
        let view = PyMemoryView::from(data.bind(py))?.into_any().unbind();
        if let Kind::SendAll(data, _) = &mut me.st.borrow_mut(py).kind {
            *data = view;
        }
        Ok(())
    }

    /// One try. `first` is the call's own attempt (asyncio's first `sendto` has no flags).
    fn attempt(slf: &Bound<'_, Self>, sock: &Bound<'_, PyAny>, first: bool) -> PyResult<Attempt> {
        let py = slf.py();
        let me = slf.get();
        let (direct, fd) = {
            let st = me.st.borrow(py);
            (st.direct, st.fd)
        };
        // A copy of the kind (new references) out of the cell: the calls below run Python code.
        let job = me.st.borrow(py).kind.clone_ref(py);
        let method = |name: &Bound<'_, pyo3::types::PyString>, args: &Bound<'_, PyTuple>| -> PyResult<Attempt> {
            match sock.call_method1(name, args) {
                Ok(v) => Ok(Attempt::Done(v.unbind())),
                Err(e) if is_retry(py, &e) => Ok(Attempt::WouldBlock),
                Err(e) => Err(e),
            }
        };
        match job {
            Kind::Recv(n) if direct => {
                let n: isize = n.bind(py).extract()?;
                if n < 0 {
                    return Err(PyValueError::new_err("negative buffersize in recv"));
                }
                let n = n as usize;
                if n == 0 {
                    // As `socket.recv(0)`: empty at once, no syscall (which would fail with
                    // EAGAIN on an empty socket and make the call wait for data).
                    return Ok(Attempt::Done(PyBytes::new(py, b"").into_any().unbind()));
                }
                let r = if n <= MAX_READ {
                    recv_bytes(py, fd, n)
                } else {
                    // Larger than the shared buffer: read into a bytes of the full size, as
                    // `socket.recv` does (a datagram must not be cut short).
                    // SAFETY: `ptr` is writable for `cap` bytes for the duration of the call.
                    match py::bytes_filled_by(py, n, |ptr, cap| unsafe { sys::recv_raw(fd, ptr, cap) }) {
                        Some(r) => r,
                        None => return Err(pyo3::exceptions::PyMemoryError::new_err(())),
                    }
                };
                match r {
                    Ok(b) => {
                        let got = b.as_bytes().len();
                        me.st.borrow_mut(py).drained = got > 0 && got < n;
                        Ok(Attempt::Done(b.into_any().unbind()))
                    }
                    Err(e) if sys::would_block(&e) => Ok(Attempt::WouldBlock),
                    Err(e) => Err(py::os_err(e)),
                }
            }
            Kind::Recv(n) => method(intern!(py, "recv"), &PyTuple::new(py, [n])?),
            Kind::RecvInto(buf) if direct => {
                let view = ByteView::for_recv_into(buf.bind(py))?;
                let len = view.len();
                if len == 0 {
                    // As `socket.recv_into()` of an empty buffer: 0 at once, no syscall.
                    return Ok(Attempt::Done(0i32.into_pyobject(py)?.into_any().unbind()));
                }
                // SAFETY: the exported writable view stays valid until `view` is dropped below.
                let r = unsafe { sys::recv_raw(fd, view.as_mut_ptr(), len) };
                drop(view);
                match r {
                    Ok(n) => {
                        me.st.borrow_mut(py).drained = n > 0 && n < len;
                        Ok(Attempt::Done(n.into_pyobject(py)?.into_any().unbind()))
                    }
                    Err(e) if sys::would_block(&e) => Ok(Attempt::WouldBlock),
                    Err(e) => Err(py::os_err(e)),
                }
            }
            Kind::RecvInto(buf) => method(intern!(py, "recv_into"), &PyTuple::new(py, [buf])?),
            Kind::RecvFrom(n) => method(intern!(py, "recvfrom"), &PyTuple::new(py, [n])?),
            Kind::RecvFromInto(buf, n) => method(intern!(py, "recvfrom_into"), &PyTuple::new(py, [buf, n])?),
            Kind::SendAll(data, pos) => {
                let (sent, total) = if direct {
                    let view = ByteView::new(data.bind(py), false)?;
                    let bytes = view.as_slice();
                    let total = bytes.len();
                    let r = sys::send(fd, &bytes[pos.min(total)..]);
                    drop(view);
                    match r {
                        Ok(n) => (n, total),
                        Err(e) if sys::would_block(&e) => (0, total),
                        Err(e) => return Err(py::os_err(e)),
                    }
                } else {
                    // asyncio: `sock.send(data)` first (the caller's object), then
                    // `sock.send(view[pos:])` from the memoryview `hold_data` made.
                    let data = data.bind(py);
                    let chunk = if pos == 0 {
                        data.clone()
                    } else {
                        data.get_item(PySlice::new(py, pos as isize, isize::MAX, 1))?
                    };
                    let sent = match sock.call_method1(intern!(py, "send"), (chunk,)) {
                        Ok(n) => n.extract::<usize>()?,
                        Err(e) if is_retry(py, &e) => 0,
                        Err(e) => return Err(e),
                    };
                    (sent, data.len()?)
                };
                let pos = pos + sent;
                if pos >= total {
                    Ok(Attempt::Done(py.None()))
                } else {
                    if let Kind::SendAll(_, p) = &mut me.st.borrow_mut(py).kind {
                        *p = pos;
                    }
                    Ok(Attempt::WouldBlock)
                }
            }
            Kind::SendTo(data, addr) => {
                if first {
                    method(intern!(py, "sendto"), &PyTuple::new(py, [data, addr])?)
                } else {
                    let flags = 0i32.into_pyobject(py)?.into_any().unbind();
                    method(intern!(py, "sendto"), &PyTuple::new(py, [data, flags, addr])?)
                }
            }
            Kind::Connect(address) if first => match sock.call_method1(intern!(py, "connect"), (&address,)) {
                Ok(_) => Ok(Attempt::Done(py.None())),
                Err(e) if is_retry(py, &e) => Ok(Attempt::WouldBlock),
                Err(e) => Err(e),
            },
            Kind::Connect(address) => {
                let err = match sock.call_method1(intern!(py, "getsockopt"), (libc::SOL_SOCKET, libc::SO_ERROR)) {
                    Ok(v) => v.extract::<i32>()?,
                    Err(e) if is_retry(py, &e) => return Ok(Attempt::WouldBlock),
                    Err(e) => return Err(e),
                };
                if err != 0 {
                    let msg = format!("Connect call failed {}", address.bind(py).str()?);
                    return Err(pyo3::exceptions::PyOSError::new_err((err, msg)));
                }
                Ok(Attempt::Done(py.None()))
            }
            Kind::Spent => Err(reuse_error()),
            Kind::Accept => match sock.call_method0(intern!(py, "accept")) {
                Ok(pair) => {
                    let conn = pair.get_item(0)?;
                    conn.call_method1(intern!(py, "setblocking"), (false,))?;
                    Ok(Attempt::Done(pair.unbind()))
                }
                Err(e) if is_retry(py, &e) => Ok(Attempt::WouldBlock),
                Err(e) => Err(e),
            },
        }
    }

    /// Not ready: create the future, register, yield the future. `check_transport`: false when
    /// the caller has just found that no transport holds the fd.
    fn wait(slf: &Bound<'_, Self>, sock: &Bound<'_, PyAny>, check_transport: bool) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let me = slf.get();
        let loop_ = me.loop_.bind(py);
        let fut = LoopCore::new_future(loop_)?;
        let fd = if me.st.borrow(py).direct {
            me.st.borrow(py).fd
        } else {
            let fileno = sock.call_method0(intern!(py, "fileno"))?;
            let fd: RawFd = fileno.extract().map_err(|e| LoopCore::sock_fd_error(loop_, &fileno, e))?;
            me.st.borrow_mut(py).fd = fd;
            fd
        };
        if check_transport && transport_holds(loop_, fd)? {
            loop_.call_method1(intern!(py, "_ensure_fd_no_transport"), (fd,))?;
        }
        Self::hold_data(slf)?;
        if me.st.borrow(py).sock_ref.is_none() {
            // Sockets without weak-reference support just never reuse an idle registration.
            let r = PyWeakrefReference::new(sock).ok().map(|r| r.into_any().unbind());
            me.st.borrow_mut(py).sock_ref = r;
        }
        loop_.get().arm_sock(py, fd, me.which, slf, sock)?;
        fut.setattr(intern!(py, "_asyncio_future_blocking"), true)?;
        let yielded = fut.clone().unbind();
        {
            let mut st = me.st.borrow_mut(py);
            st.fut = Some(fut.unbind());
            st.phase = Phase::Waiting;
        }
        Ok(yielded)
    }

    /// Leave the reactor if the slot is still this operation's.
    fn disarm(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let me = slf.get();
        let fd = me.st.borrow(py).fd;
        if fd >= 0 {
            me.loop_.get().disarm_sock(py, fd, me.which, slf)?;
        }
        Ok(())
    }

    fn step(slf: &Bound<'_, Self>) -> PyResult<Step> {
        let py = slf.py();
        let me = slf.get();
        let (phase, orphaned) = {
            let st = me.st.borrow(py);
            (st.phase, st.orphaned)
        };
        if orphaned {
            // asyncio's task, woken by the future, sends into a finished coroutine.
            Self::end_coroutine(slf)?;
            return Err(reuse_error());
        }
        match phase {
            Phase::Init => {
                let r = Self::start(slf);
                if r.is_err() && me.st.borrow(py).phase == Phase::Init {
                    drop(me.finish(py));
                }
                // asyncio's coroutine raises these in its own frame (the first try's
                // `sock.recv()`, its checks): chained to the exception being handled.
                r.map_err(|e| py::as_raised_here(py, e))
            }
            Phase::Waiting => {
                // Resumed before the outcome.
                let fut = me.st.borrow(py).fut.as_ref().map(|f| f.clone_ref(py));
                let Some(f) = fut else {
                    return Err(reuse_error());
                };
                let f = f.bind(py);
                if f.call_method0(intern!(py, "done"))?.is_truthy()? {
                    // Someone else resolved the future (readiness never does: it stores the
                    // outcome first). asyncio's `await fut` returns (or raises) what the future
                    // holds, and its done callback unregisters the operation.
                    let result = f.call_method0(intern!(py, "result"));
                    Self::abandon(slf)?;
                    return result.map(|v| Step::Return(v.unbind()));
                }
                // Not resolved yet: yield the same future again.
                f.setattr(intern!(py, "_asyncio_future_blocking"), true)?;
                Ok(Step::Yield(f.clone().unbind()))
            }
            Phase::Completed => {
                let outcome = me.st.borrow_mut(py).outcome.take();
                let held = me.finish(py);
                drop(held);
                match outcome {
                    Some(Ok(v)) => Ok(Step::Return(v)),
                    Some(Err(e)) => Err(e),
                    None => Err(reuse_error()),
                }
            }
            Phase::Done => Err(reuse_error()),
        }
    }

    /// `send(value)`: a non-None value cannot start the coroutine (as for native ones).
    fn send_step(slf: &Bound<'_, Self>, value: &Bound<'_, PyAny>) -> PyResult<Step> {
        if !value.is_none() && slf.get().st.borrow(slf.py()).phase == Phase::Init {
            return Err(PyTypeError::new_err("can't send non-None value to a just-started coroutine"));
        }
        Self::step(slf)
    }

    /// The Python-level protocol (`__next__`, `send`): a result leaves as `StopIteration`.
    fn step_py(r: PyResult<Step>) -> PyResult<Py<PyAny>> {
        match r? {
            Step::Yield(f) => Ok(f),
            Step::Return(v) => Err(stop_iteration(v)),
        }
    }

    /// Whether the operation waits on a future that is not done.
    fn pending(slf: &Bound<'_, Self>) -> PyResult<bool> {
        let py = slf.py();
        let fut = {
            let st = slf.get().st.borrow(py);
            if st.phase != Phase::Waiting {
                return Ok(false);
            }
            st.fut.as_ref().map(|f| f.clone_ref(py))
        };
        match fut {
            Some(f) => Ok(!f.bind(py).call_method0(intern!(py, "done"))?.is_truthy()?),
            None => Ok(false),
        }
    }

    /// The coroutine ends from outside (an exception thrown in, or `close()`), or an orphaned
    /// one is stepped or thrown into. While its future is not done, the operation is (or
    /// stays) orphaned: asyncio's reader or writer stays until the socket is ready. Once the
    /// future is done (resolved by the I/O, or cancelled by the task's `cancel()`, whose done
    /// callback unregisters in asyncio) nothing is left to do, and it is abandoned.
    fn end_coroutine(slf: &Bound<'_, Self>) -> PyResult<()> {
        if Self::pending(slf)? {
            slf.get().st.borrow_mut(slf.py()).orphaned = true;
            Ok(())
        } else {
            Self::abandon(slf)
        }
    }

    /// End a waiting operation from outside (an exception thrown in, or `close()`).
    fn abandon(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let me = slf.get();
        let phase = me.st.borrow(py).phase;
        if matches!(phase, Phase::Waiting | Phase::Completed) {
            Self::disarm(slf)?;
        }
        let outcome = me.st.borrow_mut(py).outcome.take();
        let held = me.finish(py);
        drop((outcome, held));
        Ok(())
    }
}

/// 3.12's `DeprecationWarning` for `throw(typ, val[, tb])`, from the caller's line.
fn warn_throw_signature(py: Python<'_>) -> PyResult<()> {
    let category = py.get_type::<pyo3::exceptions::PyDeprecationWarning>();
    PyErr::warn(
        py,
        &category,
        c"the (type, exc, tb) signature of throw() is deprecated, use the single-arg signature instead.",
        1,
    )
}

/// What a finished coroutine raises when stepped or thrown into (with no `__context__`, on
/// 3.10-3.13 alike).
fn reuse_error() -> PyErr {
    PyRuntimeError::new_err("cannot reuse already awaited coroutine")
}

/// The exception `throw(typ, val, tb)` raises, checked as CPython checks it: by the coroutine
/// (`_gen_throw`), or by the future's iterator it waits on (`FutureIter_throw`: `waiting`),
/// whose messages differ.
fn thrown<'py>(
    typ: &Bound<'py, PyAny>,
    val: Option<&Bound<'py, PyAny>>,
    tb: Option<&Bound<'py, PyAny>>,
    waiting: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let py = typ.py();
    let val = val.filter(|v| !v.is_none());
    let tb = tb.filter(|t| !t.is_none());
    if tb.is_some_and(|t| !t.is_instance_of::<pyo3::types::PyTraceback>()) {
        return Err(PyTypeError::new_err(if waiting {
            "throw() third argument must be a traceback"
        } else {
            "throw() third argument must be a traceback object"
        }));
    }
    let class = typ.cast::<PyType>().ok().filter(|t| t.is_subclass_of::<PyBaseException>().unwrap_or(false));
    let exc = if let Some(t) = class {
        // PyErr_NormalizeException: the value if it is an instance, a tuple as the arguments,
        // anything else as the one argument.
        match val {
            Some(v) if v.is_instance(t)? => v.clone(),
            Some(v) => match v.cast::<PyTuple>() {
                Ok(args) => t.call1(args)?,
                Err(_) => t.call1((v,))?,
            },
            None => t.call0()?,
        }
    } else if typ.is_instance_of::<PyBaseException>() {
        if val.is_some() {
            return Err(PyTypeError::new_err("instance exception may not have a separate value"));
        }
        typ.clone()
    } else if waiting {
        return Err(PyTypeError::new_err(
            "exceptions must be classes deriving BaseException or instances of such a class",
        ));
    } else {
        let name = typ.get_type().name()?;
        return Err(PyTypeError::new_err(format!(
            "exceptions must be classes or instances deriving from BaseException, not {name}"
        )));
    };
    if let Some(tb) = tb {
        exc.setattr(intern!(py, "__traceback__"), tb)?;
    }
    Ok(exc)
}

/// Whether the loop's `_transports` may hold a transport for `fd`, in which case asyncio's
/// `_ensure_fd_no_transport` has to be consulted.
fn transport_holds(loop_: &Bound<'_, LoopCore>, fd: RawFd) -> PyResult<bool> {
    let py = loop_.py();
    let transports = loop_.getattr(intern!(py, "_transports"))?;
    match transports.getattr(intern!(py, "data")) {
        Ok(data) => data.contains(fd),
        Err(_) => Ok(true),
    }
}

/// The `am_send` slot (`PyIter_Send`, used by `await` and by asyncio's task): the result is
/// handed back as `PYGEN_RETURN` with no `StopIteration` to create and fetch (measured: about
/// 2 000 instructions per operation). PyO3 has no way to declare it, so `install_am_send`
/// puts it in the type after creation.
unsafe extern "C" fn sockop_am_send(
    slf: *mut ffi::PyObject,
    value: *mut ffi::PyObject,
    result: *mut *mut ffi::PyObject,
) -> ffi::PySendResult {
    let run = std::panic::AssertUnwindSafe(|| {
        // SAFETY: CPython calls am_send with the GIL held (the thread is attached).
        let py = unsafe { Python::assume_attached() };
        // SAFETY: `slf` is a live SockOp (the slot belongs to its type) and `value` a live object
        // (CPython passes None for a plain `next`); both are borrowed for the call.
        let (slf, value) = unsafe {
            (Bound::from_borrowed_ptr(py, slf).cast_into_unchecked::<SockOp>(), Bound::from_borrowed_ptr(py, value))
        };
        match SockOp::send_step(&slf, &value) {
            Ok(Step::Yield(f)) => (ffi::PySendResult::PYGEN_NEXT, f.into_ptr()),
            Ok(Step::Return(v)) => (ffi::PySendResult::PYGEN_RETURN, v.into_ptr()),
            Err(e) => {
                e.restore(py);
                (ffi::PySendResult::PYGEN_ERROR, std::ptr::null_mut())
            }
        }
    });
    let (status, obj) = std::panic::catch_unwind(run).unwrap_or_else(|_| {
        // SAFETY: as above; a panic must not cross the C boundary, it becomes an exception.
        let py = unsafe { Python::assume_attached() };
        PyRuntimeError::new_err("ferroloop: internal error in sock_* operation").restore(py);
        (ffi::PySendResult::PYGEN_ERROR, std::ptr::null_mut())
    });
    // SAFETY: CPython passes a valid out-pointer for the result.
    unsafe { *result = obj };
    status
}

/// Install `sockop_am_send` on the `SockOp` type (once, at module initialisation).
pub(crate) fn install_am_send(py: Python<'_>) {
    let tp = <SockOp as pyo3::PyTypeInfo>::type_object_raw(py);
    // SAFETY: `tp` is SockOp's heap type, created by PyO3 and alive for the process; a heap
    // type's `tp_as_async` points at its own (writable) PyAsyncMethods, which already holds
    // `am_await`. No SockOp exists yet, and PyType_Modified drops any cached lookups.
    unsafe {
        let am = (*tp).tp_as_async;
        if !am.is_null() {
            (*am).am_send = Some(sockop_am_send);
            ffi::PyType_Modified(tp);
        }
    }
}

/// Readiness of the fd an operation waits on (run from the loop's ready queue). An unexpected
/// error goes to the exception handler, as an error in asyncio's reader callback would.
pub(crate) fn run(slf: &Bound<'_, SockOp>) -> PyResult<()> {
    match ready(slf) {
        Ok(()) => Ok(()),
        Err(e) => py::report_callback_error(slf.get().loop_.bind(slf.py()).as_any(), slf.as_any(), e),
    }
}

fn ready(slf: &Bound<'_, SockOp>) -> PyResult<()> {
    let py = slf.py();
    let me = slf.get();
    let (phase, fut, sock) = {
        let st = me.st.borrow(py);
        (st.phase, st.fut.as_ref().map(|f| f.clone_ref(py)), st.sock.as_ref().map(|s| s.clone_ref(py)))
    };
    let (Phase::Waiting, Some(fut), Some(sock)) = (phase, fut, sock) else {
        // An idle marker: nobody waits, so stop watching.
        return SockOp::disarm(slf);
    };
    let fut = fut.bind(py);
    if fut.call_method0(intern!(py, "done"))?.is_truthy()? {
        // Cancelled (the task will throw CancelledError in) or resolved from outside (the task's
        // next step returns what it holds): nothing more to do here.
        return SockOp::disarm(slf);
    }
    let outcome = match SockOp::attempt(slf, sock.bind(py), false) {
        Ok(Attempt::WouldBlock) => return Ok(()),
        Ok(Attempt::Done(v)) => Ok(v),
        Err(e) if py::is_fatal(py, &e) => return Err(e),
        Err(e) => Err(e),
    };
    let drained = me.st.borrow(py).drained;
    if drained {
        // It stays in the slot as the idle marker: learn whether the socket is a stream.
        me.mark_drained(py);
    }
    // An error goes to the future, as asyncio's reader or writer callback sets it: the task
    // throws it in, and each coroutine it passes through chains it as on asyncio's loop (the
    // one awaiting this to the exception it handles; the ones around it, not resumed, to
    // nothing). Stepped instead (by hand), the operation returns what the future holds.
    let failed = outcome.is_err();
    let orphaned = {
        let mut st = me.st.borrow_mut(py);
        if st.orphaned {
            st.phase = Phase::Completed;
            Some(outcome)
        } else if failed {
            Some(outcome)
        } else {
            st.phase = Phase::Completed;
            st.outcome = Some(outcome);
            None
        }
    };
    if me.which == Which::Writer {
        SockOp::disarm(slf)?;
    }
    match orphaned {
        None => fut.call_method1(intern!(py, "set_result"), (py.None(),))?,
        // The coroutine has ended: the future gets the outcome itself, as asyncio's does, and
        // the task it wakes sends (or throws) into a finished coroutine.
        Some(Ok(v)) => fut.call_method1(intern!(py, "set_result"), (v,))?,
        Some(Err(e)) => fut.call_method1(intern!(py, "set_exception"), (e.into_value(py),))?,
    };
    Ok(())
}

#[pymethods]
impl SockOp {
    /// `await op`. A second awaiter of an operation that waits gets what `await` of a native
    /// coroutine suspended in its own `await` raises.
    fn __await__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        let busy = {
            let st = slf.get().st.borrow(slf.py());
            matches!(st.phase, Phase::Waiting | Phase::Completed) && !st.orphaned
        };
        if busy {
            return Err(PyRuntimeError::new_err("coroutine is being awaited already"));
        }
        Ok(slf)
    }

    fn __next__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        Self::step_py(Self::step(slf))
    }

    fn send(slf: &Bound<'_, Self>, value: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        Self::step_py(Self::send_step(slf, value))
    }

    /// As a native coroutine's `throw`: while the operation waits (a coroutine suspended in
    /// `await fut`) the future's iterator checks the arguments, and any error, its own
    /// `TypeError` too, ends the coroutine; otherwise the coroutine's checks come first and
    /// leave it as it was. Thrown into a finished operation, an exception becomes asyncio's
    /// "cannot reuse already awaited coroutine". A coroutine that ends while its future is not
    /// done leaves the operation orphaned (`end_coroutine`), as asyncio leaves its reader.
    /// On 3.12+ more than one argument is deprecated: warned once by the coroutine, and once
    /// more by the future's iterator while waiting (where an error from that warning ends
    /// the coroutine, as any exception there does).
    #[pyo3(signature = (typ, *rest))]
    fn throw(slf: &Bound<'_, Self>, typ: &Bound<'_, PyAny>, rest: &Bound<'_, PyTuple>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        if rest.len() > 2 {
            return Err(PyTypeError::new_err(format!("throw expected at most 3 arguments, got {}", rest.len() + 1)));
        }
        let val = rest.get_item(0).ok();
        let tb = rest.get_item(1).ok();
        let (phase, orphaned) = {
            let st = slf.get().st.borrow(py);
            (st.phase, st.orphaned)
        };
        let finished = phase == Phase::Done || orphaned;
        let waiting = matches!(phase, Phase::Waiting | Phase::Completed) && !orphaned;
        if !rest.is_empty() && py.version_info() >= (3, 12) {
            warn_throw_signature(py)?;
            if waiting {
                if let Err(e) = warn_throw_signature(py) {
                    Self::end_coroutine(slf)?;
                    return Err(e);
                }
            }
        }
        let (val, tb) = (val.as_ref(), tb.as_ref());
        let exc = match thrown(typ, val, tb, waiting) {
            Ok(exc) => exc,
            Err(e) => {
                if waiting || orphaned {
                    Self::end_coroutine(slf)?;
                }
                return Err(e);
            }
        };
        if finished {
            if orphaned {
                // The task's `CancelledError` after `cancel()`, say: the future is done.
                Self::end_coroutine(slf)?;
            }
            drop(exc);
            return Err(reuse_error());
        }
        Self::end_coroutine(slf)?;
        Err(PyErr::from_value(exc))
    }

    /// As a native coroutine's `close()`: a no-op once finished (an orphaned operation keeps
    /// waiting for its socket).
    fn close(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::end_coroutine(slf)
    }

    #[getter]
    fn __name__(&self) -> &'static str {
        self.name
    }

    #[getter]
    fn __qualname__(&self) -> String {
        format!("Loop.{}", self.name)
    }

    #[getter]
    fn cr_await(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        let st = self.st.borrow(py);
        if st.phase == Phase::Waiting && !st.orphaned {
            st.fut.as_ref().map(|f| f.clone_ref(py))
        } else {
            None
        }
    }

    fn __repr__(&self) -> String {
        format!("<ferroloop {} coroutine>", self.name)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.loop_)?;
        let Some(st) = self.st.try_borrow_unguarded() else { return Ok(()) };
        visit.call(&st.sock)?;
        visit.call(&st.sock_ref)?;
        visit.call(&st.fut)?;
        if let Some(Ok(v)) = &st.outcome {
            visit.call(v)?;
        }
        match &st.kind {
            Kind::Recv(a) | Kind::RecvInto(a) | Kind::RecvFrom(a) | Kind::SendAll(a, _) | Kind::Connect(a) => {
                visit.call(a)?
            }
            Kind::RecvFromInto(a, b) | Kind::SendTo(a, b) => {
                visit.call(a)?;
                visit.call(b)?;
            }
            Kind::Accept | Kind::Spent => {}
        }
        Ok(())
    }

    fn __clear__(&self) {
        Python::attach(|py| {
            let held = {
                let mut st = self.st.borrow_mut(py);
                (
                    st.sock.take(),
                    st.sock_ref.take(),
                    st.fut.take(),
                    st.outcome.take(),
                    std::mem::replace(&mut st.kind, Kind::Spent),
                )
            };
            drop(held);
        });
    }
}

/// What the `LoopCore.sock_*` methods return: the operation, not started; the checks run on
/// its first step, as in asyncio's `async def`s.
pub(crate) fn op(loop_: &Bound<'_, LoopCore>, sock: &Bound<'_, PyAny>, kind: Kind) -> PyResult<Py<SockOp>> {
    Py::new(loop_.py(), SockOp::new(loop_, sock, kind))
}
