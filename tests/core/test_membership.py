"""Membership core on the in-memory network with a fake clock (no sockets, no sleeps)."""

from __future__ import annotations

import random

import pytest

from ringd import PROTOCOL_VERSION
from ringd.config import Settings
from ringd.core.membership import (
    MemberFailed,
    MemberJoined,
    MemberLeft,
    Membership,
    MemberSuspected,
    MemberUpdated,
)
from ringd.core.swim_config import MembershipConfig
from ringd.core.swim_wire import (
    Ack,
    Member,
    MemberState,
    Ping,
    PingReq,
    decode_payload,
    to_payload,
)
from ringd.errors import LocalProtocolError, RemoteProtocolError
from tests.core.simnet import MemberNode, SimNet

CFG = MembershipConfig()


def ring(n: int, seed: int = 1, **net_kw) -> tuple[SimNet, list[MemberNode]]:
    net = SimNet(seed=seed, **net_kw)
    nodes = [net.add(MemberNode(f"n{i}", 7000 + i, seed=seed * 100 + i)) for i in range(n)]
    for node in nodes:
        node.m.join([nodes[0].addr], net.now)
    return net, nodes


def live(node: MemberNode) -> tuple[str, ...]:
    return tuple(m.node_id for m in node.m.live_members())


def converged(nodes: list[MemberNode], size: int) -> bool:
    """Every node sees the same live members, with the same records (metadata included)."""
    views = {tuple(node.m.live_members()) for node in nodes}
    return len(views) == 1 and len(live(nodes[0])) == size


def events_about(node: MemberNode, node_id: str, kind: type) -> list[float]:
    return [t for t, ev in node.log if isinstance(ev, kind) and ev.member.node_id == node_id]


def trace(net: SimNet) -> list[tuple[float, tuple, tuple, object]]:
    """Record every message sent (time, src, dst, decoded) without dropping any."""
    out: list = []

    def record(src, dst, payload):
        out.append((net.now, src, dst, decode_payload(payload)))
        return False

    net.drop = record
    return out


# ---------------------------------------------------------------------------- forming
@pytest.mark.parametrize("n", [3, 4, 5])
def test_nodes_join_through_one_seed_and_agree_on_the_view(n: int) -> None:
    net, nodes = ring(n)
    t = net.run_until_true(lambda: converged(nodes, n), timeout=3.0)
    assert t < 1.0
    ids = tuple(f"n{i}" for i in range(n))
    for node in nodes:
        assert live(node) == ids
        joined = {ev.member.node_id for _, ev in node.log if isinstance(ev, MemberJoined)}
        assert joined == set(ids) - {node.m.node_id}
    # Stays converged and quiet: probes keep succeeding, nobody is suspected.
    net.run_for(10.0)
    assert converged(nodes, n)
    assert all(n.m.counters["suspicions"] == 0 for n in nodes)
    rtts = [nodes[0].m.rtt(f"n{i}") for i in range(1, n)]
    assert all(r is not None and 0.002 <= r <= 0.003 for r in rtts)  # 2 x (1 ms + jitter)
    row = nodes[0].m.stats()["members"][1]
    assert row["node_id"] == "n1" and row["state"] == "alive" and row["rtt_ms"] is not None


def test_join_works_with_seeds_that_include_ourselves_and_dead_addresses() -> None:
    net = SimNet(seed=3)
    nodes = [net.add(MemberNode(f"n{i}", 7000 + i, seed=i)) for i in range(3)]
    seeds = [n.addr for n in nodes] + [("10.0.0.9", 9999)]  # everyone, plus nobody
    for node in nodes:
        node.m.join(seeds, net.now)
    net.run_until_true(lambda: converged(nodes, 3), timeout=1.0)
    net.run_for(5.0)
    assert converged(nodes, 3)


def test_a_late_node_is_found_by_reconnect_to_a_static_peer() -> None:
    net = SimNet(seed=4)
    a = net.add(MemberNode("a", 7000, seed=1))
    a.m.join([("10.0.0.1", 7001)], net.now)  # b is not up yet
    net.run_for(3.0)
    b = net.add(MemberNode("b", 7001, seed=2))
    b.m.join([], net.now)
    t0 = net.now
    t = net.run_until_true(lambda: converged([a, b], 2), timeout=5.0)
    assert t - t0 <= CFG.reconnect_interval + 0.01


# ------------------------------------------------------------------------------ leave
def test_graceful_leave_is_left_not_failed_within_a_probe_interval() -> None:
    net, nodes = ring(4)
    net.run_until_true(lambda: converged(nodes, 4), timeout=2.0)
    net.run_for(2.0)
    leaver = nodes[3]
    t0 = net.now
    leaver.m.leave(net.now)
    assert leaver.m.leaving and live(leaver) == ("n0", "n1", "n2")
    t = net.run_until_true(lambda: all(n.state_of("n3") == "left" for n in nodes[:3]), timeout=5.0)
    assert t - t0 < CFG.probe_interval
    net.run_until_true(lambda: leaver.m.leave_complete, timeout=5.0)
    net.run_for(30.0)
    for n in nodes[:3]:
        assert n.state_of("n3") == "left"
        assert events_about(n, "n3", MemberLeft) and not events_about(n, "n3", MemberFailed)
        assert live(n) == ("n0", "n1", "n2")


def test_graceful_leave_survives_a_lossy_network() -> None:
    net, nodes = ring(4, seed=7, loss=0.3)
    net.run_until_true(lambda: converged(nodes, 4), timeout=10.0)
    nodes[0].m.leave(net.now)
    net.run_for(15.0)
    for n in nodes[1:]:
        assert n.state_of("n0") == "left"
        assert live(n) == ("n1", "n2", "n3")


# ------------------------------------------------------------------------------ crash
def test_crash_is_suspected_then_dead_at_exact_deadlines() -> None:
    net, nodes = ring(3, seed=5)
    sent = trace(net)
    net.run_until_true(lambda: converged(nodes, 3), timeout=2.0)
    net.run_for(1.5)
    crash_at = net.now
    net.crash(nodes[2].addr)
    net.run_until_true(lambda: all(n.state_of("n2") == "dead" for n in nodes[:2]), timeout=10.0)
    for node in nodes[:2]:
        (t_sus,) = events_about(node, "n2", MemberSuspected)
        (t_dead,) = events_about(node, "n2", MemberFailed)
        assert crash_at < t_sus <= crash_at + 2 * CFG.probe_interval + 0.01
        # 3 nodes: too few for Lifeguard confirmations, so the base timeout applies.
        assert t_dead == pytest.approx(t_sus + CFG.suspicion_timeout, abs=1e-9)
        assert live(node) == ("n0", "n1")
    # n0's own probe: ping at T, indirect probe (via n1) at T + probe_timeout,
    # suspect at T + probe_interval.
    pings = [
        t
        for t, s, d, m in sent
        if isinstance(m, Ping) and s == nodes[0].addr and d == nodes[2].addr and t > crash_at
    ]
    reqs = [
        t
        for t, s, d, m in sent
        if isinstance(m, PingReq) and s == nodes[0].addr and m.target_id == "n2"
    ]
    (t_sus0,) = events_about(nodes[0], "n2", MemberSuspected)
    if pings and pings[0] < t_sus0:  # n0 probed n2 itself (else n1's gossip came first)
        assert reqs[0] == pytest.approx(pings[0] + CFG.probe_timeout, abs=1e-9)
        assert t_sus0 == pytest.approx(pings[0] + CFG.probe_interval, abs=1e-9)


def test_timer_reports_the_suspicion_deadline() -> None:
    net = SimNet(seed=6)
    a = net.add(MemberNode("a", 7000, seed=1))
    b = net.add(MemberNode("b", 7001, seed=2))
    a.m.join([b.addr], 0.0)
    b.m.join([], 0.0)
    net.run_until_true(lambda: converged([a, b], 2), timeout=1.0)
    net.crash(b.addr)
    net.run_until_true(lambda: a.state_of("b") == "suspect", timeout=3.0)
    t_sus = net.now
    assert t_sus == pytest.approx(2.0, abs=1e-9)  # ping at 1.0 (first probe tick), suspect at 2.0
    timers = []
    while a.state_of("b") == "suspect":
        timers.append(a.m.get_timer())
        net.step(100.0)
    assert t_sus + CFG.suspicion_timeout in timers
    assert net.now == pytest.approx(6.0, abs=1e-9)


def test_lifeguard_confirmations_shorten_the_suspicion_in_larger_rings() -> None:
    net, nodes = ring(6, seed=8)
    net.run_until_true(lambda: converged(nodes, 6), timeout=2.0)
    net.run_for(1.0)
    net.crash(nodes[5].addr)
    net.run_until_true(lambda: all(n.state_of("n5") == "dead" for n in nodes[:5]), timeout=30.0)
    first_sus = min(events_about(n, "n5", MemberSuspected)[0] for n in nodes[:5])
    first_dead = min(events_about(n, "n5", MemberFailed)[0] for n in nodes[:5])
    base, top = CFG.suspicion_timeout, CFG.suspicion_timeout * CFG.suspicion_max_mult
    assert base - 1e-9 <= first_dead - first_sus < top  # confirmations cut the 12 s maximum


# ------------------------------------------------------------------------- refutation
def test_a_live_node_refutes_suspicion_with_a_higher_incarnation() -> None:
    net, nodes = ring(3, seed=9)
    net.run_until_true(lambda: converged(nodes, 3), timeout=2.0)
    c = nodes[2]
    start = net.now

    def drop_c_acks(src, dst, payload):  # c answers nobody's probes for 2 s
        return src == c.addr and net.now < start + 2.0 and isinstance(decode_payload(payload), Ack)

    net.drop = drop_c_acks
    net.run_until_true(
        lambda: any(
            n.state_of("c") == "suspect" or n.state_of("n2") == "suspect" for n in nodes[:2]
        ),
        timeout=5.0,
    )
    net.run_for(20.0)
    assert c.m.counters["refutations"] >= 1
    assert c.m.local.incarnation >= 1
    for n in nodes[:2]:
        assert events_about(n, "n2", MemberSuspected)
        assert not events_about(n, "n2", MemberFailed)
        assert n.state_of("n2") == "alive"
        assert n.m.member("n2").incarnation == c.m.local.incarnation
        sus = events_about(n, "n2", MemberSuspected)[0]
        assert any(t > sus for t in events_about(n, "n2", MemberUpdated))
    assert converged(nodes, 3)


def test_a_restarted_node_with_the_same_id_rejoins() -> None:
    net, nodes = ring(3, seed=10)
    net.run_until_true(lambda: converged(nodes, 3), timeout=2.0)
    net.crash(nodes[2].addr)
    net.run_until_true(lambda: nodes[0].state_of("n2") == "dead", timeout=10.0)
    reborn = net.add(MemberNode("n2", 7002, seed=99))  # incarnation 0 again
    reborn.m.join([nodes[0].addr], net.now)
    nodes[2] = reborn
    net.run_until_true(lambda: converged(nodes, 3), timeout=5.0)
    assert reborn.m.local.incarnation > 0
    assert nodes[0].m.member("n2").incarnation == reborn.m.local.incarnation


# ------------------------------------------------------------------------- partitions
def test_partition_splits_the_view_and_heal_merges_it() -> None:
    net, nodes = ring(4, seed=11)
    net.run_until_true(lambda: converged(nodes, 4), timeout=2.0)
    left, right = {nodes[0].addr, nodes[1].addr}, {nodes[2].addr, nodes[3].addr}
    net.partition(left, right)
    net.run_for(20.0)
    assert live(nodes[0]) == live(nodes[1]) == ("n0", "n1")
    assert live(nodes[2]) == live(nodes[3]) == ("n2", "n3")
    net.heal()
    t0 = net.now
    t = net.run_until_true(lambda: converged(nodes, 4), timeout=10.0)
    assert t - t0 <= CFG.reconnect_interval + 2.0
    net.run_for(15.0)
    assert converged(nodes, 4)
    assert all(n.m.member(f"n{i}").state is MemberState.ALIVE for n in nodes for i in range(4))


# ------------------------------------------------------------------------------ meta
def test_metadata_is_opaque_bytes_that_spread_with_a_new_incarnation() -> None:
    net, nodes = ring(3, seed=12)
    net.run_until_true(lambda: converged(nodes, 3), timeout=2.0)
    inc = nodes[1].m.local.incarnation
    assert nodes[1].m.update_meta(b"\x00 any bytes \xff")
    assert not nodes[1].m.update_meta(b"\x00 any bytes \xff")  # no change, no gossip
    assert nodes[1].m.local.incarnation == inc + 1
    net.run_until_true(
        lambda: all(n.m.member("n1").meta == b"\x00 any bytes \xff" for n in nodes), 1.0
    )
    assert all(n.m.member("n1").incarnation == inc + 1 for n in nodes)
    assert any(
        isinstance(ev, MemberUpdated) and ev.member.node_id == "n1" for _, ev in nodes[0].log
    )
    big = b"x" * CFG.max_meta_bytes
    assert nodes[1].m.update_meta(big)  # the bound itself is allowed
    net.run_until_true(lambda: all(n.m.member("n1").meta == big for n in nodes), 11.0)
    for bad in (big + b"x", "text", bytearray(b"x")):
        with pytest.raises(LocalProtocolError, match="metadata must be bytes"):
            nodes[1].m.update_meta(bad)
    with pytest.raises(LocalProtocolError, match="bytes of at most 4, got bytes of 5"):
        Membership("me", "me", ("10.0.0.1", 1), b"12345", rng=random.Random(1),
                   config=MembershipConfig(max_meta_bytes=4))


def test_a_peer_with_metadata_over_our_bound_is_junk() -> None:
    m = Membership("me", "me", ("10.0.0.1", 1), b"", rng=random.Random(1),
                   config=MembershipConfig(max_meta_bytes=8))
    m.join([], 0.0)
    fits = Member("x", "x", ("10.0.0.2", 2), 0, MemberState.ALIVE, b"8 bytes!")
    m.receive(to_payload(Ping(1, fits, None)), ("10.0.0.2", 2), 0.1)
    assert m.member("x").meta == b"8 bytes!"
    over = Member("y", "y", ("10.0.0.3", 3), 0, MemberState.ALIVE, b"9 bytes!!")
    with pytest.raises(RemoteProtocolError, match="source.meta: expected bytes, at most 8"):
        m.receive(to_payload(Ping(2, over, None)), ("10.0.0.3", 3), 0.2)
    assert m.member("y") is None and m.counters["rejected_payloads"] == 1


def test_members_of_another_protocol_version_are_tracked_but_not_live() -> None:
    net = SimNet(seed=14)
    a = net.add(MemberNode("a", 7000, seed=1))
    b = net.add(MemberNode("b", 7001, seed=2))
    newer = net.add(MemberNode("c", 7002, seed=3, protocol_version=PROTOCOL_VERSION + 1))
    for n in (a, b, newer):
        n.m.join([a.addr], net.now)
    net.run_until_true(lambda: all(n.state_of(i) == "alive" for n in (a, b, newer) for i in "abc"),
                       timeout=2.0)
    net.run_for(5.0)
    assert live(a) == live(b) == ("a", "b")
    assert live(newer) == ("c",)  # it sees us as the other version
    assert a.m.member("c").protocol_version == PROTOCOL_VERSION + 1
    assert all(n.m.counters["suspicions"] == 0 for n in (a, b, newer))


def test_membership_counts_and_survives_junk() -> None:
    net, nodes = ring(2, seed=13)
    net.run_until_true(lambda: converged(nodes, 2), timeout=1.0)
    before = nodes[0].m.live_members()
    rng = random.Random(0)
    for _ in range(50):
        net.inject(("10.6.6.6", 666), nodes[0].addr, rng.randbytes(rng.randint(0, 200)))
    net.run_for(3.0)
    assert net.rejected == 50 and nodes[0].m.counters["rejected_payloads"] == 50
    assert nodes[0].m.live_members() == before and converged(nodes, 2)


def test_config_from_settings_and_checks() -> None:
    cfg = MembershipConfig.from_settings(Settings(probe_interval=2.0, suspicion_timeout=6.0))
    assert (cfg.probe_interval, cfg.probe_timeout, cfg.suspicion_timeout) == (2.0, 0.5, 6.0)
    assert cfg.max_payload_bytes == 1200  # path-MTU datagrams: gossip keeps to 1400 B minus room
    with pytest.raises(LocalProtocolError):
        MembershipConfig(probe_interval=0.5, probe_timeout=0.5)


def test_a_lone_node_leaves_at_once() -> None:
    m = Membership("me", "me", ("10.0.0.1", 1), b"meta", rng=random.Random(1))
    m.join([], 0.0)
    assert m.live_members() == [m.local]
    m.leave(1.0)
    assert m.leave_complete and m.local.state is MemberState.LEFT
    assert m.local.meta == b"meta" and m.live_members() == []


def test_a_ping_for_another_node_is_not_acked() -> None:
    m = Membership("me", "me", ("10.0.0.1", 1), b"", rng=random.Random(1))
    m.join([], 0.0)
    other = Member("x", "x", ("10.0.0.2", 2), 0, MemberState.ALIVE, b"")
    m.receive(to_payload(Ping(5, other, "someone-else")), ("10.0.0.2", 2), 0.1)
    assert m.outbox() == []
    m.receive(to_payload(Ping(6, other, "me")), ("10.0.0.2", 2), 0.2)
    ((dst, payload),) = m.outbox()
    ack = decode_payload(payload)
    assert dst == ("10.0.0.2", 2) and isinstance(ack, Ack) and ack.seq == 6
    assert m.member("x").state is MemberState.ALIVE
