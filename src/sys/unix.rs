//! Linux system calls: epoll, the self-pipe, the monotonic clock.
//!
//! Ground rules: every `unsafe` in the crate that talks to the kernel lives here. Each function
//! returns `io::Result` and never panics; callers turn errors into Python exceptions. File
//! descriptors created here are `OwnedFd`s, so dropping them closes them exactly once.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Readiness interest, as the loop's registry sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    pub read: bool,
    pub write: bool,
}

impl Interest {
    pub fn is_empty(self) -> bool {
        !self.read && !self.write
    }

    fn to_epoll(self) -> u32 {
        let mut ev = 0u32;
        if self.read {
            ev |= libc::EPOLLIN as u32;
        }
        if self.write {
            ev |= libc::EPOLLOUT as u32;
        }
        ev
    }
}

/// One readiness report: the token it was registered with, and what is ready.
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub token: u64,
    pub readable: bool,
    pub writable: bool,
}

/// A level-triggered epoll instance.
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, interest: Interest, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: interest.to_epoll(), u64: token };
        // SAFETY: `ev` is a valid epoll_event that outlives the call; the kernel copies it.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn add(&self, fd: RawFd, interest: Interest, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, interest, token)
    }

    /// Change the interest of `fd`; re-adds it when the kernel forgot it (the fd was closed and
    /// its number reused, which drops the registration).
    pub fn modify(&self, fd: RawFd, interest: Interest, token: u64) -> io::Result<()> {
        match self.ctl(libc::EPOLL_CTL_MOD, fd, interest, token) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => self.add(fd, interest, token),
            other => other,
        }
    }

    /// Forget `fd`. A closed fd is already gone from the set, so EBADF/ENOENT are not errors.
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        match self.ctl(libc::EPOLL_CTL_DEL, fd, Interest::default(), 0) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EBADF)) => Ok(()),
            other => other,
        }
    }

    /// Wait for events. `timeout_ms < 0` blocks. Returns the number of entries written into
    /// `out`, which is cleared first. EINTR is returned as an error for the caller to handle.
    pub fn wait(&self, buf: &mut Vec<libc::epoll_event>, out: &mut Vec<Event>, timeout_ms: i32) -> io::Result<usize> {
        out.clear();
        let cap = buf.capacity().max(64);
        buf.clear();
        buf.reserve(cap);
        // SAFETY: the kernel writes at most `cap` events into the vector's spare capacity,
        // which `reserve` guaranteed; `set_len` below covers only what it wrote.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), buf.as_mut_ptr(), cap as libc::c_int, timeout_ms) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `n <= cap` entries were initialised by epoll_wait.
        unsafe { buf.set_len(n as usize) };
        let rd_mask = !(libc::EPOLLOUT as u32);
        let wr_mask = !(libc::EPOLLIN as u32);
        for ev in buf.iter() {
            let bits = ev.events;
            // Like selectors.EpollSelector: HUP/ERR wake both directions.
            out.push(Event { token: ev.u64, readable: bits & rd_mask != 0, writable: bits & wr_mask != 0 });
        }
        Ok(n as usize)
    }
}

/// A connected pair of non-blocking, close-on-exec Unix stream sockets.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid two-element array for the kernel to fill.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created by the kernel and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A non-blocking, close-on-exec eventfd: a counter the kernel wakes pollers on, cheaper to
/// write and read than a socket (no buffer is allocated per write).
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just created by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Add one to an eventfd's counter (wakes its pollers). Errors are ignored: the counter can
/// only overflow after 2^64 - 1 writes with no read, and a pending count already wakes.
pub fn write_event(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes the 8 bytes of a valid u64, as eventfd requires.
    let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Reset an eventfd's counter to zero (one read takes the whole count).
pub fn drain_event(fd: RawFd) {
    let mut count: u64 = 0;
    loop {
        // SAFETY: reads 8 bytes into a valid u64, as eventfd requires.
        let n = unsafe { libc::read(fd, (&mut count as *mut u64).cast(), 8) };
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return;
    }
}

/// Read everything currently buffered on a non-blocking fd, appending non-zero bytes (signal
/// numbers written by `signal.set_wakeup_fd`) to `signals`.
pub fn drain_wakeup(fd: RawFd, signals: &mut Vec<u8>) {
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reads into a valid stack buffer of the length given.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        signals.extend(buf[..n as usize].iter().copied().filter(|&b| b != 0));
        if (n as usize) < buf.len() {
            return;
        }
    }
}

/// malloc a `size`-byte block, touch it, run `while_held`, free it. False (and `while_held` not
/// run) when the allocation fails.
fn with_malloc_block(size: usize, while_held: impl FnOnce()) -> bool {
    // SAFETY: a plain malloc/free pair; the one byte written is inside the block. The write
    // (and `black_box`) keep the pair from being optimised away.
    unsafe {
        let p = libc::malloc(size).cast::<u8>();
        if p.is_null() {
            return false;
        }
        p.write_volatile(0);
        while_held();
        libc::free(std::hint::black_box(p).cast());
    }
    true
}

/// Raise glibc's heap thresholds the way glibc itself does: when a block it served with
/// `mmap` is freed, it moves its mmap threshold up to that block's size and its trim threshold
/// to twice that (unless the program fixed them, with `mallopt` or `MALLOC_*_` variables).
/// Freeing one 1 MiB block therefore keeps the top 2 MiB of a shrinking heap mapped instead of
/// returning it to the kernel and faulting it back in on the next large allocation, which is
/// what a server echoing 100 KiB messages otherwise does on every request. Other allocators
/// just see one allocation and its free.
pub fn raise_heap_thresholds() {
    with_malloc_block(1 << 20, || {});
}

/// Whether the allocator serves a `size`-byte block from its heap rather than with a fresh
/// `mmap` (whose pages fault in on first touch, every time). glibc counts its mmapped blocks
/// (`mallinfo2().hblks`): one allocation of `size` that leaves the count as it was came from
/// the heap. `mallinfo2` (glibc 2.33+) is looked up at run time, so the extension does not
/// need it to load. Without it, or with another C library: false (unknown).
pub fn heap_serves(size: usize) -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks a symbol up.
        let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"mallinfo2".as_ptr()) };
        if sym.is_null() {
            return false;
        }
        // SAFETY: glibc's `mallinfo2` has exactly this signature (`struct mallinfo2
        // mallinfo2(void)`, which the libc crate mirrors) and only reads the allocator's
        // statistics.
        let mallinfo2: extern "C" fn() -> libc::mallinfo2 = unsafe { std::mem::transmute(sym) };
        let before = mallinfo2().hblks;
        let mut after = before;
        with_malloc_block(size, || after = mallinfo2().hblks) && after == before
    }
    #[cfg(not(target_env = "gnu"))]
    {
        let _ = size;
        false
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock behind `time.monotonic()`.
pub fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the kernel to fill; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    // i64 on every 64-bit Linux target.
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// The calling thread's id as `threading.get_ident()` reports it on Linux.
pub fn thread_ident() -> u64 {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() as u64 }
}

/// `recv(2)` into `buf`; `Ok(0)` is end of stream. Never blocks (`MSG_DONTWAIT`), even on a
/// socket the caller left in blocking mode.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into the valid, writable `buf`.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `recv(2)` into raw memory (a Python buffer the caller holds exported for the call).
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes for the duration of the call.
pub unsafe fn recv_raw(fd: RawFd, ptr: *mut u8, len: usize) -> io::Result<usize> {
    // SAFETY: guaranteed by the caller.
    let n = unsafe { libc::recv(fd, ptr.cast(), len, libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `send(2)` without SIGPIPE (a closed peer is an EPIPE error, as in Python) and without
/// blocking (`MSG_DONTWAIT`).
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: reads at most `buf.len()` bytes from the valid `buf`.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `sendmsg(2)` of several buffers in one call (gathered, in order), with `send`'s flags.
pub fn send_vectored(fd: RawFd, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no address, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is ABI-compatible with `struct iovec` on Unix (std documents it).
    msg.msg_iov = bufs.as_ptr().cast_mut().cast();
    msg.msg_iovlen = bufs.len() as _;
    // SAFETY: `msg` points at `bufs.len()` valid iovecs, each describing readable memory
    // borrowed for the call; the kernel only reads them.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Whether `fd` is a byte-stream socket (`SOCK_STREAM`); false for any other kind of socket,
/// for what is not a socket and on error.
pub fn is_stream_socket(fd: RawFd) -> bool {
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `kind` and `len` are valid for writes and `len` holds `kind`'s size.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, (&raw mut kind).cast(), &mut len) };
    r == 0 && kind == libc::SOCK_STREAM
}

/// Whether an error only means "try again when the fd is ready".
pub fn would_block(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR))
}

/// The peer address of an accepted connection, for the families whose Python form the loop
/// builds itself.
pub enum PeerAddr {
    V4([u8; 4], u16),
    /// Address, port, flow info, scope id.
    V6([u8; 16], u16, u32, u32),
    /// `sun_path` bytes as the kernel reported them (`addrlen` minus the family field).
    Unix(Vec<u8>),
    /// Another family: the caller asks the socket itself.
    Other,
}

/// `accept4(2)` with `SOCK_NONBLOCK | SOCK_CLOEXEC` (Python's `accept` also makes the new fd
/// non-inheritable). EINTR is returned for the caller to treat as "try later".
pub fn accept(fd: RawFd) -> io::Result<(OwnedFd, PeerAddr)> {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid (empty) value, and zeroing
    // matters: an unnamed Unix peer leaves `sun_path` untouched, and Python reads it as "".
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` is valid for `len` bytes; the kernel writes at most that and updates
    // `len`.
    let rc = unsafe {
        libc::accept4(
            fd,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `rc` is a new fd returned by the kernel, owned by nobody else.
    let conn = unsafe { OwnedFd::from_raw_fd(rc) };
    Ok((conn, decode_addr(&storage, len)))
}

/// Decode what `accept4` / `getsockname` / `getpeername` wrote (`len` bytes of `storage`).
fn decode_addr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> PeerAddr {
    let len = (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which fits in it.
            let a: &libc::sockaddr_in = unsafe { &*(storage as *const libc::sockaddr_storage).cast() };
            PeerAddr::V4(a.sin_addr.s_addr.to_ne_bytes(), u16::from_be(a.sin_port))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6, which fits in it.
            let a: &libc::sockaddr_in6 = unsafe { &*(storage as *const libc::sockaddr_storage).cast() };
            PeerAddr::V6(a.sin6_addr.s6_addr, u16::from_be(a.sin6_port), u32::from_be(a.sin6_flowinfo), a.sin6_scope_id)
        }
        libc::AF_UNIX => {
            let off = std::mem::size_of::<libc::sa_family_t>();
            // SAFETY: the family says the storage holds a sockaddr_un, which fits in it.
            let a: &libc::sockaddr_un = unsafe { &*(storage as *const libc::sockaddr_storage).cast() };
            let n = len.saturating_sub(off).min(a.sun_path.len());
            PeerAddr::Unix(a.sun_path[..n].iter().map(|&c| c as u8).collect())
        }
        _ => PeerAddr::Other,
    }
}

/// `recvfrom(2)`: one datagram into `buf` (truncated to it) and its sender. Never blocks
/// (`MSG_DONTWAIT`).
pub fn recvfrom(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, PeerAddr)> {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid (empty) value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `buf.len()` bytes into the valid, writable `buf`, and
    // at most `len` bytes of address into `storage` (updating `len`).
    let n = unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let addr = if len == 0 { PeerAddr::Other } else { decode_addr(&storage, len) };
    Ok((n as usize, addr))
}

/// `sendto(2)` of one datagram to an IPv4 / IPv6 address (`None`: the connected peer, as
/// `send(2)`). Never blocks (`MSG_DONTWAIT`).
pub fn sendto(fd: RawFd, buf: &[u8], addr: Option<&PeerAddr>) -> io::Result<usize> {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid (empty) value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        None => 0,
        Some(&PeerAddr::V4(ip, port)) => {
            // SAFETY: a sockaddr_in fits in (and is aligned for) the storage.
            let a: &mut libc::sockaddr_in = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast() };
            a.sin_family = libc::AF_INET as libc::sa_family_t;
            a.sin_port = port.to_be();
            a.sin_addr.s_addr = u32::from_ne_bytes(ip);
            std::mem::size_of::<libc::sockaddr_in>()
        }
        Some(&PeerAddr::V6(ip, port, flow, scope)) => {
            // SAFETY: a sockaddr_in6 fits in (and is aligned for) the storage.
            let a: &mut libc::sockaddr_in6 = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast() };
            a.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            a.sin6_port = port.to_be();
            a.sin6_flowinfo = flow.to_be();
            a.sin6_addr.s6_addr = ip;
            a.sin6_scope_id = scope;
            std::mem::size_of::<libc::sockaddr_in6>()
        }
        Some(_) => return Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT)),
    };
    let ptr = if len == 0 { std::ptr::null() } else { (&storage as *const libc::sockaddr_storage).cast() };
    // SAFETY: reads at most `buf.len()` bytes from the valid `buf` and `len` bytes of the
    // address from `storage` (none when `len` is 0 and `ptr` NULL).
    let n =
        unsafe { libc::sendto(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT, ptr, len as libc::socklen_t) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Whether a connected Unix socket's peer was made (or connected) by this process, by the
/// peer's credentials (`SO_PEERCRED`); false for other sockets and on any error.
pub fn peer_is_this_process(fd: RawFd) -> bool {
    // SAFETY: ucred is plain data; all-zero is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is valid for `len` bytes; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len)
    };
    // SAFETY: getpid takes nothing and cannot fail.
    rc == 0 && len as usize == std::mem::size_of::<libc::ucred>() && cred.pid == unsafe { libc::getpid() }
}

/// `getsockname(2)` (`peer` false) or `getpeername(2)` (`peer` true).
pub fn socket_name(fd: RawFd, peer: bool) -> io::Result<PeerAddr> {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid (empty) value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let ptr = (&mut storage as *mut libc::sockaddr_storage).cast();
    // SAFETY: `storage` is valid for `len` bytes; the kernel writes at most that and updates
    // `len`.
    let rc = unsafe {
        if peer {
            libc::getpeername(fd, ptr, &mut len)
        } else {
            libc::getsockname(fd, ptr, &mut len)
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(decode_addr(&storage, len))
}

extern "C" {
    // POSIX, in every libc; the `libc` crate does not declare it.
    fn inet_ntop(
        af: libc::c_int,
        src: *const libc::c_void,
        dst: *mut libc::c_char,
        size: libc::socklen_t,
    ) -> *const libc::c_char;
}

/// An IPv6 address as `inet_ntop` (and so Python) writes it.
pub fn ipv6_to_string(addr: &[u8; 16]) -> String {
    let mut buf = [0 as libc::c_char; 64];
    // SAFETY: `addr` is a 16-byte in6_addr and `buf` has room for INET6_ADDRSTRLEN (46) bytes.
    let p = unsafe { inet_ntop(libc::AF_INET6, addr.as_ptr().cast(), buf.as_mut_ptr(), buf.len() as libc::socklen_t) };
    if p.is_null() {
        return std::net::Ipv6Addr::from(*addr).to_string();
    }
    // SAFETY: on success inet_ntop wrote a NUL-terminated string into `buf`.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}
