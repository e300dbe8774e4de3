"""The UDP reliability core on an in-memory network with a fake clock (no sockets, no sleeps)."""

from __future__ import annotations

import heapq
import os
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringd.core import reliable
from ringd.core.packet import SEGMENT, Transmit
from ringd.core.reliable import Endpoint, FrameReceived, PeerUnreachable, ReliableConfig
from ringd.core.seal import PN_RANGE_BITS, ReplayGuard, Sealer, new_session
from ringd.errors import LocalProtocolError

KEY = bytes(range(32))
PN0 = 1 << PN_RANGE_BITS  # the first packet number of an endpoint's first peer
A = ("10.0.0.1", 7411)
B = ("10.0.0.2", 7411)


def endpoint(name: str, *, key: bytes = KEY, session: int | None = None, **cfg) -> Endpoint:
    if session is None:
        session = new_session(1000, hash(name) & 0xFFFF)
    sealer = Sealer(key, name, session)
    return Endpoint(sealer, ReplayGuard(), config=ReliableConfig(**cfg))


class Net:
    """Endpoints joined by a seeded lossy link: drop, duplicate, reorder, delay.

    ``gso=True`` hands each Transmit over whole (as UDP GRO would on loopback) unless the
    link touches one of its segments; otherwise segment by segment.
    """

    def __init__(self, eps: dict, *, seed: int = 0, loss: float = 0.0, dup: float = 0.0,
                 reorder: float = 0.0, delay: float = 0.0005, gso: bool = False) -> None:
        self.eps = eps
        self.rng = random.Random(seed)
        self.loss, self.dup, self.reorder, self.delay, self.gso = loss, dup, reorder, delay, gso
        self.now = 0.0
        self.wire: list = []  # (time, n, dst, src, data, segment_size)
        self.n = 0
        self.events: dict = {a: [] for a in eps}
        self.drop_next: list = []  # predicates (src, dst, segment bytes) -> drop this one
        self.sent_segments = 0

    def _put(self, dst, src, data, ss: int = 0) -> None:
        d = self.delay
        if self.reorder and self.rng.random() < self.reorder:
            d += self.rng.random() * 4 * self.delay
        self.n += 1
        heapq.heappush(self.wire, (self.now + d, self.n, dst, src, data, ss))

    def flush(self) -> None:
        for src, ep in self.eps.items():
            for t in ep.datagrams_to_send(self.now):
                self.transmit(src, t)

    def transmit(self, src, t: Transmit) -> None:
        segs = [bytes(t.iov[i]) + bytes(t.iov[i + 1]) for i in range(0, len(t.iov), 2)]
        assert all(len(s) == t.segment_size for s in segs[:-1]) and len(segs[-1]) <= t.segment_size
        self.sent_segments += len(segs)
        fates = []
        for s in segs:
            if any(p(src, t.addr, s) for p in list(self.drop_next)):
                fates.append(0)
            elif self.loss and self.rng.random() < self.loss:
                fates.append(0)
            else:
                fates.append(2 if self.dup and self.rng.random() < self.dup else 1)
        if self.gso and all(f == 1 for f in fates) and len(segs) > 1:
            self._put(t.addr, src, b"".join(segs), t.segment_size)
            return
        for s, f in zip(segs, fates):
            for _ in range(f):
                self._put(t.addr, src, s)

    def step(self, until: float = float("inf")) -> bool:
        """Advance to the next delivery or timer; False when nothing is left before ``until``."""
        timers = [(ep.get_timer(), a) for a, ep in self.eps.items()]
        timers = [(t, a) for t, a in timers if t is not None]
        nxt_wire = self.wire[0][0] if self.wire else None
        nxt_timer = min(timers)[0] if timers else None
        if nxt_wire is None and nxt_timer is None:
            return False
        if min(t for t in (nxt_wire, nxt_timer) if t is not None) > until:
            self.now = max(self.now, until)
            return False
        if nxt_timer is not None and (nxt_wire is None or nxt_timer < nxt_wire):
            self.now = max(self.now, nxt_timer)
            for t, a in timers:
                if t <= self.now:
                    self.eps[a].handle_timer(self.now)
        else:
            t, _, dst, src, data, ss = heapq.heappop(self.wire)
            self.now = max(self.now, t)
            if dst in self.eps:
                self.eps[dst].receive_datagram(data, src, self.now, ss)
        self.collect()
        self.flush()
        return True

    def collect(self) -> None:
        for a, ep in self.eps.items():
            while (ev := ep.next_event()) is not None:
                self.events[a].append(ev)

    def run(self, until: float) -> None:
        self.flush()
        while self.step(until):
            pass

    def run_until(self, done, limit: float = 120.0) -> None:
        self.flush()
        while not done():
            assert self.step(), "network went idle before the condition held"
            assert self.now < limit, "condition did not hold in time"

    def frames(self, a) -> list:
        return [e for e in self.events[a] if isinstance(e, FrameReceived)]


def pto(initial_rtt: float = 0.05, max_ack_delay: float = 0.005) -> float:
    return initial_rtt + max(4 * initial_rtt / 2, 0.001) + max_ack_delay


def test_frame_is_delivered_and_acked() -> None:
    a, b = endpoint("a"), endpoint("b")
    net = Net({A: a, B: b})
    a.send_frame(B, b"hello", 0.0)
    assert a.get_timer() is None  # queued, not sent yet
    net.flush()
    # one packet in flight: the timer is the first probe timeout, from the initial RTT
    assert a.get_timer() == pytest.approx(pto())
    net.run_until(lambda: not a._peers[B].sent)
    [f] = net.frames(B)
    assert (f.addr, f.sender, bytes(f.data), f.stream) == (A, "a", b"hello", 0)
    # acked: only the idle timer is left, and the RTT was measured
    assert a.get_timer() == pytest.approx(a._peers[B].last_activity + a.config.idle_timeout)
    assert a.peer_stats()["10.0.0.2:7411"]["smoothed_rtt"] == pytest.approx(2 * net.delay)


def test_an_ack_read_with_an_older_clock_never_makes_the_rtt_negative() -> None:
    a, b = endpoint("a"), endpoint("b")
    a.send_frame(B, b"ping", 1.0)
    [t] = a.datagrams_to_send(1.0)
    b.receive_datagram(b"".join(t.iov), A, 1.0)
    [ack] = b.datagrams_to_send(1.0)
    a.receive_datagram(b"".join(ack.iov), B, 0.9995)  # read with a reading taken before the send
    stats = a.peer_stats()["10.0.0.2:7411"]
    assert not a._peers[B].sent  # acked
    assert 0 < stats["min_rtt"] <= 1e-5 and stats["smoothed_rtt"] > 0


def test_lost_packet_is_retransmitted_after_the_probe_timeout() -> None:
    a, b = endpoint("a"), endpoint("b")
    net = Net({A: a, B: b})
    dropped = []

    def drop_first(src, dst, seg):
        if src == A and not dropped:
            dropped.append(seg)
            return True
        return False

    net.drop_next.append(drop_first)
    a.send_frame(B, b"x" * 100, 0.0)
    net.flush()
    assert dropped and not net.wire
    assert a.get_timer() == pytest.approx(pto())
    net.step()  # the timer fires: a probe goes out at t = PTO
    assert net.now == pytest.approx(pto()) and a.totals["probes"] == 1
    assert a.get_timer() == pytest.approx(pto() + 2 * pto())  # backed off while unanswered
    net.run_until(lambda: len(net.frames(B)) == 1)
    assert bytes(net.frames(B)[0].data) == b"x" * 100
    net.run_until(lambda: not a._peers[B].sent)
    assert a._peers[B].pto_count == 0


def test_packet_threshold_declares_loss_without_a_timer() -> None:
    a, b = endpoint("a"), endpoint("b")
    net = Net({A: a, B: b})
    first = []
    net.drop_next.append(lambda s, d, seg: s == A and struct.unpack_from("<Q", seg, 16)[0] == PN0
                         and not first.append(1) and len(first) == 1)
    for i in range(5):
        a.send_frame(B, bytes([i]) * 10, 0.0)
        net.flush()  # one packet each
    net.run_until(lambda: a.totals["packets_lost"] == 1)
    assert net.now < pto()  # found by the packet threshold, long before a probe timeout
    net.run_until(lambda: len(net.frames(B)) == 5)
    assert [bytes(f.data)[0] for f in net.frames(B)] == [0, 1, 2, 3, 4]


def test_time_threshold_sets_the_loss_timer() -> None:
    a, b = endpoint("a"), endpoint("b")
    net = Net({A: a, B: b})
    # measure an RTT first
    a.send_frame(B, b"warm", 0.0)
    net.run_until(lambda: not a._peers[B].sent)
    rtt = a._peers[B].smoothed_rtt
    t0 = net.now
    dropped = []
    net.drop_next.append(lambda s, d, seg: s == A and not dropped and not dropped.append(1))
    a.send_frame(B, b"one", t0)
    net.flush()
    a.send_frame(B, b"two", t0)
    net.flush()
    net.run_until(lambda: a._peers[B].largest_acked >= PN0 + 2)
    # pn 1 was lost, pn 2 acked: one packet short of the threshold, so a timer at 9/8 RTT
    assert a.get_timer() == pytest.approx(t0 + 9 / 8 * max(rtt, a._peers[B].latest_rtt))
    net.run_until(lambda: len(net.frames(B)) == 3)
    assert [bytes(f.data) for f in net.frames(B)] == [b"warm", b"one", b"two"]


@pytest.mark.parametrize("seed,gso", [(1, False), (2, True), (3, False)])
def test_every_frame_exactly_once_in_order_under_loss_dup_reorder(seed: int, gso: bool) -> None:
    a, b = endpoint("a"), endpoint("b")
    net = Net({A: a, B: b}, seed=seed, loss=0.08, dup=0.05, reorder=0.3, gso=gso)
    rng = random.Random(seed)
    sent: dict[int, list[bytes]] = {0: [], 1: [], 2: []}
    for i in range(300):
        stream = rng.randrange(3)
        n = rng.choice([0, 10, 1000, 1400, 5000, 33_000, 100_000])
        data = i.to_bytes(4, "little") + rng.randbytes(n)
        assert a.send_frame(B, data, net.now, stream=stream)
        sent[stream].append(data)
        if i % 7 == 0:
            net.run(net.now + 0.002)
    total = sum(len(v) for v in sent.values())
    net.run_until(lambda: len(net.frames(B)) == total)
    got: dict[int, list[bytes]] = {0: [], 1: [], 2: []}
    for f in net.frames(B):
        got[f.stream].append(bytes(f.data))
    assert got == sent
    net.run(net.now + 5)
    assert len(net.frames(B)) == total  # nothing delivered twice, even after retransmissions settle
    assert a.totals["packets_lost"] > 0 and b.counters["abandoned"] == 0  # no frame was skipped
    assert not a._peers[B].sent and a._peers[B].queued == 0
    assert not [e for e in net.events[A] if isinstance(e, PeerUnreachable)]


def test_sender_keeps_within_the_receivers_stream_window() -> None:
    a, b = endpoint("a"), endpoint("b")
    net = Net({A: a, B: b})
    first = []
    net.drop_next.append(lambda s, d, seg: s == A and not first and not first.append(1))
    n = reliable.STREAM_WINDOW * 3
    for i in range(n):
        a.send_frame(B, i.to_bytes(4, "little"), 0.0)
    net.run_until(lambda: len(net.frames(B)) == n)
    assert [int.from_bytes(f.data, "little") for f in net.frames(B)] == list(range(n))
    assert b.counters["overflow"] == 0  # nothing was sent that the receiver had to refuse
    assert a.totals["packets_lost"] <= 2


def test_segments_per_packet_shrink_on_loss_and_grow_back() -> None:
    a, b = endpoint("a"), endpoint("b")
    net = Net({A: a, B: b})
    big = os.urandom(30_000)  # 22 segments of 1400 bytes
    dropped = []
    net.drop_next.append(lambda s, d, seg: s == A and seg[3] > 1 and seg[2] == 5 and not dropped
                         and not dropped.append(1))
    a.send_frame(B, big, 0.0)
    net.run_until(lambda: len(net.frames(B)) == 1)
    assert bytes(net.frames(B)[0].data) == big
    peer = a._peers[B]
    net.run_until(lambda: not peer.sent)
    low = peer.seg_limit
    assert low <= 11  # half the lost packet's 22 segments
    for _ in range(15):  # packets that fill the budget grow it by one segment each
        a.send_frame(B, big, net.now)
        net.run(net.now + 0.01)
    assert peer.seg_limit >= 22  # enough for the whole frame again


def test_unreachable_after_repeated_probe_timeouts() -> None:
    a, b = endpoint("a", pto_limit=4), endpoint("b")
    net = Net({A: a, B: b})
    net.drop_next.append(lambda s, d, seg: s == A)
    a.send_frame(B, b"f1", 0.0, stream=0)
    a.send_frame(B, b"f2", 0.0, stream=1)
    net.flush()
    deadlines = []
    while not net.events[A]:
        deadlines.append(a.get_timer())
        net.step()
    # probe timeouts back off exponentially: PTO, 2 PTO, 4 PTO, 8 PTO after each send
    gaps = [round(deadlines[i + 1] - deadlines[i], 6) for i in range(len(deadlines) - 1)]
    assert gaps == [round(pto() * 2, 6), round(pto() * 4, 6), round(pto() * 8, 6)]
    [ev] = net.events[A]
    assert isinstance(ev, PeerUnreachable) and ev.addr == B and ev.frames == (b"f1", b"f2")
    assert a.get_timer() == pytest.approx(a._peers[B].last_activity + a.config.idle_timeout)
    # the receiver skips what was abandoned when UDP works again
    net.drop_next.clear()
    a.send_frame(B, b"f3", net.now, stream=0)
    net.run_until(lambda: len(net.frames(B)) == 1)
    assert bytes(net.frames(B)[0].data) == b"f3"


def test_forged_segment_fails_its_packet_and_never_enters_a_frame() -> None:
    a, b = endpoint("a"), endpoint("b")
    net = Net({A: a, B: b})
    big = os.urandom(5000)  # 4 segments
    forged = []

    def forge(src, dst, seg):
        if src == A and seg[2] == 1 and not forged:
            bad = seg[:SEGMENT.size] + bytes(len(seg) - SEGMENT.size)
            forged.append(bad)
            b.receive_datagram(bad, A, net.now)  # the forgery arrives first
        return False

    net.drop_next.append(forge)
    a.send_frame(B, big, 0.0)
    net.run_until(lambda: len(net.frames(B)) == 1)
    assert bytes(net.frames(B)[0].data) == big
    assert b.counters["bad_mac"] == 1
    assert a.totals["packets_lost"] + a.totals["probes"] >= 1


@pytest.mark.parametrize("size", [500, 20_000])  # one packet of one segment / of many
def test_nodes_sharing_a_session_number_both_get_through(size: int) -> None:
    """Two nodes that drew the same session number (started in the same millisecond): each
    one's packet numbers are replay-checked against its own window, never the other's."""
    c_addr = ("10.0.0.3", 7411)
    a = endpoint("a", session=5, datagram_size=1400)
    c = endpoint("c", session=5, datagram_size=1400)
    b = endpoint("b", datagram_size=1400)
    net = Net({A: a, B: b, c_addr: c})
    for i in range(20):
        a.send_frame(B, bytes([i]) * size, net.now)
        if i >= 10:  # c starts later: its packet numbers are ones a has used already
            c.send_frame(B, bytes([100 + i]) * size, net.now)
        net.flush()
    net.run_until(lambda: len(net.frames(B)) == 30)
    got = {who: [bytes(e.data)[0] for e in net.frames(B) if e.sender == who] for who in ("a", "c")}
    assert got == {"a": list(range(20)), "c": list(range(110, 120))}
    assert b.counters["replay"] == 0
    assert a.totals["packets_lost"] == c.totals["packets_lost"] == 0


def test_datagram_rejections_are_counted() -> None:
    a, b = endpoint("a"), endpoint("b")
    other = endpoint("x", key=bytes(32))
    net = Net({A: a, B: b})
    captured: list[bytes] = []
    net.drop_next.append(lambda s, d, seg: captured.append(seg) or False)
    a.send_frame(B, b"payload", 0.0)
    net.run_until(lambda: len(net.frames(B)) == 1)
    seg = captured[0]
    b.receive_datagram(seg, A, net.now)  # replayed
    assert b.counters["replay"] == 1
    b.receive_datagram(seg[:10], A, net.now)
    assert b.counters["truncated"] == 1
    other.send_frame(B, b"intruder", net.now)
    for t in other.datagrams_to_send(net.now):
        b.receive_datagram(b"".join(bytes(x) for x in t.iov), ("10.0.0.9", 1), net.now)
    assert b.counters["wrong_cluster"] == 1
    tampered = bytearray(seg)
    tampered[-1] ^= 1
    tampered[16:24] = (PN0 + 99).to_bytes(8, "little")  # a fresh packet number, bad tag
    b.receive_datagram(bytes(tampered), A, net.now)
    assert b.counters["bad_mac"] == 1
    newer = bytearray(seg)
    newer[1] = 9
    b.receive_datagram(bytes(newer), A, net.now)
    assert b.counters["bad_version"] == 1
    assert len(net.frames(B)) == 1


def test_oneshots_are_unreliable_and_unordered() -> None:
    a, b = endpoint("a"), endpoint("b")
    net = Net({A: a, B: b})
    dropped = []
    net.drop_next.append(lambda s, d, seg: s == A and not dropped and not dropped.append(1))
    a.send_frame(B, b"lost", 0.0, reliable=False)
    net.flush()
    a.send_frame(B, b"kept", 0.0, reliable=False)
    net.run(1.0)
    assert [(bytes(f.data), f.stream) for f in net.frames(B)] == [(b"kept", None)]
    assert a.get_timer() == pytest.approx(a.config.idle_timeout)  # nothing awaits an ack
    with pytest.raises(LocalProtocolError):
        a.send_frame(B, bytes(a.max_oneshot + 1), 0.0, reliable=False)


def test_incomplete_packets_expire_and_are_bounded() -> None:
    b = endpoint("b", max_assemblies=4)
    a = endpoint("a")
    a.send_frame(B, os.urandom(4000), 0.0)
    [t] = a.datagrams_to_send(0.0)
    first = bytes(t.iov[0]) + bytes(t.iov[1])
    b.receive_datagram(first, A, 0.0)
    assert b.get_timer() == pytest.approx(b.config.assembly_timeout)
    b.handle_timer(b.config.assembly_timeout)
    assert b.counters["expired"] == 1 and not b._assemblies
    for pn in range(10):  # unauthenticated pieces can only evict each other
        seg = bytearray(first)
        seg[16:24] = (100 + pn).to_bytes(8, "little")
        b.receive_datagram(bytes(seg), ("10.9.9.9", pn), 2.0)
    assert len(b._assemblies) == 4 and b.counters["overflow"] == 6
    assert not b._peers  # nothing authenticated: no peer state was created


def test_receiver_restart_and_sender_restart() -> None:
    a, b = endpoint("a"), endpoint("b")
    net = Net({A: a, B: b})
    a.send_frame(B, b"1", 0.0)
    net.run_until(lambda: len(net.frames(B)) == 1)
    # The receiver restarts before "1" is acked: a fresh endpoint at the same address starts
    # the stream at the sender's base (0), which its predecessor already delivered. "2"
    # waits behind it until the gap timeout releases it.
    net.eps[B] = b2 = endpoint("b", session=new_session(2000, 1))
    net.events[B].clear()
    a.send_frame(B, b"2", net.now)
    net.run(net.now + 1.0)
    assert not net.frames(B)
    blocked = b2._peers[A].in_streams[0].blocked_since
    assert b2.get_timer() == pytest.approx(blocked + b2.config.gap_timeout)
    net.run_until(lambda: len(net.frames(B)) == 1)
    assert bytes(net.frames(B)[0].data) == b"2"
    assert net.now == pytest.approx(blocked + b2.config.gap_timeout)
    # a stream that has caught up has no gap timer
    a.send_frame(B, b"2b", net.now)
    net.run_until(lambda: len(net.frames(B)) == 2)
    net.events[B].clear()
    # sender restarts with a newer session: accepted; the old session is now a replay
    old_segs: list[bytes] = []
    a.send_frame(B, b"3", net.now)
    for t in a.datagrams_to_send(net.now):
        old_segs.append(b"".join(bytes(x) for x in t.iov))
    net.eps[A] = a2 = endpoint("a", session=new_session(3000, 1))
    a2.send_frame(B, b"4", net.now)
    net.run_until(lambda: len(net.frames(B)) == 1)
    assert bytes(net.frames(B)[0].data) == b"4"
    b2.receive_datagram(old_segs[0], A, net.now)
    assert b2.counters["replay"] >= 1 and len(net.frames(B)) == 1


def test_misuse_raises() -> None:
    a = endpoint("a", max_frame=1000)
    with pytest.raises(LocalProtocolError):
        a.send_frame(B, bytes(1001), 0.0)
    with pytest.raises(LocalProtocolError):
        a.send_frame(B, b"x", 0.0, stream=256)
    with pytest.raises(LocalProtocolError):
        ReliableConfig(datagram_size=10)


def test_send_queue_is_bounded() -> None:
    a = endpoint("a", max_queued=10_000)
    assert a.send_frame(B, bytes(6000), 0.0)
    assert not a.send_frame(B, bytes(6000), 0.0)
    assert a.counters["overflow"] == 1


# ------------------------------------------------------------------------ fuzz
def _real_segments() -> list[bytes]:
    a = endpoint("a")
    a.send_frame(B, os.urandom(3000), 0.0)
    a.send_frame(B, b"x", 0.0, reliable=False)
    out = []
    for t in a.datagrams_to_send(0.0):
        out += [bytes(t.iov[i]) + bytes(t.iov[i + 1]) for i in range(0, len(t.iov), 2)]
    return out


SEGS = _real_segments()


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_fuzz_datagram_decoder_never_raises(data) -> None:
    b = endpoint("b", max_assemblies=8, max_assembly_bytes=64 * 1024)
    base = data.draw(st.sampled_from(SEGS + [b""]))
    mutated = bytearray(base)
    for _ in range(data.draw(st.integers(0, 6))):
        if mutated and data.draw(st.booleans()):
            i = data.draw(st.integers(0, len(mutated) - 1))
            mutated[i] = data.draw(st.integers(0, 255))
        else:
            mutated += data.draw(st.binary(max_size=64))
    ss = data.draw(st.sampled_from([0, 0, 700, 1400]))
    b.receive_datagram(bytes(mutated), A, 0.0, ss)
    b.receive_datagram(data.draw(st.binary(max_size=3000)), A, 0.0, ss)
    b.datagrams_to_send(0.0)
    b.handle_timer(10.0)
    assert b._assembly_bytes <= 64 * 1024
    held = sum(p.reassembly for p in b._peers.values())
    assert held <= b.config.reassembly_budget + b.config.max_frame


def test_no_packet_number_is_used_twice_whatever_the_destination() -> None:
    """The AEAD nonce is the packet number and the sender's key is the same for every
    destination: packets to two peers, to one peer before and after its state was evicted,
    and from two endpoints on one sealer must never share a number (nonce reuse breaks
    AES-OCB3)."""
    sealer = Sealer(KEY, "a", new_session(1000, 1))
    ep = Endpoint(sealer, ReplayGuard(), config=ReliableConfig(max_peers=1))
    twin = Endpoint(sealer, ReplayGuard())  # a second user of the same key (ringctl ping)
    c = ("10.0.0.3", 7411)
    pns = []
    for i, (e, dst) in enumerate(((ep, B), (ep, c), (ep, B), (ep, c), (twin, B))):
        e.send_frame(dst, b"x" * 100, float(i))  # max_peers=1: each send evicts the other
        for t in e.datagrams_to_send(float(i)):
            pns.append((t.addr, SEGMENT.unpack_from(bytes(t.iov[0]), 0)[6]))
        e._peers[dst].sent.clear()  # as if acked: the state may be evicted
        e._peers[dst].queued = 0
    assert [a for a, _ in pns] == [B, c, B, c, B]
    assert len({pn for _, pn in pns}) == 5, pns
