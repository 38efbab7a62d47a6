"""Network workloads, driver side: echo servers, HTTP and idle connections, for ``run.py``.

A *group* is what one fresh server process serves: one echo style over one transport (its rows
are the message sizes; UDP has the datagram style only), uvicorn (its rows are the connection
counts) or the idle-connections server. Per round, after the loop microbenchmarks, ``run.py``
runs each group in rotating loop order. Echo groups go through ``run_echo_interleaved``: every
loop's server up at once, plus loadgen's floor server as one more "loop", measured in turn, so
each row's floor is taken over the same seconds as the loops it is compared with. The other
groups go through ``run_group``, one fresh server per loop. Servers are pinned to one core and
the load (``loadgen``, or ``wrk`` for HTTP) to the other.

Measured per row:

- echo: ``loadgen echo`` (10 connections, closed loop) reports requests/s, p50/p99 latency and
  the server's CPU time over the measured window, read from the server process's CPU-time
  clock (all threads, user + system): **server CPU per request**, the headline figure. Over
  UDP (``loadgen echo --udp``) the 10 "connections" are 10 connected UDP sockets, each with one
  datagram out at a time; those rows have no bar (informational).
- http: ``wrk -t1`` against ``uvicorn net:app --http httptools --loop ...``: requests/s, p99,
  and server CPU per request (the server's CPU clock read around the wrk run).
- idle: server RSS growth while ``loadgen idle`` holds N connections that each made one echo.

Everything this needs besides the Python loops: cargo (builds ``bench/loadgen`` once), wrk
(HTTP rows only; ``bench/install-tools.sh`` installs it), uvicorn + httptools (HTTP rows).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import json
import os
import resource
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from net import BODY

HERE = os.path.dirname(os.path.abspath(__file__))
LOADGEN_DIR = os.path.join(HERE, "loadgen")
LOADGEN_TARGET = os.path.join(LOADGEN_DIR, "target")
LOADGEN = os.path.join(LOADGEN_TARGET, "release", "loadgen")
SERVER = os.path.join(HERE, "_server.py")
WRK_SCRIPT = os.path.join(HERE, "wrk_report.lua")

SUBJECT, BASE = "ferroloop", "uvloop"
FLOOR = "floor"  # loadgen's own epoll echo server: "what the kernel costs"; in every echo group
SELECTOR = "ferroloop-selector"  # ferroloop with FERROLOOP_TRANSPORTS=selector (A/B)

ECHO_CONNS = 10
SIZES = [("1k", 1024), ("10k", 10 * 1024), ("100k", 100 * 1024)]
STYLES = [("sock_*", "sock"), ("streams", "streams"), ("Protocol", "protocol")]
TRANSPORTS = ["tcp", "unix"]
#: UDP echo: the datagram style only, no bar (shown for information: "info")
UDP_STYLE = ("DatagramProtocol", "datagram")
UDP_SIZES = [("1k", 1024), ("10k", 10 * 1024)]
HTTP_CONNS = [10, 100]
HTTP_BAR = 1.10  # req/s ferroloop ÷ uvloop >= 1.10, and p99 no worse
IDLE_PER = 10_000  # the idle-memory figure is RSS growth per this many connections
IDLE_WARM = 200  # connections opened and closed before the baseline RSS is read

#: uvicorn ``--loop`` value per loop (``module:callable`` needs uvicorn >= 0.36)
UVICORN_LOOP = {
    "asyncio": "asyncio",
    "uvloop": "uvloop",
    "rloop": "rloop:new_event_loop",
    "ferroloop": "ferroloop:new_event_loop",
    SELECTOR: "ferroloop:new_event_loop",
}
LOOP_ENV = {SELECTOR: {"FERROLOOP_TRANSPORTS": "selector"}}


def echo_bar(style: str, transport: str, size_label: str) -> float:
    """Server CPU per request, ferroloop ÷ uvloop, must be <= this (no echo row above 1.0)."""
    if style == "sock":
        return 0.55 if transport == "tcp" else 0.50
    if style == "streams":
        return 0.88
    return {"1k": 0.90, "10k": 0.88}.get(size_label, 1.0)


# --- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # "echo", "http" or "idle"
    group: str
    style: str = ""
    transport: str = ""
    size: int = 0
    size_label: str = ""
    conns: int = 0
    bar: float | None = None  # None: informational, no verdict ("info")
    doc: str = ""


@dataclass
class Group:
    name: str
    kind: str
    rows: list[Row] = field(default_factory=list)
    style: str = ""
    transport: str = ""


def _echo_row(g: Group, label, style, transport, size_label, size, bar, doc) -> Row:
    """One echo row of group ``g`` (``bar`` None: informational)."""
    return Row(
        name=f"echo {label} {transport} {size_label}",
        kind="echo",
        group=g.name,
        style=style,
        transport=transport,
        size=size,
        size_label=size_label,
        conns=ECHO_CONNS,
        bar=bar,
        doc=doc,
    )


def plan(idle_conns: int) -> list[Group]:
    """Every network group with all its rows, in run order."""
    groups = []
    for transport in TRANSPORTS:
        where = "TCP" if transport == "tcp" else "Unix sockets"
        for label, style in STYLES:
            g = Group(f"echo {label} {transport}", "echo", style=style, transport=transport)
            for size_label, size in SIZES:
                doc = (
                    f"{ECHO_CONNS} connections echo {size // 1024} KiB messages (closed loop) over "
                    f"{where} to a {label}-style server"
                )
                bar = echo_bar(style, transport, size_label)
                g.rows.append(_echo_row(g, label, style, transport, size_label, size, bar, doc))
            groups.append(g)
    label, style = UDP_STYLE
    g = Group(f"echo {label} udp", "echo", style=style, transport="udp")
    for size_label, size in UDP_SIZES:
        doc = (
            f"{ECHO_CONNS} UDP sockets echo {size // 1024} KiB datagrams (one out per socket) over "
            f"127.0.0.1 to a {label} server (create_datagram_endpoint); no bar"
        )
        g.rows.append(_echo_row(g, label, style, "udp", size_label, size, None, doc))
    groups.append(g)
    g = Group("http", "http")
    for c in HTTP_CONNS:
        doc = f"uvicorn + httptools, raw ASGI app, wrk -t1 -c{c}"
        g.rows.append(
            Row(name=f"http c={c}", kind="http", group="http", conns=c, bar=HTTP_BAR, doc=doc)
        )
    groups.append(g)
    label = "" if idle_conns == IDLE_PER else f" [{idle_conns / 1000:g}k measured]"
    doc = (
        f"server RSS growth with {idle_conns} idle TCP connections open (each made one 1-byte "
        "echo) to a Protocol echo server, scaled to 10k"
    )
    row = Row(
        name=f"memory: RSS per 10k idle connections{label}",
        kind="idle",
        group="idle",
        style="protocol",
        transport="tcp",
        conns=idle_conns,
        doc=doc,
    )
    groups.append(Group("idle", "idle", [row], style="protocol", transport="tcp"))
    return groups


def select_groups(groups: list[Group], pattern) -> list[Group]:
    """Groups cut down to the rows matching ``pattern`` (a compiled regex or None)."""
    out = []
    for g in groups:
        rows = [r for r in g.rows if not pattern or pattern.search(r.name)]
        if rows:
            out.append(Group(g.name, g.kind, rows, g.style, g.transport))
    return out


def group_loops(g: Group, loops: list[str], selector: bool) -> list[str]:
    """The servers a group runs: the loops, and for echo the floor (measured in turn with
    them: the machine's speed drifts, and a floor taken minutes apart is not comparable)."""
    out = list(loops) + ([FLOOR] if g.kind == "echo" else [])
    # FERROLOOP_TRANSPORTS changes nothing for sock_* (no transports there)
    if selector and SUBJECT in loops and g.style != "sock":
        out.append(SELECTOR)
    return out


# --- tools ------------------------------------------------------------------------------------


@dataclass
class Tools:
    loadgen: str | None = None
    loadgen_error: str | None = None
    wrk: str | None = None
    http_error: str | None = None
    server_cpu: int | None = None
    client_cpu: int | None = None
    notes: list[str] = field(default_factory=list)


def _loadgen_stale() -> bool:
    if not os.path.exists(LOADGEN):
        return True
    built = os.path.getmtime(LOADGEN)
    sources = [os.path.join(LOADGEN_DIR, f) for f in ("Cargo.toml", "Cargo.lock")]
    sources += glob.glob(os.path.join(LOADGEN_DIR, "src", "*.rs"))
    return any(os.path.exists(p) and os.path.getmtime(p) > built for p in sources)


def build_loadgen(log) -> tuple[str | None, str | None]:
    """``cargo build --release`` of bench/loadgen if its binary is missing or older than its
    sources; (path, None) or (None, why not)."""
    if not _loadgen_stale():
        return LOADGEN, None
    cargo = shutil.which("cargo") or shutil.which(os.path.expanduser("~/.cargo/bin/cargo"))
    if not cargo:
        return None, "cargo not found: cannot build bench/loadgen"
    log("building bench/loadgen (cargo build --release) ...")
    manifest = os.path.join(LOADGEN_DIR, "Cargo.toml")
    env = dict(os.environ, CARGO_TARGET_DIR=LOADGEN_TARGET)
    try:
        proc = subprocess.run(
            [cargo, "build", "--release", "--quiet", "--manifest-path", manifest],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    except subprocess.TimeoutExpired:
        return None, "cargo build of bench/loadgen timed out"
    if proc.returncode != 0 or not os.path.exists(LOADGEN):
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return None, f"cargo build of bench/loadgen failed: {tail}"
    os.utime(LOADGEN)  # cargo may leave an up-to-date binary's mtime alone
    return LOADGEN, None


def prepare(groups: list[Group], log) -> Tools:
    """Builds loadgen, finds wrk and uvicorn, picks the server and client cores."""
    t = Tools()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        t.server_cpu, t.client_cpu = cpus[0], cpus[1]
    else:
        t.notes.append("only one CPU available: servers and clients are not pinned apart")
    if groups:
        t.loadgen, t.loadgen_error = build_loadgen(log)
        if t.loadgen_error:
            t.notes.append(f"echo and idle rows n/a: {t.loadgen_error}")
    if any(g.kind == "http" for g in groups):
        t.wrk = shutil.which("wrk")
        missing = [m for m in ("uvicorn", "httptools") if importlib.util.find_spec(m) is None]
        if not t.wrk:
            t.http_error = "wrk is not installed"
            t.notes.append(
                "wrk is not installed: HTTP rows skipped (`bash bench/install-tools.sh` installs"
                " it; `make bench` runs that)"
            )
        elif missing:
            t.http_error = f"{' and '.join(missing)} not installed"
            t.notes.append(f"HTTP rows n/a: {t.http_error} (pip install -r bench/requirements.txt)")
    return t


# --- processes --------------------------------------------------------------------------------


class NetError(Exception):
    pass


def _child_setup(cpu: int | None):
    """preexec_fn for every server and client: pin to ``cpu``, open-files limit to hard."""

    def setup():
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    return setup


def _env(loop: str) -> dict:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("FERROLOOP_TRANSPORTS", None)
    env.update(LOOP_ENV.get(loop, {}))
    return env


def _readline(proc: subprocess.Popen, timeout: float) -> str | None:
    """One line of ``proc``'s stdout, or None on timeout/EOF."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
        if ready:
            line = proc.stdout.readline()
            return line or None
        if proc.poll() is not None:
            return None


class Server:
    """A server subprocess with its stderr kept in a temporary file. ``stdin=subprocess.PIPE``
    for one driven by commands (``run.py``'s micro workers); ``name`` is what failures call it."""

    def __init__(
        self,
        argv: list[str],
        cpu: int | None,
        env: dict | None = None,
        stdin: int = subprocess.DEVNULL,
        name: str = "server",
    ):
        self.name = name
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            env=env,
            preexec_fn=_child_setup(cpu),
        )
        self.pid = self.proc.pid

    def ready_line(self, timeout: float) -> dict:
        """Waits for the server's JSON ready line: {"ready": true, "port": P, ...}."""
        line = _readline(self.proc, timeout)
        if line is None:
            raise NetError(self.failure("no ready line"))
        try:
            info = json.loads(line)
        except ValueError:
            raise NetError(f"server said {line.strip()[:200]!r}") from None
        if not info.get("ready"):
            raise NetError(info.get("error") or f"server said {line.strip()[:200]!r}")
        return info

    def wait_port(self, port: int, timeout: float) -> None:
        """Waits until 127.0.0.1:port accepts connections (uvicorn prints no ready line)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NetError(self.failure("exited while starting"))
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)
        raise NetError(self.failure(f"not listening after {timeout:.0f} s"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def failure(self, what: str) -> str:
        rc = self.proc.poll()
        self.err.seek(0)
        lines = [ln for ln in self.err.read().decode(errors="replace").splitlines() if ln.strip()]
        tail = lines[-1].strip() if lines else ""
        state = "running" if rc is None else f"exit {rc}"
        return f"{self.name} {what} ({state}){': ' + tail[:300] if tail else ''}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)
        for f in (self.proc.stdin, self.proc.stdout, self.err):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass  # stdin's unsent bytes to a process that is gone


def _run_json(argv: list[str], cpu: int | None, timeout: float) -> dict:
    """Runs a client to completion; its last stdout line as JSON, or an error dict."""
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=_child_setup(cpu),
        )
    except subprocess.TimeoutExpired:
        return {
            "ok": False,
            "error": f"{os.path.basename(argv[0])} timed out after {timeout:.0f} s",
        }
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "error": f"{os.path.basename(argv[0])} exit {proc.returncode}: {tail}"}


_libc = ctypes.CDLL(None, use_errno=True)


def cpu_clock(pid: int):
    """A function returning ``pid``'s CPU time (all threads, user + system) in ns."""
    clock = ctypes.c_int()
    if _libc.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0:
        return lambda: time.clock_gettime_ns(clock.value)
    tick = 1e9 / os.sysconf("SC_CLK_TCK")

    def from_proc():  # 10 ms resolution
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int((int(fields[11]) + int(fields[12])) * tick)

    return from_proc


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- groups -----------------------------------------------------------------------------------


def run_group(g: Group, loop: str, cfg: dict, tools: Tools) -> dict[str, dict]:
    """Measures every row of ``g`` on ``loop`` in one fresh server; row name -> result."""
    if g.kind == "http":
        if tools.http_error:
            return {r.name: {"ok": False, "error": tools.http_error} for r in g.rows}
    elif tools.loadgen is None:
        return {r.name: {"ok": False, "error": tools.loadgen_error} for r in g.rows}
    run = {"http": _http_group, "idle": _idle_group}
    with tempfile.TemporaryDirectory(prefix="ferroloop-bench-") as tmp:
        try:
            return run[g.kind](g, loop, cfg, tools, tmp)
        except NetError as exc:
            return {r.name: {"ok": False, "error": str(exc)} for r in g.rows}


def _start_echo_server(style: str, transport: str, loop: str, tools: Tools, path: str):
    """An echo server (the floor for loop == FLOOR); (server, loadgen address arguments)."""
    where = ["--unix", path] if transport == "unix" else None
    inet = "--udp" if transport == "udp" else "--tcp"  # 127.0.0.1, a free port
    if loop == FLOOR:
        argv = [tools.loadgen, "serve", *(where or [inet, "127.0.0.1:0"])]
    else:
        argv = [sys.executable, SERVER, loop, style, *(where or [inet])]
    srv = Server(argv + ["--max-seconds", "900"], tools.server_cpu, _env(loop))
    try:
        info = srv.ready_line(timeout=60)
    except NetError:
        srv.stop()
        raise
    return srv, where or [inet, f"127.0.0.1:{info['port']}"]


#: --full's echo windows are cut into slices of at most this many seconds, taken in turn
ECHO_SLICE = 0.5
#: warm-up of every slice after a loop's first in a row: loadgen's fresh connections settle
SLICE_WARMUP = 0.05
#: one unmeasured run per server before the group's first row: a loop's one-time cost of its
#: first connections (asyncio's server: about 0.13 s of CPU, which made its first 0.2 s window,
#: the 1 KiB row of --quick, read 3-4x its CPU per request) is not counted in any row
PRIME_SECONDS = 0.2


def run_echo_interleaved(g: Group, loops: list[str], cfg: dict, tools: Tools):
    """Every loop's echo server for ``g`` up at once (all pinned to the server core); per row,
    ``loadgen`` (on the client core) measures them in turn, ABCD DCBA, in slices of at most
    ``ECHO_SLICE`` seconds, until each has ``echo_duration`` seconds measured; the slices are
    summed per loop (``merge``). Loops are compared over the same seconds of a machine whose
    speed drifts, instead of seconds apart. loop -> {row name -> result}."""
    out: dict[str, dict] = {loop: {} for loop in loops}
    if tools.loadgen is None:
        for loop in loops:
            out[loop] = {r.name: {"ok": False, "error": tools.loadgen_error} for r in g.rows}
        return out
    slices = max(1, round(cfg["echo_duration"] / ECHO_SLICE))
    window = cfg["echo_duration"] / slices
    with tempfile.TemporaryDirectory(prefix="ferroloop-bench-") as tmp:
        servers: dict[str, tuple] = {}
        try:
            for i, loop in enumerate(loops):
                try:
                    servers[loop] = _start_echo_server(
                        g.style, g.transport, loop, tools, f"{tmp}/echo{i}.sock"
                    )
                except NetError as exc:
                    out[loop] = {r.name: {"ok": False, "error": str(exc)} for r in g.rows}
            for srv, target in servers.values():
                # Discarded: a server that fails here fails its first measured run too.
                _echo_run(srv, target, g.rows[0], PRIME_SECONDS, 0, tools)
            for row in g.rows:
                parts: dict[str, list] = {loop: [] for loop in servers}
                for k in range(slices):
                    for loop in list(servers) if k % 2 == 0 else list(servers)[::-1]:
                        if parts[loop] is None:
                            continue  # failed in an earlier slice
                        srv, target = servers[loop]
                        warm = (
                            cfg["echo_warmup"] if k == 0 else min(SLICE_WARMUP, cfg["echo_warmup"])
                        )
                        res = _echo_run(srv, target, row, window, warm, tools)
                        if res.get("ok"):
                            parts[loop].append(res)
                        else:
                            out[loop][row.name], parts[loop] = res, None
                for loop, got in parts.items():
                    if got:
                        out[loop][row.name] = merge(got)
        finally:
            for srv, _ in servers.values():
                srv.stop()
    return out


def merge(parts: list[dict]) -> dict:
    """One echo result from loadgen's slices: totals and rates over all of them; p50/p99 are
    the medians of the slices' (each slice has thousands of requests)."""
    out = dict(parts[0])
    summed = ("requests", "wall_s", "client_cpu_s", "server_cpu_s", "verified_full")
    for key in summed + ("resent", "late", "lost"):  # (the last three: UDP only)
        if all(key in p for p in parts):
            out[key] = sum(p[key] for p in parts)
    n, wall = out["requests"], out["wall_s"]
    out["req_per_s"] = n / wall
    out["mean_us"] = sum(p["mean_us"] * p["requests"] for p in parts) / n
    out["max_us"] = max(p["max_us"] for p in parts)
    out["client_busy"] = out["client_cpu_s"] / wall
    for key in ("p50_us", "p99_us"):
        out[key] = statistics.median(p[key] for p in parts)
    if "server_cpu_s" in out:
        out["server_cpu_us_per_req"] = out["server_cpu_s"] * 1e6 / n
        out["server_busy"] = out["server_cpu_s"] / wall
        out["cpu_us_per_req"] = out["server_cpu_us_per_req"]
    out["slices"] = len(parts)
    return out


def _echo_run(srv: Server, target: list[str], row: Row, seconds: float, warmup: float,
              tools: Tools) -> dict:  # fmt: skip
    """One ``loadgen echo`` window against a running server."""
    if not srv.alive():
        return {"ok": False, "error": srv.failure("died")}
    argv = [tools.loadgen, "echo", *target, "--conns", str(row.conns)]
    argv += ["--size", str(row.size), "--duration", str(seconds)]
    argv += ["--warmup", str(warmup), "--server-pid", str(srv.pid)]
    res = _run_json(argv, tools.client_cpu, timeout=60 + 3 * seconds)
    if not res.get("ok") and not srv.alive():
        res["error"] = f"{res.get('error')}; {srv.failure('died')}"
    if res.get("ok"):
        res["cpu_us_per_req"] = res.get("server_cpu_us_per_req")
    return res


def _http_check(port: int, n: int) -> None:
    """``n`` keep-alive GETs on one connection, each checked for status 200 and the body: the
    app works on this loop (wrk counts only statuses) and the server is warm."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        buf = b""
        for _ in range(n):
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise NetError("HTTP check: connection closed")
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = next(
                (
                    int(ln.split(b":")[1])
                    for ln in lines
                    if ln.lower().startswith(b"content-length")
                ),
                None,
            )
            if b" 200 " not in lines[0] or length != len(BODY):
                raise NetError(f"HTTP check: unexpected response {head[:200]!r}")
            while len(buf) < length:
                chunk = s.recv(65536)
                if not chunk:
                    raise NetError("HTTP check: connection closed")
                buf += chunk
            body, buf = buf[:length], buf[length:]
            if body != BODY:
                raise NetError(f"HTTP check: wrong body {body[:100]!r}")


def _http_group(g: Group, loop: str, cfg: dict, tools: Tools, tmp: str) -> dict[str, dict]:
    port = _free_port()
    argv = [sys.executable, "-m", "uvicorn", "net:app", "--app-dir", HERE]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--loop", UVICORN_LOOP[loop]]
    argv += ["--http", "httptools", "--lifespan", "off", "--no-access-log"]
    argv += ["--log-level", "warning", "--workers", "1"]
    srv = Server(argv, tools.server_cpu, _env(loop))
    out = {}
    try:
        srv.wait_port(port, timeout=60)
        _http_check(port, 200)
        clock = cpu_clock(srv.pid)
        secs = max(1, round(cfg["http_duration"]))
        for row in g.rows:
            argv = [tools.wrk, "-t1", f"-c{row.conns}", f"-d{secs}s", "--timeout", "5s"]
            argv += ["-s", WRK_SCRIPT, f"http://127.0.0.1:{port}/"]
            c0 = clock()
            res = _run_json(argv, tools.client_cpu, timeout=60 + 2 * secs)
            c1 = clock()
            if "requests" in res:
                errors = {k: v for k, v in res.pop("errors", {}).items() if v}
                n, wall = res["requests"], res["duration_us"] / 1e6
                res.update(
                    ok=not errors and n > 0 and srv.alive(),
                    req_per_s=n / wall,
                    cpu_us_per_req=(c1 - c0) / 1e3 / max(n, 1),
                    server_busy=(c1 - c0) / 1e9 / wall,
                )
                if errors:
                    res["error"] = f"wrk errors: {errors}"
                elif not srv.alive():
                    res["error"] = srv.failure("died")
            out[row.name] = res
    finally:
        srv.stop()
    return out


def _idle_group(g: Group, loop: str, cfg: dict, tools: Tools, tmp: str) -> dict[str, dict]:
    row = g.rows[0]
    srv, target = _start_echo_server("protocol", "tcp", loop, tools, f"{tmp}/echo.sock")
    client = None
    try:
        warm = [tools.loadgen, "idle", *target, "--conns", str(IDLE_WARM), "--hold", "0"]
        res = _run_json(warm, tools.client_cpu, timeout=60)
        if not res.get("ok"):
            return {row.name: res}
        time.sleep(0.2)
        before = rss_bytes(srv.pid)
        argv = [tools.loadgen, "idle", *target, "--conns", str(row.conns), "--hold", "120"]
        client = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            preexec_fn=_child_setup(tools.client_cpu),
        )
        line = _readline(client, timeout=120)
        info = json.loads(line) if line else {"error": "loadgen idle: no output"}
        if not info.get("ready"):
            return {row.name: {"ok": False, "error": info.get("error") or str(info)}}
        time.sleep(0.2)
        if not srv.alive():
            return {row.name: {"ok": False, "error": srv.failure("died")}}
        after = rss_bytes(srv.pid)
        growth = after - before
        return {
            row.name: {
                "ok": True,
                "value": growth / row.conns * IDLE_PER / 2**20,  # MB per 10k connections
                "bytes_per_conn": growth / row.conns,
                "rss_before_mb": before / 2**20,
                "rss_after_mb": after / 2**20,
                "conns": row.conns,
                "connect_s": info.get("connect_s"),
            }
        }
    finally:
        srv.stop()  # first: the server must not see 10k resets
        if client is not None:
            client.stdin.close()
            try:
                client.wait(30)
            except subprocess.TimeoutExpired:
                client.kill()
                client.wait()
            client.stdout.close()


# --- aggregation ------------------------------------------------------------------------------


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(rows: list[Row], runs: dict, loops: list[str], rounds: int) -> list[dict]:
    """Per row: medians over rounds per loop, medians of per-round ferroloop ÷ uvloop ratios,
    the verdict. ``runs[row name][(loop, round)]`` is a result (the floor's too, for echo
    rows)."""

    def get(row_name, loop, r, key):
        res = runs.get(row_name, {}).get((loop, r))
        return res.get(key) if res and res.get("ok") else None

    def ratio(row_name, key):
        per = []
        for r in range(rounds):
            a, b = get(row_name, SUBJECT, r, key), get(row_name, BASE, r, key)
            if a is not None and b is not None and b > 0:
                per.append(a / b)
        return _median(per), per

    def above_floor(row_name):
        """Per round, (ferroloop - floor) ÷ (uvloop - floor) of CPU per request: the loops'
        own cost, with the kernel's (the floor, measured in the same seconds) taken out. A
        round where a loop spent less than the floor has no such figure (the floor server is
        not saturated on the 100 KiB rows: the client's core is the limit, so it is no lower
        bound there); with figures from fewer than half the rounds, n/a."""
        per = []
        for r in range(rounds):
            a, b, f = (get(row_name, lp, r, "cpu_us_per_req") for lp in (SUBJECT, BASE, FLOOR))
            if a is not None and b is not None and f is not None and a >= f and b > f:
                per.append((a - f) / (b - f))
        if 2 * len(per) < rounds:
            return None, []
        return _median(per), per

    out = []
    for row in rows:
        keys = {"idle": ("value",)}.get(
            row.kind,
            ("cpu_us_per_req", "req_per_s", "p50_us", "p99_us", "server_busy", "client_busy"),
        )
        s: dict = {"workload": row.name, "kind": row.kind, "bar": row.bar, "doc": row.doc}
        s["loops"] = {}
        columns = list(loops) + ([FLOOR] if row.kind == "echo" else [])
        for loop in columns:
            entry = {k: _median(get(row.name, loop, r, k) for r in range(rounds)) for k in keys}
            errors = sorted(
                {
                    res.get("error") or "failed"
                    for r in range(rounds)
                    if (res := runs.get(row.name, {}).get((loop, r))) is not None
                    and not res.get("ok")
                }
            )
            if errors:
                entry["errors"] = errors
            lost = [
                res["lost"]
                for r in range(rounds)
                if (res := runs.get(row.name, {}).get((loop, r))) and "lost" in res
            ]
            if lost:  # UDP: datagrams resent and never echoed, total over the rounds
                entry["lost"] = sum(lost)
            s["loops"][loop] = entry
        if row.kind == "echo":
            s["ratio_cpu"], s["ratio_cpu_rounds"] = ratio(row.name, "cpu_us_per_req")
            s["ratio_rps"], _ = ratio(row.name, "req_per_s")
            s["above_floor"], s["above_floor_rounds"] = above_floor(row.name)
            r = s["ratio_cpu"]
            if row.bar is None:
                s["result"] = "info"
            else:
                s["result"] = "n/a" if r is None else ("PASS" if r <= row.bar else "MISS")
        elif row.kind == "http":
            s["ratio_rps"], s["ratio_rps_rounds"] = ratio(row.name, "req_per_s")
            s["ratio_p99"], _ = ratio(row.name, "p99_us")
            s["ratio_cpu"], _ = ratio(row.name, "cpu_us_per_req")
            rps, p99 = s["ratio_rps"], s["ratio_p99"]
            if rps is None or p99 is None:
                s["result"] = "n/a"
            else:
                s["result"] = "PASS" if rps >= row.bar and p99 <= 1.0 else "MISS"
        else:
            s["ratio"], s["ratio_rounds"] = ratio(row.name, "value")
            mine = s["loops"].get(SUBJECT, {}).get("value")
            base = s["loops"].get(BASE, {}).get("value")
            s["result"] = (
                "n/a" if mine is None or base is None else ("PASS" if mine <= base else "MISS")
            )
        out.append(s)
    return out


# --- report -----------------------------------------------------------------------------------


BUSY = 0.9  # below this share of its core, a server that should be saturated was starved


def _starved(e: dict, kind: str) -> bool:
    """The server was short of CPU: in HTTP (wrk is never the limit) it used < 90 % of its
    core; in echo neither it nor the client did (a closed loop near the floor may leave the
    server idle, waiting on the client's core)."""
    srv, cli = e.get("server_busy"), e.get("client_busy")
    if srv is None or srv >= BUSY:
        return False
    return kind == "http" or (cli is not None and cli < BUSY)


def _rate(x) -> str:
    if x is None:
        return "n/a"
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _mark(text: str, e: dict, kind: str) -> str:
    return text + "\\*" if _starved(e, kind) else text


STARVED_NOTE = (
    "\\*: the server had less than 90 % of its core (median over rounds; for echo, the client "
    "neither): other load on the machine, so req/s and latency of that cell say little; CPU per "
    "request holds up better."
)


UDP_PREFIX = f"echo {UDP_STYLE[0]} udp"
UDP_NOTE = (
    f" `{UDP_PREFIX} …` rows: {ECHO_CONNS} connected UDP sockets instead of connections, one "
    "datagram out on each (resent after 0.2 s without an echo; `lost` in the raw results), "
    "server socket SO_RCVBUF 1 MiB; no bar."
)


def _bar(bar) -> str:
    return "—" if bar is None else f"≤ {bar:.2f}×"


def _num(x, spec) -> str:
    return "n/a" if x is None else format(x, spec)


def _ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}×"


def _range(per) -> str:
    return f"{min(per):.2f}-{max(per):.2f}" if per else "n/a"


def _table(header, rows, align) -> str:
    seps = {"l": "---", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(seps[a] for a in align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def report(summaries: list[dict], loops: list[str], rounds: int, cfg: dict) -> str:
    """The markdown tables for the network rows."""
    echo = [s for s in summaries if s["kind"] == "echo"]
    http = [s for s in summaries if s["kind"] == "http"]
    idle = [s for s in summaries if s["kind"] == "idle"]
    n = f"median of {rounds} round{'s' if rounds != 1 else ''}"
    parts = []
    if echo:
        cols = [FLOOR] + [lp for lp in loops if lp in echo[0]["loops"]]
        rows = [
            [s["workload"]]
            + [_num(s["loops"].get(lp, {}).get("cpu_us_per_req"), ".2f") for lp in cols]
            + [_ratio(s["ratio_cpu"]), _range(s["ratio_cpu_rounds"]), _bar(s["bar"])]
            + [s["result"], _ratio(s["above_floor"]), _range(s["above_floor_rounds"])]
            for s in echo
        ]
        parts.append(
            f"### Echo servers: server CPU per request, µs ({n}; lower is better)\n\n"
            f"{ECHO_CONNS} connections, closed loop, {cfg['echo_duration']} s measured per loop "
            f"after {cfg['echo_warmup']} s warm-up (and one unmeasured {PRIME_SECONDS} s run per "
            "server after it starts), every loop's server up at once and measured "
            f"in turn in slices of at most {ECHO_SLICE} s; server pinned to one core, loadgen to "
            "the other. "
            "`floor`: loadgen's own epoll echo server, measured in turn with the loops. "
            "Bar: ferro÷uvloop ≤ bar (`—`: no bar, `info`: shown, not judged). "
            "`above floor`: (ferro − floor) ÷ (uvloop − floor) per round, median and range: "
            "the loops' own cost with the kernel's taken out "
            "(shown, not judged)."
            + (UDP_NOTE if any(s["workload"].startswith(UDP_PREFIX) for s in echo) else "")
            + "\n\n"
            + _table(
                ["workload", *cols, "ferro÷uvloop", "(rounds)", "bar", "result"]
                + ["above floor", "(rounds)"],
                rows,
                "l" + "r" * (len(cols) + 3) + "c" + "rr",
            )
        )
        rows = [
            [s["workload"]]
            + [
                _mark(
                    f"{_rate(e.get('req_per_s'))} · {_num(e.get('p50_us'), '.0f')} / "
                    f"{_num(e.get('p99_us'), '.0f')}",
                    e,
                    "echo",
                )
                for e in (s["loops"].get(lp, {}) for lp in cols)
            ]
            + [_ratio(s["ratio_rps"])]
            for s in echo
        ]
        starved = any(_starved(e, "echo") for s in echo for e in s["loops"].values())
        lost = [
            f"{lp} {s['workload']}: {e['lost']}"
            for s in echo
            for lp, e in s["loops"].items()
            if e.get("lost")
        ]
        parts.append(
            "### Echo servers: requests/s · latency p50 / p99, µs (higher / lower is better)\n\n"
            + _table(["workload", *cols, "req/s ferro÷uvloop"], rows, "l" + "r" * (len(cols) + 1))
            + ("\n\n" + STARVED_NOTE if starved else "")
            + (
                "\n\nUDP datagrams lost (resent after 0.2 s and never echoed; total over the "
                "rounds): " + "; ".join(lost) + "."
                if lost
                else ""
            )
        )
    if http:
        cols = [lp for lp in loops if lp in http[0]["loops"]]
        rows = [
            [s["workload"]]
            + [_mark(_rate(s["loops"][lp].get("req_per_s")), s["loops"][lp], "http") for lp in cols]
            + [_ratio(s["ratio_rps"]), _range(s["ratio_rps_rounds"]), _ratio(s["ratio_p99"])]
            + [f"≥ {s['bar']:.2f}×, p99 ≤ 1.00×", s["result"]]
            for s in http
        ]
        secs = max(1, round(cfg["http_duration"]))
        starved = any(_starved(e, "http") for s in http for e in s["loops"].values())
        parts.append(
            f"### HTTP: requests/s ({n}; higher is better)\n\n"
            f"uvicorn (1 worker, `--http httptools`, `--loop` per loop) serving a raw ASGI app; "
            f"wrk -t1, {secs} s per run. Bar: req/s ferro÷uvloop ≥ bar and p99 no worse.\n\n"
            + _table(
                ["workload", *cols, "ferro÷uvloop", "(rounds)", "p99 ferro÷uvloop", "bar"]
                + ["result"],
                rows,
                "l" + "r" * (len(cols) + 4) + "c",
            )
            + ("\n\n" + STARVED_NOTE if starved else "")
        )
        rows = [
            [s["workload"]]
            + [
                f"{_num(e.get('p50_us') and e['p50_us'] / 1e3, '.2f')} / "
                f"{_num(e.get('p99_us') and e['p99_us'] / 1e3, '.2f')} · "
                f"{_num(e.get('cpu_us_per_req'), '.1f')}"
                for e in (s["loops"][lp] for lp in cols)
            ]
            + [_ratio(s["ratio_cpu"])]
            for s in http
        ]
        parts.append(
            "### HTTP: latency p50 / p99, ms · server CPU per request, µs (lower is better)\n\n"
            + _table(["workload", *cols, "CPU ferro÷uvloop"], rows, "l" + "r" * (len(cols) + 1))
        )
    if idle:
        cols = [lp for lp in loops if lp in idle[0]["loops"]]
        rows = [
            [s["workload"]]
            + [_num(s["loops"][lp].get("value"), ".1f") for lp in cols]
            + [_ratio(s["ratio"]), "≤ uvloop", s["result"]]
            for s in idle
        ]
        parts.append(
            f"### Memory: server RSS growth per 10k idle connections, MB ({n}; lower is better)"
            "\n\nTCP connections to a Protocol echo server, each made one 1-byte echo and then "
            "sits idle; RSS growth scaled to 10k connections.\n\n"
            + _table(
                ["workload", *cols, "ferro÷uvloop", "bar", "result"],
                rows,
                "l" + "r" * (len(cols) + 2) + "c",
            )
        )
    return "\n\n".join(parts)


def errors(summaries: list[dict], skip: set) -> list[str]:
    notes = []
    for s in summaries:
        for lp, e in s["loops"].items():
            if lp in skip:
                continue
            for err in e.get("errors", []):
                notes.append(f"- {lp} / {s['workload']}: {err}")
    return notes


def chart_rows(summaries: list[dict]) -> list[dict]:
    """For the chart, as "ferroloop's advantage over uvloop" (higher is better): echo rows as
    uvloop ÷ ferroloop server CPU per request (bar inverted), HTTP rows as req/s, the idle
    row as uvloop ÷ ferroloop RSS (bar: 1.0, i.e. no more memory than uvloop)."""
    out = []
    for s in summaries:
        if s["kind"] == "echo" and s.get("ratio_cpu"):
            speedup = 1 / s["ratio_cpu"]
            out.append(
                dict(
                    workload=f"{s['workload']} (CPU)",
                    ratio=speedup,
                    bar=None if s["bar"] is None else 1 / s["bar"],
                    result=s["result"],
                )
            )
        elif s["kind"] == "http" and s.get("ratio_rps"):
            out.append(
                dict(workload=s["workload"], ratio=s["ratio_rps"], bar=s["bar"], result=s["result"])
            )
        elif s["kind"] == "idle" and s.get("ratio"):
            out.append(
                dict(
                    workload=s["workload"],
                    ratio=1 / s["ratio"],
                    bar=1.0,
                    result=s["result"],
                )
            )
    return out
