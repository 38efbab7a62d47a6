"""One measurement in a fresh interpreter: ``_worker.py LOOP WORKLOAD [options]``.

Prints one JSON object on stdout (and nothing else), also on failure (``"ok": false``). The
parent (``run.py``) starts one of these per (round, workload, loop) so loops never share
interpreter state.

Throughput workloads: calibrate ``n`` so that one call of the workload takes about
``--chunk`` seconds, or the workload's ``min_chunk`` if longer (the calibration calls double
as warm-up, topped up to ``--warmup`` seconds), then call it until ``--duration`` seconds of
wall time have been measured. Wall time (``perf_counter``) and process CPU time
(``process_time``: all threads, user + system) are summed over the measured calls only.

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


def measure_throughput(wl: micro.Workload, loop, args) -> dict:
    lat: list[int] = []
    fn = wl.fn

    def call(n):
        w0, c0 = time.perf_counter(), time.process_time()
        ops = fn(loop, n, lat)
        return ops, time.perf_counter() - w0, time.process_time() - c0

    chunk = max(args.chunk, wl.min_chunk)
    # calibration (= warm-up): double n until one call takes half a chunk
    warm = 0.0
    n = args.n or 1
    while True:
        _, wall, _ = call(n)
        warm += wall
        if args.n or wall >= chunk / 2 or n >= 1 << 24:
            break
        n *= 2
    if not args.n:
        n = max(1, round(n * chunk / max(wall, 1e-9)))
    while warm < args.warmup:
        warm += call(n)[1]

    lat.clear()
    gc.collect()
    ops = calls = 0
    wall = cpu = 0.0
    while (calls < args.calls) if args.calls else (wall < args.duration or calls == 0):
        o, w, c = call(n)
        ops += o
        wall += w
        cpu += c
        calls += 1
    lat.sort()
    result = {
        "ops": ops,
        "wall_s": wall,
        "cpu_s": cpu,
        "ops_per_s": ops / wall,
        "cpu_ns_per_op": cpu / ops * 1e9,
        "calls": calls,
        "n_per_call": n,
        "warmup_s": warm,
    }
    if wl.latency:
        result.update(
            lat_samples=len(lat),
            lat_p50_us=percentile(lat, 0.50) / 1e3,
            lat_p99_us=percentile(lat, 0.99) / 1e3,
        )
    return result


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
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
