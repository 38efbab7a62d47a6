"""pytest-asyncio running a user's tests on ferroloop, as the README shows.

The README tells pytest-asyncio users (1.4+) to return ``{"ferroloop": ...}`` from the
``pytest_asyncio_loop_factories`` hook. This test writes a small user project (a conftest with
that hook, offering asyncio's loop and ferroloop, and a test module using pytest-asyncio's
features: async tests, async fixtures and generator fixtures, module-scoped loops, tasks that
outlive a test), runs pytest on it in a subprocess, and checks that every user test ran and
passed on both loops, and ran on the loop its parameter names.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import child_env

CONFTEST = """
import asyncio
import json
import os

import ferroloop
import pytest


def pytest_asyncio_loop_factories(config, item):
    return {"asyncio": asyncio.new_event_loop, "ferroloop": ferroloop.new_event_loop}


@pytest.fixture
def record(request):
    '''Append (test id, the running loop's class) to the log the outer test reads.'''

    def record(what):
        loop = asyncio.get_running_loop()
        with open(os.environ["LOOP_LOG"], "a") as f:
            f.write(json.dumps([request.node.nodeid, what, type(loop).__module__]) + "\\n")
        return loop

    return record
"""

USER_TESTS = """
import asyncio
import contextvars

import pytest
import pytest_asyncio

pytestmark = pytest.mark.asyncio

var = contextvars.ContextVar("var", default="unset")


@pytest_asyncio.fixture
async def server():
    '''An async generator fixture: a TCP echo server on 127.0.0.1, closed on teardown.'''

    async def echo(reader, writer):
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield srv
    srv.close()
    await srv.wait_closed()


@pytest_asyncio.fixture
async def context_fixture():
    var.set("from the fixture")
    yield


async def test_echo(server, record):
    record("test")
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping")
    assert await reader.read() == b"ping"
    writer.close()
    await writer.wait_closed()


async def test_timers_and_tasks(record):
    record("test")
    loop = asyncio.get_running_loop()
    order = []
    loop.call_later(0.02, order.append, "late")
    loop.call_soon(order.append, "soon")
    task = asyncio.create_task(asyncio.sleep(0.01, "task"))
    order.append(await task)
    await asyncio.sleep(0.05)
    assert order == ["soon", "task", "late"]


async def test_fixture_context_reaches_the_test(context_fixture, record):
    record("test")
    assert var.get() == "from the fixture"


async def test_timeout_and_cancel(record):
    record("test")
    with pytest.raises(TimeoutError if hasattr(asyncio, "timeout") else asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.sleep(10), 0.01)


async def test_leaves_a_pending_task(record):
    '''pytest-asyncio cancels what a test leaves running when it closes the loop.'''
    record("test")
    asyncio.create_task(asyncio.sleep(3600))


async def test_executor(record):
    record("test")
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, sum, [1, 2, 3]) == 6


@pytest.mark.asyncio(loop_scope="module")
class TestModuleLoop:
    loops = []

    async def test_first(self, record):
        self.loops.append(record("module-loop"))

    async def test_second(self, record):
        self.loops.append(record("module-loop"))
        assert len({id(lp) for lp in self.loops[-2:]}) == 1
"""

# Each user test above, per loop.
USER_TEST_COUNT = 8


@pytest.mark.timeout(120)
def test_pytest_asyncio_runs_user_tests_on_each_loop_factory(tmp_path):
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    log = tmp_path / "loops.jsonl"
    env = child_env({"LOOP_LOG": str(log)})
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "no:anyio"]
        + ["-W", "error", "-o", "asyncio_default_fixture_loop_scope=function"]
        + ["test_user.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert f"{2 * USER_TEST_COUNT} passed" in out, out

    seen = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(seen) == 2 * USER_TEST_COUNT, seen
    for nodeid, _what, module in seen:
        kind = "ferroloop" if "[ferroloop]" in nodeid else "asyncio"
        assert "[asyncio]" in nodeid or kind == "ferroloop", nodeid
        assert module.startswith("ferroloop") == (kind == "ferroloop"), (nodeid, module)
