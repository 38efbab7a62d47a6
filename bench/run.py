"""ferroloop's side-by-side benchmark suite: ``python bench/run.py --quick``.

Every measurement runs in a fresh subprocess: ``_worker.py`` for the loop microbenchmarks
(``micro.py``), a fresh server (``_server.py``, uvicorn, or loadgen's floor server) for the
network workloads (``netbench.py``). Loops are compared in one run, interleaved in rotating
order over several rounds; within a round, every loop's worker (or echo server) is up at once
and they take measured calls (load slices) in turn, ABCD DCBA. The report gives, per workload,
the median over rounds of each loop's figure and the median of the per-round ratios ferroloop
÷ uvloop and ferroloop ÷ asyncio. See bench/README.md.

Installs nothing but bench/loadgen, which it builds with cargo when its binary is missing or
stale: the loops it compares are imported in the workers if they are installed (see
bench/requirements.txt); a missing loop shows ``n/a``, a missing matplotlib skips the chart, a
missing wrk skips the HTTP rows (``bench/install-tools.sh`` installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import micro  # noqa: E402
import netbench  # noqa: E402

WORKER = os.path.join(HERE, "_worker.py")
RESULTS = os.path.join(HERE, "results")
LOOP_NAMES = ["asyncio", "uvloop", "rloop", "ferroloop"]
SUBJECT, BASE_FAST, BASE_STD = "ferroloop", "uvloop", "asyncio"

#: per mode: rounds, measured seconds per (round, workload, loop), minimum warm-up seconds and
#: target seconds per workload call; for the network workloads: rounds (the first net_rounds
#: rounds run them), echo measured/warm-up seconds per message size, wrk seconds per HTTP row,
#: idle connections opened for the memory row, and whether ferroloop-selector is an extra row;
#: heavy_rounds: rounds (the first ones) that run the heavy workloads, whose runs take seconds
MODES = {
    "quick": dict(
        rounds=4, heavy_rounds=3, duration=0.3, warmup=0.1, chunk=0.025,
        net_rounds=2, echo_duration=0.2, echo_warmup=0.05, http_duration=1,
        idle_conns=10_000, selector=False,
    ),
    "full": dict(
        rounds=7, heavy_rounds=7, duration=2.0, warmup=0.5, chunk=0.05,
        net_rounds=7, echo_duration=2.0, echo_warmup=0.5, http_duration=5,
        idle_conns=10_000, selector=True,
    ),
}  # fmt: skip


# --- running ----------------------------------------------------------------------------------


class Progress:
    """One status line on stderr: rewritten in place on a terminal, plain lines otherwise."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.tty = sys.stderr.isatty()
        self.started = time.perf_counter()

    def step(self, text: str) -> None:
        self.done += 1
        m, s = divmod(int(time.perf_counter() - self.started), 60)
        line = f"[{self.done}/{self.total} {m}:{s:02d}] {text}"
        if self.tty:
            sys.stderr.write("\r" + line + "\x1b[K")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def run_worker(argv: list[str], timeout: float) -> dict:
    """Run ``_worker.py`` with ``argv``; its JSON, or an error dict."""
    cmd = [sys.executable, WORKER, *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "error": f"worker exit {proc.returncode}: {tail}"}
    if proc.returncode < 0:  # killed by a signal after printing
        result["ok"] = False
        result.setdefault("error", f"worker killed by signal {-proc.returncode}")
    return result


class Served:
    """A ``_worker.py --serve`` process: one loop, one workload, driven call by call. Not
    pinned (the threadsafe workloads use two cores), stderr kept as for the servers."""

    def __init__(self, loop: str, argv: list[str], timeout: float):
        self.loop, self.timeout = loop, timeout
        argv = [sys.executable, WORKER, loop, *argv, "--serve"]
        self.server = netbench.Server(argv, None, stdin=subprocess.PIPE, name="worker")
        self.proc = self.server.proc

    def reply(self) -> dict:
        """The worker's next JSON line; a failure (``"ok": false``, its last word) raises."""
        line = netbench._readline(self.proc, self.timeout)
        if line is None:
            raise WorkerError({"ok": False, "error": self.server.failure("gave no reply")})
        try:
            msg = json.loads(line)
        except ValueError:
            said = line.strip()[:200]
            raise WorkerError({"ok": False, "error": f"worker said {said!r}"}) from None
        if msg.get("ok") is False:
            raise WorkerError(msg)
        return msg

    def ask(self, cmd: str) -> dict:
        try:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # the worker is gone: reply() says why
        return self.reply()

    def close(self) -> None:
        self.server.stop()


class WorkerError(Exception):
    pass


def run_interleaved(loops: list[str], argv: list[str], duration: float, timeout: float):
    """One round of a throughput workload with every loop's worker up at once: each calibrates
    in turn, then they take measured calls in turn, in ABCD DCBA order, until every loop has
    ``duration`` seconds of measured wall time. Loops are compared over the same seconds of a
    machine whose speed drifts, instead of seconds apart. loop -> worker result."""
    workers: dict[str, Served] = {}
    out: dict[str, dict] = {}
    try:
        for loop in loops:
            workers[loop] = Served(loop, argv, timeout)
        for loop in loops:
            try:
                workers[loop].reply()  # ready
                workers[loop].ask("calibrate")
            except WorkerError as exc:
                out[loop] = exc.args[0]
        live = [lp for lp in loops if lp not in out]
        wall = dict.fromkeys(live, 0.0)
        turn = 0
        while live and min(wall[lp] for lp in live) < duration:
            for loop in live if turn % 2 == 0 else live[::-1]:
                try:
                    wall[loop] += workers[loop].ask("call")["wall_s"]
                except WorkerError as exc:
                    out[loop] = exc.args[0]
            live = [lp for lp in live if lp not in out]
            turn += 1
        for loop in live:
            try:
                out[loop] = workers[loop].ask("end")
            except WorkerError as exc:
                out[loop] = exc.args[0]
    finally:
        for w in workers.values():
            w.close()
    return out


def rotated(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


# --- aggregation ------------------------------------------------------------------------------


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(wl: micro.Workload, runs: dict, loops: list, rounds: int) -> dict:
    """Medians over rounds for one workload; ``runs[(loop, round)]`` is a worker result."""

    def get(loop, r, key):
        res = runs.get((loop, r))
        return res.get(key) if res and res.get("ok") else None

    def ratio(key, base, invert=False):
        """Median over rounds of ferroloop ÷ base (base ÷ ferroloop if invert), same round."""
        per_round = []
        for r in range(rounds):
            a, b = get(SUBJECT, r, key), get(base, r, key)
            if a is None or b is None or min(a, b) <= (0.5 if wl.kind == "memory" else 0):
                continue  # (RSS growths under 0.5 MB are noise, not a ratio)
            per_round.append(b / a if invert else a / b)
        return median_or_none(per_round), per_round

    key = "value" if wl.kind == "memory" else "ops_per_s"
    out: dict = {"workload": wl.name, "kind": wl.kind, "op": wl.op, "bar": wl.bar, "loops": {}}
    for loop in loops:
        entry = {"value": median_or_none(get(loop, r, key) for r in range(rounds))}
        if wl.kind == "memory":
            entry["peak_mb"] = median_or_none(get(loop, r, "peak_mb") for r in range(rounds))
        else:
            entry["cpu_ns_per_op"] = median_or_none(
                get(loop, r, "cpu_ns_per_op") for r in range(rounds)
            )
            if wl.latency:
                for q in ("lat_p50_us", "lat_p99_us"):
                    entry[q] = median_or_none(get(loop, r, q) for r in range(rounds))
        errors = sorted(
            {
                res.get("error") or "failed"
                for r in range(rounds)
                if not (res := runs.get((loop, r), {"ok": False}))["ok"]
            }
        )
        if errors:
            entry["errors"] = errors
        out["loops"][loop] = entry
    for base in (BASE_FAST, BASE_STD):
        if SUBJECT in loops and base in loops:
            out[f"ratio_{base}"], out[f"ratio_{base}_rounds"] = ratio(key, base)
            if wl.kind != "memory":
                # CPU-time speedup: base CPU per op / ferroloop CPU per op (> 1: ferroloop better)
                out[f"cpu_speedup_{base}"], _ = ratio("cpu_ns_per_op", base, invert=True)
    out["result"] = verdict(wl, out)
    return out


def verdict(wl: micro.Workload, s: dict) -> str:
    if wl.kind == "memory":
        mine = s["loops"].get(SUBJECT, {}).get("value")
        std = s["loops"].get(BASE_STD, {}).get("value")
        if mine is None or std is None:
            return "n/a"
        return "PASS" if mine <= std else "MISS"
    if wl.bar is None:
        return "—"
    r = s.get(f"ratio_{BASE_FAST}")
    if r is None:
        return "n/a"
    return "PASS" if r >= wl.bar else "MISS"


# --- formatting -------------------------------------------------------------------------------


def rounds_txt(rounds: int) -> str:
    return f"{rounds} round" + ("s" if rounds != 1 else "")


def fmt_rate(x) -> str:
    if x is None:
        return "n/a"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def fmt_ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}×"


def fmt_range(per_round) -> str:
    """min-max of the per-round ratios: how much the rounds disagree."""
    if not per_round:
        return "n/a"
    return f"{min(per_round):.2f}-{max(per_round):.2f}"


def fmt_num(x, spec=".0f") -> str:
    return "n/a" if x is None else format(x, spec)


def table(header: list[str], rows: list[list[str]], align: str) -> str:
    seps = {"l": "---", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(seps[a] for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report(
    summaries: list[dict], loops: list, pending: list, rounds: int, fewer: list, fewer_rounds: int
) -> str:
    """The markdown tables for the loop microbenchmarks; the ``fewer`` workloads ran in only
    ``fewer_rounds`` rounds."""
    thr = [s for s in summaries if s["kind"] == "throughput"]
    fewer_note = f", {fewer_rounds} for {', '.join(fewer)}" if fewer else ""
    mem = [s for s in summaries if s["kind"] == "memory"]
    parts = []
    if thr:
        rows = []
        for s in thr:
            bar = "—" if s["bar"] is None else f"≥ {s['bar']:.1f}×"
            rows.append(
                [s["workload"], s["op"]]
                + [fmt_rate(s["loops"][lp]["value"]) for lp in loops]
                + [
                    fmt_ratio(s.get(f"ratio_{BASE_FAST}")),
                    fmt_range(s.get(f"ratio_{BASE_FAST}_rounds")),
                ]
                + [fmt_ratio(s.get(f"ratio_{BASE_STD}"))]
                + [bar, s["result"]]
            )
        parts.append(
            f"### Throughput: ops/s (median of {rounds_txt(rounds)}{fewer_note}; "
            "higher is better)\n\n"
            + table(
                [
                    "workload",
                    "op",
                    *loops,
                    "ferro÷uvloop",
                    "(rounds)",
                    "ferro÷asyncio",
                    "bar",
                    "result",
                ],
                rows,
                "ll" + "r" * (len(loops) + 4) + "c",
            )
        )
        rows = [
            [s["workload"]]
            + [fmt_num(s["loops"][lp]["cpu_ns_per_op"]) for lp in loops]
            + [fmt_ratio(s.get(f"cpu_speedup_{BASE_FAST}"))]
            for s in thr
        ]
        parts.append(
            "### CPU time per op, ns (process CPU, all threads; lower is better)\n\n"
            + table(["workload"] + loops + ["uvloop÷ferro"], rows, "l" + "r" * (len(loops) + 1))
        )
        lat = [s for s in thr if "lat_p50_us" in next(iter(s["loops"].values()), {})]
        if lat:
            rows = [
                [s["workload"]]
                + [
                    f"{fmt_num(s['loops'][lp]['lat_p50_us'], '.1f')} / "
                    f"{fmt_num(s['loops'][lp]['lat_p99_us'], '.1f')}"
                    for lp in loops
                ]
                for s in lat
            ]
            parts.append(
                "### Latency per op, µs: p50 / p99 (lower is better)\n\n"
                + table(["workload"] + loops, rows, "l" + "r" * len(loops))
            )
    if mem or pending:
        rows = []
        for s in mem:
            cells = []
            for lp in loops:
                e = s["loops"][lp]
                cells.append(
                    "n/a"
                    if e["value"] is None
                    else f"{e['value']:.1f} (peak {fmt_num(e.get('peak_mb'), '.0f')})"
                )
            rows.append(
                [s["workload"]]
                + cells
                + [fmt_ratio(s.get(f"ratio_{BASE_STD}")), "≤ asyncio", s["result"]]
            )
        for name, note in pending:
            rows.append([name] + [note] * len(loops) + ["n/a", "≤ asyncio", "n/a"])
        parts.append(
            "### Memory: RSS growth, MB (median; lower is better)\n\n"
            + table(
                ["workload"] + loops + ["ferro÷asyncio", "bar", "result"],
                rows,
                "l" + "r" * (len(loops) + 1) + "rc",
            )
        )
    return "\n\n".join(parts)


def failures(summaries: list[dict], loops: list, missing: dict, extra: list) -> str:
    """The failed, skipped or unavailable cells with their errors (``extra``: the network
    rows' notes), or ''."""
    notes = [f"- {lp}: not available ({why})" for lp, why in missing.items()]
    for s in summaries:
        for lp in loops:
            for err in s["loops"][lp].get("errors", []) if lp not in missing else []:
                notes.append(f"- {lp} / {s['workload']}: {err}")
    notes += extra
    if not notes:
        return ""
    return "Failed, skipped or unavailable measurements (shown as n/a):\n\n" + "\n".join(notes)


def chart(rows: list[dict], path: str) -> str | None:
    """Bar chart of ferroloop's speedup over uvloop per workload (``rows``: dicts with
    workload, ratio, bar, result); None if it was drawn."""
    if not rows:
        return "no ferroloop ÷ uvloop ratios to draw"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -r bench/requirements.txt)"
    rows = rows[::-1]  # first workload on top
    names = [s["workload"] for s in rows]
    ratios = [s["ratio"] for s in rows]
    colours = [{"PASS": "#3a8f4b", "MISS": "#c0392b"}.get(s["result"], "#7f8c8d") for s in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.4))
    ys = range(len(rows))
    ax.barh(ys, ratios, color=colours)
    for y, s, r in zip(ys, rows, ratios, strict=True):
        if s["bar"] is not None:
            ax.plot([s["bar"]] * 2, [y - 0.4, y + 0.4], color="black", linewidth=2)
        ax.text(r, y, f" {r:.2f}×", va="center", fontsize=8)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(list(ys), names)
    ax.set_xlabel(
        "ferroloop ÷ uvloop: ops/s or req/s; (CPU) rows: uvloop ÷ ferroloop server CPU per"
        " request;\nmemory row: uvloop ÷ ferroloop RSS"
        " (median of per-round ratios; black tick = bar)",
        fontsize=8,
    )
    ax.set_title("ferroloop vs uvloop (green: meets bar, red: misses)")
    ax.set_xlim(0, max(ratios + [s["bar"] or 0 for s in rows]) * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# --- main -------------------------------------------------------------------------------------


def git_head() -> str | None:
    """The repository's commit, with "+dirty" if the working tree has changes."""
    try:
        rev = subprocess.run(
            ["git", "-C", HERE, "describe", "--always", "--dirty=+dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() or None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Compare event loops side by side.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick",
                      help="4 rounds x 0.3 s per measurement (default; < 5 minutes)")  # fmt: skip
    mode.add_argument("--full", action="store_const", dest="mode", const="full",
                      help="7 rounds x 2 s per measurement (for releases)")  # fmt: skip
    p.add_argument("--only", metavar="PATTERN", help="regex on workload names (case-insensitive)")
    p.add_argument("--loops", default=",".join(LOOP_NAMES), help="comma-separated loop names")
    p.add_argument("--rounds", type=int, help="number of rounds (overrides the mode)")
    p.add_argument("--duration", type=float, help="measured seconds per measurement")
    p.add_argument("--json", metavar="PATH", help="results file (default: bench/results/)")
    p.add_argument("--no-chart", action="store_true", help="do not draw bench/results/ratios.png")
    p.add_argument("--net-rounds", type=int, help="rounds that run the network workloads")
    p.add_argument("--no-net", action="store_true", help="loop microbenchmarks only")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--selector", action="store_true", default=None,
                     help="add ferroloop-selector (FERROLOOP_TRANSPORTS=selector) to the network "
                          "rows (default in --full)")  # fmt: skip
    sel.add_argument("--no-selector", action="store_false", dest="selector",
                     help="no ferroloop-selector rows (default in --quick)")  # fmt: skip
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    args = p.parse_args(argv)
    args.mode = args.mode or "quick"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = dict(MODES[args.mode])
    if args.list:
        for wl in micro.WORKLOADS.values():
            print(f"{wl.name:32} {wl.doc}")
        for g in netbench.plan(cfg["idle_conns"]):
            for row in g.rows:
                print(f"{row.name:32} {row.doc}")
        return 0
    if args.rounds:
        cfg["rounds"] = args.rounds
        cfg["net_rounds"] = args.rounds
        cfg["heavy_rounds"] = args.rounds
    if args.net_rounds:
        cfg["net_rounds"] = args.net_rounds
    if args.duration:
        cfg["duration"] = args.duration
        cfg["echo_duration"] = args.duration
    if args.selector is not None:
        cfg["selector"] = args.selector
    rounds = cfg["rounds"]
    net_rounds = min(cfg["net_rounds"], rounds) if not args.no_net else 0

    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    unknown = [name for name in loops if name not in LOOP_NAMES]
    if unknown or not loops:
        sys.exit(f"unknown loop(s) {unknown}; choose from {', '.join(LOOP_NAMES)}")
    pattern = re.compile(args.only, re.IGNORECASE) if args.only else None
    workloads = [wl for wl in micro.WORKLOADS.values() if not pattern or pattern.search(wl.name)]
    pending = [row for row in micro.PENDING if not pattern or pattern.search(row[0])]
    groups = netbench.select_groups(netbench.plan(cfg["idle_conns"]), pattern) if net_rounds else []
    if not workloads and not pending and not groups:
        sys.exit(f"no workload matches {args.only!r} (see --list)")

    started = time.perf_counter()
    info, available, missing = {}, [], {}
    for loop in loops:
        probe = run_worker([loop, "--probe"], timeout=60)
        info[loop] = probe.get("info") or {"error": probe.get("error")}
        if probe.get("ok"):
            available.append(loop)
        else:
            missing[loop] = probe.get("error") or "probe failed"
            print(f"note: {loop} is not available ({missing[loop]}): n/a", file=sys.stderr)

    def log(msg: str) -> None:
        print(f"note: {msg}", file=sys.stderr)

    tools = netbench.prepare(groups, log)
    for note in tools.notes:
        log(note)
    if tools.http_error and not tools.wrk:  # no wrk: the HTTP rows are skipped, not n/a
        groups = [g for g in groups if g.kind != "http"]
    selector = cfg["selector"] and netbench.SUBJECT in available
    net_loops = {g.name: netbench.group_loops(g, available, selector) for g in groups}
    net_runs: dict[str, dict] = {row.name: {} for g in groups for row in g.rows}

    worker_opts = [
        f"--duration={cfg['duration']}",
        f"--warmup={cfg['warmup']}",
        f"--chunk={cfg['chunk']}",
    ]
    timeout = 120 + 20 * cfg["duration"]
    runs: dict[str, dict] = {wl.name: {} for wl in workloads}
    raw = []

    def wl_rounds(wl: micro.Workload) -> int:
        return min(rounds, cfg["heavy_rounds"]) if wl.heavy else rounds

    progress = Progress(
        sum(wl_rounds(wl) * (len(available) if wl.kind == "memory" else 1) for wl in workloads)
        + net_rounds * sum(1 if g.kind == "echo" else len(net_loops[g.name]) for g in groups)
    )
    try:
        for r in range(rounds):
            for w, wl in enumerate(workloads):
                if r >= wl_rounds(wl):
                    continue  # a heavy workload past its rounds
                # rotate the order per (round, workload): A B C D, B C D A, ...
                order = rotated(available, r + w) if available else []
                if wl.kind == "memory":  # one fresh process per figure
                    results = {}
                    for loop in order:
                        progress.step(f"round {r + 1}/{rounds} {loop} {wl.name}")
                        results[loop] = run_worker([loop, wl.name, *worker_opts], timeout)
                else:
                    progress.step(f"round {r + 1}/{rounds} {wl.name} ({len(order)} loops)")
                    argv = [wl.name, *worker_opts]
                    results = run_interleaved(order, argv, cfg["duration"], timeout)
                for pos, loop in enumerate(order):
                    res = results[loop]
                    res.update(loop=loop, workload=wl.name, round=r, position=pos)
                    runs[wl.name][(loop, r)] = res
                    raw.append(res)
            for gi, g in enumerate(groups if r < net_rounds else []):
                order = rotated(net_loops[g.name], r + gi)
                if g.kind == "echo":  # every loop's server up at once, measured in turn
                    progress.step(f"round {r + 1}/{rounds} {g.name} ({len(order)} loops)")
                    results = netbench.run_echo_interleaved(g, order, cfg, tools)
                else:
                    results = {}
                    for loop in order:
                        progress.step(f"round {r + 1}/{rounds} {loop} {g.name}")
                        results[loop] = netbench.run_group(g, loop, cfg, tools)
                for pos, loop in enumerate(order):
                    for name, res in results[loop].items():
                        res.update(loop=loop, workload=name, round=r, position=pos)
                        net_runs[name][(loop, r)] = res
                        raw.append(res)
    finally:
        progress.close()
    for loop in loops:
        if loop not in available:
            for wl in workloads:
                for r in range(rounds):
                    runs[wl.name][(loop, r)] = {"ok": False, "error": "loop unavailable"}
    elapsed = time.perf_counter() - started

    summaries = [summarize(wl, runs[wl.name], loops, wl_rounds(wl)) for wl in workloads]
    shown = loops + ([netbench.SELECTOR] if selector else [])
    net_rows = [row for g in groups for row in g.rows]
    net_summaries = netbench.summarize(net_rows, net_runs, shown, net_rounds)
    stamp = datetime.now(timezone.utc)
    print(f"## ferroloop benchmarks — {args.mode} ({rounds_txt(rounds)} × {cfg['duration']} s)\n")
    print(
        f"{stamp:%Y-%m-%d %H:%M UTC}, CPython {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs. "
        + ", ".join(f"{lp} {info[lp].get('version') or 'n/a'}" for lp in loops)
        + "."
    )
    if SUBJECT in info and info[SUBJECT].get("extension"):
        print(f"ferroloop extension: {info[SUBJECT]['extension']}")
        if info[SUBJECT].get("debug_build"):
            print("**WARNING: this ferroloop extension has overflow checks (a debug or test build):"
                  " its figures say nothing. Build a release wheel (`make bench`).**")  # fmt: skip
    if tools.server_cpu is not None and groups:
        print(
            f"Network rows: servers pinned to CPU {tools.server_cpu}, load clients to CPU "
            f"{tools.client_cpu}; {rounds_txt(net_rounds)}."
        )
    print()
    notes = [f"- {note}" for note in tools.notes]
    notes += netbench.errors(net_summaries, skip=set(missing))
    sections = [
        report(
            summaries,
            loops,
            pending,
            rounds,
            [wl.name for wl in workloads if wl_rounds(wl) < rounds],
            cfg["heavy_rounds"],
        ),
        netbench.report(net_summaries, shown, net_rounds, cfg),
        failures(summaries, loops, missing, notes),
    ]
    print("\n\n".join(part for part in sections if part))
    print(f"\nTotal wall time: {elapsed // 60:.0f} min {elapsed % 60:.0f} s.")

    os.makedirs(RESULTS, exist_ok=True)
    path = args.json or os.path.join(RESULTS, f"bench-{stamp:%Y%m%d-%H%M%S}.json")
    with open(path, "w") as f:
        json.dump(
            {
                "meta": {
                    "date": stamp.isoformat(),
                    "python": sys.version,
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "mode": args.mode,
                    "config": cfg,
                    "loops": info,
                    "wall_s": elapsed,
                    "argv": sys.argv[1:] if argv is None else argv,
                    "git": git_head(),
                },
                "summary": summaries + net_summaries,
                "pending": [dict(workload=n, note=note) for n, note in pending],
                "runs": raw,
            },
            f,
            indent=1,
        )
    print(f"Raw results: {os.path.relpath(path)}")
    if not args.no_chart:
        png = os.path.join(RESULTS, "ratios.png")
        rows = [
            dict(
                workload=s["workload"],
                ratio=s[f"ratio_{BASE_FAST}"],
                bar=s["bar"],
                result=s["result"],
            )
            for s in summaries
            if s["kind"] == "throughput" and s.get(f"ratio_{BASE_FAST}") is not None
        ]
        skipped = chart(rows + netbench.chart_rows(net_summaries), png)
        print(f"Chart skipped: {skipped}." if skipped else f"Chart: {os.path.relpath(png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
