//! Deferred context copies.
//!
//! asyncio gives every handle made without `context=` its own `copy_context()`: a new
//! `Context` object per `call_soon`, `call_soon_threadsafe` or `call_later`. A copy is only
//! a new object around the same immutable mapping of context variables (CPython's HAMT), so
//! what the copy *means* is fixed by that mapping alone. Here such a handle records the
//! calling thread's mapping instead (one reference count), and the `Context` is made when it
//! is first needed: to run the callback, or when `get_context()` hands it out. Running takes
//! the spare `Context` a dead handle gave back, if there is one, and points it at the
//! recorded mapping. A handle gives its `Context` back when it dies and nobody else holds
//! the context (its reference count is the handle's alone, and it has no weak references),
//! so nothing can tell a reused `Context` from a new one.
//!
//! This reads two CPython fields that are not in the API: the thread state's `context` (the
//! current `Context`, public header `cpython/pystate.h`, at an offset per minor version) and
//! the `Context`'s `ctx_vars` (internal header `pycore_context.h`; the same layout from 3.8
//! to 3.13). `install` checks both on live objects at import and leaves the feature off
//! (plain copies) for any interpreter where a check fails, or whose version it does not know.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use pyo3::ffi;
use pyo3::prelude::*;

use super::GilCell;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// Offset of `PyThreadState.context`.
static TS_CONTEXT: AtomicUsize = AtomicUsize::new(0);
/// The empty mapping: the snapshot of a thread that never entered a context.
static EMPTY_VARS: GilCell<Option<Py<PyAny>>> = GilCell::new(None);
/// One `Context` a dead handle gave back, for the next run.
static SPARE: GilCell<Option<Py<PyAny>>> = GilCell::new(None);

/// `struct _pycontextobject { PyObject_HEAD; ctx_prev; ctx_vars; ctx_weakreflist; ... }`.
const CTX_VARS: usize = std::mem::size_of::<ffi::PyObject>() + std::mem::size_of::<usize>();
const CTX_WEAKREFLIST: usize = CTX_VARS + std::mem::size_of::<usize>();

/// `offsetof(PyThreadState, context)` on the GIL builds of CPython we know (read off each
/// version's headers with a C compiler).
fn ts_context_offset(minor: u8) -> Option<usize> {
    match minor {
        10 => Some(240),
        11 => Some(224),
        12 | 13 => Some(208),
        _ => None,
    }
}

#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// # Safety
/// `obj` is a live object at least `off + 8` bytes long, and the GIL is held.
#[inline(always)]
unsafe fn word(obj: *mut ffi::PyObject, off: usize) -> *mut *mut ffi::PyObject {
    // SAFETY: in bounds of `obj` (the caller's promise).
    unsafe { obj.cast::<u8>().add(off).cast::<*mut ffi::PyObject>() }
}

/// The current thread's context, borrowed (null if it never entered one).
#[inline(always)]
fn current_context() -> *mut ffi::PyObject {
    // SAFETY: the caller is attached (all callers hold a `Python` token), so the thread state
    // is live; `TS_CONTEXT` was checked by `install` before `ENABLED` was set.
    unsafe { *word(ffi::PyThreadState_Get().cast(), TS_CONTEXT.load(Ordering::Relaxed)) }
}

/// The variables of `ctx`, borrowed.
///
/// # Safety
/// `ctx` is a live `contextvars.Context`, and `install` enabled the feature.
#[inline(always)]
unsafe fn vars_of(ctx: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: the caller's promise; `CTX_VARS` is inside every Context (checked by `install`).
    unsafe { *word(ctx, CTX_VARS) }
}

/// Point `ctx` at `vars` (a mapping taken from another Context).
///
/// # Safety
/// `ctx` is a live `contextvars.Context` that is not entered, `vars` a live mapping of the
/// same kind, and `install` enabled the feature.
#[inline(always)]
unsafe fn set_vars(ctx: *mut ffi::PyObject, vars: *mut ffi::PyObject) {
    // SAFETY: the caller's promise. The Context owns a reference to its mapping: take one to
    // the new mapping before releasing the old one (they may be the same object).
    unsafe {
        let slot = word(ctx, CTX_VARS);
        let old = *slot;
        if old != vars {
            ffi::Py_INCREF(vars);
            *slot = vars;
            // Null in a Context the GC cleared: a spare can be one, when the handle that gave
            // it back died inside a collection that found both unreachable (the collector
            // still clears every object it found, even one given a new reference meanwhile).
            ffi::Py_XDECREF(old);
        }
    }
}

/// The calling thread's context variables (a new reference), to stand for a copy of its
/// current context; `None` when the feature is off.
#[inline]
pub fn snapshot(py: Python<'_>) -> Option<Py<PyAny>> {
    if !enabled() {
        return None;
    }
    let ctx = current_context();
    if ctx.is_null() {
        return EMPTY_VARS.borrow(py).as_ref().map(|v| v.clone_ref(py));
    }
    // SAFETY: the thread's current context is a live Context (the thread state holds it);
    // its mapping is live while it does, and we take our own reference at once.
    Some(unsafe { Bound::from_borrowed_ptr(py, vars_of(ctx)) }.unbind())
}

/// A `Context` whose variables are `vars` (from `snapshot`): the spare if there is one,
/// else a new one.
pub fn context_for(py: Python<'_>, vars: &Py<PyAny>) -> PyResult<Py<PyAny>> {
    let ctx = match SPARE.borrow_mut(py).take() {
        Some(c) => c,
        // SAFETY: PyContext_New returns a new reference or NULL with an exception set.
        None => unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyContext_New()) }?.unbind(),
    };
    // SAFETY: a Context nobody else holds (new, or given back with no other reference), so not
    // entered; `vars` is a mapping from `snapshot`.
    unsafe { set_vars(ctx.as_ptr(), vars.as_ptr()) };
    Ok(ctx)
}

/// A dying handle's own `Context` (made by `context_for`), owned reference passed in: kept as
/// the spare, emptied, when nothing else can see it; else released.
///
/// # Safety
/// The GIL is held and `ctx` is an owned reference to a Context made by `context_for`.
pub unsafe fn give_back(py: Python<'_>, ctx: *mut ffi::PyObject) {
    // SAFETY: the caller's promise; a Context is at least `CTX_WEAKREFLIST + 8` bytes long.
    // (A Context the GC cleared, in a cycle with its handle, has no mapping: not kept.)
    let unseen =
        unsafe { ffi::Py_REFCNT(ctx) == 1 && (*word(ctx, CTX_WEAKREFLIST)).is_null() && !vars_of(ctx).is_null() };
    if unseen {
        // Drop the variables now, as the Context's death would: their values must not
        // outlive it. (Freeing them can run Python code; no borrow is held here.)
        let empty = EMPTY_VARS.borrow(py).as_ref().map(|e| e.as_ptr());
        if let Some(empty) = empty {
            // SAFETY: `ctx` is a Context nobody else holds, so not entered; `empty` is the
            // empty mapping, alive in `EMPTY_VARS` for the process.
            unsafe { set_vars(ctx, empty) };
        }
        if let Ok(mut spare) = SPARE.0.try_borrow_mut() {
            if spare.is_none() {
                // SAFETY: we own the reference the caller passed in.
                *spare = Some(unsafe { Bound::from_owned_ptr(py, ctx) }.unbind());
                return;
            }
        }
    }
    // SAFETY: the caller passed us an owned reference, released once here.
    unsafe { ffi::Py_DECREF(ctx) }
}

/// Check the two fields on live objects and switch the feature on if both are where we
/// expect them (once, at module initialisation).
pub fn install(py: Python<'_>) -> PyResult<()> {
    let v = py.version_info();
    let Some(ts_off) = ts_context_offset(v.minor).filter(|_| v.major == 3) else {
        return Ok(());
    };
    if py
        .import("sys")?
        .getattr("_is_gil_enabled")
        .is_ok_and(|f| f.call0().is_ok_and(|r| !r.is_truthy().unwrap_or(true)))
    {
        return Ok(());
    }
    let ok = check(py, ts_off)?;
    if ok {
        TS_CONTEXT.store(ts_off, Ordering::Relaxed);
        ENABLED.store(true, Ordering::Relaxed);
    }
    Ok(())
}

fn is_hamt(p: *mut ffi::PyObject) -> bool {
    if p.is_null() {
        return false;
    }
    // SAFETY: only called on a word read from a live Context's `ctx_vars` slot, after the
    // Context's own type was checked; the name of a live type is a C string.
    unsafe { std::ffi::CStr::from_ptr((*ffi::Py_TYPE(p)).tp_name) }.to_bytes() == b"hamt"
}

/// Enter a new Context and look for it at `ts_off` in the thread state; set a variable in one
/// copy and see that only its `ctx_vars` changes; give a third Context that mapping with
/// `set_vars` and read the variable back through the API.
fn check(py: Python<'_>, ts_off: usize) -> PyResult<bool> {
    let cv = py.import("contextvars")?;
    let a = cv.call_method0("copy_context")?;
    let b = cv.call_method0("copy_context")?;
    let fresh = cv.getattr("Context")?.call0()?;
    let var = cv.getattr("ContextVar")?.call1(("ferroloop_probe",))?;
    // SAFETY: `a`, `b` and `fresh` are live Contexts (checked just below before any read);
    // reads stay inside their structs; the thread state is ours and live.
    unsafe {
        for c in [&a, &b, &fresh] {
            if ffi::PyContext_CheckExact(c.as_ptr()) == 0 {
                return Ok(false);
            }
        }
        let (va, vb) = (vars_of(a.as_ptr()), vars_of(b.as_ptr()));
        if va != vb || !is_hamt(va) || !is_hamt(vars_of(fresh.as_ptr())) {
            return Ok(false);
        }
        // The thread state's slot holds the entered Context.
        let ts = ffi::PyThreadState_Get().cast::<ffi::PyObject>();
        let before = *word(ts, ts_off);
        if ffi::PyContext_Enter(a.as_ptr()) < 0 {
            return Err(PyErr::fetch(py));
        }
        let seen = *word(ts, ts_off) == a.as_ptr();
        let set = ffi::PyContextVar_Set(var.as_ptr(), py.None().as_ptr());
        let token = if set.is_null() { Err(PyErr::fetch(py)) } else { Ok(Bound::from_owned_ptr(py, set)) };
        if ffi::PyContext_Exit(a.as_ptr()) < 0 {
            return Err(PyErr::fetch(py));
        }
        token?;
        if !seen || *word(ts, ts_off) != before {
            return Ok(false);
        }
        let va2 = vars_of(a.as_ptr());
        if va2 == vb || !is_hamt(va2) || vars_of(b.as_ptr()) != vb {
            return Ok(false);
        }
        // A Context given `a`'s mapping sees `a`'s variable.
        set_vars(fresh.as_ptr(), va2);
        let got = fresh.call_method1("get", (&var, 0))?;
        if !got.is_none() || b.call_method1("get", (&var, 0))?.is_none() {
            return Ok(false);
        }
    }
    let empty = cv.getattr("Context")?.call0()?;
    // SAFETY: a live Context, checked as above; we take our own reference to its mapping.
    let vars = unsafe { Bound::from_borrowed_ptr(py, vars_of(empty.as_ptr())) };
    if !is_hamt(vars.as_ptr()) {
        return Ok(false);
    }
    *EMPTY_VARS.borrow_mut(py) = Some(vars.unbind());
    Ok(true)
}
