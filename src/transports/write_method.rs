//! `StreamTransport.write`: a method descriptor of the Python transport class whose C function
//! is the core's write.
//!
//! A C-level method (what `PyDescr_NewMethod` makes, like the methods of built-in types) costs
//! nothing per instance and runs no Python frame: `transport.write(data)` is specialised by the
//! interpreter into a direct call of `transport_write(transport, [data])`, which reads the
//! transport's `_core` slot at its fixed offset and runs `StreamCore::write`. (Before, each
//! transport held the core's bound `write` in a slot: 80 bytes per connection.)
//!
//! Ground rules:
//! - The descriptor is made for one class (`make`), whose `_core` is an object slot; the
//!   descriptor checks that `self` is an instance of that class before the function runs, so
//!   the slot offset is valid for it.
//! - Arguments as a Python `def write(self, data)` takes them (`data` positional or keyword).

use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::OnceLock;

use pyo3::exceptions::{PyAttributeError, PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple, PyType};
use pyo3::{ffi, intern};

use super::stream::StreamCore;

/// The byte offset of `_core` in the transport class's instances (0: not made yet).
static CORE_OFFSET: AtomicIsize = AtomicIsize::new(0);

/// The method's definition; CPython keeps a pointer to it for the life of the descriptor.
struct Def(ffi::PyMethodDef);
// SAFETY: the definition is written once, before any use, and only read afterwards.
unsafe impl Sync for Def {}
// SAFETY: as above; it holds pointers to static data only.
unsafe impl Send for Def {}

static DEF: OnceLock<Def> = OnceLock::new();

const DOC: &CStr = c"write(data): send or buffer bytes-like data (asyncio's Transport.write).";

fn arg_error(py: Python<'_>, msg: String) -> *mut ffi::PyObject {
    PyTypeError::new_err(format!("StreamTransport.write() {msg}")).restore(py);
    std::ptr::null_mut()
}

/// `data` from a vectorcall's arguments, with a Python function's messages when they do not
/// fit `write(self, data)`. `Err(())`: an exception is set.
///
/// # Safety
/// `args` holds `nargs` objects followed by `len(kwnames)` keyword values.
unsafe fn parse<'py>(
    py: Python<'py>,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> Result<Bound<'py, PyAny>, ()> {
    // (A method's C function gets a plain count: no PY_VECTORCALL_ARGUMENTS_OFFSET flag.)
    // SAFETY: `kwnames` is NULL or a tuple of str, borrowed for the call.
    let names =
        (!kwnames.is_null()).then(|| unsafe { Bound::from_borrowed_ptr(py, kwnames).cast_into_unchecked::<PyTuple>() });
    let nkw = names.as_ref().map_or(0, |t| t.len());
    if nargs > 1 {
        arg_error(py, format!("takes 2 positional arguments but {} were given", nargs + 1));
        return Err(());
    }
    if let Some(names) = &names {
        for (i, name) in names.iter().enumerate() {
            let is_data = name.cast::<PyString>().is_ok_and(|s| s.to_str().is_ok_and(|s| s == "data"));
            if !is_data {
                arg_error(py, format!("got an unexpected keyword argument {}", name.repr().map_err(|_| ())?));
                return Err(());
            }
            if nargs == 1 || i > 0 {
                arg_error(py, "got multiple values for argument 'data'".to_owned());
                return Err(());
            }
        }
    }
    if nargs + nkw as ffi::Py_ssize_t == 0 {
        arg_error(py, "missing 1 required positional argument: 'data'".to_owned());
        return Err(());
    }
    // SAFETY: there is exactly one argument, positional or the `data` keyword: `args[0]`.
    Ok(unsafe { Bound::from_borrowed_ptr(py, *args) })
}

unsafe extern "C" fn transport_write(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let run = std::panic::AssertUnwindSafe(|| {
        // SAFETY: CPython calls methods with the GIL held (the thread is attached).
        let py = unsafe { Python::assume_attached() };
        // SAFETY: CPython passes the arguments as the vectorcall protocol lays them out.
        let Ok(data) = (unsafe { parse(py, args, nargs, kwnames) }) else {
            return std::ptr::null_mut();
        };
        let offset = CORE_OFFSET.load(Ordering::Relaxed);
        // SAFETY: the method descriptor made by `make` calls this only for instances of the
        // class it was made for (it checks `self`'s type first), and `offset` is that class's
        // `_core` object slot, inside every such instance; the slot holds NULL or a borrowed
        // reference.
        let core = unsafe { *slf.cast::<u8>().offset(offset).cast::<*mut ffi::PyObject>() };
        if core.is_null() {
            PyAttributeError::new_err("'StreamTransport' object has no attribute '_core'").restore(py);
            return std::ptr::null_mut();
        }
        // SAFETY: `core` is a live object (the slot owns a reference; we hold the GIL).
        let core = unsafe { Bound::from_borrowed_ptr(py, core) };
        let res = match core.cast::<StreamCore>() {
            Ok(core) => StreamCore::write(core, &data),
            Err(e) => Err(e.into()),
        };
        match res {
            Ok(()) => py.None().into_ptr(),
            Err(e) => {
                e.restore(py);
                std::ptr::null_mut()
            }
        }
    });
    std::panic::catch_unwind(run).unwrap_or_else(|_| {
        // SAFETY: as above; a panic must not cross the C boundary, it becomes an exception.
        let py = unsafe { Python::assume_attached() };
        PyRuntimeError::new_err("ferroloop: internal error in transport.write").restore(py);
        std::ptr::null_mut()
    })
}

/// The `write` method descriptor for `cls`, whose `_core` must be an object slot (the
/// `StreamTransport` class; made once).
#[pyfunction]
pub fn stream_write_method<'py>(cls: &Bound<'py, PyType>) -> PyResult<Bound<'py, PyAny>> {
    let py = cls.py();
    let member = cls.getattr(intern!(py, "_core"))?;
    // SAFETY: reading the type pointer of a live object, and (after checking that it is a
    // member descriptor) its definition, which lives as long as the class.
    let offset = unsafe {
        let ptr = member.as_ptr();
        if ffi::Py_TYPE(ptr) != std::ptr::addr_of_mut!(ffi::PyMemberDescr_Type) {
            return Err(PyTypeError::new_err("_core must be a __slots__ member"));
        }
        // (pyo3-ffi types the field as PyGetSetDef before 3.11; CPython has PyMemberDef.)
        let def = (*ptr.cast::<ffi::PyMemberDescrObject>()).d_member.cast::<ffi::PyMemberDef>();
        if (*def).type_code != ffi::Py_T_OBJECT_EX || (*def).offset <= 0 {
            return Err(PyTypeError::new_err("_core must be an object slot"));
        }
        if ffi::PyType_IsSubtype(cls.as_type_ptr(), (*ptr.cast::<ffi::PyDescrObject>()).d_type) == 0 {
            return Err(PyTypeError::new_err("_core belongs to another class"));
        }
        (*def).offset
    };
    if CORE_OFFSET.compare_exchange(0, offset, Ordering::Relaxed, Ordering::Relaxed).is_err()
        && CORE_OFFSET.load(Ordering::Relaxed) != offset
    {
        return Err(PyRuntimeError::new_err("stream_write_method: made for another layout already"));
    }
    let def = DEF.get_or_init(|| {
        Def(ffi::PyMethodDef {
            ml_name: c"write".as_ptr() as *const c_char,
            ml_meth: ffi::PyMethodDefPointer { PyCFunctionFastWithKeywords: transport_write },
            ml_flags: ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
            ml_doc: DOC.as_ptr(),
        })
    });
    // SAFETY: `def` is 'static and never written after initialisation (CPython only reads it
    // through the pointer); `cls` is a live type. Returns a new reference or NULL with an
    // exception set.
    unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyDescr_NewMethod(cls.as_type_ptr(), std::ptr::addr_of!(def.0) as *mut ffi::PyMethodDef),
        )
    }
}
