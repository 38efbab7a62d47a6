//! Python glue: the GIL-guarded cell, cached imports, running a callback inside its
//! `contextvars.Context`, and asyncio's callback checks.

use std::cell::{Ref, RefCell, RefMut};

use pyo3::exceptions::{PyBaseException, PyKeyboardInterrupt, PyOSError, PySystemExit, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyTuple;

pub mod context;

/// Interior mutability for frozen pyclasses, guarded by the GIL.
///
/// Every access takes a `Python<'_>` token, so the caller is attached to the interpreter; on a
/// GIL build that serializes all threads that can reach the cell. The inner `RefCell` still
/// catches re-entrant misuse (holding a borrow across a call into Python) as a bug.
pub struct GilCell<T>(RefCell<T>);

// SAFETY: all access goes through `borrow`/`borrow_mut`, which require a `Python<'_>` token, i.e.
// the GIL is held; two threads can therefore never touch the RefCell at once. (A free-threaded
// build would need a real lock here; see docs/DESIGN.md.)
unsafe impl<T: Send> Sync for GilCell<T> {}

impl<T> GilCell<T> {
    pub const fn new(v: T) -> Self {
        Self(RefCell::new(v))
    }

    /// The value's address, with no borrow taken: for reading a `Py`'s pointer under the GIL.
    #[inline(always)]
    pub fn as_ptr(&self) -> *mut T {
        self.0.as_ptr()
    }

    /// Through exclusive access no borrow can be outstanding: no check needed.
    #[inline]
    pub fn get_mut(&mut self) -> &mut T {
        self.0.get_mut()
    }

    #[inline]
    pub fn borrow<'a>(&'a self, _py: Python<'_>) -> Ref<'a, T> {
        self.0.borrow()
    }

    #[inline]
    pub fn borrow_mut<'a>(&'a self, _py: Python<'_>) -> RefMut<'a, T> {
        self.0.borrow_mut()
    }

    /// For `__traverse__`, which runs with the GIL held but without a token: skips (returns
    /// None) when the value is mutably borrowed, which only hides edges from the collector.
    pub fn try_borrow_unguarded(&self) -> Option<Ref<'_, T>> {
        self.0.try_borrow().ok()
    }
}

/// Imports used on rare paths, fetched once per process.
pub struct Cached {
    pub iscoroutine: Py<PyAny>,
    pub iscoroutinefunction: Py<PyAny>,
    pub format_callback_source: Py<PyAny>,
    pub extract_stack: Py<PyAny>,
    pub getframe: Py<PyAny>,
    pub debug_format_takes_flag: bool,
    /// `asyncio.Handle` / `asyncio.TimerHandle`: what our handles report as `__class__`.
    pub asyncio_handle: Py<PyAny>,
    pub asyncio_timer_handle: Py<PyAny>,
    /// `socket.socket`: exactly this type gets direct syscalls in `sock_*`.
    pub socket_type: Py<PyAny>,
    /// `asyncio.base_events._check_ssl_socket`.
    pub check_ssl_socket: Py<PyAny>,
    /// `asyncio.tasks` / `asyncio.futures`: `Task` and `Future` are looked up per call, as
    /// asyncio's `create_task`/`create_future` do.
    pub tasks_module: Py<PyAny>,
    pub futures_module: Py<PyAny>,
}

static CACHED: PyOnceLock<Cached> = PyOnceLock::new();

pub fn cached(py: Python<'_>) -> PyResult<&Cached> {
    CACHED.get_or_try_init(py, || {
        let coroutines = py.import("asyncio.coroutines")?;
        // 3.12 renamed the asyncio-aware check to a private name; the public one became
        // inspect's. The private one is what the loop itself uses.
        let iscorofunc = match coroutines.getattr("_iscoroutinefunction") {
            Ok(f) => f,
            Err(_) => coroutines.getattr("iscoroutinefunction")?,
        };
        let fh = py.import("asyncio.format_helpers")?;
        let format_cb = fh.getattr("_format_callback_source")?;
        // `debug=` arrived in a patch release (absent in 3.12.1): ask the function itself.
        let takes_debug = format_cb.getattr("__code__")?.getattr("co_varnames")?.contains("debug")?;
        Ok(Cached {
            iscoroutine: coroutines.getattr("iscoroutine")?.unbind(),
            iscoroutinefunction: iscorofunc.unbind(),
            format_callback_source: format_cb.unbind(),
            extract_stack: fh.getattr("extract_stack")?.unbind(),
            getframe: py.import("sys")?.getattr("_getframe")?.unbind(),
            debug_format_takes_flag: takes_debug,
            asyncio_handle: py.import("asyncio.events")?.getattr("Handle")?.unbind(),
            asyncio_timer_handle: py.import("asyncio.events")?.getattr("TimerHandle")?.unbind(),
            socket_type: py.import("socket")?.getattr("socket")?.unbind(),
            check_ssl_socket: py.import("asyncio.base_events")?.getattr("_check_ssl_socket")?.unbind(),
            tasks_module: py.import("asyncio.tasks")?.into_any().unbind(),
            futures_module: py.import("asyncio.futures")?.into_any().unbind(),
        })
    })
}

/// asyncio's own "is this a coroutine or a coroutine function?" (debug mode only, so speed
/// does not matter and exactness does).
fn is_coroutine_like(py: Python<'_>, cb: &Bound<'_, PyAny>) -> PyResult<bool> {
    let c = cached(py)?;
    Ok(c.iscoroutine.bind(py).call1((cb,))?.is_truthy()? || c.iscoroutinefunction.bind(py).call1((cb,))?.is_truthy()?)
}

/// asyncio's `BaseEventLoop._check_callback`: same checks, same messages. Like asyncio, the
/// loop runs it only in debug mode.
pub fn check_callback(py: Python<'_>, cb: &Bound<'_, PyAny>, method: &str) -> PyResult<()> {
    if is_coroutine_like(py, cb)? {
        return Err(PyTypeError::new_err(format!("coroutines cannot be used with {method}()")));
    }
    if !cb.is_callable() {
        return Err(PyTypeError::new_err(format!("a callable object was expected by {method}(), got {}", cb.repr()?)));
    }
    Ok(())
}

/// `obj.name(*args)` without a bound-method object or an argument tuple
/// (`PyObject_VectorcallMethod`); the method is looked up on every call, as Python does.
pub fn call_method_fast<'py>(
    obj: &Bound<'py, PyAny>,
    name: &Bound<'py, pyo3::types::PyString>,
    args: &[&Bound<'py, PyAny>],
) -> PyResult<Bound<'py, PyAny>> {
    let py = obj.py();
    let mut ptrs: [*mut ffi::PyObject; 8] = [std::ptr::null_mut(); 8];
    assert!(args.len() < ptrs.len(), "call_method_fast: at most 7 arguments");
    ptrs[0] = obj.as_ptr();
    for (p, a) in ptrs[1..].iter_mut().zip(args) {
        *p = a.as_ptr();
    }
    // SAFETY: `ptrs[..=args.len()]` are borrowed references (the receiver first) kept alive by
    // the caller for the call; `name` is a str. Returns a new reference or NULL with an
    // exception set.
    unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyObject_VectorcallMethod(name.as_ptr(), ptrs.as_ptr(), args.len() + 1, std::ptr::null_mut()),
        )
    }
}

/// `cb()`, given the empty tuple `empty`. A callable whose type has no vectorcall (the C
/// `Task`'s step wrapper that every task wake-up without a value queues, an instance with
/// `__call__`) is called through its `tp_call` with `empty` straight away, as Cython's calls
/// do: `PyObject_CallNoArgs` would go through `_PyObject_MakeTpCall` (recursion check,
/// argument tuple, result check), about 100 instructions more per call on 3.11 (callgrind).
/// Python code the call reaches makes its own recursion check. Other callables go by
/// vectorcall.
#[inline(always)]
pub fn call_no_args<'py>(cb: &Bound<'py, PyAny>, empty: &Bound<'py, PyTuple>) -> PyResult<Bound<'py, PyAny>> {
    let py = cb.py();
    // SAFETY: `cb` is a live object (borrowed for the call), so its type is too; reading
    // `tp_flags` and `tp_call` of a ready type is what CPython's own call path does.
    let tp_call = unsafe {
        let tp = ffi::Py_TYPE(cb.as_ptr());
        if (*tp).tp_flags & ffi::Py_TPFLAGS_HAVE_VECTORCALL != 0 {
            None
        } else {
            (*tp).tp_call
        }
    };
    match tp_call {
        // SAFETY: `tp_call` takes the callable, an argument tuple (borrowed: `empty` is alive
        // for the call) and NULL keywords; it returns a new reference, or NULL with an
        // exception set (`from_owned_ptr_or_err` turns a NULL without one into a SystemError).
        Some(call) => unsafe {
            Bound::from_owned_ptr_or_err(py, call(cb.as_ptr(), empty.as_ptr(), std::ptr::null_mut()))
        },
        None => cb.call0(),
    }
}

/// `module.name` for a module looked up per call (so that a patched `asyncio.futures.Future`
/// is seen, as asyncio's own code sees it): a read of the module's dict, the first thing
/// the generic lookup would find (the module type has no attribute of these names). About
/// 200 instructions less than `getattr`'s full path. Anything else, and a name the dict does
/// not hold (a module `__getattr__` may supply it), takes `getattr`.
#[inline]
pub fn module_attr<'py>(
    module: &Bound<'py, PyAny>,
    name: &Bound<'py, pyo3::types::PyString>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = module.py();
    // SAFETY: `module` is live; for an exact module `PyModule_GetDict` returns its dict
    // (borrowed, alive while the module is), and `PyDict_GetItemWithError` a borrowed value
    // (or NULL, with an exception set only when the lookup itself failed), of which we take
    // our own reference before anything else runs.
    unsafe {
        if ffi::PyModule_CheckExact(module.as_ptr()) != 0 {
            let dict = ffi::PyModule_GetDict(module.as_ptr());
            if !dict.is_null() {
                let v = ffi::PyDict_GetItemWithError(dict, name.as_ptr());
                if !v.is_null() {
                    return Ok(Bound::from_borrowed_ptr(py, v));
                }
                if !ffi::PyErr_Occurred().is_null() {
                    return Err(PyErr::fetch(py));
                }
            }
        }
    }
    module.getattr(name)
}

/// Run `f` inside `ctx` (entered and exited with the C API, like `Context.run`).
#[inline]
pub fn in_context<'py, R>(py: Python<'py>, ctx: &Py<PyAny>, f: impl FnOnce() -> PyResult<R>) -> PyResult<R> {
    // SAFETY: `ctx` is a contextvars.Context (checked by whoever stored it), alive for the call
    // (we borrow a reference to it).
    unsafe { in_context_ptr(py, ctx.as_ptr(), f) }
}

/// `in_context` on a borrowed pointer.
///
/// # Safety
/// `ctx` is a `contextvars.Context` that stays alive until this returns.
#[inline]
pub unsafe fn in_context_ptr<'py, R>(
    py: Python<'py>,
    ctx: *mut ffi::PyObject,
    f: impl FnOnce() -> PyResult<R>,
) -> PyResult<R> {
    // SAFETY: the caller's promise.
    if unsafe { ffi::PyContext_Enter(ctx) } < 0 {
        return Err(PyErr::fetch(py));
    }
    let r = f();
    // SAFETY: we entered `ctx` above on this thread; exiting it restores the previous context.
    if unsafe { ffi::PyContext_Exit(ctx) } < 0 {
        let exit_err = PyErr::fetch(py);
        return Err(r.err().unwrap_or(exit_err));
    }
    r
}

/// A method descriptor of `cls` for a `METH_FASTCALL | METH_KEYWORDS` C function (PyO3's
/// trampoline, `pyo3::get_trampoline_function!(fastcall_cfunction_with_keywords, f)`, or an
/// entry point of our own that traps panics likewise). `doc` may start with a
/// `__text_signature__` line.
pub fn fastcall_method<'py>(
    cls: &Bound<'py, pyo3::types::PyType>,
    name: &'static std::ffi::CStr,
    doc: &'static std::ffi::CStr,
    meth: ffi::PyCFunctionFastWithKeywords,
) -> PyResult<Bound<'py, PyAny>> {
    c_method(
        cls,
        name,
        doc,
        ffi::PyMethodDefPointer { PyCFunctionFastWithKeywords: meth },
        ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
    )
}

/// A method descriptor of `cls` for a `METH_NOARGS` C function (as for `fastcall_method`;
/// PyO3's trampoline is `pyo3::get_trampoline_function!(noargs, f)`).
pub fn noargs_method<'py>(
    cls: &Bound<'py, pyo3::types::PyType>,
    name: &'static std::ffi::CStr,
    doc: &'static std::ffi::CStr,
    meth: ffi::PyCFunction,
) -> PyResult<Bound<'py, PyAny>> {
    c_method(cls, name, doc, ffi::PyMethodDefPointer { PyCFunction: meth }, ffi::METH_NOARGS)
}

/// The definition is leaked on purpose: the descriptor keeps a pointer to it.
fn c_method<'py>(
    cls: &Bound<'py, pyo3::types::PyType>,
    name: &'static std::ffi::CStr,
    doc: &'static std::ffi::CStr,
    ml_meth: ffi::PyMethodDefPointer,
    ml_flags: std::ffi::c_int,
) -> PyResult<Bound<'py, PyAny>> {
    let def: &'static mut ffi::PyMethodDef =
        Box::leak(Box::new(ffi::PyMethodDef { ml_name: name.as_ptr(), ml_meth, ml_flags, ml_doc: doc.as_ptr() }));
    // SAFETY: `cls` is a live type and `def` a PyMethodDef that is never freed;
    // PyDescr_NewMethod returns a new reference or NULL with an exception set.
    unsafe { Bound::from_owned_ptr_or_err(cls.py(), ffi::PyDescr_NewMethod(cls.as_type_ptr(), def)) }
}

/// The byte offset of the object slot `name` (a `__slots__` entry of `cls` or of a base
/// class) in `cls`'s instances.
pub fn slot_offset(cls: &Bound<'_, pyo3::types::PyType>, name: &Bound<'_, pyo3::types::PyString>) -> PyResult<isize> {
    let member = cls.getattr(name)?;
    // SAFETY: reading the type pointer of a live object, and (after checking that it is a
    // member descriptor) its definition, which lives as long as the class.
    unsafe {
        let ptr = member.as_ptr();
        if ffi::Py_TYPE(ptr) != std::ptr::addr_of_mut!(ffi::PyMemberDescr_Type) {
            return Err(PyTypeError::new_err(format!("{name} must be a __slots__ member")));
        }
        // (pyo3-ffi types the field as PyGetSetDef before 3.11; CPython has PyMemberDef.)
        let def = (*ptr.cast::<ffi::PyMemberDescrObject>()).d_member.cast::<ffi::PyMemberDef>();
        if (*def).type_code != ffi::Py_T_OBJECT_EX || (*def).offset <= 0 {
            return Err(PyTypeError::new_err(format!("{name} must be an object slot")));
        }
        if ffi::PyType_IsSubtype(cls.as_type_ptr(), (*ptr.cast::<ffi::PyDescrObject>()).d_type) == 0 {
            return Err(PyTypeError::new_err(format!("{name} belongs to another class")));
        }
        Ok((*def).offset)
    }
}

/// The object in the slot at `offset` of `obj` (borrowed; NULL when the slot is empty).
///
/// # Safety
/// `offset` came from `slot_offset` for `obj`'s class or a base of it.
#[inline]
pub unsafe fn read_slot(obj: *mut ffi::PyObject, offset: isize) -> *mut ffi::PyObject {
    // SAFETY: the caller's promise: an object slot inside `obj`, holding NULL or a reference.
    unsafe { *obj.cast::<u8>().offset(offset).cast::<*mut ffi::PyObject>() }
}

/// A socket object a transport uses, and the fd it held when the transport took it.
///
/// The transport's system calls go to `fd` only while the socket object still holds it: a
/// caller who closes (or detaches) the socket it passed in leaves the object with fd -1, and the
/// fd number may soon name an unrelated socket. asyncio's transport calls the socket object's
/// methods, which then fail with EBADF; `get` gives -1 then, so our calls fail the same way.
pub struct SockFd {
    fd: std::os::fd::RawFd,
    sock: Py<PyAny>,
    /// Where `sock`'s fd is, when it is a `_socket.socket` (`SOCKET_FD_LAYOUT`): it is read in
    /// place; otherwise (`None`) its `fileno()` is asked.
    offset: Option<isize>,
}

/// The offset of `sock_fd` in CPython's socket objects, and their type, checked once on live
/// sockets (`None`: the layout is not the one expected, and `fileno()` is asked instead).
static SOCKET_FD_LAYOUT: PyOnceLock<Option<(usize, isize)>> = PyOnceLock::new();

fn socket_fd_layout(py: Python<'_>) -> Option<(usize, isize)> {
    *SOCKET_FD_LAYOUT.get_or_init(py, || {
        let probe = || -> PyResult<Option<(usize, isize)>> {
            let ty = py.import("_socket")?.getattr("socket")?;
            let pair = py.import("socket")?.call_method0("socketpair")?;
            let (a, b): (Bound<'_, PyAny>, Bound<'_, PyAny>) = pair.extract()?;
            let offset = std::mem::size_of::<ffi::PyObject>() as isize;
            // SAFETY: `a` and `b` are live `socket.socket` objects (a subclass of
            // `_socket.socket`, whose C struct starts with the object header and then the
            // `int` fd); the read stays inside that struct.
            let read = |s: &Bound<'_, PyAny>| unsafe { fd_field(s.as_ptr(), offset) };
            let fa: std::ffi::c_int = a.call_method0("fileno")?.extract()?;
            let fb: std::ffi::c_int = b.call_method0("fileno")?.extract()?;
            let open_ok = read(&a) == fa && read(&b) == fb && fa != fb;
            a.call_method0("close")?;
            let closed_ok = read(&a) == -1;
            b.call_method0("close")?;
            Ok((open_ok && closed_ok).then(|| (ty.as_ptr() as usize, offset)))
        };
        probe().ok().flatten()
    })
}

/// The `int` at `offset` in `sock` (its fd, at `SOCKET_FD_LAYOUT`'s offset).
///
/// # Safety
/// `sock` is a live `_socket.socket` instance and `offset` lies inside its C struct.
#[inline(always)]
unsafe fn fd_field(sock: *mut ffi::PyObject, offset: isize) -> std::ffi::c_int {
    // SAFETY: the caller's promise.
    unsafe { *sock.cast::<u8>().offset(offset).cast::<std::ffi::c_int>() }
}

impl SockFd {
    pub fn new(sock: &Bound<'_, PyAny>, fd: std::os::fd::RawFd) -> Self {
        let offset = socket_fd_layout(sock.py()).and_then(|(ty, offset)| {
            // SAFETY: `ty` is the `_socket.socket` type object (kept alive by the `_socket`
            // module, which is never unloaded); `sock` is a live object.
            let is_socket = unsafe { ffi::PyObject_TypeCheck(sock.as_ptr(), ty as *mut ffi::PyTypeObject) != 0 };
            is_socket.then_some(offset)
        });
        Self { fd, sock: sock.clone().unbind(), offset }
    }

    /// The fd for a system call: the transport's fd while the socket object still holds it,
    /// else -1.
    #[inline(always)]
    pub fn get(&self, py: Python<'_>) -> std::os::fd::RawFd {
        let now = match self.offset {
            // SAFETY: `sock` is a `_socket.socket` instance (checked in `new`), alive while we
            // hold it; `offset` is its `int` fd field (checked by `socket_fd_layout`).
            Some(offset) => unsafe { fd_field(self.sock.as_ptr(), offset) },
            None => self.asked(py),
        };
        if now == self.fd {
            self.fd
        } else {
            -1
        }
    }

    /// The fd a socket-like object that is not a `_socket.socket` reports (-1 if it fails).
    #[cold]
    #[inline(never)]
    fn asked(&self, py: Python<'_>) -> std::os::fd::RawFd {
        self.sock.bind(py).call_method0("fileno").and_then(|f| f.extract()).unwrap_or(-1)
    }

    /// The fd the transport took.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.fd
    }

    pub fn sock(&self) -> &Py<PyAny> {
        &self.sock
    }
}

/// Run `f` with `exc` as the exception being handled (`sys.exc_info()`), as asyncio reports
/// a callback's error from inside its `except` block: an exception handler that logs with
/// `logger.exception()` gets the traceback, and an error it raises is chained to `exc`.
pub fn while_handling<R>(exc: &Bound<'_, PyBaseException>, f: impl FnOnce() -> R) -> R {
    // SAFETY: PyErr_GetExcInfo gives new references (or NULL) to the exception being handled;
    // PyErr_SetExcInfo steals the references it is given (NULL allowed) and sets the thread's
    // handled exception, which we restore to what it was after `f`, with the GIL held
    // throughout (`exc` is bound to it).
    unsafe {
        let (mut ty, mut value, mut tb) = (std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut());
        ffi::PyErr_GetExcInfo(&mut ty, &mut value, &mut tb);
        let exc_ty = ffi::Py_TYPE(exc.as_ptr()).cast::<ffi::PyObject>();
        ffi::Py_INCREF(exc_ty);
        ffi::PyErr_SetExcInfo(exc_ty, exc.clone().into_ptr(), ffi::PyException_GetTraceback(exc.as_ptr()));
        let r = f();
        ffi::PyErr_SetExcInfo(ty, value, tb);
        r
    }
}

/// `contextvars.copy_context()` without the Python call.
pub fn copy_context(py: Python<'_>) -> PyResult<Py<PyAny>> {
    // SAFETY: PyContext_CopyCurrent returns a new reference or NULL with an exception set.
    unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyContext_CopyCurrent()) }.map(Bound::unbind)
}

/// `err` as if raised here by Python code: `PyErr_SetObject` sets its `__context__` to the
/// exception being handled (the topmost on the thread's stack, cycles cut), as `raise` and
/// the C functions Python code calls do. A `PyErr` made in Rust and restored gets none.
pub fn as_raised_here(py: Python<'_>, err: PyErr) -> PyErr {
    let value = err.into_value(py);
    // SAFETY: `value` is a live exception instance and its type a live exception class;
    // PyErr_SetObject takes its own references, and the error it sets is fetched at once.
    unsafe { ffi::PyErr_SetObject(ffi::Py_TYPE(value.as_ptr()).cast(), value.as_ptr()) };
    PyErr::fetch(py)
}

/// `KeyboardInterrupt` and `SystemExit` escape the loop; everything else is reported.
pub fn is_fatal(py: Python<'_>, err: &PyErr) -> bool {
    err.is_instance_of::<PyKeyboardInterrupt>(py) || err.is_instance_of::<PySystemExit>(py)
}

/// An error escaping loop-internal work (a Rust work item standing in for asyncio's handle)
/// goes to the exception handler as "Exception in callback ..."; KeyboardInterrupt and
/// SystemExit propagate, and a failing handler is reported as unraisable.
pub fn report_callback_error(loop_: &Bound<'_, PyAny>, callback: &Bound<'_, PyAny>, err: PyErr) -> PyResult<()> {
    let py = loop_.py();
    if is_fatal(py, &err) {
        return Err(err);
    }
    let exc = err.into_value(py).into_bound(py);
    let args = (py.None(), callback, PyTuple::empty(py), &exc);
    match while_handling(&exc, || loop_.call_method1(pyo3::intern!(py, "_report_callback_error"), args)) {
        Ok(_) => Ok(()),
        Err(e) if is_fatal(py, &e) => Err(e),
        Err(e) => {
            e.write_unraisable(py, Some(loop_));
            Ok(())
        }
    }
}

/// `format_helpers.extract_stack(sys._getframe(0))` for debug-mode source tracebacks: the
/// stack of the Python code that called into the loop.
pub fn source_traceback(py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
    let c = cached(py)?;
    let frame = match c.getframe.bind(py).call1((0,)) {
        Ok(f) => f,
        Err(_) => return Ok(None),
    };
    Ok(Some(c.extract_stack.bind(py).call1((frame,))?.unbind()))
}

/// An OS error as Python raises it: `OSError(errno, strerror)`, which Python turns into the
/// matching subclass (`BlockingIOError`, `PermissionError`, ...). PyO3's own conversion keeps
/// only the message and loses `errno`.
pub fn os_err(e: std::io::Error) -> PyErr {
    match e.raw_os_error() {
        Some(code) => {
            let text = e.to_string();
            let suffix = format!(" (os error {code})");
            let strerror = text.strip_suffix(&suffix).unwrap_or(&text).to_owned();
            PyOSError::new_err((code, strerror))
        }
        None => PyOSError::new_err(e.to_string()),
    }
}

/// A borrowed contiguous byte view of a bytes-like object.
///
/// An exact `bytes` is read in place (immutable, and kept alive by the view's reference): no
/// export, and no heap block for the `Py_buffer` (a boxed `Py_buffer` per `transport.write`
/// was a `malloc`/`free` of 96 bytes per echo, which left glibc's fast-bin flag set, so the
/// next large `malloc`, the read's `bytes`, ran `malloc_consolidate`). Anything else is
/// exported with `PyObject_GetBuffer` into a boxed `Py_buffer` (boxed: the exporter may keep
/// pointers into it) and released on drop.
pub struct ByteView<'py> {
    buf: *mut u8,
    len: usize,
    export: Export<'py>,
}

enum Export<'py> {
    Bytes(#[allow(dead_code)] Bound<'py, PyAny>),
    Buffer(Box<ffi::Py_buffer>),
}

impl<'py> ByteView<'py> {
    pub fn new(obj: &Bound<'py, PyAny>, writable: bool) -> PyResult<Self> {
        if !writable {
            if let Ok(b) = obj.cast_exact::<pyo3::types::PyBytes>() {
                let data = b.as_bytes();
                let (buf, len) = (data.as_ptr().cast_mut(), data.len());
                return Ok(Self { buf, len, export: Export::Bytes(obj.clone()) });
            }
        }
        // SAFETY: Py_buffer is plain data; zeroed is its documented initial state.
        let mut view: Box<ffi::Py_buffer> = Box::new(unsafe { std::mem::zeroed() });
        let flags = if writable { ffi::PyBUF_WRITABLE } else { ffi::PyBUF_SIMPLE };
        // SAFETY: `obj` is live; on success the view must be released (Drop does it).
        if unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, flags) } != 0 {
            return Err(PyErr::fetch(obj.py()));
        }
        let (buf, len) = (view.buf.cast::<u8>(), view.len.max(0) as usize);
        Ok(Self { buf, len, export: Export::Buffer(view) })
    }

    /// A writable view of `obj` as `socket.recv_into()` takes its buffer: anything that is
    /// not a read-write bytes-like object gets its `TypeError` (the same text on 3.10-3.13).
    pub fn for_recv_into(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        Self::new(obj, true).map_err(|_| match obj.get_type().name() {
            Ok(name) => pyo3::exceptions::PyTypeError::new_err(format!(
                "recv_into() argument 1 must be read-write bytes-like object, not {name}"
            )),
            Err(e) => e,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte, writable for `len()` bytes if the view was made writable.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.buf
    }

    pub fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: a `bytes`'s storage, or a PyBUF_SIMPLE/WRITABLE export, is one contiguous
        // run of `len` bytes that stays valid while the view (its reference or export) lives.
        unsafe { std::slice::from_raw_parts(self.buf, self.len) }
    }
}

impl Drop for ByteView<'_> {
    fn drop(&mut self) {
        if let Export::Buffer(view) = &mut self.export {
            // SAFETY: the view was filled by a successful PyObject_GetBuffer and is released
            // once; releasing needs the GIL, which every owner of a ByteView holds ('py).
            unsafe { ffi::PyBuffer_Release(&mut **view) };
        }
    }
}

extern "C" {
    // Part of CPython's C API (used by `socket.recv` itself), exported by every interpreter
    // this crate builds for; pyo3-ffi keeps its declaration private.
    fn _PyBytes_Resize(bytes: *mut *mut ffi::PyObject, newsize: ffi::Py_ssize_t) -> std::os::raw::c_int;
    // The same: the lookup of a name through a type's MRO behind every attribute access (with
    // the interpreter's method cache). A borrowed reference or NULL; never sets an exception.
    fn _PyType_Lookup(tp: *mut ffi::PyTypeObject, name: *mut ffi::PyObject) -> *mut ffi::PyObject;
    // The same (exported by 3.10-3.13): the lookup behind `obj.name(...)` calls
    // (`PyObject_VectorcallMethod`, LOAD_METHOD). 1 with the function found on the type when
    // no instance attribute is in the way, 0 with the attribute itself otherwise, which is
    // NULL with an exception set on failure.
    fn _PyObject_GetMethod(
        obj: *mut ffi::PyObject,
        name: *mut ffi::PyObject,
        method: *mut *mut ffi::PyObject,
    ) -> std::os::raw::c_int;
}

/// What `obj.name(...)` would call: `(true, function found on the type)` to be called with
/// `obj` first, `(false, attribute)` otherwise; `method` gets a new reference, or NULL with an
/// exception set.
///
/// # Safety
/// The GIL is held, `obj` is live, `name` is a live `str`, and `*method` is NULL.
#[inline]
pub unsafe fn get_method(obj: *mut ffi::PyObject, name: *mut ffi::PyObject, method: *mut *mut ffi::PyObject) -> bool {
    // SAFETY: as the caller guarantees.
    unsafe { _PyObject_GetMethod(obj, name, method) == 1 }
}

/// `name` as found on the type `tp` (through its MRO), as a borrowed pointer, or NULL.
///
/// # Safety
/// The GIL is held, `tp` is a live type object and `name` a live `str`.
#[inline(always)]
pub unsafe fn type_lookup(tp: *mut ffi::PyTypeObject, name: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: as the caller guarantees.
    unsafe { _PyType_Lookup(tp, name) }
}

/// Fill a new `bytes` of `cap` bytes with `fill` (which returns how many bytes it wrote) and
/// shrink it to that length: what CPython's `socket.recv` does, with no copy. `None` when the
/// bytes object could not be allocated (nothing was read then).
pub fn bytes_filled_by(
    py: Python<'_>,
    cap: usize,
    fill: impl FnOnce(*mut u8, usize) -> std::io::Result<usize>,
) -> Option<std::io::Result<Bound<'_, pyo3::types::PyBytes>>> {
    // SAFETY: a NULL source asks for an uninitialised bytes of `cap` bytes; the result is a new
    // reference or NULL with an exception set.
    let mut obj = unsafe { ffi::PyBytes_FromStringAndSize(std::ptr::null(), cap as ffi::Py_ssize_t) };
    if obj.is_null() {
        drop(PyErr::fetch(py));
        return None;
    }
    // SAFETY: `obj` is a fresh bytes object of `cap` bytes that nobody else has seen yet.
    let data = unsafe { ffi::PyBytes_AsString(obj) }.cast::<u8>();
    let n = match fill(data, cap) {
        Ok(n) => n.min(cap),
        Err(e) => {
            // SAFETY: drops the only reference to `obj`.
            unsafe { ffi::Py_DecRef(obj) };
            return Some(Err(e));
        }
    };
    // SAFETY: `obj` has exactly one reference (ours), as `_PyBytes_Resize` requires; it may
    // move the object (updating `obj`) or, on failure, free it and set `obj` to NULL.
    if n < cap && unsafe { _PyBytes_Resize(&mut obj, n as ffi::Py_ssize_t) } < 0 {
        drop(PyErr::fetch(py));
        return Some(Err(std::io::Error::from(std::io::ErrorKind::OutOfMemory)));
    }
    // SAFETY: `obj` is a valid bytes object whose one reference we own.
    let any = unsafe { Bound::from_owned_ptr(py, obj) };
    // SAFETY: it was created by PyBytes_FromStringAndSize, so it is a bytes object.
    Some(Ok(unsafe { any.cast_into_unchecked::<pyo3::types::PyBytes>() }))
}

/// `PyBytesObject`'s layout on CPython 3.10-3.13 (pyo3-ffi marks `ob_shash` deprecated).
#[repr(C)]
struct BytesLayout {
    ob_base: ffi::PyVarObject,
    ob_shash: ffi::Py_hash_t,
    ob_sval: [u8; 1],
}

/// A `bytes` made for a read, with the number of data bytes its block holds (its length when
/// it was made). Once nobody else holds it, a later read can go into its block (`read_into`)
/// and be handed out in it (`filled`), which saves the allocation and the free of a new one.
pub struct SpareBytes {
    obj: Py<pyo3::types::PyBytes>,
    cap: usize,
}

impl SpareBytes {
    /// The largest block kept: what small reads save is an allocation, and larger reads go
    /// straight into a new `bytes` anyway (`transports::stream`).
    const MAX_CAP: usize = 16 * 1024;

    /// `obj` (made with `cap` data bytes) if this is its only reference and its block is
    /// small enough to keep.
    pub fn take_back(obj: Bound<'_, pyo3::types::PyBytes>, cap: usize) -> Option<Self> {
        // SAFETY: `obj` is a live object; reading its reference count.
        let alone = unsafe { ffi::Py_REFCNT(obj.as_ptr()) } == 1;
        (alone && cap <= Self::MAX_CAP).then(|| Self { obj: obj.unbind(), cap })
    }

    /// Whether a read of `n` bytes into this one's block would be handed out in it
    /// (`filled`): at least half of it, and more than a possibly shared 0- or 1-byte `bytes`.
    pub fn fits(&self, n: usize) -> bool {
        n > 1 && n <= self.cap && n * 2 >= self.cap
    }

    /// The number of data bytes its block holds.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Read into this one's block: `fill` gets the data area, `cap + 1` bytes (the data and
    /// the NUL's slot, so a read that fills it shows more may be waiting), and returns how
    /// many bytes it wrote. The object stays as it was for anyone but us (`filled`, `joined`).
    pub fn read_into(&mut self, fill: impl FnOnce(*mut u8, usize) -> std::io::Result<usize>) -> std::io::Result<usize> {
        let p = self.obj.as_ptr().cast::<BytesLayout>();
        // SAFETY: `obj` is an exact `bytes` whose only reference is ours (`take_back`); its
        // block holds `cap` data bytes and a NUL, all writable by us and seen by nobody.
        let area = unsafe { (*p).ob_sval.as_mut_ptr() };
        fill(area, self.cap + 1).map(|n| n.min(self.cap + 1))
    }

    /// The `bytes` of a read of `n <= cap` bytes into this one's block (`read_into`), and its
    /// block's size: this one, if `n` takes at least half of it, else a new one of `n` bytes.
    pub fn filled(self, py: Python<'_>, n: usize) -> (Bound<'_, pyo3::types::PyBytes>, usize) {
        debug_assert!(n <= self.cap);
        let (fits, cap) = (self.fits(n), self.cap);
        let obj = self.obj.into_bound(py);
        let p = obj.as_ptr().cast::<BytesLayout>();
        if fits {
            // SAFETY: as in `read_into`; `n <= cap`, so the NUL goes inside the block. The
            // cached hash is reset, as for a new object.
            unsafe {
                *(*p).ob_sval.as_mut_ptr().add(n) = 0;
                (*p).ob_base.ob_size = n as ffi::Py_ssize_t;
                (*p).ob_shash = -1;
            }
            return (obj, cap);
        }
        // SAFETY: the block's first `n <= cap` data bytes, written by `read_into`'s read.
        let data = unsafe { std::slice::from_raw_parts((*p).ob_sval.as_ptr(), n) };
        (pyo3::types::PyBytes::new(py, data), n)
    }

    /// A new `bytes` of the `cap + 1` bytes a read filled this one's block with
    /// (`read_into`), followed by `rest`, and its length; `None` if it could not be allocated.
    pub fn joined<'py>(self, py: Python<'py>, rest: &[u8]) -> Option<(Bound<'py, pyo3::types::PyBytes>, usize)> {
        let head = self.cap + 1;
        let p = self.obj.as_ptr().cast::<BytesLayout>();
        // SAFETY: the block's `cap + 1` bytes (data and the NUL's slot), written by the read.
        let first = unsafe { std::slice::from_raw_parts((*p).ob_sval.as_ptr(), head) };
        let n = head + rest.len();
        let r = pyo3::types::PyBytes::new_with(py, n, |b| {
            b[..head].copy_from_slice(first);
            b[head..].copy_from_slice(rest);
            Ok(())
        });
        match r {
            Ok(b) => Some((b, n)),
            Err(e) => {
                drop(e);
                None
            }
        }
    }
}
