//! Closed-loop echo client: N connections, each sends S bytes, waits for the S bytes to come
//! back, and repeats. One thread, level-triggered epoll: a connection waits for readability,
//! and for writability only while a request is not all sent (as libuv does), so a request
//! costs one send and (for small messages) one recv, with no spurious wake-ups.
//!
//! Every response is checked for length (exactly S bytes: a byte too many shows up as a
//! misaligned next response, or at the end as unexpected bytes) and for its first and last
//! byte; every `verify_every`-th response per connection is compared in full. Each request
//! sends a different window of a fixed pattern, so a response that belongs to another request
//! does not compare equal.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use crate::net::{Addr, Stream};
use crate::sys::{self, CpuClock, Epoll};
use crate::{percentile, Json};

pub struct Config {
    pub addr: Addr,
    pub conns: usize,
    pub size: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub server_pid: Option<i32>,
    pub verify_every: u64,
    pub stall: Duration,
    /// UDP only: a request unanswered this long is sent again (the datagram may be lost).
    pub resend: Duration,
}

pub const PATTERN_PERIOD: usize = 251; // pattern[i] = i % 251
pub const OFFSETS: usize = 241; // request windows start at 0..241, all distinct mod 251

#[derive(Clone, Copy, PartialEq)]
pub enum Phase {
    Warmup,
    Measure,
    Drain,
}

/// The measurement window, shared with the UDP client (`udp.rs`): a warm-up, then `duration`
/// measured, then a drain in which every connection completes the request it has out. The
/// server's CPU clock (`--server-pid`) and this process's are read at the measured window's
/// two ends.
pub struct Window {
    pub phase: Phase,
    server_clock: Option<CpuClock>,
    my_clock: CpuClock,
    warmup: Duration,
    duration: Duration,
    start: Instant,
    t_measure: Instant,
    t_end: Instant,
    srv: (u64, u64),
    me: (u64, u64),
}

impl Window {
    /// Opens the server's CPU clock now, so a bad `--server-pid` fails before any load.
    pub fn new(cfg: &Config) -> Result<Window, String> {
        let server_clock = match cfg.server_pid {
            Some(pid) => Some(CpuClock::of_process(pid).map_err(|e| format!("CPU clock of server {pid}: {e}"))?),
            None => None,
        };
        let now = Instant::now();
        Ok(Window {
            phase: Phase::Warmup,
            server_clock,
            my_clock: CpuClock::this_process(),
            warmup: cfg.warmup,
            duration: cfg.duration,
            start: now,
            t_measure: now,
            t_end: now,
            srv: (0, 0),
            me: (0, 0),
        })
    }

    /// Starts the warm-up (once the connections are open).
    pub fn begin(&mut self) {
        self.start = Instant::now();
    }

    fn read_cpu(&self) -> Result<(u64, u64), String> {
        let srv = match self.server_clock {
            Some(c) => c.now_ns().map_err(|e| format!("server CPU clock: {e}"))?,
            None => 0,
        };
        Ok((srv, self.my_clock.now_ns().unwrap_or(0)))
    }

    /// Moves to the next phase when its time has come; returns the phase entered, if any.
    pub fn advance(&mut self, now: Instant) -> Result<Option<Phase>, String> {
        match self.phase {
            Phase::Warmup if now >= self.start + self.warmup => {
                (self.srv.0, self.me.0) = self.read_cpu()?;
                self.t_measure = Instant::now();
                self.phase = Phase::Measure;
            }
            Phase::Measure if now >= self.t_measure + self.duration => {
                (self.srv.1, self.me.1) = self.read_cpu()?;
                self.t_end = Instant::now();
                self.phase = Phase::Drain;
            }
            _ => return Ok(None),
        }
        Ok(Some(self.phase))
    }

    /// `advance`, then what both clients do on entering a phase: the measured window starts
    /// with no request counted, and the drain restarts the stall clock (`last_progress`).
    pub fn advance_counting(
        &mut self,
        now: Instant,
        completed: &mut u64,
        lat_ns: &mut Vec<u64>,
        last_progress: &mut Instant,
    ) -> Result<(), String> {
        match self.advance(now)? {
            Some(Phase::Measure) => {
                *completed = 0;
                lat_ns.clear();
            }
            Some(Phase::Drain) => *last_progress = Instant::now(),
            _ => {}
        }
        Ok(())
    }

    /// The result: `completed` requests in the measured window, with their latencies (ns).
    pub fn report(&self, cfg: &Config, completed: u64, lat_ns: &mut [u64], verified: u64) -> Result<Json, String> {
        let wall = self.t_end.duration_since(self.t_measure).as_secs_f64();
        let n = completed;
        if n == 0 {
            return Err("no request completed in the measured window".into());
        }
        lat_ns.sort_unstable();
        let us = |ns: u64| ns as f64 / 1e3;
        let mean_ns = lat_ns.iter().sum::<u64>() as f64 / lat_ns.len() as f64;
        let me = (self.me.1 - self.me.0) as f64 / 1e9;
        let mut out = Json::new();
        out.bool("ok", true)
            .str("mode", "echo")
            .int("conns", cfg.conns as u64)
            .int("size", cfg.size as u64)
            .int("requests", n)
            .num("wall_s", wall)
            .num("req_per_s", n as f64 / wall)
            .num("p50_us", us(percentile(lat_ns, 0.50)))
            .num("p99_us", us(percentile(lat_ns, 0.99)))
            .num("mean_us", mean_ns / 1e3)
            .num("max_us", us(*lat_ns.last().unwrap_or(&0)))
            .int("verified_full", verified)
            .num("client_cpu_s", me)
            .num("client_busy", me / wall);
        if self.server_clock.is_some() {
            let cpu = (self.srv.1 - self.srv.0) as f64 / 1e9;
            out.num("server_cpu_s", cpu)
                .num("server_cpu_us_per_req", cpu * 1e6 / n as f64)
                .num("server_busy", cpu / wall);
        }
        Ok(out)
    }
}

struct Conn {
    stream: Stream,
    sent: usize,
    recvd: usize,
    off: usize,
    seq: u64,
    started: Instant,
    done: bool,
    interest: u32,
    buf: Vec<u8>,
}

struct Stats {
    responses: u64,
    completed: u64,
    lat_ns: Vec<u64>,
    verified: u64,
}

pub fn run(cfg: &Config) -> Result<Json, String> {
    let size = cfg.size;
    if size == 0 || cfg.conns == 0 {
        return Err("--size and --conns must be > 0".into());
    }
    let pattern: Vec<u8> = (0..size + OFFSETS).map(|i| (i % PATTERN_PERIOD) as u8).collect();
    let mut win = Window::new(cfg)?;

    let ep = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
    let mut conns = Vec::with_capacity(cfg.conns);
    for i in 0..cfg.conns {
        let stream = cfg.addr.connect().map_err(|e| format!("connect {:?}: {e}", cfg.addr))?;
        ep.add(&stream, sys::IN, i as u64).map_err(|e| format!("epoll_ctl: {e}"))?;
        conns.push(Conn {
            stream,
            sent: 0,
            recvd: 0,
            off: (i * 13) % OFFSETS,
            seq: 0,
            started: Instant::now(),
            done: false,
            interest: sys::IN,
            buf: vec![0; size],
        });
    }

    let mut stats = Stats { responses: 0, completed: 0, lat_ns: Vec::with_capacity(1 << 16), verified: 0 };
    win.begin();
    let mut evbuf = sys::event_buffer(256);
    let mut events = Vec::with_capacity(256);
    let mut last_progress = Instant::now();
    let mut done_conns = 0usize;

    // kick off: the first request of every connection
    let ctx = Ctx { size, pattern: &pattern, phase: win.phase, verify_every: cfg.verify_every };
    for (i, c) in conns.iter_mut().enumerate() {
        pump(i, c, &ctx, &mut stats, &ep, false)?;
    }

    loop {
        ep.wait(&mut evbuf, &mut events, Duration::from_millis(5)).map_err(|e| format!("epoll_wait: {e}"))?;
        let ctx = Ctx { size, pattern: &pattern, phase: win.phase, verify_every: cfg.verify_every };
        let before = stats.responses;
        for &(token, ev) in &events {
            let i = token as usize;
            let c = &mut conns[i];
            if c.done {
                continue;
            }
            let readable = ev & (sys::IN | sys::ERR_HUP) != 0;
            if pump(i, c, &ctx, &mut stats, &ep, readable)? {
                done_conns += 1;
            }
        }
        let now = Instant::now();
        if stats.responses != before {
            last_progress = now;
        }
        win.advance_counting(now, &mut stats.completed, &mut stats.lat_ns, &mut last_progress)?;
        if win.phase == Phase::Drain && done_conns == conns.len() {
            break;
        }
        if now.duration_since(last_progress) > cfg.stall {
            let waiting: Vec<String> = conns
                .iter()
                .filter(|c| !c.done)
                .take(3)
                .map(|c| format!("sent {}/{size}, received {}", c.sent, c.recvd))
                .collect();
            return Err(format!(
                "stalled: no response for {:.1} s ({} of {} connections waiting: {})",
                cfg.stall.as_secs_f64(),
                conns.len() - done_conns,
                conns.len(),
                waiting.join("; ")
            ));
        }
    }

    // nothing may follow the last response on any connection
    std::thread::sleep(Duration::from_millis(2));
    let mut scratch = [0u8; 4096];
    for (i, c) in conns.iter_mut().enumerate() {
        match c.stream.read(&mut scratch) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Ok(0) => return Err(format!("connection {i}: closed by the server")),
            Ok(n) => return Err(format!("connection {i}: {n} unexpected bytes after the last echo")),
            Err(e) => return Err(format!("connection {i}: {e}")),
        }
    }

    win.report(cfg, stats.completed, &mut stats.lat_ns, stats.verified)
}

struct Ctx<'a> {
    size: usize,
    pattern: &'a [u8],
    phase: Phase,
    verify_every: u64,
}

/// Drives one connection after an event: sends what it can of the current request, reads
/// once if the socket is readable, and on a complete response starts the next request. Keeps
/// the epoll interest at IN, or IN|OUT while a request is not all sent. Returns true when the
/// connection has just finished (draining: its last request came back).
fn pump(idx: usize, c: &mut Conn, ctx: &Ctx, stats: &mut Stats, ep: &Epoll, readable: bool) -> Result<bool, String> {
    let size = ctx.size;
    let mut readable = readable;
    loop {
        while c.sent < size {
            match c.stream.write(&ctx.pattern[c.off + c.sent..c.off + size]) {
                Ok(n) => c.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("connection {idx}: send: {e}")),
            }
        }
        if readable && c.recvd < size {
            readable = false;
            match c.stream.read(&mut c.buf[c.recvd..]) {
                Ok(0) => {
                    return Err(format!("connection {idx}: closed by the server after {} of {size} bytes", c.recvd))
                }
                Ok(n) => c.recvd += n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                Err(e) => return Err(format!("connection {idx}: recv: {e}")),
            }
        }
        if c.recvd < size {
            break;
        }
        let now = Instant::now();
        check(idx, c, ctx, stats)?;
        stats.responses += 1;
        if ctx.phase == Phase::Measure {
            stats.completed += 1;
            stats.lat_ns.push(now.duration_since(c.started).as_nanos() as u64);
        }
        c.seq += 1;
        if ctx.phase == Phase::Drain {
            c.done = true;
            return Ok(true);
        }
        c.off = (c.seq as usize * 97 + idx * 13) % OFFSETS;
        c.sent = 0;
        c.recvd = 0;
        c.started = now;
    }
    let want = if c.sent < size { sys::IN | sys::OUT } else { sys::IN };
    if want != c.interest {
        c.interest = want;
        ep.modify(&c.stream, want, idx as u64).map_err(|e| format!("epoll_ctl: {e}"))?;
    }
    Ok(false)
}

fn check(idx: usize, c: &Conn, ctx: &Ctx, stats: &mut Stats) -> Result<(), String> {
    let want = &ctx.pattern[c.off..c.off + ctx.size];
    let full = ctx.verify_every > 0 && c.seq.is_multiple_of(ctx.verify_every);
    let ok = if full {
        stats.verified += 1;
        c.buf[..] == *want
    } else {
        c.buf[0] == want[0] && c.buf[ctx.size - 1] == want[ctx.size - 1]
    };
    if ok {
        return Ok(());
    }
    let at = c.buf.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    Err(format!(
        "connection {idx}, request {}: echoed bytes differ from those sent (first at byte {at} \
         of {})",
        c.seq, ctx.size
    ))
}
