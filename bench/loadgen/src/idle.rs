//! Idle connections: open N connections, prove each is served (one 1-byte echo), then hold
//! them until standard input closes (or `hold` passes), and close them all with a reset (no
//! TIME_WAIT left behind, so runs do not eat the ephemeral ports).
//!
//! At most `window` connections are between connect() and their echo at any time, well under
//! the server's listen backlog, so no SYN is dropped and nothing waits for a retransmit.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use crate::net::{Addr, Stream};
use crate::sys::{self, Epoll};
use crate::Json;

pub struct Config {
    pub addr: Addr,
    pub conns: usize,
    pub window: usize,
    pub hold: Duration,
    pub stall: Duration,
}

pub fn run(cfg: &Config) -> Result<Json, String> {
    let limit = sys::raise_nofile().map_err(|e| format!("setrlimit: {e}"))?;
    if cfg.conns as libc::rlim_t + 16 > limit {
        return Err(format!("{} connections need more open files than the hard limit ({limit})", cfg.conns));
    }
    let ep = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
    let mut conns: Vec<Stream> = Vec::with_capacity(cfg.conns);
    let (mut in_flight, mut served) = (0usize, 0usize);
    let mut evbuf = sys::event_buffer(256);
    let mut events = Vec::with_capacity(256);
    let started = Instant::now();
    let mut last_progress = started;
    while served < cfg.conns {
        while in_flight < cfg.window.max(1) && conns.len() < cfg.conns {
            let mut s =
                cfg.addr.connect().map_err(|e| format!("connect #{} to {:?}: {e}", conns.len() + 1, cfg.addr))?;
            match s.write(b"!") {
                Ok(1) => {}
                Ok(_) => return Err("short write of the 1-byte ping".into()),
                Err(e) => return Err(format!("ping: {e}")),
            }
            ep.add(&s, sys::IN, conns.len() as u64).map_err(|e| format!("epoll_ctl: {e}"))?;
            conns.push(s);
            in_flight += 1;
        }
        ep.wait(&mut evbuf, &mut events, Duration::from_millis(50)).map_err(|e| format!("epoll_wait: {e}"))?;
        for &(token, _) in &events {
            let s = &mut conns[token as usize];
            let mut b = [0u8; 2];
            match s.read(&mut b) {
                Ok(1) if b[0] == b'!' => {}
                Ok(0) => return Err(format!("connection #{token}: closed by the server")),
                Ok(n) => return Err(format!("connection #{token}: bad echo ({n} bytes)")),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(format!("connection #{token}: {e}")),
            }
            ep.delete(s).map_err(|e| format!("epoll_ctl: {e}"))?;
            in_flight -= 1;
            served += 1;
            last_progress = Instant::now();
        }
        if last_progress.elapsed() > cfg.stall {
            return Err(format!(
                "stalled: {served} of {} connections served, no echo for {:.0} s",
                cfg.conns,
                cfg.stall.as_secs_f64()
            ));
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    let mut ready = Json::new();
    ready.bool("ready", true).int("conns", served as u64).num("connect_s", connect_s);
    println!("{}", ready.finish());

    // hold until stdin closes (the parent is done measuring) or `hold` passes
    let held = Instant::now();
    let mut stdin = io::stdin();
    while held.elapsed() < cfg.hold {
        let left = cfg.hold.saturating_sub(held.elapsed());
        if sys::wait_readable(0, left).map_err(|e| format!("poll: {e}"))? {
            let mut b = [0u8; 64];
            match stdin.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    for s in &conns {
        let _ = sys::linger_zero(s);
    }
    drop(conns);
    let mut out = Json::new();
    out.bool("ok", true)
        .str("mode", "idle")
        .int("conns", served as u64)
        .num("connect_s", connect_s)
        .num("held_s", held.elapsed().as_secs_f64());
    Ok(out)
}
