//! `DatagramCore` and the two hot methods of `ferroloop._transports.DatagramTransport` (UDP over
//! IPv4 / IPv6): `_read_ready` and `sendto`.
//!
//! The transport is asyncio's own `_SelectorDatagramTransport`, subclassed: every method but
//! these two is asyncio's, with its names, messages and order. These two are C method
//! descriptors of the subclass (made here, like `write_method.rs`'s) that do asyncio's common
//! case without a Python frame, and hand everything else to asyncio's method:
//!
//! - `_read_ready`: one `recvfrom` into the thread's shared read buffer (asyncio's
//!   `sock.recvfrom(max_size)` allocates `max_size` bytes per datagram and shrinks them), then
//!   `protocol.datagram_received(data, addr)`, or `protocol.error_received(exc)` for an
//!   `OSError`, as asyncio does.
//! - `sendto(data, addr)`: sends at once when asyncio would (nothing buffered, connection not
//!   lost) and `data` is a non-empty `bytes`. Unusual arguments (keywords, other bytes-like
//!   types, an address this module does not parse, a wrong address for a connected transport)
//!   and `EAGAIN` go to asyncio's `sendto`, which checks, raises, sends or buffers as before.
//!
//! The transport's state stays in its Python attributes (`_conn_lost`, `_protocol`, `_buffer`,
//! `_address`), which the subclass keeps in `__slots__` so these methods read them at fixed
//! offsets; asyncio's methods use them unchanged. The core keeps only what never changes (fd,
//! family, whether the socket is connected, `max_size`) and a few recent peers' addresses: the
//! tuple `recvfrom` returned for a peer is handed out again for the next datagram from it, and
//! `sendto` to that same tuple needs no parsing.

use std::ffi::CStr;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;
use std::sync::OnceLock;

use pyo3::exceptions::{PyAttributeError, PyRuntimeError};
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyInt, PyString, PyTuple, PyType};
use pyo3::{ffi, intern, PyTraverseError};

use super::addr::InetAddr;
use super::stream::with_read_buf;
use crate::event_loop::LoopCore;
use crate::py::{self, GilCell, SockFd};
use crate::sys::{self, PeerAddr};

/// Slot offsets in `DatagramTransport` instances.
#[derive(PartialEq)]
struct Offsets {
    loop_: isize,
    core: isize,
    conn_lost: isize,
    protocol: isize,
    buffer: isize,
    address: isize,
}

static OFFSETS: OnceLock<Offsets> = OnceLock::new();

/// asyncio's `_SelectorDatagramTransport._read_ready` and `.sendto`, for what the fast paths
/// hand on.
static BASE: PyOnceLock<(Py<PyAny>, Py<PyAny>)> = PyOnceLock::new();

/// The per-transport data of a `DatagramTransport`.
#[pyclass(frozen, module = "ferroloop._ferroloop")]
pub struct DatagramCore {
    /// The socket: system calls use its fd only while it still holds it (`SockFd`).
    sock: SockFd,
    v6: bool,
    /// The socket has a peer (asyncio's `self._extra['peername']`): datagrams go out with
    /// `send`, whatever address `sendto` is given.
    connected: bool,
    max_size: usize,
    /// Recent peers: their address and the tuple handed out (or given) for it.
    peers: GilCell<Peers>,
    /// Whether readiness events read more than one datagram (`read_ready`).
    batch: GilCell<Batch>,
}

/// The most datagrams one readiness event reads (libuv, under uvloop, reads up to 32).
const MAX_BATCH: u32 = 16;

/// When more datagrams are tried after the first: always, until four readiness events in a row
/// found none waiting (each try that finds none is a `recvfrom` that fails with EAGAIN); then
/// not for the next 64 events, after which it tries again. A socket with one datagram in flight
/// at a time (a client waiting for each answer) so pays one failed `recvfrom` per 17 or so.
#[derive(Default)]
struct Batch {
    misses: u8,
    skip: u8,
}

impl Batch {
    /// Try more datagrams in this readiness event?
    fn start(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    fn hit(&mut self) {
        self.misses = 0;
    }

    fn miss(&mut self) {
        self.misses += 1;
        if self.misses >= 4 {
            self.misses = 0;
            self.skip = 64;
        }
    }
}

/// Recent peers in a direct-mapped table (`PEER_SLOTS` slots, chosen by a hash of the
/// address; allocated at the first datagram), so a server with many clients finds each in one
/// probe, and a newcomer replaces only the peer in its slot.
#[derive(Default)]
struct Peers {
    slots: Vec<Option<Peer>>,
    /// The slot last filled or found: `sendto` usually answers the datagram just read.
    last: usize,
}

struct Peer {
    addr: InetAddr,
    /// The tuple Python's `recvfrom` gives for `addr`, made here and handed out again.
    ours: Option<Py<PyAny>>,
    /// A tuple `sendto` was given for `addr` (it may be another form: an IPv6 `(host, port)`),
    /// recognised by identity; never handed out.
    given: Option<Py<PyAny>>,
}

const PEER_SLOTS: usize = 64;

fn slot_of(addr: &InetAddr) -> usize {
    let h = match *addr {
        InetAddr::V4(ip, port) => u64::from(u32::from_ne_bytes(ip)) ^ (u64::from(port) << 32),
        InetAddr::V6(ip, port, _, scope) => {
            let (hi, lo) = ip.split_at(8);
            let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]));
            word(hi) ^ word(lo).rotate_left(17) ^ (u64::from(port) << 40) ^ u64::from(scope)
        }
    };
    (h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % PEER_SLOTS
}

impl Peers {
    fn by_addr(&mut self, addr: &InetAddr) -> Option<&Py<PyAny>> {
        let i = slot_of(addr);
        let peer = self.slots.get(i)?.as_ref().filter(|p| p.addr == *addr)?;
        self.last = i;
        peer.ours.as_ref()
    }

    fn by_object(&self, obj: *mut ffi::PyObject) -> Option<InetAddr> {
        fn holds(p: &Option<Peer>, obj: *mut ffi::PyObject) -> Option<InetAddr> {
            let p = p.as_ref()?;
            [&p.ours, &p.given].iter().any(|o| o.as_ref().is_some_and(|o| o.as_ptr() == obj)).then_some(p.addr)
        }
        if let Some(a) = self.slots.get(self.last).and_then(|p| holds(p, obj)) {
            return Some(a);
        }
        self.slots.iter().find_map(|p| holds(p, obj))
    }

    /// Keep `obj` as `addr`'s tuple (`ours`: made here, else given to `sendto`). What it
    /// replaces is returned, to be dropped by the caller after its borrow ends (dropping may
    /// run Python code).
    fn insert(&mut self, addr: InetAddr, obj: Py<PyAny>, ours: bool) -> Option<Peer> {
        if self.slots.is_empty() {
            self.slots.resize_with(PEER_SLOTS, || None);
        }
        let i = slot_of(&addr);
        self.last = i;
        let slot = &mut self.slots[i];
        match slot {
            Some(p) if p.addr == addr => {
                let old = if ours { p.ours.replace(obj) } else { p.given.replace(obj) };
                old.map(|o| Peer { addr, ours: Some(o), given: None })
            }
            _ => {
                let (ours, given) = if ours { (Some(obj), None) } else { (None, Some(obj)) };
                slot.replace(Peer { addr, ours, given })
            }
        }
    }

    fn objects(&self) -> impl Iterator<Item = &Py<PyAny>> {
        self.slots.iter().flatten().flat_map(|p| p.ours.iter().chain(p.given.iter()))
    }
}

impl DatagramCore {
    /// The Python form of a sender's address (`None` when the kernel gave none, as Python's
    /// `recvfrom` does).
    fn addr_object<'py>(&self, py: Python<'py>, addr: PeerAddr) -> PyResult<Bound<'py, PyAny>> {
        let Some(addr) = InetAddr::from_sys(&addr) else {
            return Ok(py.None().into_bound(py));
        };
        if let Some(obj) = self.peers.borrow_mut(py).by_addr(&addr) {
            return Ok(obj.bind(py).clone());
        }
        let obj = addr.to_py(py)?;
        let old = self.peers.borrow_mut(py).insert(addr, obj.clone().unbind(), true);
        drop(old);
        Ok(obj)
    }

    /// The address `addr` names, when it is a tuple this module can read without Python's
    /// socket code: one handed out or given before, or a numeric IPv4 `(host, port)` (IPv6:
    /// `(host, port[, flowinfo[, scope_id]])`) with exact `str` and `int` items in range.
    fn resolve(&self, addr: &Bound<'_, PyAny>) -> Option<InetAddr> {
        let py = addr.py();
        if let Some(a) = self.peers.borrow(py).by_object(addr.as_ptr()) {
            return Some(a);
        }
        let t = addr.cast_exact::<PyTuple>().ok()?;
        let n = t.len();
        if n < 2 || n > if self.v6 { 4 } else { 2 } {
            return None;
        }
        let host = t.get_item(0).ok()?;
        let host = host.cast_exact::<PyString>().ok()?.to_str().ok()?;
        let int = |i: usize| -> Option<u64> {
            let v = t.get_item(i).ok()?;
            v.cast_exact::<PyInt>().ok()?.extract::<u64>().ok()
        };
        let port = u16::try_from(int(1)?).ok()?;
        let a = if self.v6 {
            let ip: Ipv6Addr = host.parse().ok()?;
            let flow = if n > 2 { int(2)? } else { 0 };
            let scope = if n > 3 { u32::try_from(int(3)?).ok()? } else { 0 };
            if flow > 0xF_FFFF {
                return None;
            }
            InetAddr::V6(ip.octets(), port, flow as u32, scope)
        } else {
            let ip: Ipv4Addr = host.parse().ok()?;
            InetAddr::V4(ip.octets(), port)
        };
        let old = self.peers.borrow_mut(py).insert(a, addr.clone().unbind(), false);
        drop(old);
        Some(a)
    }
}

#[pymethods]
impl DatagramCore {
    #[new]
    fn py_new(sock: &Bound<'_, PyAny>, v6: bool, connected: bool, max_size: usize) -> PyResult<Self> {
        let fd: RawFd = sock.call_method0(intern!(sock.py(), "fileno"))?.extract()?;
        Ok(Self {
            sock: SockFd::new(sock, fd),
            v6,
            connected,
            max_size,
            peers: GilCell::new(Peers::default()),
            batch: GilCell::new(Batch::default()),
        })
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(self.sock.sock())?;
        if let Some(peers) = self.peers.try_borrow_unguarded() {
            for obj in peers.objects() {
                visit.call(obj)?;
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        // SAFETY: tp_clear runs with the GIL held.
        let py = unsafe { Python::assume_attached() };
        let old = std::mem::take(&mut self.peers.borrow_mut(py).slots);
        drop(old);
    }
}

/// The transport's attributes the fast paths read (each `None` when its slot is empty).
struct Slots<'py> {
    loop_: Option<Bound<'py, PyAny>>,
    core: Option<Bound<'py, PyAny>>,
    conn_lost: Option<Bound<'py, PyAny>>,
    protocol: Option<Bound<'py, PyAny>>,
    buffer: Option<Bound<'py, PyAny>>,
    address: Option<Bound<'py, PyAny>>,
}

impl<'py> Slots<'py> {
    /// Read them from `slf`.
    ///
    /// # Safety
    /// `slf` is a `DatagramTransport` (the class the offsets were taken from; the method
    /// descriptors check `self`'s type before their function runs).
    unsafe fn of(py: Python<'py>, slf: *mut ffi::PyObject) -> PyResult<Self> {
        let off = OFFSETS.get().ok_or_else(|| PyAttributeError::new_err("datagram_methods() was not called"))?;
        let get = |offset| {
            // SAFETY: the caller's promise; a non-NULL slot holds a reference the instance
            // owns, alive while we hold the GIL and the caller holds `slf`.
            unsafe {
                let p = py::read_slot(slf, offset);
                (!p.is_null()).then(|| Bound::from_borrowed_ptr(py, p))
            }
        };
        Ok(Self {
            loop_: get(off.loop_),
            core: get(off.core),
            conn_lost: get(off.conn_lost),
            protocol: get(off.protocol),
            buffer: get(off.buffer),
            address: get(off.address),
        })
    }

    fn protocol(&self) -> PyResult<&Bound<'py, PyAny>> {
        self.protocol.as_ref().ok_or_else(|| PyAttributeError::new_err("_protocol"))
    }
}

/// asyncio's method `which` (0: `_read_ready`, 1: `sendto`) on `slf` with the original
/// arguments.
///
/// # Safety
/// `args` holds `nargs` objects followed by `len(kwnames)` keyword values.
unsafe fn hand_on(
    py: Python<'_>,
    which: usize,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    let base = BASE.get(py).ok_or_else(|| PyAttributeError::new_err("datagram_methods() was not called"))?;
    let func = if which == 0 { &base.0 } else { &base.1 };
    // SAFETY: `kwnames` is NULL or a tuple (the vectorcall convention).
    let nkw = if kwnames.is_null() { 0 } else { unsafe { ffi::PyTuple_GET_SIZE(kwnames) } };
    let mut ptrs: Vec<*mut ffi::PyObject> = Vec::with_capacity((1 + nargs + nkw) as usize);
    ptrs.push(slf);
    for i in 0..(nargs + nkw) {
        // SAFETY: the caller's promise about `args`.
        ptrs.push(unsafe { *args.offset(i) });
    }
    // SAFETY: `ptrs` holds borrowed references alive for the call (self, then the caller's
    // arguments in vectorcall layout); returns a new reference or NULL with an exception set.
    unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyObject_Vectorcall(func.as_ptr(), ptrs.as_ptr(), nargs as usize + 1, kwnames),
        )
        .map(Bound::into_ptr)
    }
}

/// `_read_ready()`: one datagram to the protocol, then, while the loop is in effect between
/// iterations (`LoopCore::may_read_again`), up to `MAX_BATCH - 1` more: what the next
/// iterations would do were each poll to find only this socket ready (asyncio reads one
/// datagram per iteration), without their polls.
unsafe fn read_ready(py: Python<'_>, slf: *mut ffi::PyObject) -> PyResult<*mut ffi::PyObject> {
    let zero = 0i32.into_pyobject(py)?;
    let mut reads: u32 = 0;
    let mut limit: u32 = 1;
    loop {
        // SAFETY: the descriptor checked that `slf` is a DatagramTransport. (Read again for
        // each datagram: a callback may close the transport or change its protocol.)
        let slots = unsafe { Slots::of(py, slf)? };
        let (Some(core), true) = (&slots.core, slots.conn_lost.as_ref().is_some_and(|c| c.is(&zero))) else {
            if reads > 0 {
                return Ok(py.None().into_ptr());
            }
            // SAFETY: no arguments.
            return unsafe { hand_on(py, 0, slf, std::ptr::null(), 0, std::ptr::null_mut()) };
        };
        let me = core.cast::<DatagramCore>()?.get();
        if reads == 0 {
            if me.batch.borrow_mut(py).start() {
                limit = MAX_BATCH;
            }
        } else {
            let again = reads < limit
                && slots
                    .loop_
                    .as_ref()
                    .and_then(|l| l.cast::<LoopCore>().ok())
                    .is_some_and(|l| l.get().may_read_again(py, me.sock.fd()));
            if !again {
                return Ok(py.None().into_ptr());
            }
        }
        let protocol = slots.protocol()?;
        let fd = me.sock.get(py);
        let r = with_read_buf(me.max_size, |buf| sys::recvfrom(fd, buf).map(|(n, a)| (PyBytes::new(py, &buf[..n]), a)));
        let extra = reads > 0;
        reads += 1;
        match r {
            Ok((data, addr)) => {
                if extra {
                    me.batch.borrow_mut(py).hit();
                }
                let addr = match me.addr_object(py, addr) {
                    Ok(a) => a,
                    Err(e) => {
                        // SAFETY: `slf` is a live object (the caller's reference).
                        let transport = unsafe { Bound::from_borrowed_ptr(py, slf) };
                        let msg = intern!(py, "Fatal read error on datagram transport");
                        let exc = e.value(py);
                        py::while_handling(exc, || {
                            py::call_method_fast(&transport, intern!(py, "_fatal_error"), &[exc.as_any(), msg.as_any()])
                        })?;
                        return Ok(py.None().into_ptr());
                    }
                };
                py::call_method_fast(protocol, intern!(py, "datagram_received"), &[data.as_any(), &addr])?;
            }
            Err(e) if sys::would_block(&e) => {
                if extra {
                    me.batch.borrow_mut(py).miss();
                }
                return Ok(py.None().into_ptr());
            }
            Err(e) => {
                let exc = py::os_err(e).into_value(py).into_bound(py);
                py::call_method_fast(protocol, intern!(py, "error_received"), &[exc.as_any()])?;
                return Ok(py.None().into_ptr());
            }
        }
    }
}

/// `sendto(data, addr=None)`: sent at once when asyncio would and the arguments are plain.
unsafe fn sendto(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: CPython passes the arguments in vectorcall layout, and the descriptor checked
    // that `slf` is a DatagramTransport.
    let sent = unsafe { try_send(py, slf, args, nargs, kwnames)? };
    if sent {
        return Ok(py.None().into_ptr());
    }
    // SAFETY: as above.
    unsafe { hand_on(py, 1, slf, args, nargs, kwnames) }
}

/// The fast path of `sendto`: `Ok(true)` when it is done (sent, or the error reported to the
/// protocol), `Ok(false)` for asyncio's method to do the whole call.
///
/// # Safety
/// As for `sendto`: `args` in vectorcall layout, `slf` a DatagramTransport.
unsafe fn try_send(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<bool> {
    if !kwnames.is_null() || !(1..=2).contains(&nargs) {
        return Ok(false);
    }
    // SAFETY: the caller's promises; `args` holds `nargs` (1 or 2) borrowed references.
    let (slots, data, addr) = unsafe {
        (
            Slots::of(py, slf)?,
            Bound::from_borrowed_ptr(py, *args),
            (nargs == 2).then(|| Bound::from_borrowed_ptr(py, *args.offset(1))),
        )
    };
    let Ok(data) = data.cast_exact::<PyBytes>() else { return Ok(false) };
    let data = data.as_bytes();
    let zero = 0i32.into_pyobject(py)?;
    let (Some(conn_lost), Some(buffer), Some(core), Some(address)) =
        (&slots.conn_lost, &slots.buffer, &slots.core, &slots.address)
    else {
        return Ok(false);
    };
    if data.is_empty() || !conn_lost.is(&zero) || !buffer.len().is_ok_and(|n| n == 0) {
        return Ok(false);
    }
    let me = core.cast::<DatagramCore>()?.get();
    let addr = addr.filter(|a| !a.is_none());
    let target = if me.connected {
        // asyncio: a wrong address is an error (its message); the right one or none is sent.
        if !address.is_none() && addr.as_ref().is_some_and(|a| !a.is(address)) {
            return Ok(false);
        }
        None
    } else {
        match (address.is_none(), &addr) {
            (true, Some(a)) => match me.resolve(a) {
                Some(target) => Some(target.to_sys()),
                None => return Ok(false),
            },
            _ => return Ok(false),
        }
    };
    match sys::sendto(me.sock.get(py), data, target.as_ref()) {
        Ok(_) => Ok(true),
        Err(e) if sys::would_block(&e) => Ok(false),
        Err(e) => {
            let exc = py::os_err(e).into_value(py).into_bound(py);
            py::call_method_fast(slots.protocol()?, intern!(py, "error_received"), &[exc.as_any()])?;
            Ok(true)
        }
    }
}

const READ_DOC: &CStr = c"_read_ready($self, /)\n--\n\nRead one datagram and hand it to the protocol.";
const SENDTO_DOC: &CStr =
    c"sendto($self, /, data, addr=None)\n--\n\nSend data to addr (asyncio's DatagramTransport.sendto).";

/// The `_read_ready` and `sendto` method descriptors for `cls` (the `DatagramTransport` class,
/// whose `_core`, `_conn_lost`, `_protocol`, `_buffer` and `_address` are object slots; made
/// once per process). `base_read_ready` and `base_sendto` are asyncio's functions, which the
/// descriptors hand unusual calls to.
#[pyfunction]
pub fn datagram_methods<'py>(
    cls: &Bound<'py, PyType>,
    base_read_ready: Py<PyAny>,
    base_sendto: Py<PyAny>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let py = cls.py();
    let offsets = Offsets {
        loop_: py::slot_offset(cls, intern!(py, "_loop"))?,
        core: py::slot_offset(cls, intern!(py, "_core"))?,
        conn_lost: py::slot_offset(cls, intern!(py, "_conn_lost"))?,
        protocol: py::slot_offset(cls, intern!(py, "_protocol"))?,
        buffer: py::slot_offset(cls, intern!(py, "_buffer"))?,
        address: py::slot_offset(cls, intern!(py, "_address"))?,
    };
    if let Err(offsets) = OFFSETS.set(offsets) {
        if OFFSETS.get() != Some(&offsets) {
            return Err(PyRuntimeError::new_err("datagram_methods: made for another layout already"));
        }
    }
    let _ = BASE.set(py, (base_read_ready, base_sendto));
    let read = py::noargs_method(cls, c"_read_ready", READ_DOC, pyo3::get_trampoline_function!(noargs, read_ready))?;
    let send = py::fastcall_method(
        cls,
        c"sendto",
        SENDTO_DOC,
        pyo3::get_trampoline_function!(fastcall_cfunction_with_keywords, sendto),
    )?;
    Ok((read, send))
}
