"""anyio's own test suite, run on asyncio's loop and on ferroloop side by side.

anyio's tests already run every async test on several asyncio variants (asyncio's loop, uvloop,
and the eager task factory on 3.12+), chosen by its ``anyio_backend`` fixture. This test
fetches the sdist of the installed anyio (its tests are not in the wheel), adds ferroloop as
one more variant (and ferroloop with the eager task factory on 3.12+), and runs the asyncio
variants in one pytest run. asyncio is the reference: every test that passes on asyncio's loop
must pass on ferroloop. A test that fails on both is the machine's (no IPv6, no DNS) and is
only counted.

A difference is run once more, on both loops, before it fails this test, since a few of
anyio's tests race on a busy machine (one was seen failing once on asyncio's own loop).
"""

from __future__ import annotations

import importlib.metadata
import sys

import pytest
from _suites import fetch_sdist, run_and_compare

VERSION = importlib.metadata.version("anyio")

# Lines added to anyio's tests/conftest.py, before its eager-factory block: ferroloop as one
# more asyncio variant, with the same options as anyio's own asyncio variant.
ANCHOR = "if sys.version_info >= (3, 12):\n\n    def eager_task_loop_factory"
ADDED = """
import ferroloop as _ferroloop

asyncio_params.append(
    pytest.param(
        ("asyncio", {"debug": True, "loop_factory": _ferroloop.new_event_loop}),
        id="asyncio+ferroloop",
    )
)
if sys.version_info >= (3, 12):

    def _ferroloop_eager_factory():
        loop = _ferroloop.new_event_loop()
        loop.set_task_factory(asyncio.eager_task_factory)
        return loop

    asyncio_params.append(
        pytest.param(
            ("asyncio", {"debug": True, "loop_factory": _ferroloop_eager_factory}),
            id="asyncio+ferroloop+eager",
        )
    )

"""

# The variant each ferroloop variant is judged against.
REFERENCE = {"asyncio+ferroloop": "asyncio", "asyncio+ferroloop+eager": "asyncio+eager"}
VARIANTS = ["asyncio+ferroloop+eager", "asyncio+ferroloop", "asyncio+eager", "asyncio"]


def _fetch_suite(where):
    """anyio's sdist, unpacked, with ferroloop added to its conftest; returns its root."""
    root = fetch_sdist("anyio", where)
    conftest = root / "tests" / "conftest.py"
    text = conftest.read_text()
    assert ANCHOR in text, "anyio's tests/conftest.py changed: update ANCHOR in this file"
    conftest.write_text(text.replace(ANCHOR, ADDED + ANCHOR, 1))
    return root


@pytest.mark.timeout(1100)
def test_anyio_suite_passes_on_ferroloop_wherever_it_passes_on_asyncio(tmp_path):
    root = _fetch_suite(tmp_path)
    print(f"anyio {VERSION}:")
    # A difference runs once more, both loops, to tell it from one of anyio's races.
    args = ["-k", "asyncio and not uvloop", "tests"]
    results, counts, _ = run_and_compare(root, args, VARIANTS, REFERENCE, tmp_path, 480, [], 240)

    # The run must have reached ferroloop: most of anyio's asyncio cases have a ferroloop twin
    # (the rest name "asyncio" in their own parameters, not through ``anyio_backend``).
    for variant, reference in REFERENCE.items():
        if sys.version_info < (3, 12) and variant.endswith("eager"):
            continue
        ran = sum(1 for (_, v) in results if v == variant)
        assert ran > 0.9 * sum(1 for (_, v) in results if v == reference), counts
        assert counts[(variant, "passed")] > ran // 2, counts
