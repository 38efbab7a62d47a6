//! `Handle` objects made and destroyed without PyO3's generic paths.
//!
//! Every `call_soon` makes a handle and every run destroys one. PyO3's constructor calls the
//! base type's `tp_new` (`object_new`, with an empty argument tuple) before writing the
//! contents, and its `tp_dealloc` enters a panic trap and the attachment bookkeeping (two
//! thread-local accesses) before dropping them: together about 170 instructions per handle
//! (callgrind), a tenth of what the loop spends on a `call_soon`. Here:
//! - `create` takes the block from the type's `tp_alloc` (the freelist) and writes the value
//!   and the empty weak-reference slot at the offsets PyO3's own layout put them;
//! - `dealloc`, installed as `Handle`'s `tp_dealloc`, does what PyO3's does (untrack, clear
//!   weak references, drop the value, `tp_free`, release a heap type's reference), dropping
//!   the fields with plain `Py_DECREF`s, so nothing is deferred to PyO3's pool.
//!
//! Ground rules: the offsets are measured once, on a handle PyO3 made, and the fast paths are
//! used only if the type's size shows nothing else lives in the object (value, padding,
//! weak-reference slot). Otherwise everything stays on PyO3's paths. `TimerHandle` (a
//! subclass with its own contents) always uses PyO3's; its `tp_dealloc` reaches `Handle`'s
//! part through PyO3's static base layout, not through this slot. Python subclasses of
//! `Handle` (allowed: `subclass`) reach this `tp_dealloc` from `subtype_dealloc`, which has
//! already released what the subclass added, as for PyO3's.

use std::sync::atomic::{AtomicIsize, Ordering};

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::PyTypeInfo;

use super::Handle;

/// Byte offsets in a `Handle` object of the Rust value and of the weak-reference list; 0
/// while the fast paths are off.
static VALUE_OFFSET: AtomicIsize = AtomicIsize::new(0);
static WEAKLIST_OFFSET: AtomicIsize = AtomicIsize::new(0);

/// Whether `install` switched the fast paths on (exported for the tests, which require it, so
/// a PyO3 layout change cannot silently turn them off).
pub(crate) fn enabled() -> bool {
    VALUE_OFFSET.load(Ordering::Relaxed) != 0
}

/// A new `Handle` object holding `value()`. The value is made after the allocation succeeded
/// and written straight into the object (no intermediate moves). If the allocation fails,
/// `value` is dropped unrun, and with it what it captured.
#[inline(always)]
pub(crate) fn create(py: Python<'_>, value: impl FnOnce() -> Handle) -> PyResult<Py<Handle>> {
    let value_off = VALUE_OFFSET.load(Ordering::Relaxed);
    if value_off == 0 {
        return Py::new(py, value());
    }
    let weak_off = WEAKLIST_OFFSET.load(Ordering::Relaxed);
    let tp = Handle::type_object_raw(py);
    // SAFETY: the GIL is held. `tp_alloc` (the freelist's, or PyType_GenericAlloc) returns a
    // block of `tp_basicsize` bytes with the header initialised (type, one reference) and
    // tracked by the GC, or null with an exception set. `install` checked that the block is
    // the header, the value at `value_off` and the weak-reference slot at `weak_off`, as
    // measured on an object PyO3 made; both writes are inside the block and aligned (PyO3's
    // layout put them there), and the value is written exactly once, before anyone sees it.
    unsafe {
        let alloc = (*tp).tp_alloc.unwrap_or(ffi::PyType_GenericAlloc);
        let obj = alloc(tp, 0);
        if obj.is_null() {
            return Err(PyErr::fetch(py));
        }
        let base = obj.cast::<u8>();
        base.offset(value_off).cast::<Handle>().write(value());
        base.offset(weak_off).cast::<*mut ffi::PyObject>().write(std::ptr::null_mut());
        Ok(Bound::from_owned_ptr(py, obj).cast_into_unchecked::<Handle>().unbind())
    }
}

/// `Handle`'s `tp_dealloc` (installed only with the fast paths on).
unsafe extern "C" fn dealloc(obj: *mut ffi::PyObject) {
    let value_off = VALUE_OFFSET.load(Ordering::Relaxed);
    let weak_off = WEAKLIST_OFFSET.load(Ordering::Relaxed);
    // SAFETY: CPython calls tp_dealloc with the GIL held, once, on an object whose reference
    // count reached zero and whose type is `Handle` or a Python subclass of it (TimerHandle
    // has its own slot), so the value at `value_off` is an initialised `Handle` that nobody
    // can reach any more; its references are released once, in place, and the block is then
    // freed with the type's own `tp_free`, as PyO3's dealloc does.
    unsafe {
        ffi::PyObject_GC_UnTrack(obj.cast());
        let base = obj.cast::<u8>();
        if !base.offset(weak_off).cast::<*mut ffi::PyObject>().read().is_null() {
            ffi::PyObject_ClearWeakRefs(obj);
        }
        release(&mut *base.offset(value_off).cast::<Handle>());
        let tp = ffi::Py_TYPE(obj);
        match (*tp).tp_free {
            Some(free) => free(obj.cast()),
            None => ffi::PyObject_GC_Del(obj.cast()),
        }
        if ffi::PyType_HasFeature(tp, ffi::Py_TPFLAGS_HEAPTYPE) != 0 {
            ffi::Py_DECREF(tp.cast());
        }
    }
}

/// Release a dying handle's references with `Py_DECREF`, in place (the GIL is held; PyO3's
/// drop would defer them to its pool outside a PyO3 frame, and moving the value out first cost
/// a copy of it). The value is never dropped as a Rust value: its memory goes back through
/// `tp_free` right after. Listing every field makes a new one a compile error.
///
/// # Safety
/// `h` is the value of an object in `tp_dealloc`, used for nothing else afterwards.
unsafe fn release(h: &mut Handle) {
    let gives_back = h.gives_context_back();
    let Handle {
        call,
        context,
        own_context: _,
        lazy: _,
        parked: _,
        untracked: _,
        loop_,
        cancelled: _,
        source_traceback,
        repr_cache,
    } = h;
    let decref = |p: *mut ffi::PyObject| {
        // SAFETY: the GIL is held (we are in tp_dealloc); `p` is an owned reference of the
        // dying handle, released exactly once here.
        unsafe { ffi::Py_DECREF(p) }
    };
    if let Some((cb, args)) = call.get_mut() {
        decref(cb.as_ptr());
        decref(args.as_ptr());
    }
    let ctx = context.get_mut().as_ptr();
    if gives_back {
        // SAFETY: the GIL is held; the handle's own Context (made by `py::context` for it, as
        // `gives_context_back` says) and its reference, passed on once.
        unsafe { crate::py::context::give_back(Python::assume_attached(), ctx) }
    } else {
        decref(ctx);
    }
    decref(loop_.as_ptr());
    if let Some(tb) = source_traceback {
        decref(tb.as_ptr());
    }
    if let Some(r) = repr_cache.get_mut() {
        decref(r.as_ptr());
    }
}

/// Measure PyO3's layout on one handle and switch the fast paths on if it is as expected
/// (once, at module initialisation, after the freelist is installed and before any other
/// handle exists).
pub(crate) fn install(py: Python<'_>) -> PyResult<()> {
    let none = py.None();
    let probe = Handle::new(
        py,
        none.clone_ref(py),
        super::CallArgs::tuple(&pyo3::types::PyTuple::empty(py)),
        none.clone_ref(py),
        Some(none),
        false,
    )?;
    let obj = Py::new(py, probe)?;
    let value_off = (obj.get() as *const Handle as isize) - (obj.as_ptr() as isize);
    drop(obj);
    let tp = Handle::type_object_raw(py);
    // SAFETY: Handle's type object, alive for the process; reading its size fields.
    let (basic, item, weak, dict) =
        unsafe { ((*tp).tp_basicsize, (*tp).tp_itemsize, (*tp).tp_weaklistoffset, (*tp).tp_dictoffset) };
    let ptr = std::mem::size_of::<*mut ffi::PyObject>() as isize;
    let value_end = value_off + std::mem::size_of::<Handle>() as isize;
    let expected = item == 0
        && dict == 0
        && value_off >= std::mem::size_of::<ffi::PyObject>() as isize
        && weak >= value_end
        && weak - value_end < ptr
        && weak % ptr == 0
        && basic == weak + ptr;
    if !expected {
        return Ok(());
    }
    VALUE_OFFSET.store(value_off, Ordering::Relaxed);
    WEAKLIST_OFFSET.store(weak, Ordering::Relaxed);
    // SAFETY: Handle's heap type, alive for the process; its only instance (the probe) is
    // gone, so every handle from now on is made by `create` or PyO3 (same layout) and freed
    // by `dealloc`. PyType_Modified drops cached lookups.
    unsafe {
        (*tp).tp_dealloc = Some(dealloc);
        ffi::PyType_Modified(tp);
    }
    Ok(())
}
