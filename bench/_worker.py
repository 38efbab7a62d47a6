"""One measurement in a fresh interpreter: ``_worker.py LOOP WORKLOAD [options]``.

Prints one JSON object on stdout (and nothing else), also on failure (``"ok": false``). The
parent (``run.py``) starts one of these per (round, workload, loop) so loops never share
interpreter state.

Throughput workloads: calibrate ``n`` so that one call of the workload takes about
``--chunk`` seconds, or the workload's ``min_chunk`` if longer (the calibration calls double
as warm-up, topped up to ``--warmup`` seconds), then call it until ``--duration`` seconds of
wall time have been measured. Wall time (``perf_counter``) and process CPU time
(``process_time``: all threads, user + system) are summed over the measured calls only.

``--serve``: the same measurement, driven call by call so that ``run.py`` can interleave the
loops: the worker makes its loop, prints ``{"ready": true}`` and then answers one JSON line per
command line on stdin: ``calibrate`` (calibration and warm-up, as above), ``call`` (one measured
call: ops, wall and CPU seconds), ``end`` (the summed result, as without ``--serve``; then it
exits). Between commands it blocks on stdin and costs no CPU.

``_worker.py LOOP --probe`` checks that the loop imports and runs a coroutine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loops  # noqa: E402
import micro  # noqa: E402


def percentile(sorted_values: list, q: float):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1) + 0.5))]


class Meter:
    """Calibrated, measured calls of one throughput workload on one loop."""

    def __init__(self, wl: micro.Workload, loop, args):
        self.wl, self.loop, self.args = wl, loop, args
        self.lat: list[int] = []
        self.n = args.n or 1
        self.warm = 0.0
        self.ops = self.calls = 0
        self.wall = self.cpu = 0.0

    def _call(self, n):
        w0, c0 = time.perf_counter(), time.process_time()
        ops = self.wl.fn(self.loop, n, self.lat)
        return ops, time.perf_counter() - w0, time.process_time() - c0

    def calibrate(self) -> None:
        """Double n until one call takes half a chunk (the calls double as warm-up), scale n to
        a chunk, top the warm-up up to --warmup seconds; then drop what warm-up measured."""
        args = self.args
        chunk = max(args.chunk, self.wl.min_chunk)
        n = self.n
        while True:
            _, wall, _ = self._call(n)
            self.warm += wall
            if args.n or wall >= chunk / 2 or n >= 1 << 24:
                break
            n *= 2
        if not args.n:
            n = max(1, round(n * chunk / max(wall, 1e-9)))
        self.n = n
        while self.warm < args.warmup:
            self.warm += self._call(n)[1]
        self.lat.clear()
        gc.collect()

    def call(self) -> tuple[int, float, float]:
        """One measured call: (ops, wall seconds, CPU seconds)."""
        o, w, c = self._call(self.n)
        self.ops += o
        self.wall += w
        self.cpu += c
        self.calls += 1
        return o, w, c

    def result(self) -> dict:
        lat = sorted(self.lat)
        result = {
            "ops": self.ops,
            "wall_s": self.wall,
            "cpu_s": self.cpu,
            "ops_per_s": self.ops / self.wall,
            "cpu_ns_per_op": self.cpu / self.ops * 1e9,
            "calls": self.calls,
            "n_per_call": self.n,
            "warmup_s": self.warm,
        }
        if self.wl.latency:
            result.update(
                lat_samples=len(lat),
                lat_p50_us=percentile(lat, 0.50) / 1e3,
                lat_p99_us=percentile(lat, 0.99) / 1e3,
            )
        return result


def measure_throughput(wl: micro.Workload, loop, args) -> dict:
    m = Meter(wl, loop, args)
    m.calibrate()
    while (m.calls < args.calls) if args.calls else (m.wall < args.duration or m.calls == 0):
        m.call()
    return m.result()


def serve(wl: micro.Workload, loop, args) -> dict:
    """The --serve protocol (module docstring); the final result, for main() to print."""
    m = Meter(wl, loop, args)
    say({"ready": True})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "calibrate":
            m.calibrate()
            say({"n": m.n, "warmup_s": m.warm})
        elif cmd == "call":
            ops, wall, cpu = m.call()
            say({"ops": ops, "wall_s": wall, "cpu_s": cpu})
        elif cmd == "end":
            break
        else:
            raise ValueError(f"unknown command {cmd!r}")
    if not m.calls:
        raise RuntimeError("no measured call before end")
    return m.result()


def say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("loop", choices=loops.NAMES)
    p.add_argument("workload", nargs="?", help="workload name (see micro.py)")
    p.add_argument("--probe", action="store_true", help="only check that the loop works")
    p.add_argument("--duration", type=float, default=0.5, help="measured seconds (wall)")
    p.add_argument("--warmup", type=float, default=0.1, help="minimum warm-up seconds")
    p.add_argument("--chunk", type=float, default=0.025, help="target seconds per call")
    p.add_argument("--n", type=int, default=0, help="fixed n per call (no calibration)")
    p.add_argument("--calls", type=int, default=0, help="fixed number of measured calls")
    p.add_argument("--serve", action="store_true", help="driven call by call on stdin (above)")
    args = p.parse_args()

    out: dict = {"loop": args.loop, "workload": args.workload, "ok": False}
    try:
        make_loop = loops.factory(args.loop)
    except Exception as exc:
        out.update(unavailable=True, error=f"{type(exc).__name__}: {exc}")
        print(json.dumps(out))
        return 1

    loop = None
    try:
        loop = make_loop()
        asyncio.set_event_loop(loop)
        if args.probe:
            out["info"] = loops.describe(args.loop)
            out["ok"] = loop.run_until_complete(asyncio.sleep(0, "ok")) == "ok"
        else:
            wl = micro.WORKLOADS[args.workload]
            if wl.kind == "memory":
                out.update(wl.fn(loop))
            elif args.serve:
                out.update(serve(wl, loop, args))
            else:
                out.update(measure_throughput(wl, loop, args))
            out["ok"] = True
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc(limit=8)
    finally:
        if loop is not None:
            try:
                loop.close()
            except Exception as exc:
                out.setdefault("error", f"close: {type(exc).__name__}: {exc}")
            asyncio.set_event_loop(None)
    say(out)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
