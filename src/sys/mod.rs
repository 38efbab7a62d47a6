//! The operating system behind one small interface. Linux (epoll) today; kqueue, IOCP and
//! io_uring backends slot in here without touching the loop core.

#[cfg(target_os = "linux")]
mod unix;
#[cfg(target_os = "linux")]
pub use unix::*;

#[cfg(not(target_os = "linux"))]
compile_error!("ferroloop currently supports Linux only (see docs/DESIGN.md, 'Platforms')");
