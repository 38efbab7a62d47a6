//! `StreamTransport.write` and `StreamTransport.is_closing`: method descriptors of the Python
//! transport class whose C functions run on the transport's core.
//!
//! A C-level method (what `PyDescr_NewMethod` makes, like the methods of built-in types) costs
//! nothing per instance and runs no Python frame: `transport.write(data)` is specialised by the
//! interpreter into a direct call of `transport_write(transport, [data])`, which reads the
//! transport's `_core` slot at its fixed offset and runs `StreamCore::write`. (Before, each
//! transport held the core's bound `write` in a slot: 80 bytes per connection.)
//! `is_closing()` is the same kind of method: asyncio's `StreamWriter.drain()` calls it once per
//! drain, and as a Python method it was the only Python frame of ours on a streams echo's path.
//!
//! Ground rules:
//! - The descriptors are made for one class (`stream_write_method`,
//!   `stream_is_closing_method`), whose `_core` is an object slot; a descriptor checks that
//!   `self` is an instance of that class before the function runs, so the slot offset is valid
//!   for it.
//! - Arguments as a Python `def write(self, data)` takes them (`data` positional or keyword).
//! - Both are entered through PyO3's trampoline (not the loop's own entry points in
//!   `event_loop/fastcall.rs`, whose bodies were checked to drop no `Py` value): a panic
//!   becomes an exception, and objects dropped inside are released at once even when no other
//!   PyO3 frame is active.

use std::ffi::CStr;
use std::sync::atomic::{AtomicIsize, Ordering};

use pyo3::exceptions::{PyAttributeError, PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple, PyType};
use pyo3::{ffi, intern};

use super::stream::StreamCore;
use crate::py;

/// The byte offset of `_core` in the transport class's instances (0: not made yet).
static CORE_OFFSET: AtomicIsize = AtomicIsize::new(0);

const DOC: &CStr = c"write(data): send or buffer bytes-like data (asyncio's Transport.write).";

fn arg_error(msg: String) -> PyErr {
    PyTypeError::new_err(format!("StreamTransport.write() {msg}"))
}

/// `data` from a vectorcall's arguments, with a Python function's messages when they do not
/// fit `write(self, data)`.
///
/// # Safety
/// `args` holds `nargs` objects followed by `len(kwnames)` keyword values.
unsafe fn parse<'py>(
    py: Python<'py>,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<Bound<'py, PyAny>> {
    // (A method's C function gets a plain count: no PY_VECTORCALL_ARGUMENTS_OFFSET flag.)
    // SAFETY: `kwnames` is NULL or a tuple of str, borrowed for the call.
    let names =
        (!kwnames.is_null()).then(|| unsafe { Bound::from_borrowed_ptr(py, kwnames).cast_into_unchecked::<PyTuple>() });
    let nkw = names.as_ref().map_or(0, |t| t.len());
    if nargs > 1 {
        return Err(arg_error(format!("takes 2 positional arguments but {} were given", nargs + 1)));
    }
    if let Some(names) = &names {
        for (i, name) in names.iter().enumerate() {
            let is_data = name.cast::<PyString>().is_ok_and(|s| s.to_str().is_ok_and(|s| s == "data"));
            if !is_data {
                return Err(arg_error(format!("got an unexpected keyword argument {}", name.repr()?)));
            }
            if nargs == 1 || i > 0 {
                return Err(arg_error("got multiple values for argument 'data'".to_owned()));
            }
        }
    }
    if nargs + nkw as ffi::Py_ssize_t == 0 {
        return Err(arg_error("missing 1 required positional argument: 'data'".to_owned()));
    }
    // SAFETY: there is exactly one argument, positional or the `data` keyword: `args[0]`.
    Ok(unsafe { Bound::from_borrowed_ptr(py, *args) })
}

/// The method's body, entered through PyO3's trampoline (panic trap, interpreter attachment).
unsafe fn transport_write(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: CPython passes the arguments as the vectorcall protocol lays them out.
    let data = unsafe { parse(py, args, nargs, kwnames)? };
    // SAFETY: the write descriptor was made by `stream_write_method` for `slf`'s class.
    let core = unsafe { core_of(py, slf)? };
    StreamCore::write(core.cast::<StreamCore>()?, &data)?;
    Ok(py.None().into_ptr())
}

/// The transport's core, read from its `_core` slot.
///
/// # Safety
/// `slf` is an instance of the class whose `_core` offset `core_offset` recorded (a method
/// descriptor made for that class checks `self`'s type before its function runs).
unsafe fn core_of<'py>(py: Python<'py>, slf: *mut ffi::PyObject) -> PyResult<Bound<'py, PyAny>> {
    // SAFETY: the offset is that class's `_core` object slot, inside every such instance.
    let core = unsafe { py::read_slot(slf, CORE_OFFSET.load(Ordering::Relaxed)) };
    if core.is_null() {
        return Err(PyAttributeError::new_err("'StreamTransport' object has no attribute '_core'"));
    }
    // SAFETY: `core` is a live object (the slot owns a reference; we hold the GIL).
    Ok(unsafe { Bound::from_borrowed_ptr(py, core) })
}

/// `is_closing()`: the core's `closing` flag, once corked writes are sent.
unsafe fn transport_is_closing(py: Python<'_>, slf: *mut ffi::PyObject) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: the descriptor was made by `stream_is_closing_method` for `slf`'s class.
    let core = unsafe { core_of(py, slf)? };
    let core = core.cast::<StreamCore>()?;
    // A write this callback made may fail when sent, which closes the transport: asyncio would
    // have sent it in write() already (`StreamCore::write`, corking).
    StreamCore::flush_corked(core)?;
    let closing = core.get().closing(py);
    Ok(pyo3::types::PyBool::new(py, closing).to_owned().into_ptr())
}

/// The `write` method descriptor for `cls`, whose `_core` must be an object slot (the
/// `StreamTransport` class; made once).
#[pyfunction]
pub fn stream_write_method<'py>(cls: &Bound<'py, PyType>) -> PyResult<Bound<'py, PyAny>> {
    core_offset(cls)?;
    py::fastcall_method(
        cls,
        c"write",
        DOC,
        pyo3::get_trampoline_function!(fastcall_cfunction_with_keywords, transport_write),
    )
}

/// The `is_closing` method descriptor for `cls` (as for `stream_write_method`).
#[pyfunction]
pub fn stream_is_closing_method<'py>(cls: &Bound<'py, PyType>) -> PyResult<Bound<'py, PyAny>> {
    core_offset(cls)?;
    py::noargs_method(
        cls,
        c"is_closing",
        c"is_closing($self, /)\n--\n\nReturn True if the transport is closing or closed.",
        pyo3::get_trampoline_function!(noargs, transport_is_closing),
    )
}

/// Check that `cls`'s `_core` is an object slot and record its offset (one class per process).
fn core_offset(cls: &Bound<'_, PyType>) -> PyResult<()> {
    let offset = py::slot_offset(cls, intern!(cls.py(), "_core"))?;
    if CORE_OFFSET.compare_exchange(0, offset, Ordering::Relaxed, Ordering::Relaxed).is_err()
        && CORE_OFFSET.load(Ordering::Relaxed) != offset
    {
        return Err(PyRuntimeError::new_err("stream_write_method: made for another layout already"));
    }
    Ok(())
}
