//! `Handle` and `TimerHandle`: asyncio's callback handles, with the same public API
//! (`cancel`, `cancelled`, `when`, `get_context`, repr) and the private attributes that
//! asyncio's helpers read (`_callback`, `_args`, `_cancelled`, `_loop`, `_source_traceback`).
//!
//! Ground rules: a handle's callback and args are cleared on cancel (so a cancelled timer does
//! not keep its arguments alive), and are cloned out before the call, never borrowed across it,
//! so a callback may cancel its own handle.

use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::basic::CompareOp;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyFloat, PyString, PyTuple};
use pyo3::{intern, PyTraverseError};

use crate::event_loop::LoopCore;
use crate::py::{self, GilCell};

mod freelist;
mod raw;

/// A handle's callback and arguments, as asyncio's `_callback` and `_args` give them.
type CallbackAndArgs = (Option<Py<PyAny>>, Option<Py<PyTuple>>);

/// A callback's positional arguments as a handle keeps them: one argument as itself, any
/// other number as a tuple. One argument is the shape of every Future done callback
/// (`cb(fut)`): kept bare, it needs no tuple made and freed per handle, and runs by
/// vectorcall. `_args` turns it into the tuple on first access and keeps that, so it reads as
/// asyncio's `_args` does (the same tuple each time).
pub(crate) struct CallArgs {
    obj: Py<PyAny>,
    one: bool,
}

impl CallArgs {
    /// The arguments as the tuple `args`.
    pub(crate) fn tuple(args: &Bound<'_, PyTuple>) -> Self {
        Self { obj: args.clone().into_any().unbind(), one: false }
    }

    /// No arguments (the empty tuple). The tuple is asked for once and kept: `PyTuple_New(0)`
    /// returns the interpreter's one empty tuple anyway, at the cost of a call per handle.
    #[inline]
    pub(crate) fn empty(py: Python<'_>) -> Self {
        static EMPTY: std::sync::atomic::AtomicPtr<pyo3::ffi::PyObject> =
            std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
        let mut p = EMPTY.load(Ordering::Relaxed);
        if p.is_null() {
            // Kept for the life of the process (the reference is never released); with the GIL
            // held two threads cannot both get here at once.
            p = PyTuple::empty(py).into_ptr();
            EMPTY.store(p, Ordering::Relaxed);
        }
        // SAFETY: `p` is a live tuple (the reference kept above keeps it alive); we take a new
        // reference for the handle.
        Self { obj: unsafe { Bound::from_borrowed_ptr(py, p) }.unbind(), one: false }
    }

    /// The single argument `arg`.
    pub(crate) fn one(arg: Py<PyAny>) -> Self {
        Self { obj: arg, one: true }
    }

    /// The owned reference (the tuple, or the single argument).
    pub(crate) fn as_ptr(&self) -> *mut pyo3::ffi::PyObject {
        self.obj.as_ptr()
    }

    /// A `Bound` copy (one more reference, released by a plain `Py_DECREF`: dropping a
    /// `Py` would consult PyO3's thread-local attachment count, see docs/DESIGN.md).
    #[inline(always)]
    fn bind<'py>(&self, py: Python<'py>) -> BoundArgs<'py> {
        BoundArgs { obj: self.obj.bind(py).clone(), one: self.one }
    }

    /// As a tuple (a new one-item tuple for a single argument).
    fn to_tuple<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        self.bind(py).to_tuple()
    }
}

/// `CallArgs` for the length of one call (`run_handle`).
struct BoundArgs<'py> {
    obj: Bound<'py, PyAny>,
    one: bool,
}

impl<'py> BoundArgs<'py> {
    /// As a tuple (a new one-item tuple for a single argument).
    fn to_tuple(&self) -> PyResult<Bound<'py, PyTuple>> {
        if self.one {
            PyTuple::new(self.obj.py(), [&self.obj])
        } else {
            // SAFETY: `one` is false only for a tuple (`CallArgs::tuple`, `CallArgs::empty`).
            Ok(unsafe { self.obj.clone().cast_into_unchecked::<PyTuple>() })
        }
    }

    /// `cb(*args)`: by vectorcall for a single argument.
    #[inline(always)]
    fn call(&self, cb: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        if self.one {
            return cb.call1((&self.obj,));
        }
        // SAFETY: as in `to_tuple`.
        let args = unsafe { self.obj.cast_unchecked::<PyTuple>() };
        if args.is_empty() {
            py::call_no_args(cb, args)
        } else {
            cb.call1(args)
        }
    }
}

pub(crate) use freelist::trim_handles as trim_handle_freelist;
pub(crate) use raw::enabled as fast_paths;

/// A new `Handle` object for `callback(*args)` on `loop_`: in `context`, or in a copy of the
/// current one; with a source traceback in debug mode.
#[inline]
pub(crate) fn new_handle_object(
    py: Python<'_>,
    callback: &Bound<'_, PyAny>,
    args: CallArgs,
    loop_: &Bound<'_, PyAny>,
    context: Option<Bound<'_, PyAny>>,
    debug: bool,
) -> PyResult<Py<Handle>> {
    let (context, source_traceback) = Handle::context_and_traceback(py, context.map(Bound::unbind), debug)?;
    raw::create(py, || {
        Handle::build(callback.clone().unbind(), args, loop_.clone().unbind(), context, source_traceback)
    })
}

/// Where a new handle's context comes from.
pub(crate) enum HandleContext {
    /// `context=` as given.
    Given(Py<PyAny>),
    /// A copy of the caller's current context, made now.
    Copy(Py<PyAny>),
    /// The caller's context variables; the copy is made when needed (`py::context`).
    Deferred(Py<PyAny>),
}

#[pyclass(frozen, subclass, weakref, module = "ferroloop._ferroloop")]
pub struct Handle {
    /// `(callback, args)`, taken out on cancel. One cell, so running costs one borrow.
    call: GilCell<Option<(Py<PyAny>, CallArgs)>>,
    /// The `Context` to run in; while `lazy`, the context variables that its copy will have
    /// (`py::context`: the copy is made when first needed).
    context: GilCell<Py<PyAny>>,
    /// The context is a copy made for this handle (no `context=` given), seen by no one else
    /// until handed out.
    own_context: bool,
    /// `context` holds variables, not yet a `Context`.
    lazy: AtomicBool,
    /// The context copy is off the GC's lists (`park`).
    parked: AtomicBool,
    /// The handle itself is off the GC's lists (`park`).
    untracked: AtomicBool,
    loop_: Py<PyAny>,
    cancelled: AtomicBool,
    source_traceback: Option<Py<PyAny>>,
    repr_cache: GilCell<Option<Py<PyString>>>,
}

impl Handle {
    pub(crate) fn new(
        py: Python<'_>,
        callback: Py<PyAny>,
        args: CallArgs,
        loop_: Py<PyAny>,
        context: Option<Py<PyAny>>,
        debug: bool,
    ) -> PyResult<Self> {
        let (context, source_traceback) = Self::context_and_traceback(py, context, debug)?;
        Ok(Self::build(callback, args, loop_, context, source_traceback))
    }

    /// The handle's context (`context`, or a copy of the current one, then its own: deferred
    /// when `py::context` can), and its source traceback in debug mode.
    #[inline(always)]
    fn context_and_traceback(
        py: Python<'_>,
        context: Option<Py<PyAny>>,
        debug: bool,
    ) -> PyResult<(HandleContext, Option<Py<PyAny>>)> {
        let context = match context {
            Some(c) => HandleContext::Given(c),
            None => match py::context::snapshot(py) {
                Some(vars) => HandleContext::Deferred(vars),
                None => HandleContext::Copy(py::copy_context(py)?),
            },
        };
        let source_traceback = if debug { py::source_traceback(py)? } else { None };
        Ok((context, source_traceback))
    }

    /// The fields of a new handle, built where the object is written (`raw::create` is
    /// inlined here): building a `Handle` first and passing it on moved it twice.
    #[inline(always)]
    fn build(
        callback: Py<PyAny>,
        args: CallArgs,
        loop_: Py<PyAny>,
        context: HandleContext,
        source_traceback: Option<Py<PyAny>>,
    ) -> Self {
        let (context, own_context, lazy) = match context {
            HandleContext::Given(c) => (c, false, false),
            HandleContext::Copy(c) => (c, true, false),
            HandleContext::Deferred(v) => (v, true, true),
        };
        Self {
            call: GilCell::new(Some((callback, args))),
            context: GilCell::new(context),
            own_context,
            lazy: AtomicBool::new(lazy),
            parked: AtomicBool::new(false),
            untracked: AtomicBool::new(false),
            loop_,
            cancelled: AtomicBool::new(false),
            source_traceback,
            repr_cache: GilCell::new(None),
        }
    }

    /// While a new handle waits in a long ready queue of a running loop, it and its private
    /// context copy are taken off the GC's lists: a queue of thousands of handles (a thread
    /// feeding `call_soon_threadsafe`, a burst of `call_soon`) otherwise makes every
    /// collection walk them all, and promotes them to older generations whose collections
    /// walk them again. `unpark` puts both back before the handle runs or leaves the queue,
    /// and the loop unparks its whole queue when `run_forever` returns.
    ///
    /// Why no garbage is missed: a parked handle is held by the ready queue of a loop that is
    /// running, and a running loop is referenced from its thread's running-loop slot, so the
    /// handle and everything it refers to are alive; an untracked object only hides edges
    /// from the GC, which can keep objects alive longer, never free them early. The context
    /// copy is seen by no one else until it is handed out (`get_context`), which unparks it.
    pub(crate) fn park(slf: &Bound<'_, Self>) {
        let h = slf.get();
        // Plain loads and stores, not `swap` (a locked `xchg`): the GIL serialises every
        // access to these flags.
        if h.own_context && !h.lazy.load(Ordering::Relaxed) && !h.parked.load(Ordering::Relaxed) {
            h.parked.store(true, Ordering::Relaxed);
            // SAFETY: a context copy made for this handle by PyContext_CopyCurrent (a new,
            // GC-tracked object) that nothing else refers to until it is handed out, which
            // unparks it first. (A deferred handle's variables are shared: never parked.)
            unsafe { pyo3::ffi::PyObject_GC_UnTrack(h.context_ptr().cast()) }
        }
        if !h.untracked.load(Ordering::Relaxed) {
            h.untracked.store(true, Ordering::Relaxed);
            // SAFETY: a live handle (we hold a reference), tracked since its allocation; only
            // `park` untracks it, once (the flag), and `unpark` tracks it again.
            unsafe { pyo3::ffi::PyObject_GC_UnTrack(slf.as_ptr().cast()) }
        }
    }

    /// Undo `park`.
    #[inline]
    pub(crate) fn unpark(slf: &Bound<'_, Self>) {
        let h = slf.get();
        h.unpark_context();
        if h.untracked.load(Ordering::Relaxed) {
            h.untracked.store(false, Ordering::Relaxed);
            // SAFETY: untracked by `park` (the flag says so) and alive (we hold a reference);
            // tracking it again is what its allocation did.
            unsafe { pyo3::ffi::PyObject_GC_Track(slf.as_ptr().cast()) }
        }
    }

    /// After a popped handle ran (or was skipped), before the caller drops it: if anyone else
    /// holds it now, put it back on the GC's lists (it may be part of a cycle from here on).
    /// Held by the caller alone, it is freed by that drop and never needs the lists: this
    /// saves a track and an untrack per parked handle (each touching two neighbours' GC
    /// links). Its `tp_dealloc` untracks only what is tracked.
    #[inline]
    pub(crate) fn settle(slf: &Bound<'_, Self>) {
        // SAFETY: `slf` is a live object (the caller holds a reference) and the GIL is held.
        if slf.get().untracked.load(Ordering::Relaxed) && unsafe { pyo3::ffi::Py_REFCNT(slf.as_ptr()) } > 1 {
            Self::unpark(slf);
        }
    }

    /// Put the context copy back on the GC's lists: before it is handed out, and before a
    /// popped handle runs (it is entered for the call, and must be tracked when it is freed:
    /// `context_tp_dealloc` untracks without checking). A running handle itself stays off
    /// them: it is alive (the caller holds it) and `settle` decides afterwards.
    #[inline]
    pub(crate) fn unpark_context(&self) {
        if self.parked.load(Ordering::Relaxed) {
            self.parked.store(false, Ordering::Relaxed);
            // SAFETY: the context was untracked by `park` and is still alive (this handle
            // owns it); tracking it again is what its allocation did.
            unsafe { pyo3::ffi::PyObject_GC_Track(self.context_ptr().cast()) }
        }
    }

    /// The `context` field's object (a `Context`, or a deferred handle's variables), borrowed.
    #[inline(always)]
    fn context_ptr(&self) -> *mut pyo3::ffi::PyObject {
        // SAFETY: the GIL is held by every caller (a handle is only reached from Python or the
        // loop); reading the pointer moves no reference, and the field is only replaced by
        // `context`, which holds no borrow across Python code.
        unsafe { (*self.context.as_ptr()).as_ptr() }
    }

    /// The `Context` to run in (borrowed: valid while the handle is alive), made now if it was
    /// deferred. The caller has unparked it (`run_ready`, `_run`).
    #[inline(always)]
    fn run_context(&self, py: Python<'_>) -> PyResult<*mut pyo3::ffi::PyObject> {
        if self.lazy.load(Ordering::Relaxed) {
            self.materialize(py)
        } else {
            Ok(self.context_ptr())
        }
    }

    /// Make a deferred handle's `Context` from the recorded variables, and keep it.
    #[inline(never)]
    fn materialize(&self, py: Python<'_>) -> PyResult<*mut pyo3::ffi::PyObject> {
        let ctx = py::context::context_for(py, &self.context.borrow(py))?;
        let vars = std::mem::replace(&mut *self.context.borrow_mut(py), ctx);
        self.lazy.store(false, Ordering::Relaxed);
        // Released with no borrow held (a plain decref, see `CallArgs::bind`).
        drop(vars.into_bound(py));
        Ok(self.context_ptr())
    }

    /// Whether a dying handle's `Context` goes back to `py::context` as the spare: one made
    /// for it there (its own, not deferred any more, on the GC's lists).
    pub(crate) fn gives_context_back(&mut self) -> bool {
        self.own_context && !*self.lazy.get_mut() && !*self.parked.get_mut() && py::context::enabled()
    }

    /// `get_context()`: the `Context`, handed out.
    fn context_object(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.unpark_context();
        let ctx = self.run_context(py)?;
        // SAFETY: a live object the handle holds (`context`); we take our own reference.
        Ok(unsafe { Bound::from_borrowed_ptr(py, ctx) }.unbind())
    }

    /// The fields of a copy (`__copy__`): the context shared, so neither owns it.
    fn copy_value(&self, py: Python<'_>) -> PyResult<Self> {
        let context = self.context_object(py)?;
        let (cb, args) = self.callback_and_args(py)?;
        let call = match (cb, args) {
            (Some(cb), Some(args)) => Some((cb, CallArgs::tuple(args.bind(py)))),
            _ => None,
        };
        Ok(Self {
            call: GilCell::new(call),
            context: GilCell::new(context),
            own_context: false,
            lazy: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            untracked: AtomicBool::new(false),
            loop_: self.loop_.clone_ref(py),
            cancelled: AtomicBool::new(self.is_cancelled()),
            source_traceback: self.source_traceback.as_ref().map(|t| t.clone_ref(py)),
            repr_cache: GilCell::new(self.repr_cache.borrow(py).as_ref().map(|r| r.clone_ref(py))),
        })
    }

    #[inline]
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    pub(crate) fn do_cancel(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let h = slf.get();
        if h.cancelled.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Under the GIL: a load and a store, no locked `swap` needed.
        h.cancelled.store(true, Ordering::Relaxed);
        // Like asyncio: in debug mode the repr is kept, since the callback is about to go.
        if loop_debug(py, &h.loop_) {
            let r = Self::build_repr(slf)?;
            *h.repr_cache.borrow_mut(py) = Some(r);
        }
        let call = h.call.borrow_mut(py).take();
        drop(call);
        Ok(())
    }

    /// The callback and its arguments as a tuple. A single argument becomes that tuple here,
    /// kept from then on (see `CallArgs`). The tuple is made with no borrow held: an
    /// allocation can run the GC, and its callbacks Python code that reads `_args`.
    fn callback_and_args(&self, py: Python<'_>) -> PyResult<CallbackAndArgs> {
        let (c, a) = match self.call.borrow(py).as_ref() {
            Some((c, a)) => (c.clone_ref(py), a.bind(py)),
            None => return Ok((None, None)),
        };
        let mut t = a.to_tuple()?;
        if a.one {
            let mut call = self.call.borrow_mut(py);
            if let Some((_, cur)) = call.as_mut() {
                if cur.one {
                    *cur = CallArgs::tuple(&t);
                } else {
                    // Kept by a read that ran meanwhile: hand out that one.
                    t = cur.to_tuple(py)?;
                }
            }
        }
        Ok((Some(c), Some(t.unbind())))
    }

    fn repr_info(slf: &Bound<'_, Self>) -> PyResult<Vec<String>> {
        let py = slf.py();
        let h = slf.get();
        let mut info = vec![slf.get_type().name()?.to_string()];
        if h.is_cancelled() {
            info.push("cancelled".to_owned());
        }
        let (cb, args) = h.callback_and_args(py)?;
        if let Some(cb) = cb {
            let c = py::cached(py)?;
            let f = c.format_callback_source.bind(py);
            let s = if c.debug_format_takes_flag {
                let debug = loop_debug(py, &h.loop_);
                let kw = pyo3::types::PyDict::new(py);
                kw.set_item("debug", debug)?;
                f.call((cb, args), Some(&kw))?
            } else {
                f.call1((cb, args))?
            };
            info.push(s.extract::<String>()?);
        }
        if let Some(tb) = &h.source_traceback {
            let tb = tb.bind(py);
            if tb.len()? > 0 {
                let frame = tb.get_item(-1)?;
                info.push(format!("created at {}:{}", frame.get_item(0)?.str()?, frame.get_item(1)?.str()?));
            }
        }
        Ok(info)
    }

    fn build_repr(slf: &Bound<'_, Self>) -> PyResult<Py<PyString>> {
        let mut info = Self::repr_info(slf)?;
        if let Ok(th) = slf.cast::<TimerHandle>() {
            let pos = if slf.get().is_cancelled() { 2 } else { 1 };
            let when = th.get().when_value(slf.py()).bind(slf.py()).str()?.to_string();
            info.insert(pos.min(info.len()), format!("when={when}"));
        }
        Ok(PyString::new(slf.py(), &format!("<{}>", info.join(" "))).unbind())
    }
}

/// A handle freed by PyO3's `tp_dealloc` (a `TimerHandle`; any handle when the fast paths are
/// off) gives its own `Context` back as `raw::release` does. The field keeps `None` in its
/// place, released with the rest of the value.
impl Drop for Handle {
    fn drop(&mut self) {
        if self.gives_context_back() {
            // SAFETY: PyO3 drops a class's value in its `tp_dealloc`, with the GIL held.
            let py = unsafe { Python::assume_attached() };
            let ctx = std::mem::replace(self.context.get_mut(), py.None());
            // SAFETY: the handle's own Context (made by `py::context` for it) and its reference.
            unsafe { py::context::give_back(py, ctx.into_ptr()) }
        }
    }
}

/// Run a handle's callback in its context, then `after` (the loop sends the callback's held
/// writes there: what follows from them sees the callback's context, as with asyncio's
/// `write()`), also when the callback raised. Errors other than
/// `KeyboardInterrupt`/`SystemExit` go to the loop's exception handler, as the callback's;
/// those two are returned for the loop to re-raise. The caller has unparked its context.
pub(crate) fn run_handle(
    py: Python<'_>,
    handle: &Bound<'_, Handle>,
    after: &impl Fn() -> PyResult<()>,
) -> PyResult<()> {
    let h = handle.get();
    // Cloned out, not borrowed across the call: the callback may cancel its own handle.
    let (cb, args) = match h.call.borrow(py).as_ref() {
        Some((c, a)) => (c.bind(py).clone(), a.bind(py)),
        None => return Ok(()),
    };
    let ctx = h.run_context(py)?;
    let call = || match args.call(&cb) {
        Ok(_) => after(),
        Err(err) => Err(after_failed_callback(py, err, after)),
    };
    // SAFETY: `ctx` is the handle's context object, alive while the caller holds the handle;
    // the field is never replaced once it holds it. Entering anything but a `Context` fails
    // without running the callback (`callback_failed` sees to that case).
    match unsafe { py::in_context_ptr(py, ctx, call) } {
        Ok(()) => Ok(()),
        Err(err) => callback_failed(py, handle, ctx, &cb, &args, err, after),
    }
}

/// The callback raised `err`: `after` still runs; the callback's error is the one returned,
/// unless `after`'s is `KeyboardInterrupt`/`SystemExit` and the callback's is not.
#[cold]
#[inline(never)]
fn after_failed_callback(py: Python<'_>, err: PyErr, after: &dyn Fn() -> PyResult<()>) -> PyErr {
    match after() {
        Err(e) if py::is_fatal(py, &e) && !py::is_fatal(py, &err) => e,
        _ => err,
    }
}

/// `run_handle`'s error path, out of line. A `context=` that is not a `contextvars.Context`
/// could not be entered: asyncio's `Handle._run` calls `context.run(callback, *args)`
/// whatever the context is, so a duck-typed one runs the callback there, and one without
/// `run` fails with `AttributeError`, for the exception handler. Such a context was never
/// entered, so `after` runs here, after `run`.
#[cold]
#[inline(never)]
fn callback_failed<'py>(
    py: Python<'py>,
    handle: &Bound<'py, Handle>,
    ctx: *mut pyo3::ffi::PyObject,
    cb: &Bound<'py, PyAny>,
    args: &BoundArgs<'py>,
    err: PyErr,
    after: &dyn Fn() -> PyResult<()>,
) -> PyResult<()> {
    // SAFETY: `ctx` is alive (the caller's handle holds it) and the GIL is held.
    let err = if unsafe { pyo3::ffi::PyContext_CheckExact(ctx) } == 0 {
        // SAFETY: as above; we take our own reference.
        let ctx = unsafe { Bound::from_borrowed_ptr(py, ctx) };
        let duck_run = || -> PyResult<()> {
            let mut all = vec![cb.clone()];
            all.extend(args.to_tuple()?.iter());
            ctx.getattr(intern!(py, "run"))?.call1(PyTuple::new(py, all)?)?;
            Ok(())
        };
        let r = match duck_run() {
            Ok(()) => after(),
            Err(e) => Err(after_failed_callback(py, e, after)),
        };
        match r {
            Ok(()) => return Ok(()),
            Err(e) => e,
        }
    } else {
        err
    };
    if py::is_fatal(py, &err) {
        return Err(err);
    }
    report_callback_error(py, handle, cb, &args.to_tuple()?, err)
}

fn report_callback_error(
    py: Python<'_>,
    handle: &Bound<'_, Handle>,
    cb: &Bound<'_, PyAny>,
    args: &Bound<'_, PyTuple>,
    err: PyErr,
) -> PyResult<()> {
    let loop_ = handle.get().loop_.bind(py);
    let exc = err.into_value(py).into_bound(py);
    let report = || loop_.call_method1(intern!(py, "_report_callback_error"), (handle, cb, args, &exc));
    match py::while_handling(&exc, report) {
        Ok(_) => Ok(()),
        Err(e) if py::is_fatal(py, &e) => Err(e),
        Err(e) => {
            e.write_unraisable(py, Some(loop_));
            Ok(())
        }
    }
}

#[pymethods]
impl Handle {
    fn cancel(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::do_cancel(slf)
    }

    fn cancelled(&self) -> bool {
        self.is_cancelled()
    }

    fn get_context(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.context_object(py)
    }

    fn _run(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        slf.get().unpark_context();
        // The writes it holds are sent in its context, as when the loop runs it.
        match slf.get().loop_.bind(py).cast::<LoopCore>() {
            Ok(core) => run_handle(py, slf, &|| crate::event_loop::send_corked_if_any(core)),
            Err(_) => run_handle(py, slf, &|| Ok(())),
        }
    }

    /// asyncio's class, so `isinstance(handle, asyncio.Handle)` holds as it does for
    /// asyncio's loop (`isinstance` consults `__class__`); `type(handle)` stays this class.
    #[getter(__class__)]
    fn class_attr(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let c = py::cached(py)?;
        Ok(if slf.is_instance_of::<TimerHandle>() { &c.asyncio_timer_handle } else { &c.asyncio_handle }.clone_ref(py))
    }

    #[getter]
    fn _callback(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.call.borrow(py).as_ref().map(|(c, _)| c.clone_ref(py))
    }

    #[getter]
    fn _args(&self, py: Python<'_>) -> PyResult<Option<Py<PyTuple>>> {
        Ok(self.callback_and_args(py)?.1)
    }

    #[getter]
    fn _cancelled(&self) -> bool {
        self.is_cancelled()
    }

    /// asyncio's `_cancelled` is a plain attribute: set to true, the loop skips the handle
    /// (and `cancel()` does nothing more), as `_run_once` does; the callback is kept.
    #[setter(_cancelled)]
    fn set_cancelled_attr(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.cancelled.store(value.is_truthy()?, Ordering::Relaxed);
        Ok(())
    }

    /// `copy.copy(handle)`, as asyncio's (slots copied): a new handle, in no queue, with the
    /// same callback, arguments tuple, context, loop, state and source traceback.
    fn __copy__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let h = slf.get();
        let value = h.copy_value(py)?;
        if let Ok(th) = slf.cast::<TimerHandle>() {
            let t = th.get();
            let timer = TimerHandle {
                when: t.when,
                when_obj: t.when_obj.as_ref().map(|w| w.clone_ref(py)),
                scheduled: AtomicBool::new(t.is_scheduled()),
            };
            let init = PyClassInitializer::from(value).add_subclass(timer);
            return Ok(Py::new(py, init)?.into_any());
        }
        Ok(raw::create(py, || value)?.into_any())
    }

    #[getter]
    fn _loop(&self, py: Python<'_>) -> Py<PyAny> {
        self.loop_.clone_ref(py)
    }

    #[getter]
    fn _context(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.context_object(py)
    }

    #[getter]
    fn _source_traceback(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.source_traceback.as_ref().map(|t| t.clone_ref(py))
    }

    #[getter]
    fn _repr(&self, py: Python<'_>) -> Option<Py<PyString>> {
        self.repr_cache.borrow(py).as_ref().map(|r| r.clone_ref(py))
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<Py<PyString>> {
        if let Some(r) = slf.get().repr_cache.borrow(slf.py()).as_ref() {
            return Ok(r.clone_ref(slf.py()));
        }
        Self::build_repr(slf)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(call) = self.call.try_borrow_unguarded() {
            if let Some((cb, args)) = call.as_ref() {
                visit.call(cb)?;
                visit.call(&args.obj)?;
            }
        }
        if let Some(ctx) = self.context.try_borrow_unguarded() {
            visit.call(&*ctx)?;
        }
        visit.call(&self.loop_)?;
        visit.call(&self.source_traceback)?;
        Ok(())
    }

    fn __clear__(&self) {
        Python::attach(|py| {
            let call = self.call.borrow_mut(py).take();
            drop(call);
        });
    }
}

#[pyclass(frozen, subclass, extends = Handle, module = "ferroloop._ferroloop")]
pub struct TimerHandle {
    /// The deadline, for ordering.
    pub(crate) when: f64,
    /// The deadline as `call_at` was given it (asyncio keeps an int an int), if not a float.
    when_obj: Option<Py<PyAny>>,
    scheduled: AtomicBool,
}

impl TimerHandle {
    pub(crate) fn new(when: f64, when_obj: Option<&Bound<'_, PyAny>>) -> Self {
        let when_obj = when_obj.filter(|w| !w.is_exact_instance_of::<PyFloat>()).map(|w| w.clone().unbind());
        Self { when, when_obj, scheduled: AtomicBool::new(false) }
    }

    fn when_value(&self, py: Python<'_>) -> Py<PyAny> {
        match &self.when_obj {
            Some(w) => w.clone_ref(py),
            None => PyFloat::new(py, self.when).into_any().unbind(),
        }
    }

    pub(crate) fn is_scheduled(&self) -> bool {
        self.scheduled.load(Ordering::Relaxed)
    }

    pub(crate) fn set_scheduled(&self, v: bool) {
        self.scheduled.store(v, Ordering::Relaxed);
    }
}

#[pymethods]
impl TimerHandle {
    fn when(&self, py: Python<'_>) -> Py<PyAny> {
        self.when_value(py)
    }

    fn cancel(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let base = slf.as_super();
        if !base.get().is_cancelled() && slf.get().scheduled.load(Ordering::Relaxed) {
            if let Ok(core) = base.get().loop_.bind(py).cast::<LoopCore>() {
                core.get().timer_handle_cancelled(py);
            }
        }
        Handle::do_cancel(base)
    }

    #[getter]
    fn _when(&self, py: Python<'_>) -> Py<PyAny> {
        self.when_value(py)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.when_obj)
    }

    #[getter]
    fn _scheduled(&self) -> bool {
        self.scheduled.load(Ordering::Relaxed)
    }

    fn __hash__(slf: &Bound<'_, Self>) -> PyResult<isize> {
        let py = slf.py();
        let this = slf.get();
        if this.when_obj.is_none() && this.when.is_nan() {
            // asyncio hashes its one NaN object, by identity (3.10+); a new float per call
            // would give a new hash each time. The handle's identity is as stable.
            let h = (slf.as_ptr() as usize).rotate_right(4) as isize;
            return Ok(if h == -1 { -2 } else { h });
        }
        this.when_value(py).bind(py).hash()
    }

    fn __richcmp__(slf: &Bound<'_, Self>, other: &Bound<'_, PyAny>, op: CompareOp) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let Ok(other) = other.cast::<TimerHandle>() else {
            return Ok(py.NotImplemented());
        };
        let (a, b) = (slf.get().when, other.get().when);
        let r = match op {
            CompareOp::Lt => a < b,
            CompareOp::Le => a < b || slf.eq(other)?,
            CompareOp::Gt => a > b,
            CompareOp::Ge => a > b || slf.eq(other)?,
            CompareOp::Eq => timer_eq(slf, other)?,
            CompareOp::Ne => !timer_eq(slf, other)?,
        };
        Ok(pyo3::types::PyBool::new(py, r).to_owned().into_any().unbind())
    }
}

/// asyncio's `TimerHandle.__eq__`, with no identity shortcut: a handle whose `when()` is NaN is
/// not equal to itself there either.
fn timer_eq(a: &Bound<'_, TimerHandle>, b: &Bound<'_, TimerHandle>) -> PyResult<bool> {
    let py = a.py();
    let (ha, hb) = (a.as_super().get(), b.as_super().get());
    if a.get().when != b.get().when || ha.is_cancelled() != hb.is_cancelled() {
        return Ok(false);
    }
    Ok(opt_eq(py, &ha._callback(py), &hb._callback(py))? && opt_eq(py, &ha._args(py)?, &hb._args(py)?)?)
}

fn opt_eq<T>(py: Python<'_>, a: &Option<Py<T>>, b: &Option<Py<T>>) -> PyResult<bool> {
    match (a, b) {
        (None, None) => Ok(true),
        (Some(a), Some(b)) => a.bind(py).as_any().eq(b.bind(py).as_any()),
        _ => Ok(false),
    }
}

/// `Handle`'s `tp_traverse`, hand-written: the GC visits every handle in the ready queue on
/// each collection, and PyO3's generated one walks the MRO, sets up a panic trap and checks a
/// thread-local per call. Same edges as `__traverse__` (which stays for `TimerHandle`'s
/// generated traverse to find this one through `tp_base`), plus the instance's type, which
/// the first heap type above `object` must visit.
unsafe extern "C" fn handle_traverse(
    obj: *mut pyo3::ffi::PyObject,
    visit: pyo3::ffi::visitproc,
    arg: *mut std::ffi::c_void,
) -> std::ffi::c_int {
    // SAFETY: the GC calls tp_traverse with the GIL held, on a live object whose type is
    // Handle or a subclass (the slot is Handle's), so its contents are a `Handle`; `get` on a
    // frozen class reads them without touching reference counts.
    let h: &Handle =
        unsafe { pyo3::Borrowed::from_ptr(Python::assume_attached(), obj).cast_unchecked::<Handle>() }.get();
    let mut edges: [*mut pyo3::ffi::PyObject; 6] = [std::ptr::null_mut(); 6];
    // SAFETY: as above; the type of a live object is a live type object.
    edges[0] = unsafe { pyo3::ffi::Py_TYPE(obj) }.cast();
    if let Some(call) = h.call.try_borrow_unguarded() {
        if let Some((cb, args)) = call.as_ref() {
            edges[1] = cb.as_ptr();
            edges[2] = args.as_ptr();
        }
    }
    edges[3] = h.context_ptr();
    edges[4] = h.loop_.as_ptr();
    edges[5] = h.source_traceback.as_ref().map_or(std::ptr::null_mut(), |t| t.as_ptr());
    for e in edges {
        if !e.is_null() {
            // SAFETY: `visit` and `arg` come from the GC for this traversal; `e` is a live
            // object this handle holds a reference to.
            let r = unsafe { visit(e, arg) };
            if r != 0 {
                return r;
            }
        }
    }
    0
}

/// Install the handles' hand-written slots: allocation from the freelists, `tp_traverse`, and
/// `Handle`'s construction and `tp_dealloc` (once, at module initialisation, before any
/// handle exists).
pub(crate) fn install(py: Python<'_>) -> PyResult<()> {
    freelist::install(py);
    let tp = <Handle as pyo3::PyTypeInfo>::type_object_raw(py);
    // SAFETY: Handle's heap type, alive for the process and with no instances yet; a slot
    // written before any instance exists is seen by every traversal. PyType_Modified drops
    // cached lookups.
    unsafe {
        (*tp).tp_traverse = Some(handle_traverse);
        pyo3::ffi::PyType_Modified(tp);
    }
    raw::install(py)
}

/// The loop's debug flag, read directly when it is ours.
fn loop_debug(py: Python<'_>, loop_: &Py<PyAny>) -> bool {
    match loop_.bind(py).cast::<LoopCore>() {
        Ok(core) => core.get().debug(py),
        Err(_) => loop_.bind(py).call_method0(intern!(py, "get_debug")).and_then(|d| d.is_truthy()).unwrap_or(false),
    }
}
