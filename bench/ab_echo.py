"""Interleaved A/B pairs of echo servers: server CPU per request, two servers up at once.

    python bench/ab_echo.py STYLE SIZE {tcp,unix} PAIRS SECONDS A B

A and B are loop names (``loops.py``), or ``LOOP@PYTHON`` to run that loop under another
interpreter (a venv holding another build of ferroloop, for an A/B of two builds). Both
servers (``_server.py``) start at once, pinned to CPU 0; ``loadgen echo`` (10 connections,
pinned to CPU 1) alternates between them, SECONDS each, in ABBA order, so both see the
machine in nearly the same state. Prints every pair (CPU per request, the servers' busy share,
requests/s) and the median of the per-pair ratios A / B. For small changes on a noisy machine,
where a full run's rounds are seconds apart (docs/DESIGN.md, "Benchmarks"). Check req/s too: a
change can lower CPU per request while a stall lowers throughput.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LOADGEN = os.path.join(HERE, "loadgen", "target", "release", "loadgen")


def start(spec: str, style: str, transport: str, path: str):
    loop, _, python = spec.partition("@")
    argv = [python or sys.executable, os.path.join(HERE, "_server.py"), loop, style]
    argv += ["--unix", path] if transport == "unix" else ["--tcp"]
    proc = subprocess.Popen(["taskset", "-c", "0", *argv], stdout=subprocess.PIPE, text=True)
    info = json.loads(proc.stdout.readline())
    if not info.get("ready"):
        raise SystemExit(f"{spec}: {info}")
    target = ["--unix", path] if transport == "unix" else ["--tcp", f"127.0.0.1:{info['port']}"]
    return proc, target


def measure(proc, target, size: int, seconds: float, warmup: float) -> dict:
    argv = ["taskset", "-c", "1", LOADGEN, "echo", *target, "--conns", "10"]
    argv += ["--size", str(size), "--duration", str(seconds), "--warmup", str(warmup)]
    argv += ["--server-pid", str(proc.pid)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> int:
    if len(sys.argv) != 8:
        print(__doc__)
        return 2
    style, size, transport = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    pairs, seconds, specs = int(sys.argv[4]), float(sys.argv[5]), sys.argv[6:8]
    if not os.path.exists(LOADGEN):
        raise SystemExit("build bench/loadgen first (run.py does: cargo build --release)")
    with tempfile.TemporaryDirectory(prefix="ferroloop-ab-") as tmp:
        servers = [start(s, style, transport, f"{tmp}/{i}.sock") for i, s in enumerate(specs)]
        try:
            for proc, target in servers:
                measure(proc, target, size, 0.5, 0.2)
            ratios = []
            for p in range(pairs):
                order = [0, 1] if p % 2 == 0 else [1, 0]
                res = {i: measure(*servers[i], size, seconds, 0.1) for i in order}
                cpu = [res[i]["server_cpu_us_per_req"] for i in (0, 1)]
                ratios.append(cpu[0] / cpu[1])
                detail = " | ".join(
                    f"{specs[i]} {cpu[i]:.2f} µs, busy {res[i]['server_busy']:.2f}, "
                    f"{res[i]['req_per_s'] / 1e3:.1f}k req/s"
                    for i in (0, 1)
                )
                print(f"pair {p}: ratio {ratios[-1]:.3f}  [{detail}]", flush=True)
        finally:
            for proc, _ in servers:
                proc.kill()
                proc.wait()
    print(f"{style} {transport} {size}: median ratio {statistics.median(ratios):.3f}, "
          f"{sum(r < 1 for r in ratios)} of {pairs} pairs below 1")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
