//! UDP echo: the load client (`echo --udp`) and the floor server (`serve --udp`).
//!
//! The client opens one UDP socket per "connection", connected to the server, and keeps one
//! datagram outstanding on each: send S bytes, wait for the echo, check it, send the next. One
//! thread, level-triggered epoll, every readable socket read until EAGAIN. A datagram can be
//! lost (UDP): a request unanswered for `resend` (200 ms) is sent again, and the JSON counts
//! `resent`, `late` (echoes of a request already answered, i.e. of a resent one whose first
//! copy was only slow) and `lost` (resent − late). A request's latency runs from its first send,
//! so a loss shows in p99 and the maximum.
//!
//! Each datagram starts with a 16-byte header, the connection's index and the request's
//! sequence number (u64 little-endian each), followed by a window of the same pattern as the
//! stream client's (a different window per request). An echo must be exactly S bytes, carry
//! the header of this connection's current request (an earlier one is a late duplicate and is
//! skipped; another connection's is an error: the server answered the wrong peer) and match
//! the pattern in its first and last pattern byte, and in full every `verify_every`-th
//! request.
//!
//! The floor server is one UDP socket (SO_RCVBUF 1 MiB, as `_server.py --udp` gives the loops)
//! on a level-triggered epoll: when readable, `recvfrom` and `sendto` (to the address the
//! datagram came from) per datagram until EAGAIN.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::echo::{Config, Phase, Window, OFFSETS, PATTERN_PERIOD};
use crate::net::Addr;
use crate::sys::{self, Epoll};
use crate::Json;

/// Bytes of the header: connection index, then sequence number (u64 LE each).
const HEADER: usize = 16;
/// The largest UDP payload over IPv4 (and what the floor's buffer holds).
const MAX_DATAGRAM: usize = 65507;
/// SO_RCVBUF of the floor's socket, as `_server.py --udp` sets it for the loops' servers. With
/// the default (208 KiB) ten 10 KiB datagrams waiting for a descheduled server already overflow
/// it now and then (each counts ~16 KiB, and UDP gives freed receive memory back in batches),
/// and every drop costs one socket a `resend` wait.
const SERVER_RCVBUF: usize = 1 << 20;

struct Peer {
    sock: UdpSocket,
    seq: u64,
    off: usize,
    out: Vec<u8>,     // the current request's datagram
    buf: Vec<u8>,     // size + 1: a longer echo shows as size + 1 bytes
    started: Instant, // first send of the current request
    sent_at: Instant, // its latest (re)send
    done: bool,
}

#[derive(Default)]
struct Stats {
    responses: u64,
    completed: u64,
    lat_ns: Vec<u64>,
    verified: u64,
    resent: u64,
    late: u64,
}

struct Ctx<'a> {
    size: usize,
    pattern: &'a [u8],
    phase: Phase,
    verify_every: u64,
}

fn udp_target(addr: &Addr) -> Result<SocketAddr, String> {
    match addr {
        Addr::Udp(a) => Ok(*a),
        other => Err(format!("not a UDP address: {other:?}")),
    }
}

pub fn echo(cfg: &Config) -> Result<Json, String> {
    let size = cfg.size;
    let target = udp_target(&cfg.addr)?;
    if cfg.conns == 0 {
        return Err("--conns must be > 0".into());
    }
    if !(HEADER..=MAX_DATAGRAM).contains(&size) {
        return Err(format!("--size must be {HEADER}..={MAX_DATAGRAM} bytes for UDP"));
    }
    if cfg.resend.is_zero() {
        return Err("--resend must be > 0".into());
    }
    let pattern: Vec<u8> = (0..size + OFFSETS).map(|i| (i % PATTERN_PERIOD) as u8).collect();
    let mut win = Window::new(cfg)?;

    let ep = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
    let local: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
    let mut peers = Vec::with_capacity(cfg.conns);
    for i in 0..cfg.conns {
        let sock = UdpSocket::bind(local).map_err(|e| format!("bind UDP socket: {e}"))?;
        sock.connect(target).map_err(|e| format!("connect UDP socket to {target}: {e}"))?;
        sock.set_nonblocking(true).map_err(|e| format!("set_nonblocking: {e}"))?;
        ep.add(&sock, sys::IN, i as u64).map_err(|e| format!("epoll_ctl: {e}"))?;
        let now = Instant::now();
        peers.push(Peer {
            sock,
            seq: 0,
            off: 0,
            out: vec![0; size],
            buf: vec![0; size + 1],
            started: now,
            sent_at: now,
            done: false,
        });
    }

    let mut stats = Stats { lat_ns: Vec::with_capacity(1 << 16), ..Stats::default() };
    win.begin();
    let mut evbuf = sys::event_buffer(256);
    let mut events = Vec::with_capacity(256);
    let mut last_progress = Instant::now();
    let mut done_peers = 0usize;

    // kick off: the first request of every socket
    let ctx = Ctx { size, pattern: &pattern, phase: win.phase, verify_every: cfg.verify_every };
    for (i, p) in peers.iter_mut().enumerate() {
        new_request(i, p, &ctx, Instant::now())?;
    }

    loop {
        ep.wait(&mut evbuf, &mut events, Duration::from_millis(5)).map_err(|e| format!("epoll_wait: {e}"))?;
        let ctx = Ctx { size, pattern: &pattern, phase: win.phase, verify_every: cfg.verify_every };
        let before = stats.responses;
        for &(token, _) in &events {
            let i = token as usize;
            let p = &mut peers[i];
            if p.done {
                continue;
            }
            if receive(i, p, &ctx, &mut stats)? {
                done_peers += 1;
                ep.delete(&p.sock).map_err(|e| format!("epoll_ctl: {e}"))?;
            }
        }
        let now = Instant::now();
        if stats.responses != before {
            last_progress = now;
        }
        for (i, p) in peers.iter_mut().enumerate() {
            if !p.done && now.duration_since(p.sent_at) >= cfg.resend {
                stats.resent += 1;
                p.sent_at = now;
                send(i, p)?;
            }
        }
        win.advance_counting(now, &mut stats.completed, &mut stats.lat_ns, &mut last_progress)?;
        if win.phase == Phase::Drain && done_peers == peers.len() {
            break;
        }
        if now.duration_since(last_progress) > cfg.stall {
            return Err(format!(
                "stalled: no echo for {:.1} s ({} of {} sockets waiting; {} datagrams resent)",
                cfg.stall.as_secs_f64(),
                peers.len() - done_peers,
                peers.len(),
                stats.resent
            ));
        }
    }

    // nothing but late duplicates may follow the last echo on any socket
    std::thread::sleep(Duration::from_millis(2));
    for (i, p) in peers.iter_mut().enumerate() {
        loop {
            match p.sock.recv(&mut p.buf) {
                Ok(n) if n == size && header(&p.buf).0 == i as u64 && header(&p.buf).1 < p.seq => stats.late += 1,
                Ok(n) => return Err(format!("socket {i}: an unexpected datagram ({n} bytes) after the last echo")),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("socket {i}: recv: {e}")),
            }
        }
    }

    let mut out = win.report(cfg, stats.completed, &mut stats.lat_ns, stats.verified)?;
    out.str("transport", "udp")
        .int("resent", stats.resent)
        .int("late", stats.late)
        .int("lost", stats.resent.saturating_sub(stats.late));
    Ok(out)
}

fn header(buf: &[u8]) -> (u64, u64) {
    let word = |k: usize| u64::from_le_bytes(buf[k..k + 8].try_into().unwrap());
    (word(0), word(8))
}

/// Builds and sends request `p.seq` of socket `idx`.
fn new_request(idx: usize, p: &mut Peer, ctx: &Ctx, now: Instant) -> Result<(), String> {
    p.off = (p.seq as usize * 97 + idx * 13) % OFFSETS;
    p.out[..8].copy_from_slice(&(idx as u64).to_le_bytes());
    p.out[8..HEADER].copy_from_slice(&p.seq.to_le_bytes());
    p.out[HEADER..].copy_from_slice(&ctx.pattern[p.off + HEADER..p.off + ctx.size]);
    p.started = now;
    p.sent_at = now;
    send(idx, p)
}

/// Sends the current request. A full send buffer (EAGAIN) counts as a loss: the resend timer
/// sends it again.
fn send(idx: usize, p: &mut Peer) -> Result<(), String> {
    loop {
        match p.sock.send(&p.out) {
            Ok(n) if n == p.out.len() => return Ok(()),
            Ok(n) => return Err(format!("socket {idx}: short send ({n} of {} bytes)", p.out.len())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(format!("socket {idx}: send: connection refused (no server on the port?)"))
            }
            Err(e) => return Err(format!("socket {idx}: send: {e}")),
        }
    }
}

/// Reads socket `idx` until EAGAIN: checks each echo and, on the current request's, starts the
/// next. Returns true when the socket has just finished (draining: its last request came back).
fn receive(idx: usize, p: &mut Peer, ctx: &Ctx, stats: &mut Stats) -> Result<bool, String> {
    let size = ctx.size;
    loop {
        let n = match p.sock.recv(&mut p.buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(format!("socket {idx}: recv: connection refused (the server is gone?)"))
            }
            Err(e) => return Err(format!("socket {idx}: recv: {e}")),
        };
        if n != size {
            let what = if n > size { "longer than" } else { "of" };
            let n = if n > size { size + 1 } else { n };
            return Err(format!("socket {idx}, request {}: an echo {what} {n} bytes, sent {size}", p.seq));
        }
        let (who, seq) = header(&p.buf);
        if who != idx as u64 {
            return Err(format!("socket {idx}: got the echo of socket {who}'s request {seq} (wrong peer)"));
        }
        if seq < p.seq {
            stats.late += 1; // a resent request's first copy, echoed after all
            continue;
        }
        if seq > p.seq {
            return Err(format!("socket {idx}: an echo of request {seq}, which was never sent (current: {})", p.seq));
        }
        let now = Instant::now();
        check(idx, p, ctx, stats)?;
        stats.responses += 1;
        if ctx.phase == Phase::Measure {
            stats.completed += 1;
            stats.lat_ns.push(now.duration_since(p.started).as_nanos() as u64);
        }
        p.seq += 1;
        if ctx.phase == Phase::Drain {
            p.done = true;
            return Ok(true);
        }
        new_request(idx, p, ctx, now)?;
    }
}

fn check(idx: usize, p: &Peer, ctx: &Ctx, stats: &mut Stats) -> Result<(), String> {
    let size = ctx.size;
    let (got, want) = (&p.buf[HEADER..size], &p.out[HEADER..]);
    let full = ctx.verify_every > 0 && p.seq.is_multiple_of(ctx.verify_every);
    let ok = if full {
        stats.verified += 1;
        got == want
    } else {
        got.first() == want.first() && got.last() == want.last()
    };
    if ok {
        return Ok(());
    }
    let at = HEADER + got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    Err(format!("socket {idx}, request {}: echoed bytes differ from those sent (first at byte {at} of {size})", p.seq))
}

/// The UDP floor server: prints `{"ready": true, "port": P, "pid": N}` once bound, then echoes
/// every datagram to its sender until `max_lifetime` passes.
pub fn serve(addr: &Addr, max_lifetime: Duration) -> Result<Json, String> {
    let bind = udp_target(addr)?;
    let sock = UdpSocket::bind(bind).map_err(|e| format!("bind UDP {bind}: {e}"))?;
    sock.set_nonblocking(true).map_err(|e| format!("set_nonblocking: {e}"))?;
    sys::set_rcvbuf(&sock, SERVER_RCVBUF).map_err(|e| format!("SO_RCVBUF: {e}"))?;
    let ep = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
    ep.add(&sock, sys::IN, 0).map_err(|e| format!("epoll_ctl: {e}"))?;
    let port = sock.local_addr().map(|a| a.port()).unwrap_or(0);

    let mut ready = Json::new();
    ready.bool("ready", true).int("port", port as u64).int("pid", std::process::id() as u64);
    println!("{}", ready.finish());

    let started = Instant::now();
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let (mut datagrams, mut bytes, mut dropped) = (0u64, 0u64, 0u64);
    let mut evbuf = sys::event_buffer(8);
    let mut events = Vec::with_capacity(8);
    while started.elapsed() < max_lifetime {
        ep.wait(&mut evbuf, &mut events, Duration::from_millis(100)).map_err(|e| format!("epoll_wait: {e}"))?;
        if events.is_empty() {
            continue;
        }
        loop {
            let (n, from) = match sock.recv_from(&mut buf) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // EINTR, or an ICMP error of an earlier sendto: nothing to echo
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionRefused) => continue,
                Err(e) => return Err(format!("recvfrom: {e}")),
            };
            datagrams += 1;
            bytes += n as u64;
            if sock.send_to(&buf[..n], from).is_err() {
                dropped += 1; // full send buffer or an unreachable peer: UDP drops it
            }
        }
    }
    let mut out = Json::new();
    out.bool("ok", true).int("datagrams", datagrams).int("bytes", bytes).int("dropped", dropped);
    Ok(out)
}
