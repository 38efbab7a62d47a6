"""The exclusion list of the CPython conformance run (``exclusions.txt``): parsing and matching.

One exclusion per line::

    <fnmatch pattern over module.Class.test_name>  [py<op><major>.<minor> ...]  # <category>: <why>

* The pattern is matched (case-sensitively) against ``test_tasks.CTaskTests.test_foo``: the test
  module's name inside ``test.test_asyncio``, the class, the method.
* Optional conditions (all must hold) restrict the line to some interpreters,
  ``py3.11``, ``py==3.11``, ``py>=3.12``, ``py<3.13``, ``py!=3.12``, or to one kind of row,
  ``row=base`` (the module as CPython runs it), ``row=testloop`` (its ``[ferroloop test loop]``
  row), ``row=mixins`` (its ``[ferroloop mixins]`` row).
* The reason is mandatory and starts with its category: ``internals:`` (the test exercises
  asyncio's private implementation: mocks of ``loop._selector``, ``loop._ready``, ``TestLoop``
  internals, exact reprs of asyncio's own C classes, ...) or ``networking:`` (a feature owned by
  the stream-networking issue, not implemented yet).

Blank lines and lines starting with ``#`` are comments.
"""

from __future__ import annotations

import fnmatch
import operator
import re
import sys
from dataclasses import dataclass, field

CATEGORIES = ("internals", "networking")
ROW_KINDS = ("base", "mixins", "testloop")

_OPS = {
    "==": operator.eq,
    "!=": operator.ne,
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_SPEC = re.compile(r"^py(==|!=|>=|<=|>|<)?(\d+)\.(\d+)$")


class ExclusionError(ValueError):
    """A malformed line in the exclusion file."""


@dataclass
class Exclusion:
    pattern: str
    reason: str
    lineno: int
    specs: list[tuple[str, tuple[int, int]]] = field(default_factory=list)
    row: str | None = None

    @property
    def category(self) -> str:
        return self.reason.split(":", 1)[0].strip()

    def applies_to(self, version: tuple[int, int], kind: str | None = None) -> bool:
        if self.row is not None and kind is not None and self.row != kind:
            return False
        return all(_OPS[op](version, ver) for op, ver in self.specs)

    def matches(self, test_id: str) -> bool:
        return fnmatch.fnmatchcase(test_id, self.pattern)

    def describe(self) -> str:
        specs = " ".join(f"py{op}{a}.{b}" for op, (a, b) in self.specs)
        if self.row:
            specs = f"{specs} row={self.row}".strip()
        return f"{self.pattern}{' [' + specs + ']' if specs else ''}"


def parse(text: str, filename: str = "exclusions.txt") -> list[Exclusion]:
    out = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{filename}:{lineno}"
        if "#" not in line:
            raise ExclusionError(f"{where}: missing '# <category>: <reason>'")
        body, reason = (s.strip() for s in line.split("#", 1))
        category = reason.split(":", 1)[0].strip()
        if ":" not in reason or category not in CATEGORIES or not reason.split(":", 1)[1].strip():
            raise ExclusionError(
                f"{where}: the reason must be '<category>: <why>' with category one of "
                f"{', '.join(CATEGORIES)}; got {reason!r}"
            )
        pattern, *spec_words = body.split()
        specs, row = [], None
        for word in spec_words:
            word = word.strip("[],")
            if word.startswith("row="):
                row = word[4:]
                if row not in ROW_KINDS:
                    raise ExclusionError(f"{where}: bad row kind {row!r}")
                continue
            m = _SPEC.match(word)
            if not m:
                raise ExclusionError(f"{where}: bad version condition {word!r}")
            specs.append((m.group(1) or "==", (int(m.group(2)), int(m.group(3)))))
        if pattern.count(".") < 2 and not pattern.endswith("*"):
            raise ExclusionError(f"{where}: pattern {pattern!r} is not module.Class.test_name")
        out.append(Exclusion(pattern, reason, lineno, specs, row))
    return out


def load(path: str) -> list[Exclusion]:
    with open(path, encoding="utf-8") as f:
        return parse(f.read(), path)


def active(
    exclusions: list[Exclusion], version: tuple[int, int] | None = None, kind: str | None = None
) -> list[Exclusion]:
    """The exclusions that apply to this interpreter (or ``version``) and kind of row."""
    version = version or sys.version_info[:2]
    return [e for e in exclusions if e.applies_to(version, kind)]


def find(exclusions: list[Exclusion], test_id: str) -> Exclusion | None:
    for e in exclusions:
        if e.matches(test_id):
            return e
    return None
