"""One echo server in a fresh interpreter: ``_server.py LOOP STYLE (--tcp | --unix PATH | --udp)``.

Creates the loop, a listening socket (127.0.0.1 on a free port, or the Unix socket PATH; with
``--udp``, a UDP socket bound to 127.0.0.1 on a free port, SO_RCVBUF 1 MiB), starts the echo
STYLE of ``net.py`` on it (``sock``, ``streams`` or ``protocol``; ``datagram`` for ``--udp``),
prints one JSON line ``{"ready": true, "port": P, "pid": N}`` and serves until killed (or
``--max-seconds`` pass). If the loop cannot run the style (an API it lacks), it prints
``{"ok": false, "error": ...}`` instead and exits 1. Any error reported to the loop's exception
handler while serving is fatal (exit 3, message on stderr), so a broken server fails the
measurement at once instead of stalling the client.

``netbench.py`` starts it pinned to one core (the client gets the other) with the open-files
limit raised to the hard limit; it raises the limit itself too, for runs by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loops  # noqa: E402
import net  # noqa: E402


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


#: SO_RCVBUF of the UDP server socket, as loadgen's UDP floor sets it (bench/loadgen/src/udp.rs):
#: with the default 208 KiB, ten 10 KiB datagrams queued for a descheduled server overflow it
#: now and then, and each drop costs the load client a 200 ms resend wait
UDP_RCVBUF = 1 << 20


def listener(args) -> socket.socket:
    if args.udp:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        return sock
    if args.unix:
        if os.path.exists(args.unix):
            os.unlink(args.unix)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(args.unix)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def fatal(loop, context) -> None:
    exc = context.get("exception")
    detail = f"{type(exc).__name__}: {exc}" if exc else ""
    sys.stderr.write(f"server error: {context.get('message')} {detail}\n")
    if exc is not None:
        traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.flush()
    os._exit(3)


def say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("loop", choices=loops.NAMES)
    p.add_argument("style", choices=sorted(net.STYLES))
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", action="store_true", help="127.0.0.1, a free port")
    where.add_argument("--unix", metavar="PATH", help="a Unix socket at PATH")
    where.add_argument("--udp", action="store_true", help="UDP on 127.0.0.1, a free port")
    p.add_argument("--max-seconds", type=float, default=600.0, help="exit after this long")
    args = p.parse_args()
    if args.udp != (args.style in net.DATAGRAM_STYLES):
        p.error(f"style {args.style} needs {'--udp' if not args.udp else '--tcp or --unix'}")

    raise_nofile()
    try:
        loop = loops.factory(args.loop)()
    except Exception as exc:
        say({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    asyncio.set_event_loop(loop)
    sock = listener(args)
    port = 0 if args.unix else sock.getsockname()[1]  # (some loops detach the socket object)

    async def start():
        served = await net.STYLES[args.style](loop, sock)
        for _ in range(3):  # let an accept loop reach its first await (or fail)
            await asyncio.sleep(0)
        if isinstance(served, asyncio.Future) and served.done():
            served.result()  # raises what it failed with
        return served

    try:
        served = loop.run_until_complete(start())
    except Exception as exc:
        say({"ok": False, "error": f"{args.style}: {type(exc).__name__}: {exc}"})
        return 1
    loop.set_exception_handler(fatal)
    say({"ready": True, "port": port, "pid": os.getpid()})

    async def serve():
        if isinstance(served, asyncio.Future):
            await asyncio.wait_for(served, args.max_seconds)  # an accept loop: raises if it fails
        else:
            await asyncio.sleep(args.max_seconds)

    try:
        loop.run_until_complete(serve())
    except asyncio.TimeoutError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
