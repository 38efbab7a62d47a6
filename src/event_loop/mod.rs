//! `LoopCore`: the part of the event loop that runs per callback, per timer and per I/O event.
//!
//! Ground rules:
//! - `run_once` is the only place callbacks run. An iteration runs exactly the handles that were
//!   ready when it started running callbacks; due timers join the ready queue after the poll,
//!   behind earlier `call_soon` callbacks; equal deadlines fire in scheduling order.
//! - State lives in one `GilCell`; no borrow of it is ever held across a call into Python.
//! - Rare paths (loop setup, exception reporting, signals, debug logging) are Python methods of
//!   the `ferroloop.Loop` subclass, called by name.
//!
//! The Python-facing names are asyncio's (`call_soon`, `_run_once`, `_write_to_self`, ...), so a
//! reader can hold this file against `asyncio/base_events.py` and `selector_events.py`.

mod asyncio_method;
mod bound_cache;
mod fastcall;
pub(crate) mod ready;
mod run;
pub mod timers;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use pyo3::exceptions::{PyMemoryError, PyOverflowError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyTuple};
use pyo3::{intern, PyTraverseError, PyTypeInfo};

use crate::handles::{self, CallArgs, Handle, TimerHandle};
use crate::py::{self, GilCell};
use crate::reactor::{Reactor, Which};
use crate::sockops::{self, Kind, SockOp};
use crate::sys;
use crate::transports::accept::Acceptor;
use crate::transports::addr::InetAddr;
use crate::transports::stream::StreamCore;
pub(crate) use asyncio_method::AsyncioMethod;
pub(crate) use bound_cache::{install as install_cached_call_soon, CachedCallSoon};
pub(crate) use fastcall::install as install_fastcall;
use ready::ReadyQueue;
pub(crate) use run::send_corked_if_any;
use timers::{Clock, TimerHeap};

/// Queue length beyond which new handles (and their context copies) leave the GC's lists
/// while the loop runs (`Handle::park`).
const PARK_AFTER: usize = 32;
/// Past this many waiting callbacks, `call_soon_threadsafe` from another thread than the
/// running loop's pauses `THREADSAFE_PAUSE_US` with the GIL released (back-pressure).
const THREADSAFE_BACKLOG: usize = 8_192;
const THREADSAFE_PAUSE_US: u64 = 100;

/// asyncio's `MAXIMUM_SELECT_TIMEOUT`: 24 hours.
const MAX_POLL_TIMEOUT_MS: i64 = 24 * 3600 * 1000;
/// Non-blocking polls skipped after a poll while callbacks are ready (`run::run_once`).
const POLL_SKIP: u8 = 2;

/// One unit of work in the ready queue: a Python-visible handle, or readiness of a Rust
/// transport (which needs no Python object per event).
pub(crate) enum Work {
    Handle(Py<Handle>),
    Stream(Py<StreamCore>, Which),
    Sock(Py<SockOp>),
    Accept(Py<Acceptor>),
}

pub(crate) struct State {
    ready: ReadyQueue<Work>,
    timers: TimerHeap<Py<TimerHandle>>,
    timer_cancelled_count: usize,
    closed: bool,
    stopping: bool,
    /// Debug mode (the truth of `_debug`).
    debug: bool,
    /// What `set_debug` was given, when not a bool (asyncio's `get_debug()` returns it).
    debug_value: Option<Py<PyAny>>,
    thread_id: Option<u64>,
    current_handle: Option<Py<Handle>>,
    slow_callback_duration: f64,
    /// `slow_callback_duration` as set, when not a float (compared as asyncio compares it).
    slow_callback_value: Option<Py<PyAny>>,
    /// True while the loop thread is (about to be) blocked in the poll: only then does
    /// `call_soon_threadsafe` need to write the waker.
    polling: bool,
    /// How many of the coming iterations skip a non-blocking poll: `POLL_SKIP` after a poll,
    /// counting down (see `run::run_once`). So a burst of I/O and its follow-up callbacks
    /// cost one poll, while fds are still polled at least every `POLL_SKIP + 1` iterations.
    polls_to_skip: u8,
    /// The IPv4 / IPv6 names of this loop's stream transports' sockets, each with how many
    /// transports have it (accepted connections share their server's name).
    local_addrs: HashMap<InetAddr, u32>,
    /// How many open stream transports of this loop are connected to another socket of this
    /// loop (found by `local_addrs` when the second end's transport is made), or to a Unix
    /// socket made by this process. Their peer sees what they do one poll later, so while there
    /// are any, no poll is skipped: the iteration it is seen in is asyncio's.
    local_links: usize,
    /// How many reader / writer slots hold a Python callback (`add_reader`/`add_writer`).
    /// Whatever makes those fds ready is done by code the loop does not see (a raw
    /// `sock.sendmsg` to a peer in this loop, say), so while there are any, no poll is skipped.
    io_handles: usize,
    /// A handle was parked (`Handle::park`) since the last `unpark_all`.
    parked_any: bool,
    /// Signal numbers can arrive on the waker (`add_signal_handler`), so it must be polled
    /// even while the loop is busy.
    signal_handlers: bool,
    /// How timers are keyed (`timers::Clock`): `Custom` while `time()` is replaced, on the
    /// class (a subclass, a patch of the class) or on this loop (`loop.time = ...`); deadlines
    /// and "now" then come from it (asyncio's loop always asks `self.time()`; plain loops skip
    /// the Python call). `call_later`/`call_at` look at the class each call (`sync_clock`),
    /// `_check_clock` at both, at `run_forever` start and when `time` is set on the loop.
    clock: Clock,
    /// This loop has a `time` attribute of its own (`_check_clock`).
    time_on_instance: bool,
    /// The version tag of the loop's type when it was last found not to replace `time`, or
    /// 0 (`sync_clock`).
    time_checked_tag: u32,
    reactor: Option<Reactor<Py<PyAny>>>,
    /// `loop._task_factory` (`set_task_factory`).
    task_factory: Option<Py<PyAny>>,
    /// `{"loop": <this loop>}` for `Future(**kw)` / `Task(coro, **kw)`.
    loop_kwargs: Option<Py<PyDict>>,
    /// `loop.call_soon` as one bound method, made on first use (`CachedCallSoon`, 3.10/3.11).
    call_soon_bound: Option<Py<PyAny>>,
    /// True while `run::run_ready` runs callbacks: a stream transport's write from the loop
    /// thread may then be held until the callback returns (`StreamCore::write`, "corking").
    corking: bool,
    /// Counts the callbacks run (a transport tells a callback's second write by it).
    callback_seq: u64,
    /// `callback_seq` when a `call_soon_threadsafe` caller last paused (back-pressure).
    paused_at_seq: u64,
    /// Transports holding corked writes, sent after the running callback returns.
    corked: Vec<Py<StreamCore>>,
    /// The most items an iteration began with, and the most timers scheduled, since
    /// `room_checked_ns`: what `State::give_back_room` sizes the queues by.
    ready_peak: usize,
    timer_peak: usize,
    /// When `give_back_room` last looked (monotonic clock).
    room_checked_ns: i64,
}

/// How often, at most, the loop looks for room to give back (`State::give_back_room`).
const ROOM_CHECK_NS: i64 = 250_000_000;

impl State {
    /// `item` left a reader or writer slot of the reactor (`io_handles`).
    pub(super) fn slot_left(&mut self, py: Python<'_>, item: &Option<Py<PyAny>>) {
        if item.as_ref().is_some_and(|i| i.bind(py).is_instance_of::<Handle>()) {
            debug_assert!(self.io_handles > 0);
            self.io_handles = self.io_handles.saturating_sub(1);
        }
    }

    /// The loop is about to wait (nothing is ready): give back the room of a burst that has
    /// passed, in the ready queue, the timer heap and the handle freelist
    /// (`ready::idle_capacity`), sized by the peaks since the last look, at most every
    /// `ROOM_CHECK_NS`. So room a load needs again within that time (another thread's
    /// `call_soon_threadsafe` burst every GIL turn) is kept, and a spike's room is given back
    /// at the first wait a quarter of a second to half a second after it. One clock read
    /// per wait otherwise.
    fn give_back_room(&mut self, py: Python<'_>) {
        let now = sys::monotonic_ns();
        if now.saturating_sub(self.room_checked_ns) < ROOM_CHECK_NS {
            return;
        }
        self.room_checked_ns = now;
        if let Some(cap) = ready::idle_capacity(self.ready.capacity(), self.ready_peak) {
            self.ready.shrink_to(cap);
            crate::handles::trim_handle_freelist(py, cap);
        }
        let timer_peak = self.timer_peak.max(self.timers.len());
        if let Some(cap) = ready::idle_capacity(self.timers.capacity(), timer_peak) {
            self.timers.shrink_to(cap);
        }
        self.ready_peak = 0;
        self.timer_peak = self.timers.len();
    }
}

#[pyclass(frozen, subclass, module = "ferroloop._ferroloop")]
pub struct LoopCore {
    state: GilCell<State>,
    /// `!state.corked.is_empty()`, read without a borrow: the loop looks after every callback.
    /// Only touched with the GIL held (a plain load and store).
    corked_any: AtomicBool,
    /// A `bytes` a stream transport read into and got back unshared once the protocol was done
    /// with it, and how many data bytes its block holds: the next small read is copied into it
    /// instead of a new one (`py::SpareBytes`).
    pub(crate) spare: GilCell<Option<py::SpareBytes>>,
}

fn ns_to_secs(ns: i64) -> f64 {
    ns as f64 / 1e9
}

fn closed_err() -> PyErr {
    PyRuntimeError::new_err("Event loop is closed")
}

impl LoopCore {
    /// "Now" as a timer key (timers keyed at or below it are due), with the clock it was read
    /// on (calling `time()` can run code that changes the clock: the caller compares it with
    /// the heap's).
    pub(crate) fn now_key(slf: &Bound<'_, Self>) -> PyResult<(Clock, i64)> {
        let clock = slf.get().state.borrow(slf.py()).clock;
        match clock {
            Clock::Monotonic => Ok((clock, sys::monotonic_ns())),
            Clock::Custom => {
                let now: f64 = slf.call_method0(intern!(slf.py(), "time"))?.extract()?;
                Ok((clock, Clock::due_key(now)))
            }
        }
    }

    /// The clock to use now: `Custom` if `time` is replaced on this loop (as last found by
    /// `_check_clock`) or on its class, switching the timers' keys if that changed.
    ///
    /// The class is looked at through its version tag, as CPython's method cache does: a
    /// type's tag is set to 0 when it or any base is modified, a new one is never a reused
    /// one, and a type only has one when its bases have. So an unchanged nonzero tag means
    /// an unchanged `type(loop).time` (a few instructions, against 60 for `_PyType_Lookup`).
    #[inline(always)]
    fn sync_clock(slf: &Bound<'_, Self>) -> Clock {
        // SAFETY: the type of a live object is a live type object; the GIL is held.
        let tag = unsafe { (*ffi::Py_TYPE(slf.as_ptr())).tp_version_tag };
        {
            let st = slf.get().state.borrow(slf.py());
            if tag != 0 && tag == st.time_checked_tag && !st.time_on_instance && st.clock == Clock::Monotonic {
                return Clock::Monotonic;
            }
        }
        Self::sync_clock_slow(slf)
    }

    #[inline(never)]
    fn sync_clock_slow(slf: &Bound<'_, Self>) -> Clock {
        let py = slf.py();
        let core = slf.get();
        let replaced = class_time_replaced(slf);
        // Read after the lookup, which gives the type a tag if it had none.
        // SAFETY: as in `sync_clock`.
        let tag = if replaced { 0 } else { unsafe { (*ffi::Py_TYPE(slf.as_ptr())).tp_version_tag } };
        let (clock, on_instance) = {
            let mut st = core.state.borrow_mut(py);
            st.time_checked_tag = tag;
            (st.clock, st.time_on_instance)
        };
        let want = if on_instance || replaced { Clock::Custom } else { Clock::Monotonic };
        if want != clock {
            core.set_clock(py, want);
        }
        want
    }

    #[cold]
    #[inline(never)]
    fn set_clock(&self, py: Python<'_>, clock: Clock) {
        let mut st = self.state.borrow_mut(py);
        if st.clock != clock {
            st.clock = clock;
            st.timers.rekey(|t| clock.key(t.get().when));
        }
    }

    /// `asyncio.Future(loop=self)`. The keywords come from a dict made once per loop: calling
    /// a type with keyword names builds a dict per call, and `Future()` without `loop=` costs a
    /// `getpid()` syscall on 3.11 (its running-loop lookup).
    pub(crate) fn new_future<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let cls = py::module_attr(py::cached(py)?.futures_module.bind(py), intern!(py, "Future"))?;
        cls.call((), Some(&Self::loop_kwargs(slf)?))
    }

    /// `{"loop": self}`, made on first use and kept (the callee only reads it).
    fn loop_kwargs<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyDict>> {
        let py = slf.py();
        if let Some(d) = &slf.get().state.borrow(py).loop_kwargs {
            return Ok(d.bind(py).clone());
        }
        let d = PyDict::new(py);
        d.set_item(intern!(py, "loop"), slf)?;
        slf.get().state.borrow_mut(py).loop_kwargs = Some(d.clone().unbind());
        Ok(d)
    }

    /// Whether a transport write made now may be held until the running callback returns (the
    /// loop is running callbacks, and this is its thread): then the running callback's number.
    pub(crate) fn cork_seq(&self, py: Python<'_>) -> Option<u64> {
        let st = self.state.borrow(py);
        (st.corking && st.thread_id == Some(sys::thread_ident())).then_some(st.callback_seq)
    }

    /// `core` holds corked writes (called once per callback by each such transport).
    pub(crate) fn add_corked(&self, py: Python<'_>, core: Py<StreamCore>) {
        self.state.borrow_mut(py).corked.push(core);
        self.corked_any.store(true, Ordering::Relaxed);
    }

    /// `core` sends its corked writes early (`StreamCore::flush_corked`): forget it if it is the
    /// last transport listed (the usual case; otherwise the end-of-callback send finds nothing
    /// to do for it).
    pub(crate) fn forget_corked(&self, py: Python<'_>, core: &Bound<'_, StreamCore>) {
        let last = {
            let mut st = self.state.borrow_mut(py);
            if st.corked.last().is_some_and(|c| c.as_ptr() == core.as_ptr()) {
                let c = st.corked.pop();
                self.corked_any.store(!st.corked.is_empty(), Ordering::Relaxed);
                c
            } else {
                None
            }
        };
        if let Some(c) = last {
            drop(c.into_bound(py));
        }
    }

    pub(crate) fn debug(&self, py: Python<'_>) -> bool {
        self.state.borrow(py).debug
    }

    /// `get_debug()`: what `set_debug` was given.
    pub(crate) fn debug_value(&self, py: Python<'_>) -> Py<PyAny> {
        let st = self.state.borrow(py);
        match &st.debug_value {
            Some(v) => v.clone_ref(py),
            None => PyBool::new(py, st.debug).to_owned().into_any().unbind(),
        }
    }

    /// Debug mode's slow-callback check: did a callback that took `dt` seconds reach
    /// `slow_callback_duration`?
    pub(crate) fn is_slow(&self, py: Python<'_>, dt: f64) -> PyResult<bool> {
        let limit = {
            let st = self.state.borrow(py);
            match &st.slow_callback_value {
                None => return Ok(dt >= st.slow_callback_duration),
                Some(v) => v.clone_ref(py),
            }
        };
        PyFloat::new(py, dt).ge(limit.bind(py))
    }

    fn after_setattr(slf: &Bound<'_, Self>, name: &Bound<'_, PyAny>) -> PyResult<()> {
        if name.eq(intern!(slf.py(), "time"))? {
            Self::_check_clock(slf)?;
        }
        Ok(())
    }

    pub(crate) fn timer_handle_cancelled(&self, py: Python<'_>) {
        self.state.borrow_mut(py).timer_cancelled_count += 1;
    }

    fn check_thread(&self, py: Python<'_>) -> PyResult<()> {
        let st = self.state.borrow(py);
        if let Some(tid) = st.thread_id {
            if tid != sys::thread_ident() {
                return Err(PyRuntimeError::new_err(
                    "Non-thread-safe operation invoked on an event loop other than the current one",
                ));
            }
        }
        Ok(())
    }

    /// asyncio's checks for call_soon / call_at / call_soon_threadsafe: closed loop; in debug
    /// mode only, wrong thread (not for `call_soon_threadsafe`: `any_thread`) and bad callback
    /// (outside debug mode a bad callback fails when it runs, and the error goes to the
    /// exception handler).
    #[inline(always)]
    fn check_schedule(
        &self,
        py: Python<'_>,
        callback: &Bound<'_, PyAny>,
        method: &str,
        any_thread: bool,
    ) -> PyResult<bool> {
        let (closed, debug) = {
            let st = self.state.borrow(py);
            (st.closed, st.debug)
        };
        if closed {
            return Err(closed_err());
        }
        if debug {
            if !any_thread {
                self.check_thread(py)?;
            }
            py::check_callback(py, callback, method)?;
        }
        Ok(debug)
    }

    /// A new handle object for `callback(*args)` on this loop (not queued).
    #[inline(always)]
    fn new_handle(
        slf: &Bound<'_, Self>,
        callback: &Bound<'_, PyAny>,
        args: CallArgs,
        context: Option<Bound<'_, PyAny>>,
        debug: bool,
    ) -> PyResult<Py<Handle>> {
        handles::new_handle_object(slf.py(), callback, args, slf.as_any(), context, debug)
    }

    /// Queue a new handle. Behind a long queue of a running loop it and its context copy are
    /// parked (`Handle::park`); a short queue is left alone, since a GC pass walks it cheaply.
    #[inline(always)]
    fn push_ready(&self, py: Python<'_>, h: &Py<Handle>) -> PyResult<()> {
        let mut st = self.state.borrow_mut(py);
        if let Err(item) = st.ready.try_push(Work::Handle(h.clone_ref(py))) {
            drop(st);
            drop(item);
            return Err(PyMemoryError::new_err(()));
        }
        // Only while running: `run_forever` unparks what is left when it returns, so a loop
        // that is not running (and could be garbage) never holds parked handles.
        if st.ready.len() > PARK_AFTER && st.thread_id.is_some() {
            st.parked_any = true;
            drop(st);
            Handle::park(h.bind(py));
        }
        Ok(())
    }

    /// Put every parked handle still queued back on the GC's lists.
    fn unpark_all(&self, py: Python<'_>) {
        let mut st = self.state.borrow_mut(py);
        if std::mem::take(&mut st.parked_any) {
            st.ready.iter().for_each(|w| unpark(py, w));
        }
    }

    /// Whether a reader may run again for `fd` inside the current callback, as if the next
    /// iteration had begun and its poll had found only `fd` ready (`transports::datagram`
    /// reads several datagrams per readiness event this way): nothing is queued, no stop is
    /// pending, no stream writes are held, no timer is due (on the default clock), this is the
    /// loop's thread, debug mode is off (its slow-callback timing is per callback), and `fd`
    /// is still watched for reading.
    pub(crate) fn may_read_again(&self, py: Python<'_>, fd: std::os::fd::RawFd) -> bool {
        let st = self.state.borrow(py);
        if !st.ready.is_empty()
            || st.stopping
            || st.closed
            || st.debug
            || !st.corked.is_empty()
            || st.clock != Clock::Monotonic
            || st.thread_id != Some(sys::thread_ident())
        {
            return false;
        }
        if st.timers.peek_when().is_some_and(|when| when <= sys::monotonic_ns()) {
            return false;
        }
        st.reactor.as_ref().is_some_and(|r| r.registry.get(fd).is_some_and(|e| e.reader.is_some()))
    }

    /// Whether a `call_soon_threadsafe` caller should pause: the loop runs in another thread
    /// than the caller's, with more than `THREADSAFE_BACKLOG` callbacks waiting, and it has
    /// run some since the last pause. A loop that ran none is held (a callback waits, for the
    /// caller say): pausing again could not let it drain anything, only slow the caller down
    /// (Twisted's `test_wakerOverflow`: 100,000 calls while the loop's thread waits for them,
    /// 12 times asyncio's time).
    fn pause_threadsafe_caller(&self, py: Python<'_>) -> bool {
        let mut st = self.state.borrow_mut(py);
        let pause = st.ready.len() > THREADSAFE_BACKLOG
            && st.thread_id.is_some_and(|t| t != sys::thread_ident())
            && st.callback_seq != st.paused_at_seq;
        if pause {
            st.paused_at_seq = st.callback_seq;
        }
        pause
    }

    /// Write the waker if the loop is blocked (or about to block) in the poll. One byte per
    /// blocked poll is enough: the flag is cleared by the first writer.
    fn wake_if_polling(&self, py: Python<'_>) {
        let mut st = self.state.borrow_mut(py);
        if st.polling {
            st.polling = false;
            if let Some(r) = &st.reactor {
                r.wake();
            }
        }
    }

    /// `when_obj` is the deadline as the caller gave it (returned by `when()`), when it was
    /// not a float computed here.
    fn schedule_timer(
        slf: &Bound<'_, Self>,
        when: f64,
        when_obj: Option<&Bound<'_, PyAny>>,
        callback: &Bound<'_, PyAny>,
        args: CallArgs,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<TimerHandle>> {
        let py = slf.py();
        let core = slf.get();
        let debug = core.check_schedule(py, callback, "call_at", false)?;
        let base = Handle::new(
            py,
            callback.clone().unbind(),
            args,
            slf.clone().into_any().unbind(),
            context.map(Bound::unbind),
            debug,
        )?;
        let th = TimerHandle::new(when, when_obj);
        th.set_scheduled(true);
        let obj = Py::new(py, pyo3::PyClassInitializer::from(base).add_subclass(th))?;
        let mut st = core.state.borrow_mut(py);
        let key = st.clock.key(when);
        if let Err(item) = st.timers.try_push(key, obj.clone_ref(py)) {
            drop(st);
            drop(item);
            obj.get().set_scheduled(false);
            return Err(PyMemoryError::new_err(()));
        }
        Ok(obj)
    }

    /// `call_soon(callback, *args, context=None)`; the argument parsing is in `fastcall`.
    #[inline(always)]
    pub(crate) fn call_soon(
        slf: &Bound<'_, Self>,
        callback: &Bound<'_, PyAny>,
        args: CallArgs,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<Handle>> {
        Self::queue_soon(slf, callback, args, context, "call_soon", false)
    }

    pub(crate) fn call_soon_threadsafe(
        slf: &Bound<'_, Self>,
        callback: &Bound<'_, PyAny>,
        args: CallArgs,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<Handle>> {
        let h = Self::queue_soon(slf, callback, args, context, "call_soon_threadsafe", true)?;
        let py = slf.py();
        let core = slf.get();
        core.wake_if_polling(py);
        if core.pause_threadsafe_caller(py) {
            // asyncio's call_soon_threadsafe writes to its self-pipe on every call, a system
            // call that lets the loop's thread take the GIL; ours writes only to wake a blocked
            // poll. So a thread calling it in a tight loop held the GIL for whole switch
            // intervals and queued callbacks faster than the running loop could run them: the
            // queue, and memory, grew without bound (gigabytes in seconds). Behind a long queue
            // the calling thread lets go of the GIL for a moment, so the loop's thread runs.
            py.detach(|| std::thread::sleep(std::time::Duration::from_micros(THREADSAFE_PAUSE_US)));
        }
        Ok(h)
    }

    /// A new handle for `callback(*args)` at the end of the ready queue.
    #[inline(always)]
    fn queue_soon(
        slf: &Bound<'_, Self>,
        callback: &Bound<'_, PyAny>,
        args: CallArgs,
        context: Option<Bound<'_, PyAny>>,
        method: &str,
        any_thread: bool,
    ) -> PyResult<Py<Handle>> {
        let py = slf.py();
        let core = slf.get();
        let debug = core.check_schedule(py, callback, method, any_thread)?;
        let h = Self::new_handle(slf, callback, args, context, debug)?;
        core.push_ready(py, &h)?;
        Ok(h)
    }

    pub(crate) fn call_later(
        slf: &Bound<'_, Self>,
        delay: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: CallArgs,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<TimerHandle>> {
        if delay.is_none() {
            return Err(PyTypeError::new_err("delay must not be None"));
        }
        let py = slf.py();
        // asyncio's `self.time() + delay`: a float or int delay is added here; anything else
        // as Python adds it to the float (a `Decimal` is a TypeError, a `Fraction` fine).
        let when = if Self::sync_clock(slf) == Clock::Monotonic {
            let now = ns_to_secs(sys::monotonic_ns());
            if let Ok(d) = delay.cast_exact::<PyFloat>() {
                return Self::schedule_timer(slf, now + d.value(), None, callback, args, context);
            }
            if delay.is_exact_instance_of::<PyInt>() {
                let d: f64 = delay.extract()?;
                return Self::schedule_timer(slf, now + d, None, callback, args, context);
            }
            PyFloat::new(py, now).add(delay)?
        } else {
            slf.call_method0(intern!(py, "time"))?.add(delay)?
        };
        Self::schedule_timer(slf, when_secs(&when)?, Some(&when), callback, args, context)
    }

    pub(crate) fn call_at(
        slf: &Bound<'_, Self>,
        when: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: CallArgs,
        context: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<TimerHandle>> {
        if when.is_none() {
            return Err(PyTypeError::new_err("when cannot be None"));
        }
        Self::sync_clock(slf);
        Self::schedule_timer(slf, when_secs(when)?, Some(when), callback, args, context)
    }
}

/// A deadline as a float. An int beyond the float range (asyncio keeps it and compares it
/// exactly) is +-inf, which orders the same against every clock reading.
#[inline(always)]
fn when_secs(when: &Bound<'_, PyAny>) -> PyResult<f64> {
    if let Ok(f) = when.cast_exact::<PyFloat>() {
        return Ok(f.value());
    }
    match when.extract::<f64>() {
        Ok(w) => Ok(w),
        Err(e) if e.is_instance_of::<PyOverflowError>(when.py()) && when.is_instance_of::<PyInt>() => {
            Ok(if when.gt(0)? { f64::INFINITY } else { f64::NEG_INFINITY })
        }
        Err(e) => Err(e),
    }
}

/// `LoopCore.time` as found on the type: what `_PyType_Lookup(type(loop), "time")` returns
/// unless a class replaces it. Set once at module initialisation (`install_clock`), holding a
/// reference so the address is never reused.
static LOOP_TIME: AtomicPtr<ffi::PyObject> = AtomicPtr::new(std::ptr::null_mut());

pub(crate) fn install_clock(py: Python<'_>) -> PyResult<()> {
    let tp = LoopCore::type_object(py);
    // SAFETY: a live type object and an interned str, with the GIL held.
    let found = unsafe { py::type_lookup(tp.as_type_ptr(), intern!(py, "time").as_ptr()) };
    if found.is_null() {
        return Err(PyRuntimeError::new_err("LoopCore.time is missing"));
    }
    // SAFETY: `found` is a live borrowed reference (from the type's dict); the new reference
    // taken here is kept for the life of the process.
    unsafe { ffi::Py_INCREF(found) };
    LOOP_TIME.store(found, Ordering::Relaxed);
    Ok(())
}

/// Does the loop's class (a subclass, or a patch of `Loop.time`) replace `time`?
fn class_time_replaced(slf: &Bound<'_, LoopCore>) -> bool {
    let py = slf.py();
    // SAFETY: the type of a live object, and an interned str, with the GIL held.
    let found = unsafe { py::type_lookup(ffi::Py_TYPE(slf.as_ptr()), intern!(py, "time").as_ptr()) };
    found != LOOP_TIME.load(Ordering::Relaxed)
}

/// The number behind a file object: an int as it is, else `int(fileobj.fileno())`, as
/// asyncio's `_ensure_fd_no_transport` and `selectors._fileobj_to_fd` take it (so a `fileno()`
/// that returns `"3"` or `3.0` names fd 3). asyncio resolves objects before checking that the
/// loop is open, and checks the range after.
fn fileobj_number<'py>(fileobj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyInt>> {
    let py = fileobj.py();
    if let Ok(n) = fileobj.cast::<PyInt>() {
        return Ok(n.clone());
    }
    let r = fileobj
        .call_method0(intern!(py, "fileno"))
        .and_then(|n| py.get_type::<PyInt>().call1((n,)))
        .and_then(|n| n.cast_into::<PyInt>().map_err(PyErr::from));
    match r {
        Ok(n) => Ok(n),
        Err(e)
            if e.is_instance_of::<pyo3::exceptions::PyAttributeError>(py)
                || e.is_instance_of::<PyTypeError>(py)
                || e.is_instance_of::<PyValueError>(py) =>
        {
            Err(PyValueError::new_err(format!("Invalid file object: {}", fileobj.repr()?)))
        }
        Err(e) => Err(e),
    }
}

/// The fd a number names: `ValueError` for a negative one (`selectors._fileobj_to_fd`), `None`
/// for one too large for a C `int`, which can never be registered: asyncio's lookups miss it
/// (`remove_reader` returns False) and its `epoll.register` fails (`fd_too_large`).
fn checked_fd(n: &Bound<'_, PyInt>) -> PyResult<Option<RawFd>> {
    let negative = match n.extract::<i64>() {
        Ok(v) if v >= 0 => return Ok(RawFd::try_from(v).ok()),
        Ok(_) => true,
        Err(_) => n.lt(0)?,
    };
    if negative {
        return Err(invalid_fd(n.str()?));
    }
    Ok(None)
}

/// What `selectors._fileobj_to_fd` / `selector.get_key` raise for a negative fd.
fn invalid_fd(fd: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("Invalid file descriptor: {fd}"))
}

/// What asyncio's `epoll.register` raises for an fd too large for a C `int`.
fn fd_too_large() -> PyErr {
    PyOverflowError::new_err("Python int too large to convert to C int")
}

/// Drop a closing loop's queued work (outside any borrow of the loop's state: destructors may
/// run Python code): parked handles go back on the GC's lists first, and timers are marked
/// unscheduled.
fn drop_queues(py: Python<'_>, mut ready: ReadyQueue<Work>, mut timers: TimerHeap<Py<TimerHandle>>) {
    for w in ready.drain() {
        unpark(py, &w);
        drop(w);
    }
    for t in timers.drain() {
        t.get().set_scheduled(false);
        drop(t);
    }
}

/// A parked handle leaving the ready queue without running goes back on the GC's lists.
fn unpark(py: Python<'_>, w: &Work) {
    if let Work::Handle(h) = w {
        Handle::unpark(h.bind(py));
    }
}

/// An idle `sock_*` registration (kept to save an `epoll_ctl`; invisible to callers).
fn is_idle_marker(py: Python<'_>, item: &Py<PyAny>) -> bool {
    item.bind(py).cast::<SockOp>().is_ok_and(|op| op.get().is_idle(py))
}

/// `selectors._fileobj_to_fd`: an int, or an object with `fileno()`; same errors. `None` for a
/// number too large to be an fd (`checked_fd`).
fn fileobj_to_fd(fileobj: &Bound<'_, PyAny>) -> PyResult<Option<RawFd>> {
    checked_fd(&fileobj_number(fileobj)?)
}

impl LoopCore {
    /// A stream transport was made for a socket named `name` (IPv4 / IPv6), connected to
    /// `peer`; `in_process`: a Unix socket whose peer this process made. Returns whether the
    /// peer is a socket of this loop (or may be: the Unix case), which `transport_gone` is then
    /// told (`local_links`).
    pub(crate) fn transport_made(
        &self,
        py: Python<'_>,
        name: Option<InetAddr>,
        peer: Option<InetAddr>,
        in_process: bool,
    ) -> bool {
        let mut st = self.state.borrow_mut(py);
        let linked = in_process || peer.is_some_and(|p| st.local_addrs.contains_key(&p));
        if let Some(name) = name {
            *st.local_addrs.entry(name).or_insert(0) += 1;
        }
        st.local_links += usize::from(linked);
        linked
    }

    /// The transport `transport_made` was told of let go of its socket.
    pub(crate) fn transport_gone(&self, py: Python<'_>, name: Option<InetAddr>, linked: bool) {
        let mut st = self.state.borrow_mut(py);
        if let Some(Entry::Occupied(mut count)) = name.map(|name| st.local_addrs.entry(name)) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
        st.local_links -= usize::from(linked);
    }

    /// Register a Rust work item (a transport core) for one direction of `fd`.
    pub(crate) fn watch(&self, py: Python<'_>, fd: RawFd, which: Which, item: Py<PyAny>) -> PyResult<()> {
        let replaced = {
            let mut st = self.state.borrow_mut(py);
            if st.closed {
                return Err(closed_err());
            }
            let reactor = st.reactor.as_mut().ok_or_else(closed_err)?;
            let replaced = reactor.set(fd, item.clone_ref(py), which, item).map_err(py::os_err)?;
            st.slot_left(py, &replaced.0);
            replaced
        };
        drop(replaced);
        Ok(())
    }

    pub(crate) fn unwatch(&self, py: Python<'_>, fd: RawFd, which: Which) -> PyResult<()> {
        let removed = {
            let mut st = self.state.borrow_mut(py);
            let removed = match st.reactor.as_mut() {
                Some(r) => r.unset(fd, which).map_err(py::os_err)?,
                None => (None, None),
            };
            st.slot_left(py, &removed.0);
            removed
        };
        drop(removed);
        Ok(())
    }

    /// Put a waiting `sock_*` operation in the fd's slot. An idle marker left by an earlier
    /// operation on the same open socket is swapped out without an `epoll_ctl` (the kernel
    /// already watches the fd for this direction).
    pub(crate) fn arm_sock(
        &self,
        py: Python<'_>,
        fd: RawFd,
        which: Which,
        op: &Bound<'_, SockOp>,
        sock: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let current = {
            let st = self.state.borrow(py);
            if st.closed {
                return Err(closed_err());
            }
            // asyncio's `_add_reader`: `selector.get_key(fd)` rejects a negative fd (a look-alike
            // socket whose `fileno()` gives -1).
            if fd < 0 {
                return Err(invalid_fd(fd));
            }
            let reactor = st.reactor.as_ref().ok_or_else(closed_err)?;
            reactor.item(fd, which).map(|i| i.clone_ref(py))
        };
        if let Some(cur) = current {
            if let Ok(prev) = cur.bind(py).cast::<SockOp>() {
                if prev.get().is_idle(py) && prev.get().same_socket(py, sock, fd) {
                    op.get().inherit(py, prev.get());
                    let old = {
                        let mut st = self.state.borrow_mut(py);
                        st.reactor.as_mut().and_then(|r| r.swap_item(fd, which, op.clone().into_any().unbind()))
                    };
                    drop((old, cur));
                    return Ok(());
                }
            }
        }
        self.watch(py, fd, which, op.clone().into_any().unbind())
    }

    /// What asyncio raises when a `sock_*` operation has to wait on a socket whose `fileno()`
    /// gave `fileno`, not an int a C `int` holds: `_ensure_fd_no_transport(fileno)`'s error,
    /// "Event loop is closed", `selector.get_key`'s `ValueError`, or `epoll.register`'s
    /// `OverflowError`. `fallback` when none applies.
    pub(crate) fn sock_fd_error(slf: &Bound<'_, Self>, fileno: &Bound<'_, PyAny>, fallback: PyErr) -> PyErr {
        let py = slf.py();
        let core = slf.get();
        if let Err(e) = slf.call_method1(intern!(py, "_ensure_fd_no_transport"), (fileno,)) {
            return e;
        }
        if core.state.borrow(py).closed {
            return closed_err();
        }
        match core.or_registered(py, fileno, fileobj_to_fd(fileno)) {
            Err(e) => e,
            Ok(None) => fd_too_large(),
            Ok(Some(_)) => fallback,
        }
    }

    /// The idle marker a finished read of `sock` left in the reader slot of `fd`, if it is
    /// still there.
    pub(crate) fn idle_sock_reader<'py>(
        &self,
        py: Python<'py>,
        fd: RawFd,
        sock: &Bound<'py, PyAny>,
    ) -> Option<Bound<'py, SockOp>> {
        let cur = {
            let st = self.state.borrow(py);
            st.reactor.as_ref()?.item(fd, Which::Reader)?.clone_ref(py).into_bound(py)
        };
        let op = cur.cast_into::<SockOp>().ok()?;
        (op.get().is_idle(py) && op.get().same_socket(py, sock, fd)).then_some(op)
    }

    /// Whether the fd's reader or writer slot holds `item` (work queued by a poll may run after
    /// its registration was removed or replaced, as a cancelled handle in asyncio's ready queue).
    pub(crate) fn holds(&self, py: Python<'_>, fd: RawFd, which: Which, item: &Bound<'_, PyAny>) -> bool {
        let st = self.state.borrow(py);
        st.reactor.as_ref().and_then(|r| r.item(fd, which)).is_some_and(|i| i.bind(py).is(item))
    }

    /// Take a `sock_*` operation out of the fd's slot, if the slot still holds it.
    pub(crate) fn disarm_sock(&self, py: Python<'_>, fd: RawFd, which: Which, op: &Bound<'_, SockOp>) -> PyResult<()> {
        if self.holds(py, fd, which, op.as_any()) {
            self.unwatch(py, fd, which)?;
        }
        Ok(())
    }

    /// Resolve a file object to its registered fd, finding a closed object by identity the way
    /// `selectors` does.
    /// `None`: a number too large to be an fd, so not registered.
    fn lookup_fd(&self, py: Python<'_>, fileobj: &Bound<'_, PyAny>) -> PyResult<Option<RawFd>> {
        self.or_registered(py, fileobj, fileobj_to_fd(fileobj))
    }

    /// `resolved`, or for a `ValueError` the fd `fileobj` itself is registered under
    /// (`selectors._fileobj_lookup`'s search by identity), else that error.
    fn or_registered(
        &self,
        py: Python<'_>,
        fileobj: &Bound<'_, PyAny>,
        resolved: PyResult<Option<RawFd>>,
    ) -> PyResult<Option<RawFd>> {
        match resolved {
            Err(e) if e.is_instance_of::<PyValueError>(py) => {
                let st = self.state.borrow(py);
                let found = st.reactor.as_ref().and_then(|r| {
                    r.registry
                        .iter()
                        .find_map(|(fd, e)| e.fileobj.as_ref().filter(|o| o.bind(py).is(fileobj)).map(|_| fd))
                });
                match found {
                    Some(fd) => Ok(Some(fd)),
                    None => Err(e),
                }
            }
            r => r,
        }
    }

    fn add_io(
        slf: &Bound<'_, Self>,
        which: Which,
        fileobj: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        let py = slf.py();
        let core = slf.get();
        let number = fileobj_number(fileobj)?;
        let (closed, debug) = {
            let st = core.state.borrow(py);
            (st.closed, st.debug)
        };
        if closed {
            return Err(closed_err());
        }
        // asyncio's `_add_reader`: `selector.get_key(fd)` (a negative fd is found by identity,
        // or raises), then `register`, whose `epoll.register` rejects a number too large.
        let fd = core.or_registered(py, fileobj, checked_fd(&number))?.ok_or_else(fd_too_large)?;
        let handle = Self::new_handle(slf, callback, CallArgs::tuple(args), None, debug)?;
        let (old, old_fileobj) = {
            let mut st = core.state.borrow_mut(py);
            let reactor = st.reactor.as_mut().ok_or_else(closed_err)?;
            let replaced = reactor
                .set(fd, fileobj.clone().unbind(), which, handle.clone_ref(py).into_any())
                .map_err(py::os_err)?;
            st.slot_left(py, &replaced.0);
            st.io_handles += 1;
            replaced
        };
        drop(old_fileobj);
        if let Some(old) = old {
            if let Ok(h) = old.bind(py).cast::<Handle>() {
                Handle::do_cancel(h)?;
            }
        }
        Ok(handle)
    }

    fn remove_io(&self, py: Python<'_>, which: Which, fileobj: &Bound<'_, PyAny>) -> PyResult<bool> {
        if self.state.borrow(py).closed {
            return Ok(false);
        }
        let Some(fd) = self.lookup_fd(py, fileobj)? else { return Ok(false) };
        let (old, old_fileobj) = {
            let mut st = self.state.borrow_mut(py);
            let removed = match st.reactor.as_mut() {
                Some(r) => r.unset(fd, which).map_err(py::os_err)?,
                None => (None, None),
            };
            st.slot_left(py, &removed.0);
            removed
        };
        drop(old_fileobj);
        match old {
            Some(item) => {
                // A Rust transport registered there has nothing to cancel; an idle `sock_*`
                // marker was not a registration as far as the caller can tell.
                if let Ok(h) = item.bind(py).cast::<Handle>() {
                    Handle::do_cancel(h)?;
                }
                Ok(!is_idle_marker(py, &item))
            }
            None => Ok(false),
        }
    }
}

#[pymethods]
impl LoopCore {
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn py_new(py: Python<'_>, _args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let _ = py::cached(py)?;
        let reactor = Reactor::new().map_err(py::os_err)?;
        Ok(Self {
            state: GilCell::new(State {
                ready: ReadyQueue::default(),
                timers: TimerHeap::default(),
                timer_cancelled_count: 0,
                closed: false,
                stopping: false,
                debug: false,
                debug_value: None,
                thread_id: None,
                current_handle: None,
                slow_callback_duration: 0.1,
                slow_callback_value: None,
                polling: false,
                polls_to_skip: 0,
                local_addrs: HashMap::new(),
                io_handles: 0,
                local_links: 0,
                parked_any: false,
                signal_handlers: false,
                clock: Clock::Monotonic,
                time_on_instance: false,
                time_checked_tag: 0,
                reactor: Some(reactor),
                task_factory: None,
                loop_kwargs: None,
                call_soon_bound: None,
                corking: false,
                callback_seq: 0,
                paused_at_seq: u64::MAX,
                corked: Vec::new(),
                ready_peak: 0,
                timer_peak: 0,
                room_checked_ns: 0,
            }),
            corked_any: AtomicBool::new(false),
            spare: GilCell::new(None),
        })
    }

    // --- scheduling ----------------------------------------------------------------------

    /// asyncio's `create_task`. The common case (no task factory, no extra keywords, not in
    /// debug mode) calls `asyncio.Task(coro, loop=self[, name=][, context=])` directly; the
    /// rest is `_create_task_slow` in Python.
    #[pyo3(signature = (coro, *, name=None, context=None, **kwargs))]
    fn create_task<'py>(
        slf: &Bound<'py, Self>,
        coro: &Bound<'py, PyAny>,
        name: Option<Bound<'py, PyAny>>,
        context: Option<Bound<'py, PyAny>>,
        kwargs: Option<Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let (closed, debug, factory) = {
            let st = slf.get().state.borrow(py);
            (st.closed, st.debug, st.task_factory.is_some())
        };
        if closed {
            return Err(closed_err());
        }
        let name = name.filter(|n| !n.is_none());
        let context = context.filter(|c| !c.is_none());
        let kwargs = kwargs.filter(|k| !k.is_empty());
        if debug || factory || kwargs.is_some() {
            let kwargs = kwargs.unwrap_or_else(|| PyDict::new(py));
            return slf.call_method1(intern!(py, "_create_task_slow"), (coro, name, context, kwargs));
        }
        let task = py::module_attr(py::cached(py)?.tasks_module.bind(py), intern!(py, "Task"))?;
        let loop_kwargs = Self::loop_kwargs(slf)?;
        if name.is_none() && context.is_none() {
            // The common case: keywords from the loop's own dict (see `new_future`).
            return task.call((coro,), Some(&loop_kwargs));
        }
        let kw = loop_kwargs.copy()?;
        if let Some(n) = name {
            kw.set_item(intern!(py, "name"), n)?;
        }
        if let Some(x) = context {
            kw.set_item(intern!(py, "context"), x)?;
        }
        task.call((coro,), Some(&kw))
    }

    #[getter(_task_factory)]
    fn getter_attr_task_factory(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.state.borrow(py).task_factory.as_ref().map(|f| f.clone_ref(py))
    }
    #[setter(_task_factory)]
    fn setter_attr_task_factory(&self, py: Python<'_>, v: Option<Py<PyAny>>) {
        let old = std::mem::replace(&mut self.state.borrow_mut(py).task_factory, v.filter(|f| !f.is_none(py)));
        drop(old);
    }

    fn time(&self) -> f64 {
        ns_to_secs(sys::monotonic_ns())
    }

    /// A handle for `callback(*args)` that is not scheduled (signal handlers use it).
    fn _make_handle(
        slf: &Bound<'_, Self>,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        let debug = slf.get().debug(slf.py());
        Self::new_handle(slf, callback, CallArgs::tuple(args), None, debug)
    }

    /// Queue an existing handle (asyncio's `_add_callback`).
    fn _add_callback(&self, py: Python<'_>, handle: &Bound<'_, Handle>) {
        if !handle.get().is_cancelled() {
            self.state.borrow_mut(py).ready.push(Work::Handle(handle.clone().unbind()));
        }
    }

    fn _timer_handle_cancelled(&self, py: Python<'_>, handle: &Bound<'_, TimerHandle>) {
        if handle.get().is_scheduled() {
            self.timer_handle_cancelled(py);
        }
    }

    /// Look for a replaced `time` on this loop (its `__dict__`) and on its class, and key the
    /// timers by that clock (`Clock`). Called by `__init__`, at `run_forever` start, and when
    /// `time` is set or deleted on the loop (`__setattr__`).
    fn _check_clock(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        // Not through `__dict__`: asking for it makes CPython (3.11+) turn the instance's
        // inline attribute values into a real dict for good, and every attribute lookup on the
        // loop then costs a dict lookup (+2.6% instructions per future ping-pong). `loop.time`
        // is the class's method bound to this loop unless the loop has a `time` of its own
        // (or the class's is replaced, which `sync_clock` sees too).
        let attr = slf.getattr(intern!(py, "time"))?;
        let on_instance = !attr.getattr_opt(intern!(py, "__self__"))?.is_some_and(|s| s.is(slf));
        slf.get().state.borrow_mut(py).time_on_instance = on_instance;
        Self::sync_clock(slf);
        Ok(())
    }

    /// `object.__setattr__`, then `_check_clock` if the name is `time`: a test's
    /// `loop.time = fake` or `mock.patch.object(loop, "time", ...)` takes effect at once.
    fn __setattr__(slf: &Bound<'_, Self>, name: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        // SAFETY: live objects, the GIL held; a null value would mean delete, and is not one.
        if unsafe { ffi::PyObject_GenericSetAttr(slf.as_ptr(), name.as_ptr(), value.as_ptr()) } < 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Self::after_setattr(slf, name)
    }

    fn __delattr__(slf: &Bound<'_, Self>, name: &Bound<'_, PyAny>) -> PyResult<()> {
        // SAFETY: live objects, the GIL held; a null value asks for deletion.
        if unsafe { ffi::PyObject_GenericSetAttr(slf.as_ptr(), name.as_ptr(), std::ptr::null_mut()) } < 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Self::after_setattr(slf, name)
    }

    /// Told by the Python side whether any `add_signal_handler` handler is installed.
    fn _set_signal_handlers_present(&self, py: Python<'_>, present: bool) {
        self.state.borrow_mut(py).signal_handlers = present;
    }

    fn _write_to_self(&self, py: Python<'_>) {
        if let Some(r) = &self.state.borrow(py).reactor {
            r.wake();
        }
    }

    /// The fd that `signal.set_wakeup_fd` should write to, or -1 once closed.
    fn _wakeup_fd(&self, py: Python<'_>) -> RawFd {
        self.state.borrow(py).reactor.as_ref().map_or(-1, |r| r.signal_fd())
    }

    fn _check_callback(&self, py: Python<'_>, callback: &Bound<'_, PyAny>, method: &str) -> PyResult<()> {
        py::check_callback(py, callback, method)
    }

    fn _check_thread(&self, py: Python<'_>) -> PyResult<()> {
        self.check_thread(py)
    }

    // --- running -------------------------------------------------------------------------

    fn _run_once(slf: &Bound<'_, Self>) -> PyResult<()> {
        run::run_once(slf)
    }

    /// The body of `run_forever` between its set-up and clean-up (done in Python).
    fn _run_forever_inner(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        // The first iteration of a run always polls (`stop(); run_forever()` must see I/O).
        slf.get().state.borrow_mut(py).polls_to_skip = 0;
        let res = loop {
            if let Err(e) = run::run_once(slf) {
                break Err(e);
            }
            if slf.get().state.borrow(py).stopping {
                break Ok(());
            }
        };
        slf.get().unpark_all(py);
        res
    }

    fn stop(&self, py: Python<'_>) {
        self.state.borrow_mut(py).stopping = true;
    }

    fn is_running(&self, py: Python<'_>) -> bool {
        self.state.borrow(py).thread_id.is_some()
    }

    fn is_closed(&self, py: Python<'_>) -> bool {
        self.state.borrow(py).closed
    }

    /// Mark closed, drop queued work and registrations, close the poller and the waker.
    fn _close_core(&self, py: Python<'_>) {
        let (ready, timers, entries, reactor, current, own) = {
            let mut st = self.state.borrow_mut(py);
            st.closed = true;
            // What refers back to the loop goes too, so plain reference counting frees it.
            let own = (st.loop_kwargs.take(), st.call_soon_bound.take());
            // Taken whole, not copied: a queue that hit MemoryError must not need another.
            let ready = std::mem::take(&mut st.ready);
            let timers = std::mem::take(&mut st.timers);
            st.timer_cancelled_count = 0;
            let mut reactor = st.reactor.take();
            st.io_handles = 0;
            let entries = reactor.as_mut().map(|r| r.clear()).unwrap_or_default();
            (ready, timers, entries, reactor, st.current_handle.take(), own)
        };
        // Dropped here, outside the borrow: their destructors may run Python code.
        drop_queues(py, ready, timers);
        drop((entries, reactor, current, own));
    }

    // --- readers and writers -------------------------------------------------------------

    #[pyo3(signature = (fd, callback, *args))]
    fn _add_reader(
        slf: &Bound<'_, Self>,
        fd: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        Self::add_io(slf, Which::Reader, fd, callback, args)
    }

    #[pyo3(signature = (fd, callback, *args))]
    fn _add_writer(
        slf: &Bound<'_, Self>,
        fd: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<Py<Handle>> {
        Self::add_io(slf, Which::Writer, fd, callback, args)
    }

    fn _remove_reader(&self, py: Python<'_>, fd: &Bound<'_, PyAny>) -> PyResult<bool> {
        self.remove_io(py, Which::Reader, fd)
    }

    fn _remove_writer(&self, py: Python<'_>, fd: &Bound<'_, PyAny>) -> PyResult<bool> {
        self.remove_io(py, Which::Writer, fd)
    }

    /// The selector-style event mask watched for `fd` (1 = read, 2 = write), or None when the
    /// fd is not watched. Backs the `_selector` view that asyncio's transport reprs consult.
    fn _fd_events(&self, py: Python<'_>, fd: RawFd) -> Option<u8> {
        let st = self.state.borrow(py);
        let entry = st.reactor.as_ref()?.registry.get(fd)?;
        let active = |slot: &Option<Py<PyAny>>| slot.as_ref().is_some_and(|i| !is_idle_marker(py, i));
        let mask = u8::from(active(&entry.reader)) | (u8::from(active(&entry.writer)) << 1);
        (mask != 0).then_some(mask)
    }

    /// The fds currently watched (for tests and `close()` bookkeeping).
    fn _watched_fds(&self, py: Python<'_>) -> Vec<RawFd> {
        let mut v: Vec<RawFd> = {
            let st = self.state.borrow(py);
            st.reactor.as_ref().map(|r| r.registry.keys().collect()).unwrap_or_default()
        };
        v.retain(|fd| self._fd_events(py, *fd).is_some());
        v.sort_unstable();
        v
    }

    /// asyncio's `_start_serving` for a server without TLS: accept in Rust (accept.rs).
    fn _start_accepting(
        slf: &Bound<'_, Self>,
        protocol_factory: &Bound<'_, PyAny>,
        sock: &Bound<'_, PyAny>,
        server: &Bound<'_, PyAny>,
        backlog: isize,
    ) -> PyResult<()> {
        Acceptor::start(slf, protocol_factory, sock, server, backlog)
    }

    // --- sock_* (see sockops.rs) ---------------------------------------------------------

    fn sock_recv(slf: &Bound<'_, Self>, sock: &Bound<'_, PyAny>, n: &Bound<'_, PyAny>) -> PyResult<Py<SockOp>> {
        sockops::op(slf, sock, Kind::Recv(n.clone().unbind()))
    }

    fn sock_recv_into(slf: &Bound<'_, Self>, sock: &Bound<'_, PyAny>, buf: &Bound<'_, PyAny>) -> PyResult<Py<SockOp>> {
        sockops::op(slf, sock, Kind::RecvInto(buf.clone().unbind()))
    }

    fn sock_recvfrom(
        slf: &Bound<'_, Self>,
        sock: &Bound<'_, PyAny>,
        bufsize: &Bound<'_, PyAny>,
    ) -> PyResult<Py<SockOp>> {
        sockops::op(slf, sock, Kind::RecvFrom(bufsize.clone().unbind()))
    }

    #[pyo3(signature = (sock, buf, nbytes=None))]
    fn sock_recvfrom_into(
        slf: &Bound<'_, Self>,
        sock: &Bound<'_, PyAny>,
        buf: &Bound<'_, PyAny>,
        nbytes: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<SockOp>> {
        let py = slf.py();
        let nbytes = match nbytes {
            Some(n) => n,
            None => 0i32.into_pyobject(py)?.into_any(),
        };
        sockops::op(slf, sock, Kind::RecvFromInto(buf.clone().unbind(), nbytes.unbind()))
    }

    fn sock_sendall(slf: &Bound<'_, Self>, sock: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<Py<SockOp>> {
        sockops::op(slf, sock, Kind::SendAll(data.clone().unbind(), 0))
    }

    fn sock_sendto(
        slf: &Bound<'_, Self>,
        sock: &Bound<'_, PyAny>,
        data: &Bound<'_, PyAny>,
        address: &Bound<'_, PyAny>,
    ) -> PyResult<Py<SockOp>> {
        sockops::op(slf, sock, Kind::SendTo(data.clone().unbind(), address.clone().unbind()))
    }

    /// The connect step of `sock_connect` (the Python method checks and resolves first).
    fn _sock_connect_op(
        slf: &Bound<'_, Self>,
        sock: &Bound<'_, PyAny>,
        address: &Bound<'_, PyAny>,
    ) -> PyResult<Py<SockOp>> {
        sockops::op(slf, sock, Kind::Connect(address.clone().unbind()))
    }

    fn sock_accept(slf: &Bound<'_, Self>, sock: &Bound<'_, PyAny>) -> PyResult<Py<SockOp>> {
        sockops::op(slf, sock, Kind::Accept)
    }

    // --- state that asyncio keeps as attributes ------------------------------------------

    /// What `set_debug` was given (asyncio's plain attribute: any object, used for its truth).
    #[getter(_debug)]
    fn getter_attr_debug(&self, py: Python<'_>) -> Py<PyAny> {
        self.debug_value(py)
    }
    #[setter(_debug)]
    fn setter_attr_debug(&self, py: Python<'_>, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let on = v.is_truthy()?;
        let value = (!v.is_exact_instance_of::<PyBool>()).then(|| v.clone().unbind());
        let old = {
            let mut st = self.state.borrow_mut(py);
            st.debug = on;
            std::mem::replace(&mut st.debug_value, value)
        };
        drop(old);
        Ok(())
    }

    #[getter(_closed)]
    fn getter_attr_closed(&self, py: Python<'_>) -> bool {
        self.state.borrow(py).closed
    }

    #[getter(_stopping)]
    fn getter_attr_stopping(&self, py: Python<'_>) -> bool {
        self.state.borrow(py).stopping
    }
    #[setter(_stopping)]
    fn setter_attr_stopping(&self, py: Python<'_>, v: bool) {
        self.state.borrow_mut(py).stopping = v;
    }

    #[getter(_thread_id)]
    fn getter_attr_thread_id(&self, py: Python<'_>) -> Option<u64> {
        self.state.borrow(py).thread_id
    }
    #[setter(_thread_id)]
    fn setter_attr_thread_id(&self, py: Python<'_>, v: Option<u64>) {
        self.state.borrow_mut(py).thread_id = v;
    }

    #[getter(_current_handle)]
    fn getter_attr_current_handle(&self, py: Python<'_>) -> Option<Py<Handle>> {
        self.state.borrow(py).current_handle.as_ref().map(|h| h.clone_ref(py))
    }

    /// asyncio's plain attribute: any object; debug mode compares a callback's duration with
    /// it (a float here, anything else with Python's `>=`, which may raise as asyncio's does).
    #[getter(slow_callback_duration)]
    fn getter_attrslow_callback_duration(&self, py: Python<'_>) -> Py<PyAny> {
        let st = self.state.borrow(py);
        match &st.slow_callback_value {
            Some(v) => v.clone_ref(py),
            None => PyFloat::new(py, st.slow_callback_duration).into_any().unbind(),
        }
    }
    #[setter(slow_callback_duration)]
    fn setter_attrslow_callback_duration(&self, py: Python<'_>, v: &Bound<'_, PyAny>) {
        let (secs, value) = match v.cast_exact::<PyFloat>() {
            Ok(f) => (f.value(), None),
            Err(_) => (f64::NAN, Some(v.clone().unbind())),
        };
        let old = {
            let mut st = self.state.borrow_mut(py);
            st.slow_callback_duration = secs;
            std::mem::replace(&mut st.slow_callback_value, value)
        };
        drop(old);
    }

    #[getter(_timer_cancelled_count)]
    fn getter_attr_timer_cancelled_count(&self, py: Python<'_>) -> usize {
        self.state.borrow(py).timer_cancelled_count
    }

    #[getter(_clock_resolution)]
    fn getter_attr_clock_resolution(&self) -> f64 {
        1e-9
    }

    /// Number of handles waiting in the ready queue, and of scheduled timers.
    fn _queue_sizes(&self, py: Python<'_>) -> (usize, usize) {
        let st = self.state.borrow(py);
        (st.ready.len(), st.timers.len())
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        let Some(st) = self.state.try_borrow_unguarded() else { return Ok(()) };
        for w in st.ready.iter() {
            match w {
                Work::Handle(h) => visit.call(h)?,
                Work::Stream(c, _) => visit.call(c)?,
                Work::Sock(o) => visit.call(o)?,
                Work::Accept(a) => visit.call(a)?,
            }
        }
        for t in st.timers.iter() {
            visit.call(t)?;
        }
        visit.call(&st.current_handle)?;
        visit.call(&st.task_factory)?;
        visit.call(&st.loop_kwargs)?;
        visit.call(&st.call_soon_bound)?;
        for c in &st.corked {
            visit.call(c)?;
        }
        if let Some(r) = &st.reactor {
            for e in r.registry.values() {
                visit.call(&e.fileobj)?;
                visit.call(&e.reader)?;
                visit.call(&e.writer)?;
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        Python::attach(|py| {
            let (ready, timers, entries, current, factory) = {
                let mut st = self.state.borrow_mut(py);
                let ready = std::mem::take(&mut st.ready);
                let timers = std::mem::take(&mut st.timers);
                let entries = st.reactor.as_mut().map(|r| r.clear()).unwrap_or_default();
                let extra = (st.task_factory.take(), st.loop_kwargs.take(), st.call_soon_bound.take());
                (ready, timers, entries, st.current_handle.take(), extra)
            };
            drop_queues(py, ready, timers);
            drop((entries, current, factory));
        });
    }
}
