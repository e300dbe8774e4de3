"""Which path the data plane takes to a peer (core/paths.py), on synthetic measurements."""

from __future__ import annotations

import pytest

from ringd.core.paths import (ETHERNET, LOOPBACK, MAX_LOST, OTHER, STALE_AFTER_S, SWITCH_MIN_S,
                              SWITCH_RATIO, THUNDERBOLT, VIRTUAL, WIFI, Advertised,
                              LocalInterface, PathMeasure, PathOption, advertised_addresses,
                              choose_path, interface_kind, local_interface_for,
                              parse_hardware_ports)

NETWORKSETUP = """
Hardware Port: Ethernet
Device: en0
Ethernet Address: 3c:a6:f6:00:00:01

Hardware Port: Wi-Fi
Device: en1
Ethernet Address: 3c:a6:f6:00:00:02

Hardware Port: Thunderbolt Bridge
Device: bridge0
Ethernet Address: 36:9d:00:00:00:03

Hardware Port: Thunderbolt 1
Device: en2
Ethernet Address: 36:9d:00:00:00:04

VLAN Configurations
===================
"""


def test_macos_kinds_come_from_the_hardware_ports() -> None:
    ports = parse_hardware_ports(NETWORKSETUP)
    assert ports == {"en0": "Ethernet", "en1": "Wi-Fi", "bridge0": "Thunderbolt Bridge",
                     "en2": "Thunderbolt 1"}
    kinds = {d: interface_kind(d, "Darwin", ports) for d in ("en0", "en1", "bridge0", "en2")}
    assert kinds == {"en0": ETHERNET, "en1": WIFI, "bridge0": THUNDERBOLT, "en2": THUNDERBOLT}
    # without networksetup's answer: what the names alone say
    assert interface_kind("bridge0", "Darwin") == THUNDERBOLT
    assert interface_kind("lo0", "Darwin") == LOOPBACK
    assert interface_kind("utun3", "Darwin") == VIRTUAL
    assert interface_kind("en0", "Darwin") == OTHER  # a Mac's en0 may be either


@pytest.mark.parametrize("name, kind", [
    ("lo", LOOPBACK), ("eth0", ETHERNET), ("enp3s0", ETHERNET), ("eno1", ETHERNET),
    ("enx00e04c680001", ETHERNET), ("wlan0", WIFI), ("wlp2s0", WIFI),
    ("thunderbolt0", THUNDERBOLT), ("veth12ab", VIRTUAL), ("docker0", VIRTUAL),
    ("tailscale0", VIRTUAL), ("ib0", OTHER)])
def test_linux_kinds_come_from_the_names(name: str, kind: str) -> None:
    assert interface_kind(name, "Linux") == kind


LOCAL = [LocalInterface("lo", "127.0.0.1", 8, LOOPBACK),
         LocalInterface("eth0", "192.168.1.10", 24, ETHERNET),
         LocalInterface("thunderbolt0", "169.254.10.1", 16, THUNDERBOLT),
         LocalInterface("wlan0", "192.168.1.11", 24, WIFI),
         LocalInterface("eth1", "10.0.0.5", 8, ETHERNET),
         LocalInterface("eth1", "10.1.2.5", 24, ETHERNET)]


def test_the_local_interface_of_a_peer_address_is_the_most_specific_network() -> None:
    assert local_interface_for("169.254.3.4", LOCAL).name == "thunderbolt0"
    assert local_interface_for("10.1.2.9", LOCAL).ip == "10.1.2.5"  # /24 beats /8
    assert local_interface_for("127.0.0.2", LOCAL).name == "lo"
    assert local_interface_for("8.8.8.8", LOCAL) is None
    assert local_interface_for("not an ip", LOCAL) is None


def test_a_node_advertises_what_it_binds() -> None:
    wild = advertised_addresses(LOCAL, bind_host="0.0.0.0", advertise_host=None)
    assert [a.ip for a in wild] == ["192.168.1.10", "169.254.10.1", "192.168.1.11",
                                    "10.0.0.5", "10.1.2.5"]  # no loopback beside them
    assert wild[1] == Advertised("169.254.10.1", "thunderbolt0", THUNDERBOLT)
    first = advertised_addresses(LOCAL, bind_host="0.0.0.0", advertise_host="10.1.2.5")
    assert first[0] == Advertised("10.1.2.5", "eth1", ETHERNET) and len(first) == 5
    one = advertised_addresses(LOCAL, bind_host="127.0.0.1", advertise_host="127.0.0.1")
    assert one == (Advertised("127.0.0.1", "lo", LOOPBACK),)
    lo = advertised_addresses(LOCAL[:1], bind_host="0.0.0.0", advertise_host=None)
    assert lo == (Advertised("127.0.0.1", "lo", LOOPBACK),)  # nothing else: loopback


def measured(*rtts: float, now: float = 0.0, throughput: float | None = None) -> PathMeasure:
    m = PathMeasure()
    for r in rtts:
        m.rtt(r, now)
    if throughput is not None:
        m.bandwidth(throughput, now)
    return m


TB = "169.254.3.4"
ETH = "192.168.1.20"
WLAN = "192.168.1.21"


def options(tb: PathMeasure | None, eth: PathMeasure | None,
            wlan: PathMeasure | None = None) -> list[PathOption]:
    return [PathOption(ETH, "eth0", ETHERNET, eth), PathOption(TB, "thunderbolt0", THUNDERBOLT, tb),
            PathOption(WLAN, "wlan0", WIFI, wlan)]


def test_the_lowest_round_trip_wins() -> None:
    c = choose_path(options(measured(0.00008), measured(0.0004), measured(0.003)),
                    default_ip=WLAN, current=None, pinned=None, now=1.0)
    assert (c.ip, c.interface, c.kind, c.pinned) == (TB, "thunderbolt0", THUNDERBOLT, False)
    assert c.rtt_s == pytest.approx(0.00008) and "lowest round trip of 3 paths" in c.reason


def test_nothing_measured_uses_the_membership_address() -> None:
    c = choose_path(options(None, None), default_ip=ETH, current=None, pinned=None, now=0.0)
    assert (c.ip, c.interface, c.rtt_s) == (ETH, "eth0", None)
    assert "not measured yet" in c.reason
    lone = choose_path([], default_ip="10.9.9.9", current=None, pinned=None, now=0.0)
    assert (lone.ip, lone.interface) == ("10.9.9.9", "?")


def test_a_path_that_stops_answering_is_left() -> None:
    tb, eth = measured(0.00008), measured(0.0004)
    for _ in range(MAX_LOST):
        tb.loss()
    c = choose_path(options(tb, eth), default_ip=ETH, current=TB, pinned=None, now=1.0)
    assert c.ip == ETH and "the only path that answers" in c.reason
    # silent for too long is down too
    tb, eth = measured(0.00008, now=0.0), measured(0.0004, now=STALE_AFTER_S)
    c = choose_path(options(tb, eth), default_ip=ETH, current=TB, pinned=None,
                    now=STALE_AFTER_S + 0.5)
    assert c.ip == ETH


def test_the_current_path_stays_unless_another_is_clearly_better() -> None:
    cur = 0.0004
    barely = cur * SWITCH_RATIO * 1.01  # 19% better: not enough
    c = choose_path(options(measured(barely), measured(cur)), default_ip=ETH, current=ETH,
                    pinned=None, now=1.0)
    assert c.ip == ETH and "kept" in c.reason
    # better by the ratio but by less than SWITCH_MIN_S (tiny loopback-like numbers): kept
    small = 0.00002
    c = choose_path(options(measured(small / 2), measured(small)), default_ip=ETH,
                    current=ETH, pinned=None, now=1.0)
    assert c.ip == ETH and small / 2 < SWITCH_MIN_S
    # clearly better: switch
    c = choose_path(options(measured(cur * 0.5), measured(cur)), default_ip=ETH, current=ETH,
                    pinned=None, now=1.0)
    assert c.ip == TB


def test_equal_round_trips_prefer_throughput_then_a_wired_kind() -> None:
    c = choose_path(options(measured(0.0004, throughput=1e9), measured(0.0004, throughput=4e9)),
                    default_ip=ETH, current=None, pinned=None, now=1.0)
    assert c.ip == ETH and c.throughput == 4e9
    c = choose_path([PathOption(WLAN, "wlan0", WIFI, measured(0.0004)),
                     PathOption(ETH, "eth0", ETHERNET, measured(0.0004))],
                    default_ip=WLAN, current=None, pinned=None, now=1.0)
    assert c.ip == ETH


def test_a_pinned_interface_wins_even_when_slower_or_silent() -> None:
    opts = options(measured(0.00008), measured(0.0004), measured(0.003))
    c = choose_path(opts, default_ip=ETH, current=TB, pinned="wlan0", now=1.0)
    assert (c.ip, c.pinned, c.reason) == (WLAN, True, "pinned to wlan0")
    silent = options(measured(0.00008), measured(0.0004), None)
    assert choose_path(silent, default_ip=ETH, current=TB, pinned="wlan0", now=1.0).ip == WLAN
    # a pin that reaches none of the peer's addresses: the best path, and why
    c = choose_path(opts, default_ip=ETH, current=None, pinned="eth9", now=1.0)
    assert c.ip == TB and not c.pinned
    assert c.reason.startswith("interface eth9 reaches no address of this peer")
