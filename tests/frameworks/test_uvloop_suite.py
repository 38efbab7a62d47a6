"""uvloop's own test suite, its asyncio half, run on asyncio's loop and on ferroloop.

uvloop's tests are written twice over: each ``Test_UV_*`` class runs a shared body on uvloop
and its ``Test_AIO_*`` twin runs the same body on asyncio's loop, so the ``Test_AIO_*`` classes
check asyncio's behaviour (TCP, TLS, UDP, Unix sockets, pipes, subprocesses, signals,
executors, context variables, deallocation). This test fetches the sdist of the installed
uvloop (the tests are not in the wheel), runs the ``Test_AIO_*`` classes once as they are and
once with their loop made by ``ferroloop.new_event_loop``, and requires every test that passes
on asyncio's loop to pass on ferroloop.

For the ferroloop run, the signal tests' child interpreters make a ferroloop loop too, and
uvloop's ``is_asyncio_loop()`` answers yes: its branches for "a loop
that is not asyncio's" test uvloop's own extensions (``sendto`` without an address on a
connected socket, say), and asyncio, which ferroloop follows, is what those tests skip them for.
The ``Test_UV_*`` classes test uvloop itself and are not run.
"""

from __future__ import annotations

import shutil

import pytest
from _suites import fetch_sdist, node_id, outcomes, run_pytest

# Written beside uvloop's tests; the run for ferroloop sets FERROLOOP_SUITE_LOG.
CONFTEST = """
import os

if os.environ.get("FERROLOOP_SUITE_LOG"):
    import ferroloop
    from uvloop import _testbase

    def new_loop(self):
        with open(os.environ["FERROLOOP_SUITE_LOG"], "a") as log:
            log.write("loop\\n")
        return ferroloop.new_event_loop()

    _testbase.AIOTestCase.new_loop = new_loop
    _testbase.BaseTestCase.is_asyncio_loop = lambda self: True

    def pytest_collection_modifyitems(items):
        # test_signals runs its loop in a child interpreter, made by the source text NEW_LOOP.
        for item in items:
            if getattr(item.cls, "NEW_LOOP", None) == "asyncio.new_event_loop()":
                item.cls.NEW_LOOP = "__import__('ferroloop').new_event_loop()"
"""

# uvloop's own pytest options (its pyproject.toml, which is not copied).
OPTIONS = ["-p", "no:asyncio", "-p", "no:anyio", "--capture=no", "--assert=plain"]
OPTIONS += ["--import-mode=importlib", "--tb=native"]
# Its asyncio half.
ASYNCIO_HALF = ["-k", "Test_AIO_", "tests"]


@pytest.mark.timeout(900)
def test_uvloop_suite_asyncio_half_passes_on_ferroloop(tmp_path):
    sdist = fetch_sdist("uvloop", tmp_path)
    # Only its tests: the sdist's uvloop/ (sources, not built) must not shadow the installed one.
    root = tmp_path / "suite"
    shutil.copytree(sdist / "tests", root / "tests")
    (root / "conftest.py").write_text(CONFTEST)

    asyncio_run = run_pytest(root, [*OPTIONS, *ASYNCIO_HALF], tmp_path / "asyncio.xml", 300)
    log = tmp_path / "loops.txt"
    env = {"FERROLOOP_SUITE_LOG": str(log)}
    ferro_run = run_pytest(root, [*OPTIONS, *ASYNCIO_HALF], tmp_path / "ferro.xml", 300, env)
    for done in (asyncio_run, ferro_run):
        assert done.returncode in (0, 1), f"pytest did not run the suite:\n{done.stdout[-4000:]}"
    reference = outcomes(tmp_path / "asyncio.xml")
    ferro = outcomes(tmp_path / "ferro.xml")
    summary = {
        kind: {o: sum(1 for v in got.values() if v == o) for o in ("passed", "failed", "skipped")}
        for kind, got in (("asyncio", reference), ("ferroloop", ferro))
    }
    print(f"uvloop's Test_AIO_* classes: {summary}")

    differ = [k for k, o in ferro.items() if o == "failed" and reference.get(k) == "passed"]
    if differ:
        # Once more, both loops, to tell a difference from a race of the suite's own.
        ids = [node_id(root, *k) for k in differ]
        run_pytest(root, [*OPTIONS, *ids], tmp_path / "a2.xml", 200)
        again_f = run_pytest(root, [*OPTIONS, *ids], tmp_path / "f2.xml", 200, env)
        second_a, second_f = outcomes(tmp_path / "a2.xml"), outcomes(tmp_path / "f2.xml")
        first = differ
        differ = [k for k in first if second_f.get(k) == "failed" and second_a.get(k) == "passed"]
        for key in set(first) - set(differ):
            print(f"failed on ferroloop once, passed when run again: {key}")
        assert not differ, "uvloop tests that pass on asyncio's loop and fail on ferroloop:\n" + (
            "\n".join(f"  {c}::{n}" for c, n in differ) + "\n" + again_f.stdout[-8000:]
        )

    # The ferroloop run really ran on ferroloop, and ran as much as asyncio's.
    assert set(ferro) == set(reference), summary
    assert summary["ferroloop"]["passed"] > 100, summary
    assert log.read_text().count("loop") >= summary["ferroloop"]["passed"], summary
