"""``loop.getaddrinfo`` / ``loop.getnameinfo`` give exactly what ``socket.getaddrinfo`` /
``socket.getnameinfo`` give: same lists, same element types (``AddressFamily`` and
``SocketKind`` enums, ints, strs, address tuples), same exceptions. Only names that resolve
locally (IP literals, ``localhost`` from /etc/hosts, service names from /etc/services); a name
that reaches DNS fails the same way on both sides."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import itertools
import socket

import ferroloop
import pytest
from conftest import run

HOSTS = [
    None,
    "127.0.0.1",
    "::1",
    "localhost",
    "0.0.0.0",
    "::",
    "127.1",
    "::ffff:127.0.0.1",
    b"127.0.0.1",
    "",
    "fe80::1%1",
]
PORTS = [None, 0, 80, "80", "http", b"https", "ssh", 65535, "nosuchservice"]
FAMILIES = [0, socket.AF_INET, socket.AF_INET6]
TYPES = [0, socket.SOCK_STREAM, socket.SOCK_DGRAM]
PROTOS = [0, socket.IPPROTO_TCP, socket.IPPROTO_UDP]
FLAGS = [
    0,
    socket.AI_PASSIVE,
    socket.AI_NUMERICHOST,
    socket.AI_CANONNAME,
    socket.AI_NUMERICSERV,
    socket.AI_PASSIVE | socket.AI_NUMERICHOST | socket.AI_CANONNAME,
    socket.AI_V4MAPPED | socket.AI_ALL,
]


def _cases():
    cases = []
    for host, port in itertools.product(HOSTS, PORTS):
        cases.append((host, port, {}))
    for host, family, type_, flags in itertools.product(HOSTS, FAMILIES, TYPES, FLAGS):
        cases.append((host, 80, {"family": family, "type": type_, "flags": flags}))
    for host, type_, proto in itertools.product(HOSTS, TYPES, PROTOS):
        cases.append((host, "http", {"type": type_, "proto": proto}))
    # Errors: a family getaddrinfo cannot serve, a bad socket type, bad argument types.
    cases += [
        ("127.0.0.1", 80, {"family": socket.AF_UNIX}),
        ("127.0.0.1", 80, {"type": 12345}),
        ("localhost", 80, {"flags": socket.AI_NUMERICHOST}),
        ("127.0.0.1", "http", {"flags": socket.AI_NUMERICSERV}),
        (None, None, {}),
        (None, None, {"flags": socket.AI_PASSIVE}),
        ("127.0.0.1", 70000, {}),
        ("127.0.0.1", -1, {}),
        ("127.0.0.1", 1.5, {}),
        (1234, 80, {}),
        ("a" * 300, 80, {"flags": socket.AI_NUMERICHOST}),
    ]
    return cases


CASES = _cases()


def _outcome(fn, *args, **kw):
    try:
        return ("ok", fn(*args, **kw))
    except Exception as e:
        return ("error", type(e), e.args)


async def _async_outcome(coro_fn, *args, **kw):
    try:
        return ("ok", await coro_fn(*args, **kw))
    except Exception as e:
        return ("error", type(e), e.args)


def _assert_same(got, expected, what):
    """Equal, and of the same type, all the way down the tuples and lists."""
    assert type(got) is type(expected), f"{what}: {type(got)} != {type(expected)}"
    if isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), f"{what}: {got!r} != {expected!r}"
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            _assert_same(g, e, f"{what}[{i}]")
    else:
        assert got == expected, f"{what}: {got!r} != {expected!r}"


def _compare_getaddrinfo(loop, cases):
    """Look up every `(host, port, kwargs)` case concurrently with `loop.getaddrinfo` and assert
    each outcome equals `socket.getaddrinfo`'s. Returns the outcomes and how many resolved."""
    expected = [
        _outcome(
            socket.getaddrinfo,
            host,
            port,
            kw.get("family", 0),
            kw.get("type", 0),
            kw.get("proto", 0),
            kw.get("flags", 0),
        )
        for host, port, kw in cases
    ]

    async def main():
        return await asyncio.gather(
            *(_async_outcome(loop.getaddrinfo, host, port, **kw) for host, port, kw in cases)
        )

    got = run(loop, main())
    assert len(got) == len(cases)
    oks = 0
    for case, g, e in zip(cases, got, expected, strict=True):
        _assert_same(g, e, f"getaddrinfo{case!r}")
        oks += g[0] == "ok"
    return got, oks


def test_getaddrinfo_matches_socket(loop):
    got, oks = _compare_getaddrinfo(loop, CASES)
    assert oks > len(CASES) // 2  # the inputs mostly resolve: the comparison means something
    # The results carry the enums, not bare ints.
    sample = next(g[1][0] for g in got if g[0] == "ok" and g[1])
    assert isinstance(sample[0], socket.AddressFamily)
    assert isinstance(sample[1], socket.SocketKind)


class _BadIndex:
    """An int-like whose conversion fails: the error is the caller's to see."""

    def __index__(self):
        raise ZeroDivisionError("no index")


def test_getaddrinfo_of_arguments_that_are_not_ints_matches_socket(loop):
    """family/type/proto/flags that are not ints (a float, a str, None, an object whose
    ``__index__`` raises): the outcome is ``socket.getaddrinfo``'s, as asyncio passes them on,
    for IP literals too (ferroloop resolves those on the loop thread)."""
    bad = [1.5, "0", None, _BadIndex(), True]
    cases = [
        (host, 80, {name: value})
        for host in ("127.0.0.1", "::1", "localhost")
        for name in ("family", "type", "proto", "flags")
        for value in bad
    ]
    _, oks = _compare_getaddrinfo(loop, cases)
    assert 0 < oks < len(cases)  # some answer (True is an int), most fail


def test_getaddrinfo_in_debug_mode(loop):
    """Debug mode logs slow lookups (asyncio's _getaddrinfo_debug) but returns the same."""
    loop.set_debug(True)
    cases = [c for c in CASES if c[0] in ("127.0.0.1", "localhost", None)][:60]

    async def main():
        return [await _async_outcome(loop.getaddrinfo, h, p, **kw) for h, p, kw in cases]

    try:
        got = run(loop, main())
    finally:
        loop.set_debug(False)
    for (host, port, kw), g in zip(cases, got, strict=True):
        e = _outcome(
            socket.getaddrinfo,
            host,
            port,
            kw.get("family", 0),
            kw.get("type", 0),
            kw.get("proto", 0),
            kw.get("flags", 0),
        )
        _assert_same(g, e, f"getaddrinfo{(host, port, kw)!r}")


def test_getaddrinfo_signature(loop):
    sig = inspect.signature(loop.getaddrinfo)
    assert list(sig.parameters) == ["host", "port", "family", "type", "proto", "flags"]
    for name in ("family", "type", "proto", "flags"):
        p = sig.parameters[name]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default == 0
    with pytest.raises(TypeError):
        run(loop, loop.getaddrinfo("127.0.0.1", 80, socket.AF_INET))


# 127.0.0.1 has a name in /etc/hosts; the others would need a reverse DNS query (slow where
# no DNS server answers), so they are looked up with NI_NUMERICHOST.
NAMED_SOCKADDRS = [("127.0.0.1", 80), ("127.0.0.1", 0), ("127.0.0.1", 53), ("127.0.0.1", 65535)]
NUMERIC_SOCKADDRS = [
    ("0.0.0.0", 22),
    ("::1", 443),
    ("::1", 443, 0, 0),
    ("::1", 80, 0, 1),
    ("::ffff:127.0.0.1", 8080),
]
NI_FLAGS = [
    0,
    socket.NI_NUMERICHOST,
    socket.NI_NUMERICSERV,
    socket.NI_NUMERICHOST | socket.NI_NUMERICSERV,
    socket.NI_DGRAM,
    socket.NI_NOFQDN,
    socket.NI_NAMEREQD,
]
BAD_SOCKADDRS = [
    ("127.0.0.1",),
    ("localhost", 80),
    ("not an address", 80),
    ("127.0.0.1", "80"),
    ("127.0.0.1", 70000),
    ("::1", 80, 0, 0, 0),
    "127.0.0.1",
    ("127.0.0.1", 80, 0),
]


def test_getnameinfo_matches_socket(loop):
    cases = [(sa, fl) for sa in NAMED_SOCKADDRS for fl in NI_FLAGS]
    cases += [(sa, fl | socket.NI_NUMERICHOST) for sa in NUMERIC_SOCKADDRS for fl in NI_FLAGS]
    cases += [(sa, 0) for sa in BAD_SOCKADDRS]
    expected = [_outcome(socket.getnameinfo, sa, fl) for sa, fl in cases]

    async def main():
        return await asyncio.gather(*(_async_outcome(loop.getnameinfo, sa, fl) for sa, fl in cases))

    got = run(loop, main())
    oks = 0
    for case, g, e in zip(cases, got, expected, strict=True):
        _assert_same(g, e, f"getnameinfo{case!r}")
        oks += g[0] == "ok"
    assert oks > len(cases) // 2


def test_getnameinfo_default_flags(loop):
    got = run(loop, loop.getnameinfo(("127.0.0.1", 80)))
    _assert_same(got, socket.getnameinfo(("127.0.0.1", 80), 0), "getnameinfo")


# --- IP literals ------------------------------------------------------------------------------
#
# An event loop may answer IP literals without a thread (asyncio's own _ipaddr_info does so
# inside create_connection); loop.getaddrinfo() must still give exactly what getaddrinfo(3)
# gives for them, including its odd forms (inet_aton's short and octal/hex forms, scope ids,
# IPv4-mapped IPv6) and the near-literals it refuses.

LITERAL_HOSTS = {
    "ipv4": ["127.0.0.1", "0.0.0.0", "255.255.255.255", "10.1.2.3", "192.0.2.200", b"127.0.0.1"],
    # inet_aton's forms: fewer parts, one 32-bit number, hex and octal (017 is 15).
    "ipv4-aton-forms": ["127.1", "127.0.1", "2130706433", "0x7f.0.0.1", "0177.0.0.1", "017.0.0.1"],
    "ipv6": [
        "::1",
        "::",
        "0:0:0:0:0:0:0:1",
        "2001:DB8::1",
        "2001:db8:0:0:1:0:0:1",
        "fe80::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:1.2.3.4",
        "::127.0.0.1",
        b"::1",
    ],
    # Scope ids: by number anywhere, by interface name only on link-local addresses (glibc).
    "ipv6-scope-id": ["fe80::1%1", "fe80::1%0", "::1%1", "::1%99999", "fe80::1%lo", "::1%lo"],
    # Refused as numeric hosts (and not names in any hosts file).
    "near-literals": [
        "127.0.0.256",
        "1.2.3.4.5",
        "[::1]",
        "1::2::3",
        "12345::1",
        "fe80::1%",
        "fe80::1%nosuchif",
        "2001:db8::1%lo",
        " 127.0.0.1",
        "127.0.0.1 ",
        "::1 ",
    ],
    "none-and-bad-types": [None, bytearray(b"127.0.0.1"), 2130706433, 1.5],
}
LITERAL_PORTS = [None, 0, 80, 65535, "80", "0", "http", b"80", "65536", "-1", "", 1.0]
LITERAL_FLAGS = [
    0,
    socket.AI_NUMERICHOST,
    socket.AI_PASSIVE,
    socket.AI_PASSIVE | socket.AI_NUMERICHOST,
    socket.AI_CANONNAME,
    socket.AI_NUMERICSERV,
    socket.AI_V4MAPPED,
    socket.AI_V4MAPPED | socket.AI_ALL,
    socket.AI_ADDRCONFIG,
]


def _literal_cases(hosts, extra_flags=0):
    cases = []
    for host, port in itertools.product(hosts, LITERAL_PORTS):
        cases.append((host, port, {"flags": extra_flags}))
        cases.append((host, port, {"type": socket.SOCK_STREAM, "flags": extra_flags}))
    for host, family, type_, flags in itertools.product(hosts, FAMILIES, TYPES, LITERAL_FLAGS):
        kw = {"family": family, "type": type_, "flags": flags | extra_flags}
        cases.append((host, 80, kw))
    for host, type_, proto in itertools.product(hosts, [*TYPES, socket.SOCK_RAW], PROTOS):
        cases.append((host, "80", {"type": type_, "proto": proto, "flags": extra_flags}))
    return cases


@pytest.mark.parametrize("group", list(LITERAL_HOSTS))
def test_getaddrinfo_of_ip_literals_matches_socket(loop, group):
    # The near-literals are not numeric hosts, so without AI_NUMERICHOST they would be
    # looked up in DNS (slow or unanswered here): they are only tried as numeric hosts.
    extra = socket.AI_NUMERICHOST if group == "near-literals" else 0
    cases = _literal_cases(LITERAL_HOSTS[group], extra)
    _, oks = _compare_getaddrinfo(loop, cases)
    if group == "near-literals":
        assert oks == 0  # every one of them is refused
    elif group != "none-and-bad-types":
        assert oks > len(cases) // 3  # mostly answers: the comparison means something


def test_getaddrinfo_of_ip_literals_one_by_one(loop):
    """The same answers when each lookup runs alone (not among many concurrent ones), and
    the addresses are normalised as getaddrinfo(3) does (octal, short forms, case)."""

    async def main():
        return [
            await loop.getaddrinfo("017.0.0.1", 80, type=socket.SOCK_STREAM),
            await loop.getaddrinfo("127.1", None, type=socket.SOCK_DGRAM),
            await loop.getaddrinfo("2001:DB8::1", "80", type=socket.SOCK_STREAM),
            await loop.getaddrinfo(
                "fe80::1%1", 443, family=socket.AF_INET6, type=socket.SOCK_STREAM
            ),
        ]

    got = run(loop, main())
    tcp, udp = socket.SOCK_STREAM, socket.SOCK_DGRAM
    assert got == [
        [(socket.AF_INET, tcp, socket.IPPROTO_TCP, "", ("15.0.0.1", 80))],
        [(socket.AF_INET, udp, socket.IPPROTO_UDP, "", ("127.0.0.1", 0))],
        [(socket.AF_INET6, tcp, socket.IPPROTO_TCP, "", ("2001:db8::1", 80, 0, 0))],
        [(socket.AF_INET6, tcp, socket.IPPROTO_TCP, "", ("fe80::1", 443, 0, 1))],
    ]


# --- ferroloop only ------------------------------------------------------------------------------


def test_ferroloop_ip_literal_lookups_skip_the_executor():
    """FERROLOOP ONLY (not a behaviour of asyncio, which always uses the executor):
    getaddrinfo of an IP literal is answered without submitting work to the executor."""

    class RecordingExecutor(concurrent.futures.ThreadPoolExecutor):
        def __init__(self):
            super().__init__(max_workers=1)
            self.submitted = []

        def submit(self, fn, /, *args, **kwargs):
            self.submitted.append((fn, args))
            return super().submit(fn, *args, **kwargs)

    loop = ferroloop.new_event_loop()
    executor = RecordingExecutor()
    loop.set_default_executor(executor)
    try:
        v4 = run(loop, loop.getaddrinfo("127.0.0.1", 80))
        v6 = run(loop, loop.getaddrinfo("::1", "80", type=socket.SOCK_STREAM))
        assert v4 == socket.getaddrinfo("127.0.0.1", 80)
        assert v6 == socket.getaddrinfo("::1", "80", type=socket.SOCK_STREAM)
        assert executor.submitted == []
        # The recorder works: anything else run in the default executor is seen.
        assert run(loop, loop.run_in_executor(None, int, "7")) == 7
        assert len(executor.submitted) == 1
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
        executor.shutdown(wait=True)
