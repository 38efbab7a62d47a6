//! `Acceptor`: a listening socket's accept loop (asyncio's `_accept_connection`), for servers
//! without TLS.
//!
//! Registered in the reactor as the listening fd's reader, like `StreamCore`. Each readiness
//! event accepts up to `backlog` connections with `accept4` (so an empty queue costs no Python
//! exception), builds the `socket.socket` and the peer address as Python's `accept()` would,
//! and schedules `loop._accept_connection_plain(protocol_factory, conn, peer, server)` in a
//! copy of the context the server was started in (asyncio runs each connection's set-up in a
//! task made from that context).
//!
//! Ground rules:
//! - Errors follow asyncio: an empty queue, `EINTR` and `ECONNABORTED` end the batch;
//!   `EMFILE`/`ENFILE`/`ENOBUFS`/`ENOMEM` go to `loop._accept_out_of_resources`, which logs,
//!   stops accepting and retries after `ACCEPT_RETRY_DELAY` (once per batch, where asyncio
//!   repeats it for every remaining iteration of the batch); any other error goes to the
//!   exception handler.
//! - TLS servers keep asyncio's own accept path (their set-up needs a task per connection).
//! - No Python object is held that the server does not also hold.

use std::os::fd::{AsRawFd, RawFd};

use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use pyo3::{ffi, intern, PyTraverseError};

use crate::event_loop::LoopCore;
use crate::py::{self, SockFd};
use crate::reactor::Which;
use crate::sys::{self, PeerAddr};
use crate::transports::addr::{InetAddr, SockAddr};

#[pyclass(frozen, module = "ferroloop._ferroloop")]
pub struct Acceptor {
    loop_: Py<LoopCore>,
    /// The listening socket and its fd (accepts use the fd only while the socket still holds
    /// it: `SockFd`).
    sock: SockFd,
    /// `(sock.family, sock.type, sock.proto)`: what Python's `accept()` gives the new socket.
    kind: Py<PyTuple>,
    protocol_factory: Py<PyAny>,
    server: Py<PyAny>,
    context: Py<PyAny>,
    backlog: usize,
}

impl Acceptor {
    /// Register an acceptor as `sock`'s reader (asyncio's `_start_serving` without TLS).
    pub(crate) fn start(
        loop_: &Bound<'_, LoopCore>,
        protocol_factory: &Bound<'_, PyAny>,
        sock: &Bound<'_, PyAny>,
        server: &Bound<'_, PyAny>,
        backlog: isize,
    ) -> PyResult<()> {
        let py = loop_.py();
        let fd: RawFd = sock.call_method0(intern!(py, "fileno"))?.extract()?;
        let kind = PyTuple::new(
            py,
            [
                sock.getattr(intern!(py, "family"))?,
                sock.getattr(intern!(py, "type"))?,
                sock.getattr(intern!(py, "proto"))?,
            ],
        )?;
        let acceptor = Py::new(
            py,
            Self {
                loop_: loop_.clone().unbind(),
                sock: SockFd::new(sock, fd),
                kind: kind.unbind(),
                protocol_factory: protocol_factory.clone().unbind(),
                server: server.clone().unbind(),
                context: py::copy_context(py)?,
                // At least one per event, as uvloop: asyncio's batch of `range(backlog)` never
                // accepts for a backlog of 0 or less, and its loop spins on the readable socket.
                backlog: backlog.max(1) as usize,
            },
        )?;
        loop_.get().watch(py, fd, Which::Reader, acceptor.into_any())
    }
}

/// The peer address in the form Python's `socket.accept()` returns.
fn peer_to_py<'py>(py: Python<'py>, addr: PeerAddr, conn: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    if let Some(inet) = InetAddr::from_sys(&addr) {
        return inet.to_py(py);
    }
    Ok(match addr {
        PeerAddr::V4(..) | PeerAddr::V6(..) => unreachable!("handled above"),
        PeerAddr::Unix(path) if path.first() == Some(&0) => PyBytes::new(py, &path).into_any(),
        PeerAddr::Unix(path) => {
            // A regular path (or "" for an unnamed peer), NUL-terminated, in the file-system
            // encoding.
            let n = path.iter().position(|&b| b == 0).unwrap_or(path.len());
            // SAFETY: `path[..n]` is valid for reads; the call returns a new reference or NULL
            // with an exception set.
            unsafe {
                Bound::from_owned_ptr_or_err(
                    py,
                    ffi::PyUnicode_DecodeFSDefaultAndSize(path.as_ptr().cast(), n as ffi::Py_ssize_t),
                )
            }?
        }
        PeerAddr::Other => conn.call_method0(intern!(py, "getpeername")).unwrap_or_else(|_| py.None().into_bound(py)),
    })
}

fn accept_one(slf: &Bound<'_, Acceptor>, conn_fd: std::os::fd::OwnedFd, addr: PeerAddr) -> PyResult<()> {
    let py = slf.py();
    let me = slf.get();
    let cached = py::cached(py)?;
    let kwargs = PyDict::new(py);
    kwargs.set_item(intern!(py, "fileno"), conn_fd.as_raw_fd())?;
    let conn = cached.socket_type.bind(py).call(me.kind.bind(py), Some(&kwargs))?;
    // The socket object owns the fd now.
    let _ = std::os::fd::IntoRawFd::into_raw_fd(conn_fd);
    conn.call_method1(intern!(py, "setblocking"), (false,))?;
    let loop_ = me.loop_.bind(py);
    // An IPv4 / IPv6 peer travels as plain data (the transport builds its Python form only
    // when asked); other families as their Python form.
    let peer = match InetAddr::from_sys(&addr) {
        Some(inet) => {
            if loop_.get().debug(py) {
                let addr = inet.to_py(py)?;
                loop_.call_method1(intern!(py, "_log_new_connection"), (me.server.bind(py), &addr, &conn))?;
            }
            Bound::new(py, SockAddr(inet))?.into_any()
        }
        None => {
            let addr = peer_to_py(py, addr, &conn)?;
            if loop_.get().debug(py) {
                loop_.call_method1(intern!(py, "_log_new_connection"), (me.server.bind(py), &addr, &conn))?;
            }
            addr
        }
    };
    let ctx = me.context.bind(py).call_method0(intern!(py, "copy"))?;
    let cb = loop_.getattr(intern!(py, "_accept_connection_plain"))?;
    let kwargs = PyDict::new(py);
    kwargs.set_item(intern!(py, "context"), ctx)?;
    loop_.call_method(
        intern!(py, "call_soon"),
        (cb, me.protocol_factory.bind(py), conn, peer, me.server.bind(py)),
        Some(&kwargs),
    )?;
    Ok(())
}

/// The listening socket is readable: accept a batch, unless the server stopped accepting
/// after the poll queued the batch (a callback ahead of it in the same iteration closed the
/// server): asyncio's `remove_reader` cancels its queued `_accept_connection` handle.
pub(crate) fn run(slf: &Bound<'_, Acceptor>) -> PyResult<()> {
    let py = slf.py();
    let me = slf.get();
    if !me.loop_.get().holds(py, me.sock.fd(), Which::Reader, slf.as_any()) {
        return Ok(());
    }
    for _ in 0..me.backlog {
        match sys::accept(me.sock.get(py)) {
            Ok((conn_fd, addr)) => {
                if let Err(e) = accept_one(slf, conn_fd, addr) {
                    report(slf, e)?;
                }
            }
            Err(e) if sys::would_block(&e) || e.raw_os_error() == Some(libc::ECONNABORTED) => return Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
                ) =>
            {
                let args = (
                    py::os_err(e).into_value(py),
                    me.sock.sock().bind(py),
                    me.protocol_factory.bind(py),
                    me.server.bind(py),
                    me.backlog,
                );
                if let Err(e) = me.loop_.bind(py).call_method1(intern!(py, "_accept_out_of_resources"), args) {
                    report(slf, e)?;
                }
                return Ok(());
            }
            Err(e) => return report(slf, py::os_err(e)),
        }
    }
    Ok(())
}

/// An error of the accept path goes to the exception handler, as an exception escaping
/// asyncio's `_accept_connection` handle would.
fn report(slf: &Bound<'_, Acceptor>, err: PyErr) -> PyResult<()> {
    py::report_callback_error(slf.get().loop_.bind(slf.py()).as_any(), slf.as_any(), err)
}

#[pymethods]
impl Acceptor {
    fn __repr__(&self) -> String {
        format!("<ferroloop accept loop fd={}>", self.sock.fd())
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.loop_)?;
        visit.call(self.sock.sock())?;
        visit.call(&self.kind)?;
        visit.call(&self.protocol_factory)?;
        visit.call(&self.server)?;
        visit.call(&self.context)
    }
}
