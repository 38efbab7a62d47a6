//! One iteration of the loop: asyncio's `BaseEventLoop._run_once`, in Rust.
//!
//! 1. drop cancelled timers (compacting the heap when they are over half of it),
//! 2. poll: without blocking when work is ready or a stop is pending, else until the next
//!    deadline; the GIL is released only for a poll that may block. A non-blocking poll is
//!    skipped when no fd and no signal handler is registered (it could find nothing), and
//!    in the two iterations after one that polled (what a poll finds usually takes three
//!    iterations to settle: the fd's callback, the task it wakes, that task's done callbacks;
//!    by then the queue has usually drained and the next poll is the blocking one), unless
//!    something in this process could tell: an `add_reader`/`add_writer` callback, or a stream
//!    connection between two sockets of this loop (`State::io_handles`, `State::local_links`),
//! 3. queue the handles of ready fds, handle signals and run Python signal handlers,
//! 4. move due timers behind what is already queued,
//! 5. run exactly the handles queued so far.

use std::io;
use std::sync::atomic::Ordering;

use pyo3::intern;
use pyo3::prelude::*;

use super::timers::{self, Clock};
use super::{LoopCore, Work, MAX_POLL_TIMEOUT_MS};
use crate::handles::{self, Handle, TimerHandle};
use crate::reactor::{is_waker, Which};
use crate::sockops::{self, SockOp};
use crate::sys;
use crate::transports::accept::{self, Acceptor};
use crate::transports::stream::{self, StreamCore};

fn timer_cancelled(py: Python<'_>, t: &Py<TimerHandle>) -> bool {
    t.bind(py).as_super().get().is_cancelled()
}

pub(super) fn run_once(slf: &Bound<'_, LoopCore>) -> PyResult<()> {
    let py = slf.py();
    let core = slf.get();
    // Objects removed under the borrow are dropped after it: a drop can run Python code.
    let mut garbage: Vec<Py<TimerHandle>> = Vec::new();
    // The clock is read only with timers scheduled: without, neither the poll timeout nor
    // step 4 needs it (a callback chain runs one iteration per callback).
    let has_timers = !core.state.borrow(py).timers.is_empty();
    let now = if has_timers { Some(LoopCore::now_key(slf)?) } else { None };

    // 1 + 2a: purge cancelled timers, compute the poll timeout.
    let (timeout_ms, poller, (mut buf, mut events)) = {
        let mut st = core.state.borrow_mut(py);
        // "Now" read on another clock than the heap's (`time()` switched it): unknown, so
        // poll without blocking and read it again in `run_ready`.
        let clock_changed = now.is_some_and(|(c, _)| c != st.clock);
        let now_ns = now.filter(|_| !clock_changed).map(|(_, t)| t);
        if has_timers {
            st.timer_peak = st.timer_peak.max(st.timers.len());
            if timers::should_compact(st.timers.len(), st.timer_cancelled_count) {
                st.timers.compact(|t| timer_cancelled(py, t), &mut garbage);
                st.timer_cancelled_count = 0;
            } else {
                st.timers.pop_cancelled_head(|t| timer_cancelled(py, t), &mut garbage);
                st.timer_cancelled_count = st.timer_cancelled_count.saturating_sub(garbage.len());
            }
        }
        let timeout_ms: i32 = if !st.ready.is_empty() || st.stopping || clock_changed {
            0
        } else if let (Some(when_ns), Some(now_ns)) = (st.timers.peek_when(), now_ns) {
            st.clock.timeout_ms(when_ns, now_ns, MAX_POLL_TIMEOUT_MS) as i32
        } else {
            -1
        };
        let signal_handlers = st.signal_handlers;
        // A timer due now runs after what a poll finds ready (asyncio's order): this
        // iteration polls, so I/O that is already there is seen first.
        let timer_due = matches!((st.timers.peek_when(), now_ns), (Some(w), Some(n)) if w <= n);
        let in_skip_window =
            st.polls_to_skip > 0 && !st.stopping && st.io_handles == 0 && st.local_links == 0 && !timer_due;
        let Some(reactor) = st.reactor.as_mut() else {
            return Err(super::closed_err());
        };
        // A non-blocking poll is skipped
        // - with nothing registered but the waker: it can find nothing (the waker is written
        //   only while the loop blocks, and signal numbers only matter with handlers);
        // - in the `POLL_SKIP` iterations after one that polled, unless stopping: what that
        //   poll found has just run and usually queued its follow-ups (a task woken by a read,
        //   then that task's done callbacks). Polling before they run would mostly find
        //   nothing, or race a peer's reply to a response written a few microseconds earlier
        //   (DESIGN.md). fds are still polled at least every `POLL_SKIP + 1` iterations, and
        //   the last iteration before a stop always polls. Not while a peer in this process
        //   could see the difference: an fd watched by a Python callback (its I/O is made by
        //   code the loop does not see), or a stream transport connected to another socket of
        //   this loop; those iterations poll as asyncio's loop does. Nor when a timer is due:
        //   I/O that arrived before it runs first, as on asyncio's loop (a reply racing a
        //   `call_later(0)` timeout).
        let skip = timeout_ms == 0 && (in_skip_window || (reactor.registry.is_empty() && !signal_handlers));
        if skip {
            st.polls_to_skip = st.polls_to_skip.saturating_sub(1);
            drop(st);
            release_timers(py, garbage);
            // No poll happened, so "now" is still now.
            return run_ready(slf, now);
        }
        let poller = reactor.poller();
        let buf = reactor.take_buf();
        if timeout_ms != 0 {
            st.give_back_room(py);
        }
        st.polling = timeout_ms != 0;
        st.polls_to_skip = super::POLL_SKIP;
        (timeout_ms, poller, buf)
    };
    release_timers(py, garbage);

    // 2b: poll (the waker, if written, is drained in there: signal numbers land in `signals`).
    let mut signals: Vec<u8> = Vec::new();
    let res = if timeout_ms == 0 {
        poller.wait(&mut buf, &mut events, 0, &mut signals)
    } else {
        py.detach(|| poller.wait(&mut buf, &mut events, timeout_ms, &mut signals))
    };
    let interrupted = match res {
        Ok(_) => false,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
        Err(e) => {
            let mut st = core.state.borrow_mut(py);
            st.polling = false;
            if let Some(r) = st.reactor.as_mut() {
                r.put_buf((buf, events));
            }
            return Err(crate::py::os_err(e));
        }
    };

    // 3: dispatch readiness.
    let mut stale: Vec<(i32, Which)> = Vec::new();
    {
        let mut st = core.state.borrow_mut(py);
        st.polling = false;
        let st = &mut *st;
        if let Some(r) = st.reactor.as_mut() {
            for ev in events.iter() {
                if is_waker(ev.token) {
                    continue;
                }
                let fd = ev.token as i32;
                let Some(entry) = r.registry.get(fd) else { continue };
                for (ready, slot, which) in
                    [(ev.readable, &entry.reader, Which::Reader), (ev.writable, &entry.writer, Which::Writer)]
                {
                    if !ready {
                        continue;
                    }
                    let Some(item) = slot else { continue };
                    let item = item.bind(py);
                    if let Ok(h) = item.cast::<Handle>() {
                        if h.get().is_cancelled() {
                            stale.push((fd, which));
                        } else {
                            st.ready.push(Work::Handle(h.clone().unbind()));
                        }
                    } else if let Ok(core) = item.cast::<StreamCore>() {
                        st.ready.push(Work::Stream(core.clone().unbind(), which));
                    } else if let Ok(op) = item.cast::<SockOp>() {
                        st.ready.push(Work::Sock(op.clone().unbind()));
                    } else if let Ok(a) = item.cast::<Acceptor>() {
                        st.ready.push(Work::Accept(a.clone().unbind()));
                    }
                }
            }
            r.put_buf((buf, events));
        }
    }
    if !stale.is_empty() {
        let mut dropped = Vec::new();
        {
            let mut st = core.state.borrow_mut(py);
            if let Some(r) = st.reactor.as_mut() {
                for (fd, which) in stale {
                    dropped.push(r.unset(fd, which).map_err(crate::py::os_err)?);
                }
            }
            for (item, _) in &dropped {
                st.slot_left(py, item);
            }
        }
        drop(dropped);
    }
    for sig in signals {
        slf.call_method1(intern!(py, "_handle_signal"), (sig,))?;
    }
    if interrupted || timeout_ms != 0 {
        // Run Python-level signal handlers now (KeyboardInterrupt surfaces here).
        py.check_signals()?;
    }

    run_ready(slf, None)
}

/// Purged timers leave the heap: mark them unscheduled, then drop them (outside any borrow).
fn release_timers(py: Python<'_>, garbage: Vec<Py<TimerHandle>>) {
    if garbage.capacity() == 0 {
        // Nothing was purged, so nothing was allocated: skip the out-of-line drop glue (23
        // instructions per iteration). Forgetting an unallocated Vec leaks nothing.
        std::mem::forget(garbage);
        return;
    }
    for t in garbage {
        t.get().set_scheduled(false);
        // As a `Bound`: a plain decref, without PyO3's thread-local attachment check.
        drop(t.into_bound(py));
    }
}

/// Steps 4 and 5: due timers join the ready queue, then run what is queued. `now` is the
/// time already read this iteration (with its clock), if no poll has happened since.
fn run_ready(slf: &Bound<'_, LoopCore>, now: Option<(Clock, i64)>) -> PyResult<()> {
    let py = slf.py();
    let core = slf.get();
    let now = match now {
        Some(t) => Some(t),
        // No timers, no clock (Python code run since the last look may have added some).
        None if core.state.borrow(py).timers.is_empty() => None,
        None => Some(LoopCore::now_key(slf)?),
    };
    let ntodo = {
        let mut st = core.state.borrow_mut(py);
        // A "now" read on another clock than the heap's (`time()` switched it) is ignored:
        // the next iteration reads it again.
        if let Some((_, now_ns)) = now.filter(|(c, _)| *c == st.clock) {
            while let Some(t) = st.timers.pop_due(now_ns) {
                t.get().set_scheduled(false);
                st.ready.push(Work::Handle(t.into_bound(py).into_super().unbind()));
            }
        }
        st.corking = true;
        let ntodo = st.ready.begin_iteration();
        st.ready_peak = st.ready_peak.max(ntodo);
        ntodo
    };

    // 5: run what was ready when this iteration began. Stream transport writes made by a
    // callback are held ("corked") and sent as it returns, in its context: the writes of one
    // callback go out in one system call (`StreamCore::write`).
    let res = run_callbacks(slf, ntodo);
    let corked = {
        let mut st = core.state.borrow_mut(py);
        st.corking = false;
        !st.corked.is_empty()
    };
    if corked {
        let flushed = send_corked(slf);
        return res.and(flushed);
    }
    res
}

/// Run `ntodo` queued items. Each callback's corked writes are sent as it returns, still in
/// its context (a handle's: `run_handle`'s `after`; a transport's reading context:
/// `stream::read_ready`), as asyncio's `write()` sends inside the callback: a failed send's
/// `_fatal_error` and the writer a partial send starts see that context. What another item
/// wrote (the loop's own paths) is sent after it.
fn run_callbacks(slf: &Bound<'_, LoopCore>, ntodo: usize) -> PyResult<()> {
    let py = slf.py();
    let core = slf.get();
    let after = || send_corked_if_any(slf);
    for _ in 0..ntodo {
        let (handle, debug) = {
            let mut st = core.state.borrow_mut(py);
            st.callback_seq = st.callback_seq.wrapping_add(1);
            (st.ready.pop(), st.debug)
        };
        // Each item becomes a `Bound` at once: dropping a `Py` asks PyO3's thread-local
        // attachment count first (a `__tls_get_addr` call per item), a `Bound` just decrefs.
        let handle = match handle {
            None => break,
            Some(Work::Handle(h)) => h.into_bound(py),
            Some(io) => {
                let r = run_io(py, io);
                r.and(after())?;
                continue;
            }
        };
        let h = &handle;
        h.get().unpark_context();
        let r = if h.get().is_cancelled() {
            Ok(())
        } else if debug {
            run_debug(slf, h, &after)
        } else {
            handles::run_handle(py, h, &after)
        };
        Handle::settle(h);
        r?;
    }
    Ok(())
}

/// Send the corked writes, if a transport holds some (`send_corked`).
#[inline(always)]
pub(crate) fn send_corked_if_any(slf: &Bound<'_, LoopCore>) -> PyResult<()> {
    if !slf.get().corked_any.load(Ordering::Relaxed) {
        return Ok(());
    }
    send_corked(slf)
}

/// Send the corked writes of the transports that hold some, in the order they first wrote.
/// Every one is sent to even if one of them raises (only `KeyboardInterrupt`/`SystemExit` can:
/// write errors go to the transport's `_fatal_error`); the first error is returned.
#[inline(never)]
fn send_corked(slf: &Bound<'_, LoopCore>) -> PyResult<()> {
    let py = slf.py();
    let core = slf.get();
    let mut first_err: Option<PyErr> = None;
    loop {
        let c = {
            let mut st = core.state.borrow_mut(py);
            match st.corked.len() {
                0 => {
                    core.corked_any.store(false, Ordering::Relaxed);
                    break;
                }
                1 => st.corked.pop(),
                _ => Some(st.corked.remove(0)),
            }
        };
        let Some(c) = c else { break };
        if let Err(e) = StreamCore::uncork(&c.into_bound(py)) {
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// An fd's work item. Out of line, so none of the I/O paths' code (some of which consults
/// PyO3's thread-local attachment count) is hoisted into `run_ready`'s loop, which would then
/// look the thread-local block up on every iteration.
#[inline(never)]
fn run_io(py: Python<'_>, work: Work) -> PyResult<()> {
    match work {
        Work::Handle(_) => unreachable!("run_ready runs handles itself"),
        Work::Stream(core, which) => {
            let core = core.into_bound(py);
            match which {
                Which::Reader => stream::read_ready(&core),
                Which::Writer => stream::write_ready(&core),
            }
        }
        Work::Sock(op) => sockops::run(&op.into_bound(py)),
        Work::Accept(a) => accept::run(&a.into_bound(py)),
    }
}

/// Debug mode: remember the running handle and warn about slow callbacks. Out of line, like
/// `run_io`: its `Py` drops consult PyO3's thread-local.
#[inline(never)]
fn run_debug(slf: &Bound<'_, LoopCore>, h: &Bound<'_, Handle>, after: &impl Fn() -> PyResult<()>) -> PyResult<()> {
    let py = slf.py();
    let core = slf.get();
    let prev = core.state.borrow_mut(py).current_handle.replace(h.clone().unbind());
    drop(prev);
    // asyncio times the callback with `self.time()`: a replaced clock (a test's clock that
    // jumps, maybe replaced by the callback itself) is what the warning measures.
    let now = || -> PyResult<f64> {
        if core.state.borrow(py).clock == Clock::Custom {
            slf.call_method0(intern!(py, "time"))?.extract()
        } else {
            Ok(sys::monotonic_ns() as f64 / 1e9)
        }
    };
    let t0 = now()?;
    let res = handles::run_handle(py, h, after);
    let dt = now()? - t0;
    let prev = core.state.borrow_mut(py).current_handle.take();
    drop(prev);
    res?;
    if core.is_slow(py, dt)? {
        slf.call_method1(intern!(py, "_log_slow_callback"), (h, dt))?;
    }
    Ok(())
}
