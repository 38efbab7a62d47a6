"""Interleaved A/B pairs of echo servers: server CPU per request, two servers up at once.

    python bench/ab_echo.py STYLE SIZE {tcp,unix,udp} PAIRS SECONDS A B [--fresh K]

A and B are loop names (``loops.py``), or ``LOOP@PYTHON`` to run that loop under another
interpreter (a venv holding another build of ferroloop, for an A/B of two builds). Both
servers (``_server.py``) start at once, pinned to CPU 0; ``loadgen echo`` (10 connections,
pinned to CPU 1) alternates between them, SECONDS each, in ABBA order, so both see the
machine in nearly the same state. Prints every pair (CPU per request, the servers' busy share,
requests/s) and the median of the per-pair ratios A / B. For A/B changes of one echo row on a
noisy machine, two builds at a time (``run.py`` interleaves loops the same way, but not builds;
docs/DESIGN.md, "Benchmarks"). Even so, 1-2% is below what 10 pairs resolve. Check req/s too: a
change can lower CPU per request while a stall lowers throughput. Servers and the load client
are started and run by ``netbench.py``'s own helpers. For UDP the style is ``datagram``
(``python bench/ab_echo.py datagram 1024 udp 10 1 uvloop ferroloop``).

``--fresh K`` starts a new pair of server processes every K pairs (default: one pair for the
whole run), so a bias one server process may carry (its memory placement, say) is averaged
too. On the AMD EPYC VM (2026-12-06), A/A runs of one build against itself (streams, TCP,
1 KiB, 12 pairs of 1 s) read 1.003, 1.010 and 1.024 with one pair of processes, and 1.009,
1.001 and 0.987 with ``--fresh 2``: there, differences under about 2% are not resolved
either way.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile

import netbench

SERVER_CPU, CLIENT_CPU = 0, 1
TOOLS = netbench.Tools(loadgen=netbench.LOADGEN, client_cpu=CLIENT_CPU)


def start(spec: str, style: str, transport: str, path: str):
    """A running echo server for ``LOOP[@PYTHON]``; (server, loadgen address arguments)."""
    loop, _, python = spec.partition("@")
    inet = "--udp" if transport == "udp" else "--tcp"  # 127.0.0.1, a free port
    where = ["--unix", path] if transport == "unix" else [inet]
    argv = [python or sys.executable, netbench.SERVER, loop, style, *where]
    srv = netbench.Server(argv + ["--max-seconds", "3600"], SERVER_CPU, netbench._env(loop))
    try:
        info = srv.ready_line(timeout=60)
    except netbench.NetError as exc:
        srv.stop()
        raise SystemExit(f"{spec}: {exc}") from None
    return srv, where if transport == "unix" else [inet, f"127.0.0.1:{info['port']}"]


def measure(srv, target, size: int, seconds: float, warmup: float) -> dict:
    """One ``loadgen echo`` window, by netbench's own runner (``_echo_run``)."""
    row = netbench.Row(name=f"{size}", kind="echo", group="", size=size, conns=netbench.ECHO_CONNS)
    res = netbench._echo_run(srv, target, row, seconds, warmup, TOOLS)
    if not res.get("ok"):
        raise SystemExit(f"loadgen: {res.get('error')}")
    return res


def main() -> int:
    argv = sys.argv[1:]
    fresh = 0
    if "--fresh" in argv:
        i = argv.index("--fresh")
        fresh = int(argv[i + 1])
        del argv[i : i + 2]
    if len(argv) != 7:
        print(__doc__)
        return 2
    style, size, transport = argv[0], int(argv[1]), argv[2]
    pairs, seconds, specs = int(argv[3]), float(argv[4]), argv[5:7]
    if not os.path.exists(netbench.LOADGEN):
        raise SystemExit("build bench/loadgen first (run.py does: cargo build --release)")
    with tempfile.TemporaryDirectory(prefix="ferroloop-ab-") as tmp:
        servers = []

        def start_pair(n):
            for srv, _ in servers:
                srv.stop()
            servers.clear()
            for i, spec in enumerate(specs):
                servers.append(start(spec, style, transport, f"{tmp}/{n}-{i}.sock"))
            for srv, target in servers:
                measure(srv, target, size, 0.5, 0.2)

        try:
            ratios = []
            for p in range(pairs):
                if p == 0 or (fresh and p % fresh == 0):
                    start_pair(p)
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
            for srv, _ in servers:
                srv.stop()
    print(f"{style} {transport} {size}: median ratio {statistics.median(ratios):.3f}, "
          f"{sum(r < 1 for r in ratios)} of {pairs} pairs below 1")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
