"""udp_payload_limit on real sockets: loopback, bad peers, and veths of set MTUs in namespaces."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from ringd.net import pmtu
from ringd.net.pmtu import udp_payload_limit
from tests.net.netns import BridgeLab, NetnsUnavailable

ROOT = Path(__file__).resolve().parents[2]


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _loopback_mtu(ip: str) -> int:
    """psutil's MTU for the interface holding ``ip`` (``lo`` on Linux, ``lo0`` on macOS)."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == ip for a in addrs):
            return psutil.net_if_stats()[name].mtu
    raise AssertionError(f"no interface holds {ip}")


LOOPBACKS = [
    pytest.param("127.0.0.1", 28, id="ipv4"),
    pytest.param("::1", 48, id="ipv6", marks=pytest.mark.skipif(
        not _ipv6_loopback(), reason="no IPv6 loopback on this machine")),
]


@pytest.mark.parametrize("ip, headers", LOOPBACKS)
def test_loopback_is_the_lo_mtu_less_headers(ip: str, headers: int) -> None:
    if sys.platform.startswith("linux"):
        assert _loopback_mtu(ip) == psutil.net_if_stats()["lo"].mtu
    expected = min(_loopback_mtu(ip) - headers, 65507)
    assert udp_payload_limit((ip, 9)) == expected
    assert udp_payload_limit((ip, 0)) == expected  # UDP connect() to port 0 is fine too


@pytest.mark.parametrize("ip, headers", LOOPBACKS)
def test_interface_fallback_agrees_with_the_route_mtu(ip: str, headers: int) -> None:
    target = pmtu._target((ip, 9), None)
    assert target is not None
    by_interface = pmtu._payload(pmtu._interface_mtu(target), target.wire)
    assert by_interface == min(_loopback_mtu(ip) - headers, 65507)
    if not sys.platform.startswith("linux"):
        pytest.skip("IP_MTU/IPV6_MTU are Linux-only")
    # On Linux the IPv4 route MTU of lo is capped at 65535 (IP_MAX_MTU) while the device says
    # 65536; both clamp to the same payload.
    assert pmtu._payload(pmtu._route_mtu(target), target.wire) == by_interface


def test_v4_mapped_and_dual_stack_use_ipv4_headers() -> None:
    v4 = udp_payload_limit(("127.0.0.1", 9))
    assert v4 is not None
    assert udp_payload_limit(("::ffff:127.0.0.1", 9)) == v4
    assert udp_payload_limit(("::ffff:127.0.0.1", 9), family=socket.AF_INET) == v4
    if _ipv6_loopback():
        assert udp_payload_limit(("127.0.0.1", 9), family=socket.AF_INET6) == v4
    assert udp_payload_limit(("::1", 9), family=socket.AF_INET) is None


@pytest.mark.parametrize("ip, family", [
    pytest.param("127.0.0.1", socket.AF_INET, id="ipv4"),
    pytest.param("::1", socket.AF_INET6, id="ipv6", marks=pytest.mark.skipif(
        not _ipv6_loopback(), reason="no IPv6 loopback on this machine")),
])
def test_loopback_limit_is_exact(ip: str, family: int) -> None:
    """A datagram of the limit arrives whole with DF set; one byte more is refused."""
    limit = udp_payload_limit((ip, 9))
    assert limit is not None
    with socket.socket(family, socket.SOCK_DGRAM) as rx, \
            socket.socket(family, socket.SOCK_DGRAM) as tx:
        rx.bind((ip, 0))
        rx.settimeout(5)
        if family == socket.AF_INET6:
            tx.setsockopt(socket.IPPROTO_IPV6, pmtu.IPV6_MTU_DISCOVER, pmtu.IPV6_PMTUDISC_DO)
        elif sys.platform.startswith("linux"):
            tx.setsockopt(socket.IPPROTO_IP, pmtu.IP_MTU_DISCOVER, pmtu.IP_PMTUDISC_DO)
        tx.connect(rx.getsockname())
        tx.send(b"x" * limit)
        assert len(rx.recv(1 << 17)) == limit
        with pytest.raises(OSError) as e:
            tx.send(b"x" * (limit + 1))
        assert e.value.errno == errno.EMSGSIZE


@pytest.mark.parametrize("peer", [
    ("not-an-ip", 1), ("999.1.1.1", 1), ("", 0), ("224.0.0.1", 5353),
    ("127.0.0.1", 70000), ("127.0.0.1", -1), ("127.0.0.1", "x"), ("fe80::1%no-such-if", 1),
    ("1.2.3.4",), None, ("::1", 9, 0, 0, 0),
])
def test_bad_peers_never_raise(peer) -> None:
    got = udp_payload_limit(peer)
    assert got is None or (isinstance(got, int) and 548 <= got <= 65507)
    got = udp_payload_limit(peer, family=12345)
    assert got is None


def test_payload_bounds() -> None:
    assert pmtu._payload(None, socket.AF_INET) is None
    assert pmtu._payload(1500, socket.AF_INET) == 1472
    assert pmtu._payload(1500, socket.AF_INET6) == 1452
    assert pmtu._payload(9000, socket.AF_INET) == 8972
    assert pmtu._payload(65536, socket.AF_INET) == 65507
    assert pmtu._payload(576, socket.AF_INET) == 548
    assert pmtu._payload(575, socket.AF_INET) is None
    assert pmtu._payload(0, socket.AF_INET6) is None


# --- veths of a chosen MTU, in network namespaces ----------------------------------------

CHILD = r"""
import errno, json, socket, sys
from ringd.net import pmtu

if sys.argv[1] == "recv":
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((sys.argv[2], 0))
    rx.settimeout(10)
    print(rx.getsockname()[1], flush=True)
    print(len(rx.recv(1 << 17)), flush=True)
else:
    peer = (sys.argv[2], int(sys.argv[3]))
    target = pmtu._target(peer, None)
    out = {
        "limit": pmtu.udp_payload_limit(peer),
        "route": pmtu._payload(pmtu._route_mtu(target), target.wire),
        "interface": pmtu._payload(pmtu._interface_mtu(target), target.wire),
        "no_route": pmtu.udp_payload_limit(("198.51.100.7", 9)),
    }
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setsockopt(socket.IPPROTO_IP, pmtu.IP_MTU_DISCOVER, pmtu.IP_PMTUDISC_DO)
    tx.connect(peer)
    tx.send(b"x" * out["limit"])
    try:
        tx.send(b"x" * (out["limit"] + 1))
        out["one_more"] = "sent"
    except OSError as e:
        out["one_more"] = errno.errorcode.get(e.errno, str(e.errno))
    print(json.dumps(out), flush=True)
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def _set_mtu(lab: BridgeLab, mtu: int) -> None:
    """Every veth end, in the namespaces and on the bridge (the bridge follows its ports)."""
    ports = subprocess.run(["ip", "-o", "link", "show", "master", lab.bridge], check=True,
                           capture_output=True, text=True, timeout=10).stdout
    for line in ports.splitlines():
        _ip("link", "set", line.split(":")[1].strip().split("@")[0], "mtu", str(mtu))
    for host in lab.hosts:
        _ip("-n", host.name, "link", "set", host.ifname, "mtu", str(mtu))


def _probe(lab: BridgeLab) -> tuple[dict, int]:
    """From host 0 towards host 1: what pmtu says, and the size host 1 received."""
    a, b = lab.hosts
    rx = subprocess.Popen(b.exec([sys.executable, "-c", CHILD, "recv", b.address]), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert rx.stdout is not None
        port = rx.stdout.readline().strip()
        assert port.isdigit(), rx.stderr.read() if rx.stderr else ""
        argv = a.exec([sys.executable, "-c", CHILD, "send", b.address, port])
        tx = subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert tx.returncode == 0, tx.stderr
        out, err = rx.communicate(timeout=15)
        assert rx.returncode == 0, err
        return json.loads(tx.stdout), int(out.strip())
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()


@pytest.fixture
def lab():
    try:
        lab = BridgeLab(2).__enter__()
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces unavailable: {e}")
    try:
        yield lab
    finally:
        lab.close()


@pytest.mark.netns
def test_veth_mtu_sets_the_limit(lab: BridgeLab) -> None:
    for mtu, expected in ((1500, 1472), (9000, 8972)):
        _set_mtu(lab, mtu)
        said, received = _probe(lab)
        print(f"veth mtu {mtu}: {said}, received {received}")
        assert said["limit"] == said["route"] == said["interface"] == expected
        assert received == expected  # arrived whole, with DF set
        assert said["one_more"] == "EMSGSIZE"
        assert said["no_route"] is None  # the namespace has no default route

    # A route's own MTU (as a learned path MTU would be) wins over the interface's on Linux;
    # the psutil fallback only sees the interface.
    a, b = lab.hosts
    _ip("-n", a.name, "route", "add", f"{b.address}/32", "dev", a.ifname, "mtu", "lock", "4000")
    said, received = _probe(lab)
    print(f"route mtu 4000 on a 9000 veth: {said}, received {received}")
    assert said["limit"] == said["route"] == received == 3972
    assert said["interface"] == 8972
    assert said["one_more"] == "EMSGSIZE"
