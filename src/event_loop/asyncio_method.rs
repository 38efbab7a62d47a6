//! `AsyncioMethod`: a method of `ferroloop.Loop` that follows a patch of asyncio's loop class.
//!
//! Test suites replace loop methods on asyncio's classes, as in
//! `mock.patch("asyncio.BaseEventLoop.create_connection", ...)`. On asyncio's loop that
//! reaches every loop through inheritance. `ferroloop.Loop` does not derive from
//! `BaseEventLoop`, so its own methods (and the asyncio functions it borrowed at import) would
//! ignore such a patch. This descriptor stands in the class for one such method: each access
//! looks the name up on `asyncio.SelectorEventLoop` (the most derived of asyncio's loop
//! classes, so a patch of any of them shows), and while that finds what it found at import,
//! the access gets ferroloop's own method; otherwise it gets the replacement, bound as
//! attribute lookup on asyncio's loop would bind it (a function becomes a bound method, a
//! `Mock` is returned as it is).
//!
//! A non-data descriptor (`__get__` only), as a function is: `loop.name = f` on an instance,
//! `mock.patch.object(loop, ...)`, a subclass's own method and `Loop.name = ...` take
//! precedence as they would over a function. The loop's hot methods (`call_soon`,
//! `create_task`, `sock_recv`, ...) are not wrapped: a patch of those on asyncio's classes
//! does not reach ferroloop (docs/DESIGN.md, "Deviations").

use pyo3::ffi;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyType};
use pyo3::PyTraverseError;

#[pyclass(frozen, module = "ferroloop._ferroloop")]
pub struct AsyncioMethod {
    /// The method's name (interned).
    name: Py<PyString>,
    /// `asyncio.SelectorEventLoop`.
    source: Py<PyType>,
    /// `getattr(source, name)` at import.
    original: Py<PyAny>,
    /// ferroloop's implementation (a function or a method descriptor).
    own: Py<PyAny>,
    /// Called with the instance before a replacement is handed out for it: readies state
    /// that asyncio's own code expects and ferroloop keeps elsewhere.
    prepare: Option<Py<PyAny>>,
}

impl AsyncioMethod {
    /// What a lookup of the name on `source` finds now: `own` while asyncio's class is as it
    /// was at import (then `false`), else the replacement (`true`).
    fn current<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, bool)> {
        let found = self.source.bind(py).getattr(self.name.bind(py))?;
        if found.is(&self.original) {
            Ok((self.own.bind(py).clone(), false))
        } else {
            Ok((found, true))
        }
    }
}

#[pymethods]
impl AsyncioMethod {
    #[new]
    #[pyo3(signature = (name, source, own, prepare=None))]
    fn new(
        name: &Bound<'_, PyString>,
        source: &Bound<'_, PyType>,
        own: Py<PyAny>,
        prepare: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let py = name.py();
        let name = PyString::intern(py, name.to_str()?);
        let original = source.getattr(&name)?.unbind();
        Ok(Self { name: name.unbind(), source: source.clone().unbind(), original, own, prepare })
    }

    /// The method for `obj` (`None`: class access), bound by the found object's own
    /// `__get__`, if it has one.
    fn __get__<'py>(&self, obj: &Bound<'py, PyAny>, owner: Option<&Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyAny>> {
        let py = obj.py();
        let (f, replaced) = self.current(py)?;
        if let (true, Some(prepare), false) = (replaced, &self.prepare, obj.is_none()) {
            prepare.bind(py).call1((obj,))?;
        }
        // SAFETY: `f` is a live object whose type stays alive while we hold it; its
        // `tp_descr_get` slot is called as CPython's attribute lookup calls it (GIL held,
        // NULL for a missing instance or owner), and returns a new reference or NULL with an
        // exception set.
        unsafe {
            let Some(get) = (*ffi::Py_TYPE(f.as_ptr())).tp_descr_get else {
                return Ok(f);
            };
            let obj = if obj.is_none() { std::ptr::null_mut() } else { obj.as_ptr() };
            let owner = owner.map_or(std::ptr::null_mut(), |o| o.as_ptr());
            Bound::from_owned_ptr_or_err(py, get(f.as_ptr(), obj, owner))
        }
    }

    /// `__name__`, `__qualname__`, `__doc__`, `__wrapped__`-style attributes, as the method
    /// that an access would get has them (for `inspect`, `pydoc`, `mock.create_autospec`).
    fn __getattr__<'py>(&self, py: Python<'py>, name: &Bound<'py, PyString>) -> PyResult<Bound<'py, PyAny>> {
        self.current(py)?.0.getattr(name)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("<asyncio method {}>", self.own.bind(py).repr()?))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.source)?;
        visit.call(&self.original)?;
        visit.call(&self.own)?;
        visit.call(&self.prepare)
    }
}
