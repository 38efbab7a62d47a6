"""Instructions per operation of a loop microbenchmark, counted by valgrind's callgrind.

Noise cannot move an instruction count, so this is the tool for small A/B changes on a busy
machine (docs/DESIGN.md, "Benchmarks"). Each (loop, workload) runs twice under callgrind, at
n1 and n2 units of `micro.py`'s workload; start-up cancels out of

    instructions/op = (Ir(n2) - Ir(n1)) / (ops(n2) - ops(n1))

Counts are user-space only (system calls are not counted), and a GC collection counts where
it happens, so the collections per run are printed too.

    python bench/instructions.py                       # every workload, ferroloop and uvloop
    python bench/instructions.py --loops ferroloop --only ping --keep /tmp/cg

With --keep the .cg files stay for `callgrind_annotate --inclusive=yes FILE`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# Units per run (n1, n2): large enough that n2 - n1 dwarfs start-up noise in the counts.
SIZES = {"gather 100k": (1, 3), "timers firing": (40, 240)}
DEFAULT_SIZES = (10, 210)
SKIP = {"call_soon_threadsafe rtt"}  # latency of a thread round trip: not an instruction count


def child(loop_name: str, workload: str, n: int) -> None:
    """Run one workload once (inside valgrind) and report ops and GC collections on stderr."""
    sys.path.insert(0, HERE)
    import loops
    import micro

    loop = loops.factory(loop_name)()
    asyncio.set_event_loop(loop)
    collections = [0, 0, 0]

    def on_gc(phase, info):
        if phase == "start":
            collections[info["generation"]] += 1

    gc.callbacks.append(on_gc)
    ops = micro.WORKLOADS[workload].fn(loop, n, [])
    gc.callbacks.remove(on_gc)
    loop.close()
    print(f"RESULT ops={ops} gc={collections}", file=sys.stderr)


def measure(loop_name: str, workload: str, n: int, outdir: str) -> tuple[int, int, list[int]]:
    tag = re.sub(r"\W+", "_", f"{loop_name}_{workload}_{n}")
    out = os.path.join(outdir, f"{tag}.cg")
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        loop_name,
        workload,
        str(n),
    ]
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    ir = re.search(r"Collected : (\d+)", proc.stderr)
    res = re.search(r"RESULT ops=(\d+) gc=\[(\d+), (\d+), (\d+)\]", proc.stderr)
    if proc.returncode != 0 or not ir or not res:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return int(ir.group(1)), int(res.group(1)), [int(res.group(i)) for i in (2, 3, 4)]


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--loops",
        default="ferroloop,uvloop",
        help="comma-separated: ferroloop, uvloop, rloop, asyncio, ...",
    )
    ap.add_argument("--only", default="", help="regex on workload names (case-insensitive)")
    ap.add_argument("--keep", metavar="DIR", help="keep the callgrind files in DIR")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    sys.path.insert(0, HERE)
    import micro

    loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    names = [
        w
        for w, spec in micro.WORKLOADS.items()
        if spec.kind == "throughput" and w not in SKIP and re.search(args.only, w, re.I)
    ]
    outdir = args.keep or tempfile.mkdtemp(prefix="ferroloop-cg-")
    os.makedirs(outdir, exist_ok=True)
    print(
        "| workload | "
        + " | ".join(f"{x} instr/op" for x in loops)
        + " | GC collections (n2 run) |"
    )
    print("|---|" + "--:|" * len(loops) + "---|")
    for w in names:
        n1, n2 = SIZES.get(w, DEFAULT_SIZES)
        cells, gcs = [], []
        for lp in loops:
            ir1, ops1, _ = measure(lp, w, n1, outdir)
            ir2, ops2, gc2 = measure(lp, w, n2, outdir)
            cells.append(f"{(ir2 - ir1) / (ops2 - ops1):,.0f}")
            gcs.append(f"{lp} {gc2}")
        print(f"| {w} | " + " | ".join(cells) + " | " + "; ".join(gcs) + " |", flush=True)
    if not args.keep:
        shutil.rmtree(outdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
