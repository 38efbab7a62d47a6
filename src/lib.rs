//! ferroloop: a drop-in replacement for asyncio's event loop.
//!
//! This file only wires the module together. See docs/DESIGN.md for the architecture:
//! `event_loop` (scheduling, timers, `run_once`), `handles`, `reactor` (poller, registry,
//! waker), `sys` (the OS), `py` (Python glue).

use pyo3::prelude::*;

mod event_loop;
mod handles;
mod py;
mod reactor;
mod sockops;
mod sys;
mod transports;

#[pymodule]
fn _ferroloop(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<event_loop::LoopCore>()?;
    event_loop::install_fastcall(m.py())?;
    event_loop::install_clock(m.py())?;
    m.add_class::<event_loop::CachedCallSoon>()?;
    event_loop::install_cached_call_soon(m.py())?;
    m.add_class::<event_loop::AsyncioMethod>()?;
    sys::raise_heap_thresholds();
    m.add("_direct_read_max", transports::stream::set_direct_read_max())?;
    py::context::install(m.py())?;
    m.add("_deferred_contexts", py::context::enabled())?;
    m.add_class::<handles::Handle>()?;
    m.add_class::<handles::TimerHandle>()?;
    handles::install(m.py())?;
    m.add("_handle_fast_paths", handles::fast_paths())?;
    m.add_class::<transports::stream::StreamCore>()?;
    m.add_class::<sockops::SockOp>()?;
    sockops::install_am_send(m.py());
    m.add_class::<transports::accept::Acceptor>()?;
    m.add_class::<transports::addr::SockAddr>()?;
    m.add_function(wrap_pyfunction!(transports::write_method::stream_write_method, m)?)?;
    m.add_function(wrap_pyfunction!(transports::write_method::stream_is_closing_method, m)?)?;
    m.add_class::<transports::datagram::DatagramCore>()?;
    m.add_function(wrap_pyfunction!(transports::datagram::datagram_methods, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
