//! `asyncio.StreamReaderProtocol.data_received`, done here when nothing about it is replaced.
//!
//! An asyncio streams server (`start_server`, `open_connection`) gets a `StreamReaderProtocol`
//! whose `data_received` hands each chunk to a `StreamReader`. In Python that is four frames per
//! read: `data_received`, the `_stream_reader` property, `feed_data` and `_wakeup_waiter`, about
//! 3,200 instructions on 3.11 for work the C API does in a fraction of that. `target` and
//! `Target::feed` do the same steps, in the same order, on the same attributes, when:
//! - the protocol is exactly `asyncio.StreamReaderProtocol` and its reader exactly
//!   `asyncio.StreamReader`;
//! - `data_received`, `_stream_reader`, `feed_data` and `_wakeup_waiter` are asyncio's own, as
//!   found for these objects (class and instance: `mock.patch.object` on either is seen), and
//!   were asyncio's code when first looked up (a replacement made before the first read, by an
//!   instrumentation library at import say, turns this off for the process);
//! - the reader is not at EOF and its `_buffer` is a `bytearray` (otherwise asyncio's code
//!   raises, or does something unusual: it runs instead).
//!
//! The stream transport checks `target` before it reads, and extends the reader's `bytearray`
//! from its read (`extend_from`, or `extend` from the shared buffer): no `bytes` is made for the
//! data (`read_ready`).
//!
//! Everything else calls `protocol.data_received(data)`. Methods of other objects the steps
//! call (`waiter.cancelled()`, `waiter.set_result(None)`, `transport.pause_reading()`) are
//! called by name, as asyncio's code does. What differs: a profiler or tracer does not see the
//! four frames (docs/DESIGN.md, deviations).

use pyo3::exceptions::PyNotImplementedError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyByteArray, PyInt, PyString, PyType};
use pyo3::{intern, PyTypeInfo};

use crate::py;

/// asyncio's originals, looked up once.
struct Originals {
    protocol_type: Py<PyType>,
    reader_type: Py<PyType>,
    data_received: Py<PyAny>,
    stream_reader: Py<PyAny>,
    feed_data: Py<PyAny>,
    wakeup_waiter: Py<PyAny>,
}

static ORIGINALS: PyOnceLock<Option<Originals>> = PyOnceLock::new();

fn originals(py: Python<'_>) -> Option<&Originals> {
    ORIGINALS.get_or_init(py, || load_originals(py).ok().flatten()).as_ref()
}

/// The four from the classes' namespaces, if each is still asyncio's own code: something may
/// have replaced one before the first read (an instrumentation library at import), and then
/// what the class holds is not what `target` stands for, so it never applies.
fn load_originals<'py>(py: Python<'py>) -> PyResult<Option<Originals>> {
    let streams = py.import("asyncio.streams")?;
    let file = streams.getattr("__file__")?;
    let protocol_type = streams.getattr("StreamReaderProtocol")?.cast_into::<PyType>()?;
    let reader_type = streams.getattr("StreamReader")?.cast_into::<PyType>()?;
    let function_type = py.import("types")?.getattr("FunctionType")?;
    // A plain function whose code is `name` in asyncio/streams.py.
    let asyncios = |f: &Bound<'_, PyAny>, name: &str| -> PyResult<bool> {
        if !f.get_type().is(&function_type) {
            return Ok(false);
        }
        let code = f.getattr("__code__")?;
        Ok(code.getattr("co_filename")?.eq(&file)? && code.getattr("co_name")?.eq(name)?)
    };
    let own = |cls: &Bound<'py, PyType>, name: &str| cls.getattr("__dict__")?.get_item(name);
    let data_received = own(&protocol_type, "data_received")?;
    let stream_reader = own(&protocol_type, "_stream_reader")?;
    let feed_data = own(&reader_type, "feed_data")?;
    let wakeup_waiter = own(&reader_type, "_wakeup_waiter")?;
    let property = py.import("builtins")?.getattr("property")?;
    let plain_property = stream_reader.get_type().is(&property)
        && stream_reader.getattr("fset")?.is_none()
        && asyncios(&stream_reader.getattr("fget")?, "_stream_reader")?;
    if !(plain_property
        && asyncios(&data_received, "data_received")?
        && asyncios(&feed_data, "feed_data")?
        && asyncios(&wakeup_waiter, "_wakeup_waiter")?)
    {
        return Ok(None);
    }
    Ok(Some(Originals {
        protocol_type: protocol_type.unbind(),
        reader_type: reader_type.unbind(),
        data_received: data_received.unbind(),
        stream_reader: stream_reader.unbind(),
        feed_data: feed_data.unbind(),
        wakeup_waiter: wakeup_waiter.unbind(),
    }))
}

/// Whether `obj.name` is `original` called on `obj`: the function the attribute lookup finds,
/// with nothing of the instance's own in the way.
fn method_is(obj: &Bound<'_, PyAny>, name: &Bound<'_, PyString>, original: &Py<PyAny>) -> bool {
    let mut meth: *mut ffi::PyObject = std::ptr::null_mut();
    // SAFETY: `obj` and `name` are live; `meth` receives a new reference or NULL (with an
    // exception set when the lookup failed).
    let unbound = unsafe { py::get_method(obj.as_ptr(), name.as_ptr(), &mut meth) };
    if meth.is_null() {
        // SAFETY: the GIL is held; the failed lookup's exception is dropped (the caller falls
        // back to the Python call, which raises it again).
        unsafe { ffi::PyErr_Clear() };
        return false;
    }
    let same = unbound && meth == original.as_ptr();
    // SAFETY: drops the reference `get_method` returned.
    unsafe { ffi::Py_DecRef(meth) };
    same
}

/// Where `protocol.data_received(data)` would put the data, when the protocol is asyncio's
/// `StreamReaderProtocol` as asyncio wrote it; `None` when the caller must make that call.
/// Reads attributes only: nothing changes until `Target::feed`.
pub(crate) fn target<'py>(protocol: &Bound<'py, PyAny>) -> Option<Target<'py>> {
    let py = protocol.py();
    let o = originals(py)?;
    if !protocol.get_type().is(o.protocol_type.bind(py)) {
        return None;
    }
    if !method_is(protocol, intern!(py, "data_received"), &o.data_received) {
        return None;
    }
    // `_stream_reader` is a property (a data descriptor): the class decides, not the instance.
    // SAFETY: the GIL is held; a live type and a str.
    let prop = unsafe { py::type_lookup(o.protocol_type.as_ptr().cast(), intern!(py, "_stream_reader").as_ptr()) };
    if prop != o.stream_reader.as_ptr() {
        return None;
    }
    let wr = protocol.getattr(intern!(py, "_stream_reader_wr")).ok()?;
    if wr.is_none() {
        return Some(Target::Nobody);
    }
    // SAFETY: `wr` is a live object; an exact-type check reads only its type.
    if unsafe { ffi::PyWeakref_CheckRefExact(wr.as_ptr()) } == 0 {
        return None;
    }
    let reader = wr.call0().ok()?;
    if reader.is_none() {
        return Some(Target::Nobody);
    }
    if !reader.get_type().is(o.reader_type.bind(py))
        || !method_is(&reader, intern!(py, "feed_data"), &o.feed_data)
        || !method_is(&reader, intern!(py, "_wakeup_waiter"), &o.wakeup_waiter)
    {
        return None;
    }
    // `assert not self._eof`: anything but False runs asyncio's code (which raises, or under
    // -O goes on).
    let eof = reader.getattr(intern!(py, "_eof")).ok()?;
    if !eof.is(PyBool::new(py, false)) {
        return None;
    }
    let buffer = reader.getattr(intern!(py, "_buffer")).ok()?;
    if !buffer.get_type().is(PyByteArray::type_object(py)) {
        return None;
    }
    Some(Target::Reader { reader, buffer })
}

/// What `StreamReaderProtocol.data_received` does with data, found by `target`.
pub(crate) enum Target<'py> {
    /// No reader (never set, or collected): the data is dropped, as asyncio's code drops it.
    Nobody,
    /// `reader.feed_data(data)`, with `reader._buffer` (an exact `bytearray`).
    Reader { reader: Bound<'py, PyAny>, buffer: Bound<'py, PyAny> },
}

impl<'py> Target<'py> {
    /// `feed_data(data)` for non-empty `data`: `extend` then `after_extend`. Callers holding
    /// the data in a Rust buffer call the two apart (the `extend` while they hold it), which
    /// saves the `bytes` object `data_received` would be given.
    pub(crate) fn feed(&self, data: &[u8]) -> PyResult<()> {
        self.extend(data)?;
        self.after_extend()
    }

    /// `self._buffer.extend(data)`. Runs no Python code.
    pub(crate) fn extend(&self, data: &[u8]) -> PyResult<()> {
        let Target::Reader { buffer, .. } = self else { return Ok(()) };
        // SAFETY: `buffer` is an exact bytearray (checked by `target`). Resizing fails with
        // BufferError while it is exported, as `extend` does; after a successful resize it
        // holds `old + data.len()` bytes, and the copy fills the new tail. `data` cannot
        // overlap it: it is not memory of a Python object.
        unsafe {
            let old = ffi::PyByteArray_Size(buffer.as_ptr());
            if ffi::PyByteArray_Resize(buffer.as_ptr(), old + data.len() as ffi::Py_ssize_t) != 0 {
                return Err(PyErr::fetch(buffer.py()));
            }
            let at = ffi::PyByteArray_AsString(buffer.as_ptr()).cast::<u8>().add(old as usize);
            std::ptr::copy_nonoverlapping(data.as_ptr(), at, data.len());
        }
        Ok(())
    }

    /// `self._buffer.extend(data)` for data read straight into the `bytearray`: `fill` gets
    /// room for `room` bytes made at its end and returns how many it wrote there; the
    /// `bytearray` is then cut to what it holds, and that count returned. `None`, with nothing
    /// called, if the room cannot be made (the `bytearray` is exported, or no memory: the
    /// error is dropped, and `extend` meets it again for the caller). Runs no Python code.
    pub(crate) fn extend_from(
        &self,
        room: usize,
        fill: impl FnOnce(*mut u8, usize) -> std::io::Result<usize>,
    ) -> Option<std::io::Result<usize>> {
        let Target::Reader { buffer, .. } = self else { return None };
        let b = buffer.as_ptr();
        // SAFETY: `buffer` is an exact bytearray (checked by `target`) and nothing runs Python
        // code until this returns, so nobody sees the room before it is cut back. A resize
        // fails only with an exception set (exported, or no memory); after a successful one it
        // holds `old + room` bytes, the last `room` of them writable at `at`.
        unsafe {
            let old = ffi::PyByteArray_Size(b) as usize;
            if ffi::PyByteArray_Resize(b, (old + room) as ffi::Py_ssize_t) != 0 {
                drop(PyErr::fetch(buffer.py()));
                return None;
            }
            let at = ffi::PyByteArray_AsString(b).cast::<u8>().add(old);
            let r = fill(at, room).map(|n| n.min(room));
            let n = *r.as_ref().unwrap_or(&0);
            if ffi::PyByteArray_Resize(b, (old + n) as ffi::Py_ssize_t) != 0 {
                // Cutting back can allocate (a bytearray whose data starts past its block's
                // start) and so fail: the room's unwritten bytes are zeroed, never shown, and
                // the read fails the connection, as the MemoryError of asyncio's `extend`.
                drop(PyErr::fetch(buffer.py()));
                std::ptr::write_bytes(at.add(n), 0, room - n);
                return Some(Err(std::io::Error::from(std::io::ErrorKind::OutOfMemory)));
            }
            Some(r)
        }
    }

    /// The rest of `StreamReader.feed_data` after `self._buffer.extend(data)`, with
    /// `_wakeup_waiter` inline.
    pub(crate) fn after_extend(&self) -> PyResult<()> {
        let Target::Reader { reader, .. } = self else { return Ok(()) };
        after_extend(reader)
    }
}

/// `StreamReader.feed_data` from `self._wakeup_waiter()` on, inline.
fn after_extend(reader: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = reader.py();
    let waiter = reader.getattr(intern!(py, "_waiter"))?;
    if !waiter.is_none() {
        reader.setattr(intern!(py, "_waiter"), py.None())?;
        if !py::call_method_fast(&waiter, intern!(py, "cancelled"), &[])?.is_truthy()? {
            py::call_method_fast(&waiter, intern!(py, "set_result"), &[py.None().bind(py)])?;
        }
    }

    let transport = reader.getattr(intern!(py, "_transport"))?;
    if transport.is_none() || reader.getattr(intern!(py, "_paused"))?.is_truthy()? {
        return Ok(());
    }
    // `_buffer` read again, as `feed_data` does: the calls above may have replaced it.
    let len = reader.getattr(intern!(py, "_buffer"))?.len()?;
    let limit = reader.getattr(intern!(py, "_limit"))?;
    // `len(self._buffer) > 2 * self._limit`, natively for an int that fits.
    let native = match limit.is_exact_instance_of::<PyInt>() {
        true => limit.extract::<i64>().ok(),
        false => None,
    };
    let over = match native {
        Some(l) => (len as i128) > 2 * (l as i128),
        None => len.into_pyobject(py)?.gt(2i32.into_pyobject(py)?.mul(&limit)?)?,
    };
    if !over {
        return Ok(());
    }
    match py::call_method_fast(&transport, intern!(py, "pause_reading"), &[]) {
        Ok(_) => reader.setattr(intern!(py, "_paused"), true),
        Err(e) if e.is_instance_of::<PyNotImplementedError>(py) => reader.setattr(intern!(py, "_transport"), py.None()),
        Err(e) => Err(e),
    }
}
