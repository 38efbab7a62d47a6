"""Runs ONE module of CPython's ``test.test_asyncio`` in this process, with ferroloop as the loop
that asyncio creates by default. Started by ``run_conformance.py``, one process per module (and
again, skipping what already ran, after a test hung or crashed the process).

It writes one JSON object per line to ``--events``::

    {"ev": "installed", ...}                    ferroloop is the default loop (self-checked)
    {"ev": "excluded", "id": ..., "reason": ...}
    {"ev": "start", "id": ...}                  a test begins (the driver's hang detection)
    {"ev": "result", "id": ..., "outcome": ..., "msg": ..., "tb": ...}
    {"ev": "stop", "id": ..., "loops": n}       n ferroloop loops were created during the test
    {"ev": "done", "loops": n}

Outcomes: pass, fail, error, skip, xfail, uxpass. A per-test watchdog (faulthandler) dumps all
threads' stacks to ``--trace`` and exits the process when one test runs longer than
``--test-timeout``; the driver then reports that test as hung and resumes the module.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import fnmatch
import importlib
import json
import os
import sys
import time
import traceback
import unittest
import warnings

import _exclusions

PKG = "test.test_asyncio."
# The concrete test class, in each module with loop-generic mixins, whose mixins (everything but
# its create_event_loop) are re-run on a ferroloop loop.
MIXIN_HOSTS = {
    "test_events": "SelectEventLoopTests",  # EventLoopTestsMixin (+ Unix, Subprocess mixins)
    "test_sock_lowlevel": "SelectEventLoopTests",  # BaseSockTestsMixin
    "test_sendfile": "SelectEventLoopTests",  # SendfileMixin, SockSendfileMixin
}
MIXIN_CLASS = "FerroloopEventLoopTests"

LOOPS_CREATED = 0
# The class new_ferroloop() instantiates: ferroloop.Loop, or with --asyncio (the baseline run)
# asyncio's own default loop class.
LOOP_CLASS = None


def new_ferroloop():
    """The loop factory installed into asyncio: a ferroloop loop, counted."""
    global LOOPS_CREATED
    loop = LOOP_CLASS()
    LOOPS_CREATED += 1
    return loop


def default_policy_class():
    cls = getattr(asyncio, "DefaultEventLoopPolicy", None)
    if cls is None:  # 3.14+: the class is private
        from asyncio import unix_events

        cls = unix_events._DefaultEventLoopPolicy
    return cls


def install_ferroloop() -> dict:
    """Make ferroloop the loop asyncio creates by default, then check it.

    Every default loop comes from the default policy's ``new_event_loop()``, which calls
    ``self._loop_factory()``: ``asyncio.new_event_loop()`` and ``asyncio.get_event_loop()``
    (3.11/3.13), ``asyncio.run()`` and ``asyncio.Runner()`` without a ``loop_factory`` (via
    ``events.new_event_loop()``), and ``unittest.IsolatedAsyncioTestCase`` (an
    ``asyncio.Runner(debug=True)``, with ``loop_factory=None`` unless the test sets one).
    Replacing ``_loop_factory`` on the default policy *class* survives
    ``asyncio.set_event_loop_policy(None)``, which just instantiates that class again.
    """
    import ferroloop

    global LOOPS_CREATED
    default_policy_class()._loop_factory = staticmethod(new_ferroloop)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_event_loop_policy(None)
        checks = {}
        loop = asyncio.new_event_loop()
        checks["new_event_loop"] = type(loop)
        loop.close()
        asyncio.set_event_loop_policy(None)
        if hasattr(asyncio, "Runner"):  # 3.11+
            with asyncio.Runner() as runner:
                checks["Runner"] = type(runner.get_loop())

        async def running():
            return type(asyncio.get_running_loop())

        checks["run"] = asyncio.run(running())

        class Probe(unittest.IsolatedAsyncioTestCase):
            async def test_probe(self):
                checks["IsolatedAsyncioTestCase"] = await running()

        Probe("test_probe").run(unittest.TestResult())
        asyncio.set_event_loop_policy(None)
    names = {k: f"{v.__module__}.{v.__qualname__}" for k, v in checks.items()}
    expected = 4 if hasattr(asyncio, "Runner") else 3
    if len(checks) != expected or any(v is not ferroloop.Loop for v in checks.values()):
        raise RuntimeError(f"ferroloop is not the default loop: {names}")
    LOOPS_CREATED = 0
    return names


def short_id(test_id: str) -> str:
    return test_id[len(PKG) :] if test_id.startswith(PKG) else test_id


def test_id_of(test) -> str:
    """``module.Class.test_name`` (subtests: their parent's id; fixtures:
    ``module.Class.setUpClass``, ``module.setUpModule``)."""
    parent = getattr(test, "test_case", None)
    if parent is not None:  # a _SubTest
        return test_id_of(parent)
    desc = getattr(test, "description", None)
    if desc is not None and type(test).__name__ == "_ErrorHolder":
        # "setUpClass (test.test_asyncio.test_x.Cls)" / "setUpModule (test.test_asyncio.test_x)"
        name, _, where = desc.partition(" (")
        return short_id(f"{where.rstrip(')')}.{name}")
    return short_id(test.id())


class Events:
    def __init__(self, path: str):
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def emit(self, **kw):
        self.f.write(json.dumps(kw) + "\n")
        self.f.flush()


def first_line(exc_type, exc_value) -> str:
    try:
        lines = traceback.format_exception_only(exc_type, exc_value)
    except Exception:  # pragma: no cover - a broken __str__
        return exc_type.__name__
    text = "".join(lines).strip().splitlines()
    return text[0] if text else exc_type.__name__


class Result(unittest.TestResult):
    def __init__(self, events: Events, test_timeout: float, trace):
        super().__init__()
        self.events = events
        self.test_timeout = test_timeout
        self.trace = trace
        self._loops_at_start = 0
        self._t0 = 0.0

    def _emit(self, test, outcome, err=None, msg=None):
        tid = test_id_of(test)
        rec = {"ev": "result", "id": tid, "outcome": outcome}
        if err is not None:
            rec["msg"] = first_line(err[0], err[1])
            rec["tb"] = self._exc_info_to_string(err, test)
            sub = getattr(test, "_subDescription", None)
            if sub is not None and test is not getattr(test, "test_case", test):
                rec["msg"] = f"{test._subDescription()} {rec['msg']}"
        elif msg is not None:
            rec["msg"] = msg
        self.events.emit(**rec)

    def startTest(self, test):
        super().startTest(test)
        self._loops_at_start = LOOPS_CREATED
        self._t0 = time.monotonic()
        self.events.emit(ev="start", id=test_id_of(test))
        if self.test_timeout > 0:
            faulthandler.dump_traceback_later(self.test_timeout, exit=True, file=self.trace)

    def stopTest(self, test):
        if self.test_timeout > 0:
            faulthandler.cancel_dump_traceback_later()
        super().stopTest(test)
        self.events.emit(
            ev="stop",
            id=test_id_of(test),
            loops=LOOPS_CREATED - self._loops_at_start,
            secs=round(time.monotonic() - self._t0, 3),
        )

    def addSuccess(self, test):
        super().addSuccess(test)
        self._emit(test, "pass")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._emit(test, "fail", err)

    def addError(self, test, err):
        super().addError(test, err)
        self._emit(test, "error", err)

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._emit(test, "skip", msg=str(reason))

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._emit(test, "xfail", err)

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._emit(test, "uxpass", msg="unexpected success")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            failure = issubclass(err[0], test.failureException)
            self._emit(subtest, "fail" if failure else "error", err)


def iter_tests(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from iter_tests(t)
        else:
            yield t


def filter_suite(suite, keep):
    """A copy of ``suite`` (nesting kept, so class and module fixtures still run) holding the
    tests for which ``keep(test)`` is true."""
    out = unittest.TestSuite()
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            sub = filter_suite(t, keep)
            if sub.countTestCases():
                out.addTest(sub)
        elif keep(t):
            out.addTest(t)
    return out


def mixin_suite(module, loader):
    """The loop-generic mixins of ``module`` run on ferroloop: a subclass of the module's
    concrete selector-loop test class whose ``create_event_loop()`` returns a ferroloop loop."""
    host = getattr(module, MIXIN_HOSTS[module.__name__[len(PKG) :]])

    def create_event_loop(self):
        return new_ferroloop()

    cls = type(
        MIXIN_CLASS,
        (host,),
        {
            "create_event_loop": create_event_loop,
            "__module__": module.__name__,
            "__qualname__": MIXIN_CLASS,
        },
    )
    setattr(module, MIXIN_CLASS, cls)
    return loader.loadTestsFromTestCase(cls)


# --- "test loop" variants -------------------------------------------------------------------
# Some modules run most tests on a private loop: test_utils.TestLoop (a BaseEventLoop with a
# virtual clock) or a BaseEventLoop whose selector is a Mock. Their [ferroloop test loop] rows
# run the same tests with a ferroloop loop in that place. A TestLoop created *with* a clock
# generator is kept (those tests are written against virtual time).


def _test_utils():
    from test.test_asyncio import utils

    return utils


def variant_new_test_loop(module):
    test_utils = _test_utils()
    orig = test_utils.TestCase.new_test_loop

    def new_test_loop(self, gen=None):
        if gen is not None:
            return orig(self, gen)
        loop = new_ferroloop()
        self.set_event_loop(loop)
        return loop

    test_utils.TestCase.new_test_loop = new_test_loop


def variant_base_loop_setup(cls_name):
    """``cls_name.setUp`` builds ``asyncio.BaseEventLoop()`` with a mocked selector: use a
    ferroloop loop instead."""

    def patch(module):
        test_utils = _test_utils()

        def setUp(self):
            test_utils.TestCase.setUp(self)
            self.loop = new_ferroloop()
            self.set_event_loop(self.loop)

        getattr(module, cls_name).setUp = setUp

    return patch


def variant_runners(module):
    """test_runners: the policy's loop factory ``BaseTest.new_loop`` makes a mocked
    BaseEventLoop that records ``shutdown_asyncgens()``; make a ferroloop loop that does."""

    def new_loop(self):
        loop = new_ferroloop()
        loop.shutdown_ag_run = False
        real = loop.shutdown_asyncgens

        async def shutdown_asyncgens():
            loop.shutdown_ag_run = True
            await real()

        loop.shutdown_asyncgens = shutdown_asyncgens
        return loop

    module.BaseTest.new_loop = new_loop


def variant_tasks(module):
    """test_tasks: TestLoop -> ferroloop, and GatherTestsBase._run_loop, which spins the loop
    ``while loop._ready``, spins while ferroloop's ready queue is non-empty instead."""
    variant_new_test_loop(module)
    test_utils = _test_utils()

    def _run_loop(self, loop):
        while (
            loop._queue_sizes()[0] if LOOP_CLASS.__module__.startswith("ferroloop") else loop._ready
        ):
            test_utils.run_briefly(loop)

    module.GatherTestsBase._run_loop = _run_loop


VARIANTS = {
    "test_base_events": variant_base_loop_setup("BaseEventLoopTests"),
    "test_futures": variant_new_test_loop,
    "test_pep492": variant_base_loop_setup("BaseTest"),
    "test_runners": variant_runners,
    "test_tasks": variant_tasks,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("module")
    ap.add_argument("--kind", choices=("base", "mixins", "testloop"), default="base")
    ap.add_argument("--events", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--skip-file")
    ap.add_argument("--exclusions")
    ap.add_argument("--run-excluded", action="store_true")
    ap.add_argument("--asyncio", action="store_true", help="baseline: do not install ferroloop")
    ap.add_argument("-k", dest="patterns", action="append", default=[])
    ap.add_argument("--test-timeout", type=float, default=30.0)
    args = ap.parse_args()

    events = Events(args.events)
    trace = open(args.trace, "a", encoding="utf-8")  # noqa: SIM115
    faulthandler.enable(file=trace, all_threads=True)

    if not sys.warnoptions:  # as unittest.main / TextTestRunner do
        warnings.simplefilter("default")

    global LOOP_CLASS
    if args.asyncio:
        # Baseline: the ferroloop rows run on asyncio's own default loop class instead.
        LOOP_CLASS = default_policy_class()._loop_factory
    else:
        import ferroloop

        LOOP_CLASS = ferroloop.Loop
        checks = install_ferroloop()
        events.emit(ev="installed", checks=checks)

    modname = args.module
    try:
        module = importlib.import_module(PKG + modname)
    except unittest.SkipTest as exc:
        events.emit(ev="result", id=f"{modname}.<import>", outcome="skip", msg=str(exc))
        events.emit(ev="done", loops=LOOPS_CREATED)
        os._exit(0)
    except BaseException as exc:
        err = (type(exc), exc, exc.__traceback__)
        events.emit(
            ev="result",
            id=f"{modname}.<import>",
            outcome="error",
            msg=first_line(*err[:2]),
            tb="".join(traceback.format_exception(*err)),
        )
        events.emit(ev="done", loops=LOOPS_CREATED)
        os._exit(0)

    loader = unittest.TestLoader()
    if args.kind == "testloop":
        VARIANTS[modname](module)
    if args.kind == "mixins":
        suite = mixin_suite(module, loader)
    else:
        suite = loader.loadTestsFromModule(module)

    skip = set()
    if args.skip_file and os.path.exists(args.skip_file):
        with open(args.skip_file, encoding="utf-8") as f:
            skip = {line.strip() for line in f if line.strip()}
    excl = []
    if args.exclusions:
        excl = _exclusions.active(_exclusions.load(args.exclusions), kind=args.kind)

    def keep(test):
        tid = test_id_of(test)
        if tid in skip:
            return False
        if args.patterns and not any(fnmatch.fnmatchcase(tid, p) for p in args.patterns):
            return False
        e = _exclusions.find(excl, tid)
        if e is not None:
            events.emit(ev="excluded", id=tid, reason=e.reason, pattern=e.describe())
            return args.run_excluded
        return True

    suite = filter_suite(suite, keep)
    result = Result(events, args.test_timeout, trace)
    suite.run(result)
    events.emit(ev="done", loops=LOOPS_CREATED)
    sys.stdout.flush()
    sys.stderr.flush()
    # Leftover non-daemon threads or atexit hooks of a misbehaving test must not hang the run.
    os._exit(0)


if __name__ == "__main__":
    main()
