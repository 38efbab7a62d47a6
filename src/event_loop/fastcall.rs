//! `call_soon`, `call_soon_threadsafe`, `call_later` and `call_at` as raw
//! `METH_FASTCALL | METH_KEYWORDS` methods.
//!
//! They are the hottest entry points of the loop: every Task step and Future callback goes
//! through `call_soon(cb, arg, context=ctx)`. PyO3's generated parser for a
//! `(callback, *args, context=None)` signature costs 100-450 instructions per call (a varargs
//! tuple, keyword matching through a generic description); the two shapes that occur, no
//! keywords or exactly `context=`, are parsed here directly from the vector.
//!
//! Ground rules: the methods are installed on `LoopCore` once, at module initialisation
//! (`install`); the bodies are the ordinary Rust methods in `mod.rs`. Errors match asyncio's
//! signatures: a missing positional argument or an unknown keyword is a `TypeError` naming it.
//!
//! The C entry points are our own (`entry!`), not PyO3's trampoline: CPython calls a method
//! with the GIL held, so what PyO3's adds on top of a panic trap, the attachment count it
//! keeps in a thread-local (two `__tls_get_addr` calls per call from a cdylib) and a check of
//! its deferred-decref pool, is bookkeeping these bodies do not need: they drop no `Py<T>`
//! (whose drop consults that count) on the success path, only `Bound`s (a plain
//! `Py_DECREF`); an error path that does drops it through PyO3's pool, which the next PyO3
//! entry point empties. A panic still becomes a Python exception, never an unwind into C.

use std::ffi::CStr;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::{intern, Borrowed, PyTypeInfo};

use super::LoopCore;
use crate::handles::CallArgs;
use crate::py;

/// The arguments of one call: the fixed parameters (at most two), the rest of the
/// positionals (the callback's arguments), and `context`.
struct Args<'a, 'py> {
    py: Python<'py>,
    fixed: [*mut ffi::PyObject; 2],
    rest: &'a [*mut ffi::PyObject],
    context: Option<Borrowed<'a, 'py, PyAny>>,
}

impl<'a, 'py> Args<'a, 'py> {
    /// Split the vector. `fixed` names the leading parameters, which may also come by keyword
    /// (as in asyncio's `def call_soon(self, callback, *args, context=None)`).
    ///
    /// # Safety
    /// `args` points at `nargs` live object pointers followed by one per name in `kwnames`
    /// (a tuple of str, or NULL), as CPython passes them to a `METH_FASTCALL | METH_KEYWORDS`
    /// method; they stay alive for the call.
    #[inline(always)]
    unsafe fn parse(
        py: Python<'py>,
        method: &str,
        fixed: &[&str],
        args: *const *mut ffi::PyObject,
        nargs: ffi::Py_ssize_t,
        kwnames: *mut ffi::PyObject,
    ) -> PyResult<Self> {
        debug_assert!(fixed.len() <= 2);
        let nargs_in = nargs;
        let nargs = nargs as usize;
        let nfixed = fixed.len();
        // The shapes every Task step and Future callback use: the fixed parameters and the
        // callback's arguments by position, then nothing or exactly `context=`.
        if nargs >= nfixed {
            // SAFETY: kwnames as CPython passes it (see this function's contract).
            let nkw = unsafe { kw_count(kwnames) };
            let context_only = nkw == 1 && {
                // SAFETY: item 0 of a one-item tuple, a borrowed str.
                let name = unsafe { Borrowed::from_ptr(py, ffi::PyTuple_GET_ITEM(kwnames, 0)) };
                is_context_name(py, &name)?
            };
            if nkw == 0 || context_only {
                // SAFETY: the caller guarantees `nargs + nkw` valid pointers at `args`.
                let all: &'a [*mut ffi::PyObject] = unsafe { vector(args, nargs + nkw) };
                // Element by element: a `copy_from_slice` of a run-time length is a memcpy call.
                let mut slots = [std::ptr::null_mut(); 2];
                for (slot, &p) in slots.iter_mut().zip(&all[..nfixed]) {
                    *slot = p;
                }
                // SAFETY: a live borrowed pointer from the vector.
                let context = context_only.then(|| unsafe { Borrowed::from_ptr(py, all[nargs]) });
                return Ok(Self { py, fixed: slots, rest: &all[nfixed..nargs], context });
            }
        }
        // SAFETY: as for this function.
        unsafe { Self::parse_general(py, method, fixed, args, nargs_in, kwnames) }
    }

    /// Every other shape: keywords for the fixed parameters, and the errors.
    ///
    /// # Safety
    /// As for `parse`.
    #[cold]
    #[inline(never)]
    unsafe fn parse_general(
        py: Python<'py>,
        method: &str,
        fixed: &[&str],
        args: *const *mut ffi::PyObject,
        nargs: ffi::Py_ssize_t,
        kwnames: *mut ffi::PyObject,
    ) -> PyResult<Self> {
        let nargs = nargs as usize;
        // SAFETY: kwnames as CPython passes it (see `parse`'s contract).
        let nkw = unsafe { kw_count(kwnames) };
        // SAFETY: the caller guarantees `nargs + nkw` valid pointers at `args`.
        let all: &'a [*mut ffi::PyObject] = unsafe { vector(args, nargs + nkw) };
        let npos = nargs.min(fixed.len());
        let mut slots = [std::ptr::null_mut(); 2];
        slots[..npos].copy_from_slice(&all[..npos]);
        let mut context = None;
        for i in 0..nkw {
            // SAFETY: i < size of the kwnames tuple; the item is a borrowed str.
            let name = unsafe { Borrowed::from_ptr(py, ffi::PyTuple_GET_ITEM(kwnames, i as ffi::Py_ssize_t)) };
            let value = all[nargs + i];
            if is_context_name(py, &name)? {
                if context.is_some() {
                    return Err(multiple_values(method, "context"));
                }
                // SAFETY: a live borrowed pointer from the vector.
                context = Some(unsafe { Borrowed::from_ptr(py, value) });
                continue;
            }
            let Some(j) = fixed.iter().position(|f| name.eq(*f).unwrap_or(false)) else {
                return Err(PyTypeError::new_err(format!(
                    "{method}() got an unexpected keyword argument '{}'",
                    name.str()?
                )));
            };
            if !slots[j].is_null() {
                return Err(multiple_values(method, fixed[j]));
            }
            slots[j] = value;
        }
        if slots[..fixed.len()].iter().any(|p| p.is_null()) {
            let missing: Vec<&str> = (0..fixed.len()).filter(|&j| slots[j].is_null()).map(|j| fixed[j]).collect();
            let names = missing.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(" and ");
            let s = if missing.len() == 1 { "" } else { "s" };
            return Err(PyTypeError::new_err(format!(
                "{method}() missing {} required positional argument{s}: {names}",
                missing.len()
            )));
        }
        Ok(Self { py, fixed: slots, rest: &all[npos..nargs], context })
    }

    /// Fixed parameter `i` (checked to be present by `parse`).
    fn get(&self, i: usize) -> Borrowed<'a, 'py, PyAny> {
        // SAFETY: `parse` filled every fixed slot with a live pointer borrowed for the call.
        unsafe { Borrowed::from_ptr(self.py, self.fixed[i]) }
    }

    /// The positionals after the fixed ones, as the handle keeps them: a single one bare
    /// (`CallArgs`), any other number as a tuple.
    #[inline(always)]
    fn rest(&self) -> PyResult<CallArgs> {
        let items = self.rest;
        if let [one] = items {
            // SAFETY: a live pointer borrowed from the vector for the call.
            return Ok(CallArgs::one(unsafe { Borrowed::from_ptr(self.py, *one) }.to_owned().unbind()));
        }
        if items.is_empty() {
            return Ok(CallArgs::empty(self.py));
        }
        // SAFETY: PyTuple_New returns a new tuple with `len` NULL slots, or NULL with an
        // exception set; each slot is filled once with a new reference, as PyTuple_SET_ITEM
        // requires.
        unsafe {
            let t = Bound::from_owned_ptr_or_err(self.py, ffi::PyTuple_New(items.len() as ffi::Py_ssize_t))?;
            for (i, &item) in items.iter().enumerate() {
                ffi::Py_INCREF(item);
                ffi::PyTuple_SET_ITEM(t.as_ptr(), i as ffi::Py_ssize_t, item);
            }
            Ok(CallArgs::tuple(&t.cast_into_unchecked()))
        }
    }

    /// `context=None` means "copy the current context", as in asyncio.
    fn context(&self) -> Option<Bound<'py, PyAny>> {
        self.context.filter(|c| !c.is_none()).map(|c| c.to_owned())
    }
}

/// The number of keyword arguments: the length of `kwnames`, or 0 when it is NULL.
///
/// # Safety
/// `kwnames` is NULL or a tuple (CPython's vectorcall convention).
#[inline(always)]
unsafe fn kw_count(kwnames: *mut ffi::PyObject) -> usize {
    if kwnames.is_null() {
        0
    } else {
        // SAFETY: a tuple, as the caller guarantees.
        unsafe { ffi::PyTuple_GET_SIZE(kwnames) as usize }
    }
}

/// The argument vector as a slice (CPython may pass a NULL `args` when it is empty).
///
/// # Safety
/// `args` points at `len` live object pointers that stay alive for `'a`, or `len` is 0.
#[inline(always)]
unsafe fn vector<'a>(args: *const *mut ffi::PyObject, len: usize) -> &'a [*mut ffi::PyObject] {
    if len == 0 {
        &[]
    } else {
        // SAFETY: as the caller guarantees.
        unsafe { std::slice::from_raw_parts(args, len) }
    }
}

fn multiple_values(method: &str, arg: &str) -> PyErr {
    PyTypeError::new_err(format!("{method}() got multiple values for argument '{arg}'"))
}

/// The `context` keyword names seen so far: the first two distinct `str` objects equal to
/// `"context"` (CPython's C code, `_asyncio` included, passes its own static string; Python
/// callers pass the interned one). Each holds a reference that is never released, so the
/// identity test can never match a reused address. Written under the GIL only.
static CONTEXT_NAMES: [AtomicPtr<ffi::PyObject>; 2] =
    [AtomicPtr::new(ptr::null_mut()), AtomicPtr::new(ptr::null_mut())];

/// Is this keyword name `"context"`? By identity first: every Task step and Future callback
/// passes one, and an equality test costs more than the rest of the parsing.
#[inline(always)]
fn is_context_name(py: Python<'_>, name: &Borrowed<'_, '_, PyAny>) -> PyResult<bool> {
    let p = name.as_ptr();
    // `p` is never NULL, so an empty slot never matches.
    if CONTEXT_NAMES.iter().any(|slot| slot.load(Ordering::Relaxed) == p) {
        return Ok(true);
    }
    is_context_name_slow(py, name)
}

#[cold]
#[inline(never)]
fn is_context_name_slow(py: Python<'_>, name: &Borrowed<'_, '_, PyAny>) -> PyResult<bool> {
    if !name.eq(intern!(py, "context"))? {
        return Ok(false);
    }
    if let Some(slot) = CONTEXT_NAMES.iter().find(|slot| slot.load(Ordering::Relaxed).is_null()) {
        // A reference kept for the life of the process (see `CONTEXT_NAMES`).
        slot.store((*name).to_owned().into_ptr(), Ordering::Relaxed);
    }
    Ok(true)
}

/// `self` as the loop. CPython's method descriptor checks `self` is a `LoopCore` (or subclass)
/// before calling, so the cast cannot fail.
///
/// # Safety
/// `slf` is a live object of the descriptor's type, borrowed for the call.
unsafe fn this<'a, 'py>(py: Python<'py>, slf: *mut ffi::PyObject) -> Borrowed<'a, 'py, LoopCore> {
    // SAFETY: see above.
    unsafe { Borrowed::from_ptr(py, slf).cast_unchecked::<LoopCore>() }
}

/// A panic's payload as the `PanicException` PyO3's trampoline would raise.
#[cold]
fn panic_err(payload: Box<dyn std::any::Any + Send + 'static>) -> PyErr {
    let msg = if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else {
        "panic from Rust code".to_owned()
    };
    pyo3::panic::PanicException::new_err((msg,))
}

/// The result of a body as CPython expects it: the new reference, or NULL with the exception
/// set.
#[inline(always)]
fn finish(py: Python<'_>, r: std::thread::Result<PyResult<*mut ffi::PyObject>>) -> *mut ffi::PyObject {
    match r {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            e.restore(py);
            std::ptr::null_mut()
        }
        Err(payload) => {
            panic_err(payload).restore(py);
            std::ptr::null_mut()
        }
    }
}

/// What every entry point below does around its body: the GIL is held (CPython calls a
/// method with it), and a panic becomes a `PanicException` instead of unwinding into C.
///
/// # Safety
/// Called by CPython as a method's C function, on the thread that holds the GIL.
#[inline(always)]
unsafe fn guarded(body: impl FnOnce(Python<'_>) -> PyResult<*mut ffi::PyObject>) -> *mut ffi::PyObject {
    // SAFETY: as the caller guarantees, this thread holds the GIL.
    let py = unsafe { Python::assume_attached() };
    finish(py, std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(py))))
}

/// A `METH_FASTCALL | METH_KEYWORDS` C entry point for one of the bodies below.
macro_rules! entry {
    ($name:ident => $body:ident) => {
        unsafe extern "C" fn $name(
            slf: *mut ffi::PyObject,
            args: *const *mut ffi::PyObject,
            nargs: ffi::Py_ssize_t,
            kwnames: *mut ffi::PyObject,
        ) -> *mut ffi::PyObject {
            // SAFETY: CPython calls this method's C function with the GIL held, and passes the
            // arguments by the METH_FASTCALL | METH_KEYWORDS convention, as `$body` requires.
            unsafe { guarded(|py| $body(py, slf, args, nargs, kwnames)) }
        }
    };
}

/// A `METH_NOARGS` C entry point running `$body(&loop)`.
macro_rules! noargs_entry {
    ($name:ident => $body:expr) => {
        unsafe extern "C" fn $name(slf: *mut ffi::PyObject, _unused: *mut ffi::PyObject) -> *mut ffi::PyObject {
            // SAFETY: CPython calls this method's C function with the GIL held; by the
            // METH_NOARGS convention `slf` is the descriptor's instance.
            unsafe { guarded(|py| $body(&this(py, slf))) }
        }
    };
}

// Every `Future` made by `create_future` calls `get_debug()` from its `__init__`.
noargs_entry!(create_future_entry => |slf: &Borrowed<'_, '_, LoopCore>| {
    LoopCore::new_future(slf).map(Bound::into_ptr)
});
noargs_entry!(get_debug_entry => |slf: &Borrowed<'_, '_, LoopCore>| {
    let py = slf.py();
    Ok(slf.get().debug_value(py).into_ptr())
});

entry!(call_soon_entry => call_soon);
entry!(call_soon_threadsafe_entry => call_soon_threadsafe);
entry!(call_later_entry => call_later);
entry!(call_at_entry => call_at);

unsafe fn call_soon(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: CPython's METH_FASTCALL | METH_KEYWORDS convention (see `Args::parse`, `this`).
    let (a, slf) =
        unsafe { (Args::parse(py, "BaseEventLoop.call_soon", &["callback"], args, nargs, kwnames)?, this(py, slf)) };
    let h = LoopCore::call_soon(&slf, &a.get(0), a.rest()?, a.context())?;
    Ok(h.into_ptr())
}

unsafe fn call_soon_threadsafe(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: as in `call_soon`.
    let (a, slf) = unsafe {
        (Args::parse(py, "BaseEventLoop.call_soon_threadsafe", &["callback"], args, nargs, kwnames)?, this(py, slf))
    };
    let h = LoopCore::call_soon_threadsafe(&slf, &a.get(0), a.rest()?, a.context())?;
    Ok(h.into_ptr())
}

unsafe fn call_later(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: as in `call_soon`.
    let (a, slf) = unsafe {
        (Args::parse(py, "BaseEventLoop.call_later", &["delay", "callback"], args, nargs, kwnames)?, this(py, slf))
    };
    let h = LoopCore::call_later(&slf, &a.get(0), &a.get(1), a.rest()?, a.context())?;
    Ok(h.into_ptr())
}

unsafe fn call_at(
    py: Python<'_>,
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<*mut ffi::PyObject> {
    // SAFETY: as in `call_soon`.
    let (a, slf) = unsafe {
        (Args::parse(py, "BaseEventLoop.call_at", &["when", "callback"], args, nargs, kwnames)?, this(py, slf))
    };
    let h = LoopCore::call_at(&slf, &a.get(0), &a.get(1), a.rest()?, a.context())?;
    Ok(h.into_ptr())
}

/// Put the four `call_*` methods, `create_future` and `get_debug` on `LoopCore` (once, at
/// module initialisation).
pub(crate) fn install(py: Python<'_>) -> PyResult<()> {
    let tp = LoopCore::type_object(py);
    let methods: [(&'static CStr, &'static CStr, ffi::PyCFunctionFastWithKeywords); 4] = [
        (
            c"call_soon",
            c"call_soon($self, callback, *args, context=None)\n--\n\nArrange for callback(*args) to be called soon.",
            call_soon_entry,
        ),
        (
            c"call_soon_threadsafe",
            c"call_soon_threadsafe($self, callback, *args, context=None)\n--\n\nLike call_soon(), but thread-safe.",
            call_soon_threadsafe_entry,
        ),
        (
            c"call_later",
            c"call_later($self, delay, callback, *args, context=None)\n--\n\nArrange for callback(*args) to be called after delay seconds.",
            call_later_entry,
        ),
        (
            c"call_at",
            c"call_at($self, when, callback, *args, context=None)\n--\n\nArrange for callback(*args) to be called at loop time when.",
            call_at_entry,
        ),
    ];
    for (name, doc, meth) in methods {
        let descr = py::fastcall_method(&tp, name, doc, meth)?;
        tp.setattr(name.to_str().expect("ASCII method name"), descr)?;
    }
    let noargs: [(&'static CStr, &'static CStr, ffi::PyCFunction); 2] = [
        (
            c"create_future",
            c"create_future($self, /)\n--\n\nasyncio's `create_future`: `asyncio.Future(loop=self)`.",
            create_future_entry,
        ),
        (c"get_debug", c"get_debug($self, /)\n--\n\nWhether the loop is in debug mode.", get_debug_entry),
    ];
    for (name, doc, meth) in noargs {
        let descr = py::noargs_method(&tp, name, doc, meth)?;
        tp.setattr(name.to_str().expect("ASCII method name"), descr)?;
    }
    Ok(())
}
