//! The floor: a minimal single-threaded epoll echo server, i.e. what the kernel's sockets cost
//! with no event loop and no interpreter on top. Level-triggered, as libuv is: a readable
//! connection gets one read into its own 64 KiB buffer and the data is written straight back;
//! only a write that would block switches the connection to waiting for writability (and stops
//! reading it) until the rest is out. So a request costs one epoll_wait (shared by all the
//! connections ready at once), one recv and one send.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use crate::net::{Addr, Stream};
use crate::sys::{self, Epoll};
use crate::Json;

const LISTENER: u64 = u64::MAX;
const BUF: usize = 64 * 1024;

struct Slot {
    stream: Stream,
    buf: Box<[u8]>,
    off: usize, // bytes of buf[off..len] still to write back
    len: usize,
    interest: u32,
}

pub fn run(addr: &Addr, max_lifetime: Duration) -> Result<Json, String> {
    sys::raise_nofile().map_err(|e| format!("setrlimit: {e}"))?;
    let listener = addr.listen().map_err(|e| format!("listen {addr:?}: {e}"))?;
    let ep = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
    ep.add(&listener, sys::IN, LISTENER).map_err(|e| format!("epoll_ctl: {e}"))?;

    let mut ready = Json::new();
    ready.bool("ready", true).int("port", listener.port() as u64).int("pid", std::process::id() as u64);
    println!("{}", ready.finish());

    let started = Instant::now();
    let mut slots: Vec<Option<Slot>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let (mut accepted, mut bytes) = (0u64, 0u64);
    let mut evbuf = sys::event_buffer(256);
    let mut events = Vec::with_capacity(256);
    while started.elapsed() < max_lifetime {
        ep.wait(&mut evbuf, &mut events, Duration::from_millis(100)).map_err(|e| format!("epoll_wait: {e}"))?;
        for &(token, _) in &events {
            if token == LISTENER {
                while let Some(stream) = listener.accept().map_err(|e| format!("accept: {e}"))? {
                    let i = free.pop().unwrap_or_else(|| {
                        slots.push(None);
                        slots.len() - 1
                    });
                    ep.add(&stream, sys::IN, i as u64).map_err(|e| format!("epoll_ctl: {e}"))?;
                    slots[i] =
                        Some(Slot { stream, buf: vec![0; BUF].into_boxed_slice(), off: 0, len: 0, interest: sys::IN });
                    accepted += 1;
                }
                continue;
            }
            let i = token as usize;
            let keep = match slots.get_mut(i).and_then(Option::as_mut) {
                Some(slot) => match echo(slot, &mut bytes) {
                    Some(want) if want != slot.interest => {
                        slot.interest = want;
                        ep.modify(&slot.stream, want, i as u64).is_ok()
                    }
                    Some(_) => true,
                    None => false,
                },
                None => continue,
            };
            if !keep {
                if let Some(slot) = slots[i].take() {
                    let _ = ep.delete(&slot.stream);
                }
                free.push(i);
            }
        }
    }
    let mut out = Json::new();
    out.bool("ok", true).int("accepted", accepted).int("bytes", bytes);
    Ok(out)
}

/// Writes back what is pending, then reads once and writes that straight back. Returns the
/// epoll interest the connection needs next, or None when it is finished (EOF or error).
fn echo(s: &mut Slot, bytes: &mut u64) -> Option<u32> {
    if !flush(s)? {
        return Some(sys::OUT);
    }
    match s.stream.read(&mut s.buf) {
        Ok(0) => None,
        Ok(n) => {
            *bytes += n as u64;
            s.off = 0;
            s.len = n;
            Some(if flush(s)? { sys::IN } else { sys::OUT })
        }
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => Some(sys::IN),
        Err(_) => None,
    }
}

/// Writes buf[off..len]: Some(true) when all is out, Some(false) if the socket is full, None on
/// an error.
fn flush(s: &mut Slot) -> Option<bool> {
    while s.off < s.len {
        match s.stream.write(&s.buf[s.off..s.len]) {
            Ok(n) => s.off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(true)
}
