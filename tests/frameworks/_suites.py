"""Running another project's own test suite (from its sdist) on asyncio's loop and on ferroloop.

Used by test_anyio_suite.py, test_aiohttp_suite.py and test_uvloop_suite.py. The sdist of the
installed version is fetched from the package index (tests are not in wheels), pytest runs the
suite in a subprocess with a JUnit report, and the outcomes of the ferroloop runs are compared
with asyncio's, test by test. Where one run holds both loops (a test parametrized by its loop,
``test_x[asyncio]`` beside ``test_x[ferroloop]``), ``by_variant`` pairs the twins and
``differences`` finds and reruns those that pass on asyncio's loop only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import ssl
import subprocess
import sys
import tarfile
import urllib.request
import xml.etree.ElementTree as ET
from collections import Counter
from urllib.parse import urljoin

import pytest
from conftest import child_env, sigint_default


def fetch_sdist(name, where):
    """The sdist of the installed ``name``, unpacked under ``where``; returns its root.

    Fetched from the package index pip uses (``PIP_INDEX_URL``, else PyPI), through its simple
    API (JSON, or the HTML form a mirror may serve), and checked against the index's sha256.
    Not with ``pip download``, which builds an sdist to read its metadata (uvloop's build
    compiles libuv: minutes)."""
    version = importlib.metadata.version(name)
    filename = f"{name}-{version}.tar.gz"
    context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT"))
    base = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    index = urllib.request.Request(
        f"{base}/{name}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"},
    )
    with urllib.request.urlopen(index, timeout=60, context=context) as r:
        page_url, kind, body = r.geturl(), r.headers.get("content-type", ""), r.read()
    if "json" in kind:
        found = [
            (f["url"], f["hashes"].get("sha256"))
            for f in json.loads(body)["files"]
            if f["filename"] == filename
        ]
    else:
        links = re.findall(r'href="([^"#]+)#sha256=([0-9a-f]{64})"[^>]*>([^<]+)<', body.decode())
        found = [(url, digest) for url, digest, text in links if text.strip() == filename]
    assert found, f"the index {base} lists no {filename}"
    url, digest = found[0]
    with urllib.request.urlopen(urljoin(page_url, url), timeout=120, context=context) as r:
        data = r.read()
    assert hashlib.sha256(data).hexdigest() == digest, f"{filename}: sha256 differs"
    archive = where / filename
    archive.write_bytes(data)
    with tarfile.open(archive) as tar:
        tar.extractall(where, filter="data")
    return where / f"{name}-{version}"


def run_pytest(cwd, args, report, timeout, env=None):
    """pytest ``args`` in ``cwd``, writing a JUnit report; fails the calling test on a hang."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            + ["--junitxml", str(report), *args],
            cwd=cwd,
            env=child_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            # The suites' signal tests send SIGINT to interpreters they start (uvloop's waited
            # out its child's 200 s sleep when the test run was started in the background).
            preexec_fn=sigint_default,
        )
    except subprocess.TimeoutExpired as e:
        # A hang in the suite (a loop that never delivers an event leaves a test's server
        # thread waiting): fail with what it printed, not after the outer timeout.
        pytest.fail(f"the suite did not finish in {timeout} s:\n{(e.stdout or '')[-4000:]}")


def outcomes(report):
    """{(classname, test name): "passed" | "failed" | "skipped"} from a JUnit report."""
    out = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        key = (case.get("classname"), case.get("name"))
        if case.find("skipped") is not None:
            outcome = "skipped"
        elif case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        else:
            outcome = "passed"
        # A test that passed and then failed its teardown has two entries; failure wins.
        if out.get(key) != "failed":
            out[key] = outcome
    return out


def node_id(root, classname, name):
    """The pytest node id of a JUnit test case (its classname has dots for the path)."""
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if (root / path).exists():
            return "::".join([path, *parts[i:], name])
    raise AssertionError(f"no file for {classname}")


def by_variant(report, variants):
    """{(test id with "*" for its loop variant, variant): outcome} for the cases of a JUnit
    report whose parameters (split at "-") include one of ``variants``."""
    out = {}
    for (classname, name), outcome in outcomes(report).items():
        match = re.search(r"\[(.*)\]$", name)
        if not match:
            continue
        parts = match.group(1).split("-")
        variant = next((v for v in variants if v in parts), None)
        if variant is None:
            continue
        parts[parts.index(variant)] = "*"
        out[(f"{classname}::{name[: match.start()]}[{'-'.join(parts)}]", variant)] = outcome
    return out


def differences(root, results, reference, rerun_args, report, timeout):
    """The (test id, variant) pairs of ``results`` (``by_variant``) that failed on a ferroloop
    variant and passed on its ``reference[variant]``, and still do when run once more, both
    twins, with ``rerun_args`` before their node ids (a race of the suite's own, or a failure
    caused by an earlier test, goes away then). Returns them and the rerun's output."""
    first = [
        (key, variant)
        for (key, variant), outcome in results.items()
        if variant in reference
        and outcome == "failed"
        and results.get((key, reference[variant])) == "passed"
    ]
    if not first:
        return [], ""

    def node(key, variant):
        classname, name = key.split("::", 1)
        return node_id(root, classname, name.replace("*", variant))

    ids = [node(key, v) for key, variant in first for v in (variant, reference[variant])]
    done = run_pytest(root, [*rerun_args, *ids], report, timeout)
    second = by_variant(report, list(reference) + list(reference.values()))
    still = [
        (key, variant)
        for key, variant in first
        if second.get((key, variant)) == "failed"
        and second.get((key, reference[variant])) == "passed"
    ]
    for key, variant in set(first) - set(still):
        print(f"failed on {variant} once, passed when run again: {key}")
    return still, done.stdout


def run_and_compare(root, args, variants, reference, where, timeout, rerun_args, rerun_timeout):
    """Run the suite at ``root`` with ``args`` (both loops in one run), print its outcomes per
    variant and the tests that failed on a ferroloop variant and on its reference alike (the
    machine's: no IPv6, no DNS, root's permissions), and fail the calling test with every
    ``differences`` left after the rerun. Returns (results, Counter of (variant, outcome),
    the failed-on-both test ids)."""
    report = where / "report.xml"
    done = run_pytest(root, args, report, timeout)
    assert done.returncode in (0, 1), f"pytest did not run the suite:\n{done.stdout[-4000:]}"
    results = by_variant(report, variants)
    counts = Counter((variant, outcome) for (_, variant), outcome in results.items())
    print(", ".join(f"{v} {o} {n}" for (v, o), n in sorted(counts.items())))
    both_failed = sorted(
        key
        for (key, variant), outcome in results.items()
        if variant in reference
        and outcome == "failed"
        and results.get((key, reference[variant])) == "failed"
    )
    print(f"failed on ferroloop and on asyncio's loop alike: {len(both_failed)}")
    for key in both_failed[:20]:
        print(f"  {key}")

    differ, rerun = differences(
        root, results, reference, rerun_args, where / "again.xml", rerun_timeout
    )
    assert not differ, "tests that pass on asyncio's loop and fail on ferroloop:\n" + (
        "\n".join(f"  {k.replace('*', v)}" for k, v in differ) + "\n" + rerun[-8000:]
    )
    return results, counts, both_failed
