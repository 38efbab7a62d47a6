//! The reactor: the poller, the registry of watched file descriptors, and the waker.
//!
//! Ground rules:
//! - The registry maps each fd to its reader and writer work; the epoll interest always equals
//!   "has a reader" / "has a writer" (level-triggered, so an undrained fd is reported again on
//!   the next poll with no extra syscall).
//! - Two wakers. Other threads (`call_soon_threadsafe`) add to an eventfd, and only while the
//!   loop is (about to be) blocked in the poll. `signal.set_wakeup_fd` writes signal numbers
//!   to one end of a socketpair (it writes single bytes, which an eventfd refuses).
//! - `Poller` (the epoll instance and both wakers' read ends) is shared through an `Arc` so the
//!   loop thread can poll, and drain the wakers, without the GIL while other threads (holding
//!   the GIL) add or remove registrations, which epoll allows. The `Arc` keeps the fds open
//!   for as long as a poll uses them.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use crate::sys::{self, Epoll, Interest};

mod fdtable;
pub use fdtable::FdTable;

/// The token of the thread waker (an eventfd); fds use their own number as token.
pub const WAKER_TOKEN: u64 = u64::MAX;
/// The token of the signal waker's read end.
pub const SIGNAL_TOKEN: u64 = u64::MAX - 1;

/// A poll event of one of the reactor's own wakers, not of a registered fd.
#[inline]
pub fn is_waker(token: u64) -> bool {
    token >= SIGNAL_TOKEN
}

/// What the registry holds per fd. `T` is the loop's work item (a handle today; transports'
/// Rust-side work later).
pub struct FdEntry<T> {
    /// The object the caller registered (an int or an object with `fileno()`), kept so a
    /// closed socket can still be found by identity, as `selectors` does.
    pub fileobj: Option<T>,
    pub reader: Option<T>,
    pub writer: Option<T>,
}

impl<T> FdEntry<T> {
    fn slot(&mut self, which: &Which) -> &mut Option<T> {
        match which {
            Which::Reader => &mut self.reader,
            Which::Writer => &mut self.writer,
        }
    }

    fn interest(&self) -> Interest {
        Interest { read: self.reader.is_some(), write: self.writer.is_some() }
    }
}

/// What a poll needs without the GIL: the epoll instance and the wakers' read ends.
pub struct Poller {
    epoll: Epoll,
    /// The thread waker: an eventfd, written by other threads and read here.
    waker: OwnedFd,
    /// The read end of the signal waker's socketpair.
    sig_r: OwnedFd,
}

impl Poller {
    /// Wait up to `timeout_ms` (-1: no limit) for events into `out`. Wakers among them are
    /// drained here, before the caller takes the GIL back: signal numbers go to `signals`, and
    /// the thread that wrote the waker (still holding the GIL right after the write) usually
    /// lets the GIL go meanwhile, so the loop thread takes it without waiting on the GIL's
    /// condition variable. The wakers' events stay in `out` (callers skip them: `is_waker`).
    pub fn wait(
        &self,
        buf: &mut Vec<libc::epoll_event>,
        out: &mut Vec<sys::Event>,
        timeout_ms: i32,
        signals: &mut Vec<u8>,
    ) -> io::Result<usize> {
        let n = self.epoll.wait(buf, out, timeout_ms)?;
        for ev in out.iter().filter(|ev| is_waker(ev.token)) {
            if ev.token == WAKER_TOKEN {
                sys::drain_event(self.waker.as_raw_fd());
            } else {
                sys::drain_wakeup(self.sig_r.as_raw_fd(), signals);
            }
        }
        Ok(n)
    }
}

pub struct Reactor<T> {
    poller: Arc<Poller>,
    /// The write end of the signal waker (given to `signal.set_wakeup_fd`).
    sig_w: OwnedFd,
    pub registry: FdTable<T>,
    ep_buf: Vec<libc::epoll_event>,
    /// The decoded events of the last poll, kept so each iteration reuses the allocation.
    events: Vec<sys::Event>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Reader,
    Writer,
}

impl<T> Reactor<T> {
    pub fn new() -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let waker = sys::eventfd()?;
        let (sig_r, sig_w) = sys::socketpair()?;
        let read = Interest { read: true, write: false };
        epoll.add(waker.as_raw_fd(), read, WAKER_TOKEN)?;
        epoll.add(sig_r.as_raw_fd(), read, SIGNAL_TOKEN)?;
        Ok(Self {
            poller: Arc::new(Poller { epoll, waker, sig_r }),
            sig_w,
            registry: FdTable::new(),
            ep_buf: Vec::with_capacity(256),
            events: Vec::with_capacity(256),
        })
    }

    pub fn poller(&self) -> Arc<Poller> {
        Arc::clone(&self.poller)
    }

    /// Wake the poll (from any thread holding the GIL).
    pub fn wake(&self) {
        sys::write_event(self.poller.waker.as_raw_fd());
    }

    /// The fd for `signal.set_wakeup_fd`.
    pub fn signal_fd(&self) -> RawFd {
        self.sig_w.as_raw_fd()
    }

    /// Install `item` as the fd's reader or writer. Returns what it replaced (the previous
    /// reader or writer, and the previous file object) for the caller to drop outside any
    /// borrow. On error the registry is left as it was.
    pub fn set(&mut self, fd: RawFd, fileobj: T, which: Which, item: T) -> io::Result<(Option<T>, Option<T>)> {
        let existed = self.registry.contains(fd);
        let Some(entry) = self.registry.entry(fd) else {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        };
        let old = entry.slot(&which).replace(item);
        let interest = entry.interest();
        let res = if existed {
            self.poller.epoll.modify(fd, interest, fd as u64)
        } else {
            self.poller.epoll.add(fd, interest, fd as u64)
        };
        match res {
            Ok(()) => Ok((old, entry.fileobj.replace(fileobj))),
            Err(e) => {
                if existed {
                    *entry.slot(&which) = old;
                } else {
                    self.registry.remove(fd);
                }
                Err(e)
            }
        }
    }

    /// Remove the fd's reader or writer. Returns it (None when there was none) and, when the
    /// fd is no longer watched at all, its file object; the caller drops both.
    pub fn unset(&mut self, fd: RawFd, which: Which) -> io::Result<(Option<T>, Option<T>)> {
        let Some(entry) = self.registry.get_mut(fd) else { return Ok((None, None)) };
        let old = entry.slot(&which).take();
        let interest = entry.interest();
        if interest.is_empty() {
            let fileobj = self.registry.remove(fd).and_then(|e| e.fileobj);
            self.poller.epoll.delete(fd)?;
            Ok((old, fileobj))
        } else {
            if old.is_some() {
                self.poller.epoll.modify(fd, interest, fd as u64)?;
            }
            Ok((old, None))
        }
    }

    /// The item in the fd's reader or writer slot.
    pub fn item(&self, fd: RawFd, which: Which) -> Option<&T> {
        let entry = self.registry.get(fd)?;
        match which {
            Which::Reader => entry.reader.as_ref(),
            Which::Writer => entry.writer.as_ref(),
        }
    }

    /// Put `item` in an occupied slot without telling the kernel: the interest is unchanged.
    /// Returns the previous item; `None` (and nothing changed) when the slot was empty.
    pub fn swap_item(&mut self, fd: RawFd, which: Which, item: T) -> Option<T> {
        let entry = self.registry.get_mut(fd)?;
        let slot = entry.slot(&which);
        if slot.is_none() {
            return None;
        }
        slot.replace(item)
    }

    /// Forget every registration (the loop is closing, or being collected). The poller's own
    /// registrations go when it is closed, with the reactor: no `epoll_ctl` per fd here. After
    /// a `fork()` the epoll instance and the fds are shared with the parent, and deleting them
    /// from a child that closes (or drops) its copy of the loop left the parent's loop deaf.
    pub fn clear(&mut self) -> Vec<FdEntry<T>> {
        self.registry.drain()
    }

    /// Take the event buffers out for a poll that runs without the GIL.
    pub fn take_buf(&mut self) -> (Vec<libc::epoll_event>, Vec<sys::Event>) {
        (std::mem::take(&mut self.ep_buf), std::mem::take(&mut self.events))
    }

    pub fn put_buf(&mut self, buf: (Vec<libc::epoll_event>, Vec<sys::Event>)) {
        (self.ep_buf, self.events) = buf;
    }
}
