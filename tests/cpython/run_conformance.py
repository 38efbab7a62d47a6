#!/usr/bin/env python3
"""Run CPython's own ``test_asyncio`` (the copy shipped with the interpreter running this script)
with ferroloop as the loop that ``asyncio.new_event_loop()`` returns, and report per module.

    python tests/cpython/run_conformance.py                 # everything, 2 modules at a time
    python tests/cpython/run_conformance.py --module test_tasks -v
    python tests/cpython/run_conformance.py --module test_events -k '*test_call_later*' \\
        --list-failures                                     # tracebacks, hang stacks, reruns
    python tests/cpython/run_conformance.py --asyncio       # baseline: stock asyncio loop

* Each module runs in its own subprocess (``_worker.py``), so module state never leaks. A test
  that runs longer than ``--test-timeout`` is a hang: its stacks are dumped, it counts as a
  failure, and the module resumes after it in a fresh process. A module gets at most
  ``--module-timeout`` seconds in all; the rest is reported as a timeout.
* ``<module>[ferroloop mixins]`` rows re-run the loop-generic mixins of a module (those that
  get their loop from ``create_event_loop()``) on ``ferroloop.Loop()``.
* ``<module>[ferroloop test loop]`` rows re-run the tests that CPython runs on a private loop
  (``test_utils.TestLoop`` without a virtual clock, or a ``BaseEventLoop`` with a mocked
  selector) on a ferroloop loop instead; they report only the tests that got one.
* The ``loops`` column counts the ferroloop loops created in each row, so a row whose tests
  never touch ferroloop is visible as such (``no ferroloop loop``).
* Excluded tests (``exclusions.txt``, see ``_exclusions.py``) are not run; they are counted
  as excluded, never as passed.
* Required modules (the loop-core issue) must have no failure, error or timeout: otherwise the
  exit status is 1. Informational modules (asyncio's own loop classes) are reported only.

The last line is ``conformance: N passed, M failed, K skipped`` over the required modules
(``failed`` includes errors, hangs and crashes).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _exclusions  # noqa: E402

WORKER = os.path.join(HERE, "_worker.py")
EXCLUSIONS = os.path.join(HERE, "exclusions.txt")
MIXINS = "[ferroloop mixins]"
TESTLOOP = "[ferroloop test loop]"

# Rows, in report order. Modules that the running interpreter does not ship are left out.
REQUIRED = [
    "test_base_events",
    "test_base_events" + TESTLOOP,
    "test_context",
    "test_eager_task_factory",  # 3.12+
    "test_events",
    "test_events" + MIXINS,
    "test_futures",
    "test_futures" + TESTLOOP,
    "test_futures2",
    "test_locks",
    "test_pep492",
    "test_pep492" + TESTLOOP,
    "test_queues",
    "test_runners",
    "test_runners" + TESTLOOP,
    "test_staggered",  # 3.12+: staggered_race, plain task scheduling
    "test_taskgroups",
    "test_tasks",
    "test_tasks" + TESTLOOP,
    "test_threads",
    "test_timeouts",
    "test_unix_events",
    "test_waitfor",
    # networking
    "test_buffered_proto",
    "test_protocols",
    "test_sendfile",
    "test_sendfile" + MIXINS,
    "test_server",
    "test_sock_lowlevel",
    "test_sock_lowlevel" + MIXINS,
    "test_ssl",
    "test_sslproto",
    "test_streams",
    "test_subprocess",
    "test_transports",
]
# Tests of asyncio's own loop classes (the Windows proactor loop, the selector loop, with
# mocks): they create no ferroloop loop, so they are reported but never fail the run.
INFORMATIONAL = [
    "test_proactor_events",
    "test_selector_events",
]
# Rough seconds per row, to start the long ones first.
COST = {
    "test_tasks": 17,
    "test_tasks" + TESTLOOP: 18,
    "test_ssl": 14,
    "test_events": 9,
    "test_taskgroups": 6,
    "test_sslproto": 5,
}

# Worst first: the outcome a test gets when it reports several (subtests).
RANK = ["crash", "hang", "error", "fail", "uxpass", "pass", "xfail", "skip"]
BUCKET = {
    "pass": "passed",
    "xfail": "passed",
    "fail": "failed",
    "uxpass": "failed",
    "hang": "failed",
    "error": "errors",
    "crash": "errors",
    "skip": "skipped",
}


@dataclass
class CaseResult:
    outcome: str
    msg: str = ""
    tb: str = ""
    loops: int = 0
    secs: float = 0.0


@dataclass
class Row:
    name: str
    required: bool
    results: dict[str, CaseResult] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    excluded_patterns: set[str] = field(default_factory=set)
    loops: int = 0
    installed: bool = False
    timed_out: bool = False
    attempts: int = 0
    secs: float = 0.0

    @property
    def module(self) -> str:
        return self.name.split("[", 1)[0]

    @property
    def kind(self) -> str:
        if self.name.endswith(MIXINS):
            return "mixins"
        if self.name.endswith(TESTLOOP):
            return "testloop"
        return "base"

    def counts(self) -> dict[str, int]:
        """Outcome counts; excluded tests (run only with --run-excluded) never count."""
        c = dict.fromkeys(("passed", "failed", "errors", "skipped"), 0)
        for tid, r in self.results.items():
            if tid in self.excluded:
                continue
            c[BUCKET[r.outcome]] += 1
        c["excluded"] = len(self.excluded)
        c["ferro_tests"] = sum(
            1 for tid, r in self.results.items() if r.loops and tid not in self.excluded
        )
        return c

    def failures(self):
        for tid, r in sorted(self.results.items()):
            if tid in self.excluded:
                continue
            if BUCKET[r.outcome] in ("failed", "errors"):
                yield tid, r

    @property
    def ok(self) -> bool:
        c = self.counts()
        return not (c["failed"] or c["errors"] or self.timed_out)


def record(row: Row, tid: str, res: CaseResult):
    old = row.results.get(tid)
    if old is None or RANK.index(res.outcome) < RANK.index(old.outcome):
        if old is not None:
            res.loops, res.secs = max(res.loops, old.loops), max(res.secs, old.secs)
        row.results[tid] = res


def read_events(path):
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut short by a kill
                pass
    return out


_PROCS: set[subprocess.Popen] = set()
_PROCS_LOCK = threading.Lock()


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill_group(proc: subprocess.Popen):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_row(row: Row, opts, workdir: str) -> Row:
    """Run one row to completion: resume after each hung or crashed test, within the budget."""
    t_start = time.monotonic()
    budget = opts.module_timeout if row.required else opts.info_module_timeout
    test_timeout = opts.test_timeout if row.required else opts.info_test_timeout
    tag = row.name.replace("[", "-").replace("]", "").replace(" ", "-")
    skip_file = os.path.join(workdir, f"{tag}.skip")
    open(skip_file, "w").close()
    done_ids: set[str] = set()
    while True:
        row.attempts += 1
        base = os.path.join(workdir, f"{tag}.{row.attempts}")
        events_path, trace_path, log_path = base + ".events", base + ".trace", base + ".log"
        cmd = [sys.executable, WORKER, row.module, "--events", events_path]
        cmd += ["--trace", trace_path, "--skip-file", skip_file]
        cmd += ["--test-timeout", str(test_timeout)]
        cmd += ["--kind", row.kind]
        if not opts.no_exclusions:
            cmd += ["--exclusions", opts.exclusions]
        if opts.run_excluded:
            cmd.append("--run-excluded")
        if opts.asyncio:
            cmd.append("--asyncio")
        for p in opts.patterns:
            cmd += ["-k", p]
        remaining = budget - (time.monotonic() - t_start)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
                start_new_session=True,
                # SIGINT at its default, as under a terminal: a shell without job control
                # starts background jobs with it ignored, which would be inherited, and
                # test_runners' Ctrl+C tests would then wait out their timeouts.
                preexec_fn=_default_sigint,
            )
            with _PROCS_LOCK:
                _PROCS.add(proc)
            try:
                proc.wait(timeout=max(remaining, 1))
                killed = False
            except subprocess.TimeoutExpired:
                kill_group(proc)
                killed = True
            finally:
                with _PROCS_LOCK:
                    _PROCS.discard(proc)
        # Whatever the test left behind (servers, subprocesses) goes with it.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

        started, stopped, finished = [], set(), False
        attempt_loops = 0
        for ev in read_events(events_path):
            kind = ev["ev"]
            if kind == "installed":
                row.installed = True
            elif kind == "excluded":
                row.excluded[ev["id"]] = ev["reason"]
                row.excluded_patterns.add(ev["pattern"])
            elif kind == "start":
                started.append(ev["id"])
            elif kind == "stop":
                stopped.add(ev["id"])
                done_ids.add(ev["id"])
                attempt_loops += ev["loops"]
                r = row.results.setdefault(ev["id"], CaseResult("pass"))
                r.loops, r.secs = ev["loops"], ev["secs"]
            elif kind == "result":
                record(
                    row, ev["id"], CaseResult(ev["outcome"], ev.get("msg", ""), ev.get("tb", ""))
                )
            elif kind == "done":
                finished = True
                attempt_loops = ev["loops"]
        row.loops += attempt_loops
        if finished:
            break
        trace = open(trace_path).read() if os.path.exists(trace_path) else ""
        inflight = [t for t in started if t not in stopped]
        victim = inflight[-1] if inflight else f"{row.module}.<outside tests>"
        if killed:
            kind, msg = "hang", f"module time budget ({budget:.0f}s) exhausted while running"
            row.timed_out = True
        elif "Timeout (" in trace:
            kind, msg = "hang", f"hung: still running after {test_timeout:.0f}s"
        else:
            rc = proc.returncode
            how = f"signal {-rc} ({signal.Signals(-rc).name})" if rc < 0 else f"exit status {rc}"
            kind, msg = "crash", f"process died: {how}"
        log_tail = open(log_path, errors="replace").read()[-4000:]
        tb = f"--- stacks (faulthandler) ---\n{trace[-6000:]}\n--- output tail ---\n{log_tail}"
        record(row, victim, CaseResult(kind, msg, tb))
        done_ids.add(victim)
        if killed or not inflight or row.attempts >= opts.max_attempts:
            if not killed and row.attempts >= opts.max_attempts:
                row.timed_out = True
            break
        if time.monotonic() - t_start >= budget:
            row.timed_out = True
            break
        with open(skip_file, "w") as f:
            f.write("\n".join(sorted(done_ids)) + "\n")
    row.secs = time.monotonic() - t_start
    if row.kind == "testloop":
        # Tests that never got a ferroloop loop ran exactly as in the module's own row.
        row.results = {
            t: r
            for t, r in row.results.items()
            if r.loops or r.outcome not in ("pass", "xfail", "skip")
        }
    return row


def available(name: str) -> bool:
    module = name.split("[", 1)[0]
    return importlib.util.find_spec(f"test.test_asyncio.{module}") is not None


def select_rows(opts) -> list[Row]:
    rows = [Row(n, True) for n in REQUIRED] + [Row(n, False) for n in INFORMATIONAL]
    if opts.required_only:
        rows = [r for r in rows if r.required]
    if opts.modules:
        wanted = []
        for m in opts.modules:
            hit = [r for r in rows if (r.name if "[" in m else r.module) == m]
            if not hit:
                sys.exit(f"unknown module {m!r}; known: {', '.join(r.name for r in rows)}")
            wanted += [r for r in hit if r not in wanted]
        rows = wanted
    return [r for r in rows if available(r.name)]


def fmt_row(row: Row, opts) -> str:
    c = row.counts()
    if not row.results and not row.excluded:
        status = "EMPTY"
    elif row.timed_out:
        status = "TIMEOUT"
    elif row.ok:
        status = "ok"
    else:
        status = "FAIL" if row.required else "fail"
    if row.loops == 0 and row.results and not opts.asyncio:
        status += " (no ferroloop loop)"
    if not row.installed and not opts.asyncio:
        status += " (ferroloop NOT installed)"
    group = "req" if row.required else "info"
    return (
        f"{row.name:38} {group:4} {c['passed']:6} {c['failed']:6} {c['errors']:6} "
        f"{c['skipped']:7} {c['excluded']:8} {row.loops:6} {c['ferro_tests']:11} "
        f"{row.secs:6.1f}s  {status}"
    )


HEADER = (
    f"{'module':38} {'grp':4} {'passed':>6} {'failed':>6} {'errors':>6} {'skipped':>7} "
    f"{'excluded':>8} {'loops':>6} {'ferro-tests':>11} {'time':>7}  status"
)


def rerun_cmd(row: Row, tid: str, opts) -> str:
    args = [sys.executable, os.path.relpath(__file__), "--module", row.name, "-k", tid]
    args += [
        f
        for f in ("--asyncio", "--no-exclusions", "--run-excluded")
        if getattr(opts, f[2:].replace("-", "_"))
    ]
    return " ".join(shlex.quote(a) for a in args + ["--list-failures"])


def print_failures(rows: list[Row], opts):
    full = opts.list_failures
    for row in rows:
        fails = list(row.failures())
        if not fails:
            continue
        limit = None if (row.required or opts.modules or full) else 10
        print(f"\n=== {row.name}: {len(fails)} failing ({'required' if row.required else 'info'})")
        for tid, r in fails[:limit]:
            print(f"  {r.outcome.upper():6} {tid}: {r.msg}")
            if full:
                print("    rerun: " + rerun_cmd(row, tid, opts))
                for line in r.tb.rstrip().splitlines():
                    print("      " + line)
        if limit is not None and len(fails) > limit:
            print(f"  ... {len(fails) - limit} more (use --module {shlex.quote(row.name)} -v)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--module",
        dest="modules",
        action="append",
        default=[],
        help="run only this row (e.g. test_tasks, 'test_events[ferroloop mixins]'); a bare "
        "module name selects all its rows; repeatable",
    )
    ap.add_argument(
        "-k",
        dest="patterns",
        action="append",
        default=[],
        help="only tests whose module.Class.test id matches this fnmatch pattern",
    )
    ap.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="list failing test ids with the first line of their error",
    )
    ap.add_argument(
        "--list-failures",
        action="store_true",
        help="like -v, plus tracebacks, hang stacks and a rerun command per test",
    )
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--required-only", action="store_true", help="skip informational modules")
    ap.add_argument(
        "--asyncio",
        action="store_true",
        help="baseline: run on stock asyncio loops (no ferroloop) for comparison",
    )
    ap.add_argument("--exclusions", default=EXCLUSIONS)
    ap.add_argument("--no-exclusions", action="store_true", help="ignore exclusions.txt")
    ap.add_argument(
        "--run-excluded",
        action="store_true",
        help="also run excluded tests and report which of them pass now",
    )
    ap.add_argument(
        "--test-timeout",
        type=float,
        default=30.0,
        help="seconds before a test of a required module counts as hung",
    )
    ap.add_argument(
        "--module-timeout",
        type=float,
        default=240.0,
        help="wall-clock budget of a required module, resumes included",
    )
    ap.add_argument("--info-test-timeout", type=float, default=10.0)
    ap.add_argument("--info-module-timeout", type=float, default=90.0)
    ap.add_argument(
        "--max-attempts",
        type=int,
        default=25,
        help="processes per module (1 + resumes after hangs/crashes)",
    )
    ap.add_argument("--keep-logs", metavar="DIR", help="keep worker logs/events in DIR")
    ap.add_argument("--json", metavar="FILE", help="write every test result to FILE")
    opts = ap.parse_args(argv)

    exclusions = [] if opts.no_exclusions else _exclusions.load(opts.exclusions)
    active = _exclusions.active(exclusions)
    rows = select_rows(opts)
    if not rows:
        sys.exit("nothing to run")

    tests_dir = os.path.dirname(importlib.util.find_spec("test.test_asyncio").origin)
    try:
        import ferroloop

        fl = f"ferroloop {ferroloop.__version__} ({os.path.dirname(ferroloop.__file__)})"
    except ImportError as exc:
        if not opts.asyncio:
            sys.exit(f"cannot import ferroloop: {exc}")
        fl = "ferroloop not importable"
    loop_desc = "stock asyncio loops (--asyncio baseline)" if opts.asyncio else fl
    print(f"CPython {sys.version.split()[0]} test_asyncio from {tests_dir}")
    print(f"loop: {loop_desc}; {len(active)}/{len(exclusions)} exclusions active; jobs={opts.jobs}")
    sys.stdout.flush()

    workdir = opts.keep_logs or tempfile.mkdtemp(prefix="ferroloop-conformance-")
    os.makedirs(workdir, exist_ok=True)
    t0 = time.monotonic()
    order = sorted(rows, key=lambda r: -COST.get(r.name, 1))
    done = 0
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, opts.jobs)) as pool:
            futs = [pool.submit(run_row, r, opts, workdir) for r in order]
            for fut in concurrent.futures.as_completed(futs):
                row = fut.result()
                done += 1
                c = row.counts()
                print(
                    f"[{done:2}/{len(rows)}] {row.name:38} {row.secs:6.1f}s  "
                    f"{c['passed']} passed, {c['failed'] + c['errors']} failed"
                    + (" TIMEOUT" if row.timed_out else "")
                    + (f" ({row.attempts} processes)" if row.attempts > 1 else ""),
                    flush=True,
                )
    except KeyboardInterrupt:
        with _PROCS_LOCK:
            for p in list(_PROCS):
                kill_group(p)
        print("\ninterrupted")
        return 130
    wall = time.monotonic() - t0

    print()
    print(HEADER)
    for group in (True, False):
        for row in rows:
            if row.required == group:
                print(fmt_row(row, opts))
    print(
        "(loops: ferroloop loops created (stock loops with --asyncio); ferro-tests: tests that"
        f" created one; {TESTLOOP} rows: tests that got a ferroloop loop instead of a test loop)"
    )

    if opts.verbose or opts.list_failures:
        print_failures(rows, opts)

    if opts.run_excluded:
        print("\n=== excluded tests, run anyway (PASS: the exclusion may be stale):")
        for row in rows:
            for tid in sorted(row.excluded):
                r = row.results.get(tid)
                outcome = r.outcome.upper() if r else "NOT RUN"
                print(f"  {outcome:6} {row.name}: {tid}: {r.msg if r else ''}"[:160])

    full_run = not opts.modules and not opts.patterns and not opts.required_only
    if full_run and not opts.no_exclusions:
        used = set().union(*(r.excluded_patterns for r in rows))
        unused = [e for e in active if e.describe() not in used]
        if unused and (opts.verbose or opts.list_failures):
            print("\n=== exclusion patterns that matched no test on this interpreter:")
            for e in unused:
                print(f"  line {e.lineno}: {e.describe()}")

    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(
                {
                    r.name: {
                        "required": r.required,
                        "loops": r.loops,
                        "timed_out": r.timed_out,
                        "results": {t: vars(x) for t, x in r.results.items()},
                        "excluded": r.excluded,
                    }
                    for r in rows
                },
                f,
                indent=1,
            )

    req = [r for r in rows if r.required]
    info = [r for r in rows if not r.required]

    def total(rs):
        cs = [r.counts() for r in rs]
        return {k: sum(c[k] for c in cs) for k in ("passed", "failed", "errors", "skipped")} | {
            "excluded": sum(c["excluded"] for c in cs)
        }

    t_req, t_info = total(req), total(info)
    bad = [r.name for r in req if not r.ok or not (r.installed or opts.asyncio)]
    if info:
        print(
            f"\ninformational (asyncio's own loop classes; never fails the run): "
            f"{t_info['passed']} passed, {t_info['failed'] + t_info['errors']} failed, "
            f"{t_info['skipped']} skipped, {t_info['excluded']} excluded"
        )
    print(
        f"required: {len(req)} modules, {t_req['excluded']} tests excluded, "
        f"{sum(r.loops for r in req)} ferroloop loops created; wall time {wall:.1f}s"
        + (f"; FAILING: {', '.join(bad)}" if bad else "")
    )
    if not opts.keep_logs:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs in {workdir}")
    print(
        f"conformance: {t_req['passed']} passed, {t_req['failed'] + t_req['errors']} failed, "
        f"{t_req['skipped']} skipped"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
