//! Thin wrappers over the few system calls std does not offer: epoll, CPU-time clocks of this
//! and another process, RLIMIT_NOFILE, SO_LINGER, SO_RCVBUF.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

pub const IN: u32 = libc::EPOLLIN as u32;
pub const OUT: u32 = libc::EPOLLOUT as u32;
pub const ERR_HUP: u32 = (libc::EPOLLERR | libc::EPOLLHUP) as u32;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// An epoll instance; tokens are the `u64` of each registration.
pub struct Epoll {
    fd: RawFd,
}

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain system call without pointers.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Epoll { fd })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event that outlives the call.
        check(unsafe { libc::epoll_ctl(self.fd, op, fd, &mut ev) })?;
        Ok(())
    }

    pub fn add(&self, fd: &impl AsRawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd.as_raw_fd(), events, token)
    }

    pub fn modify(&self, fd: &impl AsRawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd.as_raw_fd(), events, token)
    }

    pub fn delete(&self, fd: &impl AsRawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd.as_raw_fd(), 0, 0)
    }

    /// Waits for events; returns (token, events) pairs in `out`. EINTR counts as no event.
    pub fn wait(&self, buf: &mut [libc::epoll_event], out: &mut Vec<(u64, u32)>, timeout: Duration) -> io::Result<()> {
        out.clear();
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `buf` is valid for `buf.len()` events for the duration of the call.
        let n = unsafe { libc::epoll_wait(self.fd, buf.as_mut_ptr(), buf.len() as libc::c_int, ms) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(err) };
        }
        for ev in &buf[..n as usize] {
            let (token, events) = (ev.u64, ev.events); // copies out of the packed struct
            out.push((token, events));
        }
        Ok(())
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.fd) };
    }
}

pub fn event_buffer(n: usize) -> Vec<libc::epoll_event> {
    vec![libc::epoll_event { events: 0, u64: 0 }; n]
}

fn clock_ns(clock: libc::clockid_t) -> io::Result<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec that outlives the call.
    check(unsafe { libc::clock_gettime(clock, &mut ts) })?;
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// The CPU-time clock of a whole process (all its threads, user + system, in ns).
#[derive(Clone, Copy)]
pub struct CpuClock(libc::clockid_t);

impl CpuClock {
    pub fn this_process() -> Self {
        CpuClock(libc::CLOCK_PROCESS_CPUTIME_ID)
    }

    pub fn of_process(pid: libc::pid_t) -> io::Result<Self> {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `clock` is a valid out-pointer for the duration of the call.
        let rc = unsafe { libc::clock_getcpuclockid(pid, &mut clock) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        let me = CpuClock(clock);
        me.now_ns()?; // fails now rather than mid-run if the process is not readable
        Ok(me)
    }

    pub fn now_ns(self) -> io::Result<u64> {
        clock_ns(self.0)
    }
}

/// Raises the soft limit on open files to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> io::Result<libc::rlim_t> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid out-pointer.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok(lim.rlim_cur)
}

/// SO_LINGER {on, 0}: close() then resets the connection instead of leaving a TIME_WAIT.
pub fn linger_zero(fd: &impl AsRawFd) -> io::Result<()> {
    let lin = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: `lin` is a valid linger struct of the size passed.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&lin as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// SO_RCVBUF: asks for a receive buffer of `bytes` (the kernel doubles it, and caps the request
/// at net.core.rmem_max).
pub fn set_rcvbuf(fd: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let v = bytes.min(libc::c_int::MAX as usize) as libc::c_int;
    // SAFETY: `v` is a valid c_int of the size passed.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Waits until `fd` is readable or `timeout` passes; true if readable (or hung up).
pub fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(err) };
    }
    Ok(n > 0)
}
