//! `CachedCallSoon`: what `ferroloop.Loop.call_soon` is on Python 3.10 and 3.11.
//!
//! On those versions `_asyncio` fetches `loop.call_soon` with `PyObject_GetAttr` for every
//! Task step and Future callback that passes `context=` (all of them), which makes a bound
//! method and frees it after the one call. This descriptor hands out one bound method per
//! loop, made on first use and kept in the loop's state.
//!
//! It is a non-data descriptor (`__get__` only), as a plain method is, so attribute lookup
//! is asyncio's: `loop.call_soon = f` lands in `vars(loop)` and shadows it, `del` removes
//! that, `mock.patch.object` works, and a subclass defining `call_soon`, or a later
//! `Loop.call_soon = ...`, takes precedence. What differs: `loop.call_soon is
//! loop.call_soon` is true, and `Loop.__dict__["call_soon"]` is this object. On 3.12+,
//! where `_asyncio` calls `PyObject_VectorcallMethod` (no bound method), it is not installed.
//!
//! The type's C `tp_descr_get` is `descr_get` below, not PyO3's trampoline (which costs about
//! as much as the bound method it saves); it answers the one hot case, a loop whose bound
//! method is made, and hands everything else to the PyO3-generated `__get__`, which is also
//! what Python-level `desc.__get__(...)` calls.

use std::sync::OnceLock;

use pyo3::exceptions::PyRuntimeError;
use pyo3::ffi;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use pyo3::{intern, Borrowed, PyTraverseError, PyTypeInfo};

use super::LoopCore;

#[pyclass(frozen, module = "ferroloop._ferroloop")]
pub struct CachedCallSoon {
    /// `LoopCore.call_soon`, the method descriptor the bound methods come from.
    func: Py<PyAny>,
}

#[pymethods]
impl CachedCallSoon {
    #[new]
    fn new(func: Py<PyAny>) -> Self {
        Self { func }
    }

    /// `loop.call_soon` for a `LoopCore` instance: the loop's one bound method (a new one
    /// each time once the loop is closed). Anything else (class access, another object) is
    /// `func.__get__(obj, owner)`.
    fn __get__<'py>(&self, obj: &Bound<'py, PyAny>, owner: Option<&Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyAny>> {
        let py = obj.py();
        let func = self.func.bind(py);
        let Ok(core) = obj.cast::<LoopCore>() else {
            return func.call_method1(intern!(py, "__get__"), (obj, owner));
        };
        let _ = LOOP_CLASS.get_or_init(py, || obj.get_type().unbind());
        let closed = {
            let st = core.get().state.borrow(py);
            if let Some(m) = &st.call_soon_bound {
                return Ok(m.bind(py).clone());
            }
            st.closed
        };
        let m = func.call_method1(intern!(py, "__get__"), (obj, owner))?;
        // A closed loop keeps nothing that refers back to it (`_close_core`).
        if !closed {
            core.get().state.borrow_mut(py).call_soon_bound = Some(m.clone().unbind());
        }
        Ok(m)
    }

    /// `__name__`, `__qualname__`, `__doc__`, `__text_signature__`, `__objclass__` and the
    /// rest, as the method descriptor has them (for `inspect`, `pydoc`).
    fn __getattr__<'py>(&self, py: Python<'py>, name: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        self.func.bind(py).getattr(name.cast::<pyo3::types::PyString>()?)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("<cached {}>", self.func.bind(py).repr()?))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.func)
    }
}

/// The first class whose instance `__get__` found to be a `LoopCore` (in practice
/// `ferroloop.Loop`): `descr_get` serves its instances. Held, so its address is never reused.
static LOOP_CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// PyO3's `tp_descr_get` for `CachedCallSoon` (the general path), saved by `install`.
static GENERAL_GET: OnceLock<ffi::descrgetfunc> = OnceLock::new();

/// `CachedCallSoon`'s C `tp_descr_get`: the loop's bound method when it is made, else the
/// general path.
///
/// # Safety
/// Called by CPython as a `tp_descr_get` slot, with the GIL held: `desc` is a live
/// `CachedCallSoon`, `obj` a live object or NULL (class access), `owner` a type or NULL.
unsafe extern "C" fn descr_get(
    desc: *mut ffi::PyObject,
    obj: *mut ffi::PyObject,
    owner: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls a slot with the GIL held (this function's contract).
    let py = unsafe { Python::assume_attached() };
    if !obj.is_null() {
        // SAFETY: `obj` is a live object borrowed for the call.
        let obj = unsafe { Borrowed::from_ptr(py, obj) };
        // An exact type test, where PyO3's cast would walk the subclass's MRO (40
        // instructions a lookup).
        if LOOP_CLASS.get(py).is_some_and(|t| t.as_ptr() == obj.get_type_ptr().cast()) {
            // SAFETY: `LOOP_CLASS` is a `LoopCore` subclass (see `LOOP_CLASS`).
            let core = unsafe { obj.cast_unchecked::<LoopCore>() };
            // Not borrowed elsewhere while Python code runs (GilCell's rule), so this only
            // falls through on a bug, to the general path, never a panic across C.
            if let Some(st) = core.get().state.try_borrow_unguarded() {
                if let Some(m) = &st.call_soon_bound {
                    return m.clone_ref(py).into_ptr();
                }
            }
        }
    }
    let Some(general) = GENERAL_GET.get() else {
        PyRuntimeError::new_err("CachedCallSoon used before its type was set up").restore(py);
        return std::ptr::null_mut();
    };
    // SAFETY: PyO3's own slot function for this type, called with the arguments CPython gave.
    unsafe { general(desc, obj, owner) }
}

/// Replace `CachedCallSoon`'s C `tp_descr_get` with `descr_get` (once, at module
/// initialisation, after the class is made and before any instance exists).
pub(crate) fn install(py: Python<'_>) -> PyResult<()> {
    let tp = CachedCallSoon::type_object(py);
    let raw = tp.as_type_ptr();
    // SAFETY: a live, fully initialised heap type; its slot is read and written with the GIL
    // held, before any instance exists, and `PyType_Modified` drops cached lookups.
    unsafe {
        let general = (*raw).tp_descr_get.expect("CachedCallSoon defines __get__");
        let _ = GENERAL_GET.set(general);
        (*raw).tp_descr_get = Some(descr_get);
        ffi::PyType_Modified(raw);
    }
    Ok(())
}
