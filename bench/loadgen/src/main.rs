//! ferroloop's benchmark load generator (bench/ only).
//!
//! ```text
//! loadgen echo  (--tcp HOST:PORT | --unix PATH | --udp HOST:PORT) [--conns 10] [--size 1024]
//!               [--duration 1] [--warmup 0.2] [--server-pid PID] [--verify-every 16] [--stall 5]
//!               [--resend 0.2]
//! loadgen serve (--tcp HOST:PORT | --unix PATH | --udp HOST:PORT) [--max-seconds 600]
//! loadgen idle  (--tcp HOST:PORT | --unix PATH) [--conns 10000] [--window 64] [--hold 120]
//!               [--stall 10]
//! ```
//!
//! `echo` runs a closed-loop echo load and prints one JSON object: requests/s, latency
//! percentiles and, with `--server-pid`, the server's CPU time per request over the measured
//! window (read from the server's process CPU-time clock, all threads, user + system). With
//! `--udp`, one connected UDP socket per connection, each with one datagram out at a time,
//! resent after `--resend` seconds without an echo (`udp.rs`).
//! `serve` is the floor echo server: prints `{"ready": true, "port": P, ...}` once listening
//! (with `--udp`, once bound).
//! `idle` holds N served connections open; prints a ready line, waits for stdin to close.
//! Errors: `{"ok": false, "error": "..."}` and exit status 1.

mod echo;
mod idle;
mod net;
mod serve;
mod sys;
mod udp;

use std::fmt::Write as _;
use std::time::Duration;

use net::Addr;

/// A flat JSON object written by hand (no dependency for four value types).
#[derive(Default)]
pub struct Json {
    body: String,
}

impl Json {
    pub fn new() -> Self {
        Json { body: String::new() }
    }

    fn key(&mut self, k: &str) -> &mut String {
        self.body.push_str(if self.body.is_empty() { "{" } else { ", " });
        let _ = write!(self.body, "\"{k}\": ");
        &mut self.body
    }

    pub fn bool(&mut self, k: &str, v: bool) -> &mut Self {
        let _ = write!(self.key(k), "{v}");
        self
    }

    pub fn int(&mut self, k: &str, v: u64) -> &mut Self {
        let _ = write!(self.key(k), "{v}");
        self
    }

    pub fn num(&mut self, k: &str, v: f64) -> &mut Self {
        if v.is_finite() {
            let _ = write!(self.key(k), "{v}");
        } else {
            self.key(k).push_str("null");
        }
        self
    }

    pub fn str(&mut self, k: &str, v: &str) -> &mut Self {
        let body = self.key(k);
        body.push('"');
        for ch in v.chars() {
            match ch {
                '"' => body.push_str("\\\""),
                '\\' => body.push_str("\\\\"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(body, "\\u{:04x}", c as u32);
                }
                c => body.push(c),
            }
        }
        body.push('"');
        self
    }

    pub fn finish(&self) -> String {
        if self.body.is_empty() {
            "{}".into()
        } else {
            format!("{}}}", self.body)
        }
    }
}

/// Nearest-rank percentile of sorted values (0 if empty).
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = (q * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

const USAGE: &str = "usage: loadgen echo|serve|idle (--tcp HOST:PORT | --unix PATH | --udp HOST:PORT) [options]
  echo:  --conns N (10) --size BYTES (1024) --duration S (1) --warmup S (0.2)
         --server-pid PID --verify-every K (16) --stall S (5) --resend S (0.2, --udp only)
  serve: --max-seconds S (600)
  idle:  --conns N (10000) --window N (64) --hold S (120) --stall S (10); --tcp or --unix only";

struct Args {
    mode: String,
    opts: Vec<(String, String)>,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut it = std::env::args().skip(1);
        let mode = it.next().ok_or("missing mode")?;
        let mut opts = Vec::new();
        while let Some(k) = it.next() {
            let name = k.strip_prefix("--").ok_or_else(|| format!("unexpected argument {k:?}"))?;
            let v = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
            opts.push((name.to_string(), v));
        }
        Ok(Args { mode, opts })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.opts.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("--{name}: not a number: {v:?}")),
        }
    }

    fn secs(&self, name: &str, default: f64) -> Result<Duration, String> {
        let s: f64 = self.num(name, default)?;
        Duration::try_from_secs_f64(s).map_err(|_| format!("--{name}: bad duration {s}"))
    }

    fn addr(&self) -> Result<Addr, String> {
        match (self.get("tcp"), self.get("unix"), self.get("udp")) {
            (Some(t), None, None) => Addr::tcp(t),
            (None, Some(u), None) => Ok(Addr::Unix(u.into())),
            (None, None, Some(u)) => Addr::udp(u),
            _ => Err("give exactly one of --tcp HOST:PORT, --unix PATH and --udp HOST:PORT".into()),
        }
    }

    fn check_known(&self, known: &[&str]) -> Result<(), String> {
        for (k, _) in &self.opts {
            if !known.contains(&k.as_str()) {
                return Err(format!("unknown option --{k} for {}", self.mode));
            }
        }
        Ok(())
    }
}

fn run() -> Result<Json, String> {
    let args = Args::parse()?;
    match args.mode.as_str() {
        "echo" => {
            args.check_known(&[
                "tcp",
                "unix",
                "udp",
                "conns",
                "size",
                "duration",
                "warmup",
                "server-pid",
                "verify-every",
                "stall",
                "resend",
            ])?;
            let server_pid = match args.get("server-pid") {
                None => None,
                Some(_) => Some(args.num("server-pid", 0i32)?),
            };
            let cfg = echo::Config {
                addr: args.addr()?,
                conns: args.num("conns", 10)?,
                size: args.num("size", 1024)?,
                warmup: args.secs("warmup", 0.2)?,
                duration: args.secs("duration", 1.0)?,
                server_pid,
                verify_every: args.num("verify-every", 16)?,
                stall: args.secs("stall", 5.0)?,
                resend: args.secs("resend", 0.2)?,
            };
            match cfg.addr {
                Addr::Udp(_) => udp::echo(&cfg),
                _ if args.get("resend").is_some() => Err("--resend is for --udp only".into()),
                _ => echo::run(&cfg),
            }
        }
        "serve" => {
            args.check_known(&["tcp", "unix", "udp", "max-seconds"])?;
            let (addr, max) = (args.addr()?, args.secs("max-seconds", 600.0)?);
            match addr {
                Addr::Udp(_) => udp::serve(&addr, max),
                _ => serve::run(&addr, max),
            }
        }
        "idle" => {
            args.check_known(&["tcp", "unix", "conns", "window", "hold", "stall"])?;
            idle::run(&idle::Config {
                addr: args.addr()?,
                conns: args.num("conns", 10_000)?,
                window: args.num("window", 64)?,
                hold: args.secs("hold", 120.0)?,
                stall: args.secs("stall", 10.0)?,
            })
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            std::process::exit(0);
        }
        other => Err(format!("unknown mode {other:?}\n{USAGE}")),
    }
}

fn main() {
    if std::env::args().len() < 2 {
        eprintln!("{USAGE}");
        std::process::exit(2);
    }
    match run() {
        Ok(out) => println!("{}", out.finish()),
        Err(e) => {
            let mut out = Json::new();
            out.bool("ok", false).str("error", &e);
            println!("{}", out.finish());
            std::process::exit(1);
        }
    }
}
