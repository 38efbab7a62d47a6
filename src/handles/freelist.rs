//! Freelists for `Handle` and `TimerHandle` memory, installed as the types' `tp_alloc` and
//! `tp_free` (as CPython's own float, tuple and frame freelists do).
//!
//! Every `call_soon` makes a handle and every run frees one. Reusing the memory saves the
//! allocator round trip and, because a reused block never passes through `_PyObject_GC_Link`/
//! `PyObject_GC_Del`, handles stop counting towards the GC's generation-0 threshold. PyO3's
//! own `freelist` option takes a mutex per allocation and leaves reused objects untracked by
//! the GC; this one is guarded by the GIL and tracks them, as `PyType_GenericAlloc` does.
//!
//! Ground rules: only instances of exactly these two types use the lists (subclasses made in
//! Python get CPython's allocator from `type()`); a list holds raw blocks of dead objects of
//! one type, and a block is handed out again only for that type. The memory is kept for the
//! life of the process (at most `HANDLE_CAPACITY` or `TIMER_CAPACITY` blocks).

use std::cell::UnsafeCell;
use std::ffi::c_void;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::PyTypeInfo;

use super::{Handle, TimerHandle};

/// Plain handles: a burst of pending callbacks as large as another thread makes with
/// `call_soon_threadsafe` in one GIL turn (`sys.getswitchinterval()`, 5 ms: some 15,000 on
/// this machine) fits, so the loop thread's frees feed that thread's next turn instead of
/// `malloc`/`free` and the GC's generation-0 count. At most 4 MiB (128-byte blocks), and only
/// once that many handles were alive at the same time.
const HANDLE_CAPACITY: usize = 32 * 1024;
/// Timer handles: a burst of 1000 timers fits. Kept small: cancelled timers are freed in bulk
/// (500,000 at once in the memory benchmark), and what a list keeps is not given back.
const TIMER_CAPACITY: usize = 1024;
/// What each list reserves at start; it grows (by doubling) up to its `cap`.
const INITIAL: usize = 1024;

struct List {
    tp: *mut ffi::PyTypeObject,
    cap: usize,
    free: Vec<*mut ffi::PyObject>,
}

struct Lists(UnsafeCell<[List; 2]>);

// SAFETY: the lists are only touched from `tp_alloc`/`tp_free` and `install`, which CPython
// calls with the GIL held, so no two threads access them at once. (A free-threaded build
// would need per-thread lists; see docs/DESIGN.md.)
unsafe impl Sync for Lists {}

static LISTS: Lists = Lists(UnsafeCell::new([
    List { tp: std::ptr::null_mut(), cap: HANDLE_CAPACITY, free: Vec::new() },
    List { tp: std::ptr::null_mut(), cap: TIMER_CAPACITY, free: Vec::new() },
]));

/// The list for exactly type `tp`, if it has one.
///
/// # Safety
/// The GIL is held, and no other reference into `LISTS` is alive.
unsafe fn list_for(tp: *mut ffi::PyTypeObject) -> Option<&'static mut List> {
    // SAFETY: exclusive access under the GIL (see `Lists`).
    let lists = unsafe { &mut *LISTS.0.get() };
    lists.iter_mut().find(|l| l.tp == tp)
}

unsafe extern "C" fn alloc(tp: *mut ffi::PyTypeObject, nitems: ffi::Py_ssize_t) -> *mut ffi::PyObject {
    if nitems == 0 {
        // SAFETY: CPython calls tp_alloc with the GIL held; the borrow ends in this block.
        if let Some(obj) = unsafe { list_for(tp) }.and_then(|l| l.free.pop()) {
            // SAFETY: `obj` is a block freed by `free` below for an object of exactly `tp`,
            // untracked by the GC (tp_dealloc untracks first). PyObject_Init sets the type and
            // a fresh reference count; the caller (PyO3) writes every field of the contents,
            // as it does after PyType_GenericAlloc. Tracking it now matches GenericAlloc.
            unsafe {
                ffi::PyObject_Init(obj, tp);
                ffi::PyObject_GC_Track(obj.cast());
            }
            return obj;
        }
    }
    // SAFETY: the generic allocator, as the type would use without this module.
    unsafe { ffi::PyType_GenericAlloc(tp, nitems) }
}

unsafe extern "C" fn free(obj: *mut c_void) {
    let obj = obj.cast::<ffi::PyObject>();
    // SAFETY: tp_free is called by the type's tp_dealloc with the GIL held, on an object that
    // is untracked and whose contents are dropped; its type pointer is still valid.
    unsafe {
        if let Some(list) = list_for(ffi::Py_TYPE(obj)) {
            // `try_reserve` does nothing while there is room, else doubles the list; a failed
            // growth frees the block instead of aborting the process.
            if list.free.len() < list.cap && list.free.try_reserve(1).is_ok() {
                list.free.push(obj);
                return;
            }
        }
        ffi::PyObject_GC_Del(obj.cast());
    }
}

/// Give back the plain-handle blocks beyond `keep` (at least `INITIAL` are kept), and the
/// list's room for them. The loop calls this when it goes idle after a burst
/// (`run::run_once`): the list is full after any burst of `HANDLE_CAPACITY` live handles,
/// and would otherwise keep its 4 MiB for the life of the process.
pub(crate) fn trim_handles(py: Python<'_>, keep: usize) {
    let keep = keep.max(INITIAL);
    // SAFETY: the GIL is held (`py`); the borrow of `LISTS` ends in this function, and
    // PyObject_GC_Del runs no Python code, so nothing re-enters `alloc`/`free` meanwhile.
    unsafe {
        let Some(list) = list_for(Handle::type_object_raw(py)) else { return };
        if list.free.len() <= keep && list.free.capacity() <= keep {
            return;
        }
        for obj in list.free.drain(keep.min(list.free.len())..) {
            // SAFETY: a block `free` kept: untracked, contents dropped, from this type's
            // allocator (PyType_GenericAlloc, GC variant), which PyObject_GC_Del frees.
            ffi::PyObject_GC_Del(obj.cast());
        }
        list.free.shrink_to(keep);
    }
}

/// Make the two types allocate through the lists (once, at module initialisation, before any
/// handle exists).
pub(crate) fn install(py: Python<'_>) {
    let types = [Handle::type_object_raw(py), TimerHandle::type_object_raw(py)];
    // SAFETY: the GIL is held; both are PyO3 heap types alive for the process, with no
    // instances yet, so switching their allocator pair cannot mix allocators for one object.
    // PyType_Modified drops cached lookups.
    unsafe {
        let lists = &mut *LISTS.0.get();
        for (list, tp) in lists.iter_mut().zip(types) {
            list.tp = tp;
            list.free.reserve_exact(INITIAL.min(list.cap));
            (*tp).tp_alloc = Some(alloc);
            (*tp).tp_free = Some(free);
            ffi::PyType_Modified(tp);
        }
    }
}
