"""Link measurement and path choice (net/links.py): probes and echoes, the choice applied only
while no request runs, and real transports on loopback with a second path to the peer through
a userspace delay proxy."""

from __future__ import annotations

import asyncio
import time

import pytest

from ringd.config import Settings
from ringd.core import wire
from ringd.core.paths import ETHERNET, LOOPBACK, MAX_LOST, Advertised, LocalInterface
from ringd.net.links import LinkProber, Peer
from ringd.net.transport import Transport
from tests.net.test_udp import Inbox

KEY = bytes(range(32))
LOCAL = [LocalInterface("lo", "127.0.0.1", 8, LOOPBACK),
         LocalInterface("slow0", "127.0.0.2", 32, ETHERNET)]


class Wire:
    """A fake network for one prober: records what it sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[tuple[str, int], wire.Message]] = []

    def __call__(self, addr: tuple[str, int], msg: wire.Message) -> None:
        self.sent.append((addr, msg))

    def take(self) -> list[tuple[tuple[str, int], wire.Message]]:
        out, self.sent = self.sent, []
        return out


PEER = Peer("b" * 16, "beta", ("127.0.0.1", 7411),
            (Advertised("127.0.0.1", "lo", LOOPBACK), Advertised("127.0.0.2", "slow0",
                                                                  ETHERNET)))


def answer(prober: LinkProber, sent, now: float, rtt: dict[str, float]) -> None:
    """Echo the round-trip probes of ``sent`` as the peer would, after ``rtt[ip]`` seconds."""
    for addr, msg in sent:
        if not memoryview(msg.data).nbytes and addr[0] in rtt:
            prober.receive(wire.LinkEcho(msg.nonce, 0), PEER.node_id, addr, now + rtt[addr[0]])


def test_probes_every_address_and_chooses_the_fastest_only_while_quiet() -> None:
    net, quiet = Wire(), [True]
    p = LinkProber(net, lambda: [PEER], local=LOCAL, quiet=lambda: quiet[0],
                   throughput_interval=0)
    p.tick(0.0)
    sent = net.take()
    assert sorted(a for a, _ in sent) == [("127.0.0.1", 7411), ("127.0.0.2", 7411)]
    assert all(isinstance(m, wire.LinkProbe) and not m.data for _, m in sent)
    # nothing measured yet: the membership address
    assert p.address_for(PEER.node_id) == PEER.addr
    answer(p, sent, 0.0, {"127.0.0.1": 0.004, "127.0.0.2": 0.0003})
    quiet[0] = False  # a request runs: the faster path is chosen but not taken yet
    p.tick(1.0)
    answer(p, net.take(), 1.0, {"127.0.0.1": 0.004, "127.0.0.2": 0.0003})
    assert p.choices[PEER.node_id].ip == "127.0.0.2"
    assert p.address_for(PEER.node_id) == PEER.addr
    quiet[0] = True
    p.tick(2.0)
    assert p.address_for(PEER.node_id) == ("127.0.0.2", 7411)
    st = p.path_status(PEER.node_id)
    assert st is not None and (st["interface"], st["kind"]) == ("slow0", ETHERNET)
    assert {o["address"]: o["up"] for o in st["options"]} == {"127.0.0.1": True,
                                                               "127.0.0.2": True}
    assert p.counters["switches"] == 1


def test_lost_probes_take_a_path_down_and_stray_echoes_are_counted() -> None:
    net = Wire()
    p = LinkProber(net, lambda: [PEER], local=LOCAL, throughput_interval=0, timeout=0.5)
    now = 0.0
    p.tick(now)
    answer(p, net.take(), now, {"127.0.0.1": 0.001, "127.0.0.2": 0.0002})
    assert p.address_for(PEER.node_id)[0] == "127.0.0.1"  # applied before any measurement
    for _ in range(MAX_LOST + 1):  # 127.0.0.2 answers no more
        now += 1.0
        p.tick(now)
        answer(p, net.take(), now, {"127.0.0.1": 0.001})
    assert p.choices[PEER.node_id].ip == "127.0.0.1"
    assert p.measures[(PEER.node_id, "127.0.0.2")].lost >= MAX_LOST
    p.receive(wire.LinkEcho(12345, 0), PEER.node_id, PEER.addr, now)
    p.receive(wire.LinkEcho(0, 0), "someone else", PEER.addr, now)
    assert p.counters["stray_echoes"] == 2


def test_a_probe_is_echoed_to_where_it_came_from() -> None:
    net = Wire()
    p = LinkProber(net, lambda: [], local=LOCAL)
    p.receive(wire.LinkProbe(77, b"x" * 1000), "a" * 16, ("10.0.0.9", 4000), 0.0)
    assert net.take() == [(("10.0.0.9", 4000), wire.LinkEcho(77, 1000))]


def test_a_gone_peer_takes_its_measurements_along() -> None:
    net, peers = Wire(), [PEER]
    p = LinkProber(net, lambda: peers, local=LOCAL, throughput_interval=0)
    p.tick(0.0)
    answer(p, net.take(), 0.0, {"127.0.0.1": 0.001})
    peers.clear()
    p.tick(1.0)
    assert p.measures == {} and p.address_for(PEER.node_id) is None
    assert p.path_status(PEER.node_id) is None


def test_a_throughput_probe_once_a_path_answers_and_only_while_quiet() -> None:
    net, quiet = Wire(), [False]
    p = LinkProber(net, lambda: [PEER], local=LOCAL, quiet=lambda: quiet[0],
                   throughput_interval=60.0, throughput_bytes=1 << 20)
    p.tick(0.0)
    answer(p, net.take(), 0.0, {"127.0.0.1": 0.001})
    p.tick(1.0)  # busy: no throughput probe
    sent = net.take()
    assert all(not m.data for _, m in sent)
    answer(p, sent, 1.0, {"127.0.0.1": 0.001})
    quiet[0] = True
    p.tick(2.0)  # quiet: one, to the path that answers
    bulk = [(a, m) for a, m in net.take() if m.data]
    assert [a for a, _ in bulk] == [("127.0.0.1", 7411)]
    (addr, probe), = bulk
    p.receive(wire.LinkEcho(probe.nonce, 1 << 20), PEER.node_id, addr, 2.0 + 0.011)
    m = p.measures[(PEER.node_id, "127.0.0.1")]
    assert m.throughput == pytest.approx((1 << 20) / 0.010, rel=1e-6)  # less the round trip
    p.tick(3.0)
    assert not any(m.data for _, m in net.take())  # not again before throughput_interval


# ----------------------------------------------------------------------- real sockets
class DelayProxy:
    """A userspace TCP proxy that holds every chunk back ``delay`` seconds each way (a slow
    link). It listens on ``front`` and connects to ``target`` from ``source_ip`` (so the
    target sees the traffic come from another address of the client, as over a second
    interface)."""

    def __init__(self, front: tuple[str, int], target: tuple[str, int], source_ip: str,
                 delay: float) -> None:
        self.front, self.target, self.source_ip, self.delay = front, target, source_ip, delay
        self.server: asyncio.base_events.Server | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, *self.front)

    async def _client(self, r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        r2, w2 = await asyncio.open_connection(*self.target, local_addr=(self.source_ip, 0))
        for r, w in ((r1, w2), (r2, w1)):
            t = asyncio.get_running_loop().create_task(self._pipe(r, w))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await r.read(1 << 16):
                loop.call_later(self.delay, w.write, data)
        finally:
            loop.call_later(self.delay, w.close)

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        if self.server is not None:
            self.server.close()


class Node:
    """A transport and a prober wired as the daemon wires them."""

    def __init__(self, name: str, peers: list[Peer], **kw) -> None:
        self.name, self.inbox = name, Inbox()
        self.transport = Transport(Settings(bind_host="127.0.0.1", port=0, mdns=False),
                                   node_id=name, key=KEY, on_message=self._on_message)
        self.prober = LinkProber(lambda addr, msg: self.transport.send(addr, msg, bulk=True),
                                 lambda: peers, local=LOCAL, **kw)

    def _on_message(self, sender, addr, msg) -> None:
        if isinstance(msg, (wire.LinkProbe, wire.LinkEcho)):
            self.prober.receive(msg, sender, addr, time.monotonic())
        self.inbox.put((sender, addr, msg))


async def rounds(node: Node, n: int) -> None:
    """``n`` rounds of probes, each waiting until every probe of the round is answered."""
    for _ in range(n):
        node.prober.tick(time.monotonic())
        await node.inbox.wait(lambda _: not node.prober._pending)


@pytest.mark.parametrize("pinned", [None, "slow0"])
async def test_two_paths_one_slowed_by_a_delay_proxy(pinned: str | None) -> None:
    b = Node("beta", [])
    await b.transport.start()
    port = b.transport.local_addr[1]
    # the second path to beta: 127.0.0.2 on beta's port, 20 ms each way in userspace; beta
    # sees it come from 127.0.0.3 (alpha's "other interface")
    proxy = DelayProxy(("127.0.0.2", port), ("127.0.0.1", port), "127.0.0.3", 0.02)
    await proxy.start()
    peer = Peer("beta", "beta", ("127.0.0.1", port),
                (Advertised("127.0.0.1", "lo", LOOPBACK),
                 Advertised("127.0.0.2", "slow0", ETHERNET)))
    a = Node("alpha", [peer], pinned=pinned, throughput_bytes=1 << 20, timeout=5.0)
    await a.transport.start()
    try:
        await rounds(a, 4)
        fast = a.prober.measures[("beta", "127.0.0.1")]
        slow = a.prober.measures[("beta", "127.0.0.2")]
        assert slow.samples == fast.samples == 4 and slow.lost == fast.lost == 0
        assert slow.min_rtt is not None and slow.min_rtt >= 0.04  # both ways through the proxy
        assert fast.srtt is not None and fast.srtt < slow.min_rtt / 4
        assert fast.throughput is not None and fast.throughput > 1e6  # bytes/s
        assert slow.throughput is not None  # measured too (the proxy adds latency only)
        want = "127.0.0.2" if pinned else "127.0.0.1"
        assert a.prober.address_for("beta") == (want, port)
        st = a.prober.path_status("beta")
        assert st is not None and st["pinned"] == bool(pinned)
        assert st["interface"] == ("slow0" if pinned else "lo")
        assert {o["address"] for o in st["options"] if o["up"]} == {"127.0.0.1", "127.0.0.2"}
        # beta heard alpha by both paths, each probe once: nothing dropped as a replay
        assert b.transport.counters["replay"] == b.transport.counters["duplicate"] == 0
        assert a.transport.counters["replay"] == 0
    finally:
        await proxy.close()
        await a.transport.close()
        await b.transport.close()
