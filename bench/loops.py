"""The event loops under comparison, by name. Imported only by the processes that run a loop
(``_worker.py``, ``_server.py``)."""

from __future__ import annotations

import importlib
import os
import platform
from collections.abc import Callable

#: name -> (module to import, attribute that is a zero-argument loop factory)
LOOPS: dict[str, tuple[str, str]] = {
    "asyncio": ("asyncio", "new_event_loop"),
    "uvloop": ("uvloop", "new_event_loop"),
    "rloop": ("rloop", "new_event_loop"),
    "ferroloop": ("ferroloop", "new_event_loop"),
    # ferroloop with asyncio's own socket transports instead of its Rust ones: an A/B row for
    # the network workloads (the micro workloads do not touch transports)
    "ferroloop-selector": ("ferroloop", "new_event_loop"),
}

#: environment a loop needs, set before its module is imported
ENV: dict[str, dict[str, str]] = {"ferroloop-selector": {"FERROLOOP_TRANSPORTS": "selector"}}

NAMES = list(LOOPS)


def factory(name: str) -> Callable:
    """The loop factory for ``name``; raises ImportError/AttributeError if unavailable."""
    os.environ.update(ENV.get(name, {}))
    module, attr = LOOPS[name]
    return getattr(importlib.import_module(module), attr)


def describe(name: str) -> dict:
    """Version and location of the loop's package, for the results file."""
    module = importlib.import_module(LOOPS[name][0])
    if name == "asyncio":
        info = {"version": "CPython " + platform.python_version()}
    else:
        info = {"version": getattr(module, "__version__", None) or _dist_version(name)}
    info["file"] = getattr(module, "__file__", None)
    if name.startswith("ferroloop"):
        ext = importlib.import_module("ferroloop._ferroloop")
        info["extension"] = ext.__file__
        try:
            with open(ext.__file__, "rb") as f:
                # Rust keeps overflow checks (and their panic message) only in debug builds
                info["debug_build"] = b"attempt to add with overflow" in f.read()
        except OSError:
            pass
    return info


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None
