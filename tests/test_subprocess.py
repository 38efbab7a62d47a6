"""Subprocesses on both loops. ferroloop runs asyncio's own subprocess code (borrowed
methods, docs/DESIGN.md "Networking") on its core; these check that every name that code
reaches on the loop is there, in debug mode too."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest
from conftest import run

UPPER = "import sys; sys.stdout.write(sys.stdin.read().upper())"


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
@pytest.mark.parametrize("how", ["exec", "shell"])
def test_subprocess_round_trip(loop, caplog, how, debug):
    """stdin in, stdout out, exit status; in debug mode the loop logs what it started
    ("execute program ..." / "run shell command ...", asyncio's ``_log_subprocess``, which
    ferroloop once lacked: AttributeError from every subprocess in debug mode)."""
    loop.set_debug(debug)
    pipe = asyncio.subprocess.PIPE

    async def main():
        if how == "exec":
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", UPPER, stdin=pipe, stdout=pipe, stderr=pipe
            )
        else:
            proc = await asyncio.create_subprocess_shell(
                f'"{sys.executable}" -c "{UPPER}"', stdin=pipe, stdout=pipe, stderr=pipe
            )
        out, err = await proc.communicate(b"ferroloop")
        return proc.returncode, out, err

    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        assert run(loop, main()) == (0, b"FERROLOOP", b"")
    started = "execute program" if how == "exec" else "run shell command"
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith(started)]
    if debug:
        assert any("stdin=<pipe>" in m for m in logged), logged
    else:
        assert logged == []
