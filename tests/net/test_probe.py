"""The prober of ``ringctl ping`` / ``ringctl doctor`` on loopback, against a real transport
and membership (a node without a model: what answers a ping is the same code a daemon
runs), and against listeners that answer wrongly on purpose. Real sockets, loop guard on."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import time

import pytest

from ringd import PROTOCOL_VERSION, __version__
from ringd.config import Settings
from ringd.core import wire
from ringd.core.membership import Membership
from ringd.core.reliable import Endpoint
from ringd.core.ringmeta import NodeMeta, NodePhase
from ringd.core.seal import ReplayGuard, Sealer, cluster_id
from ringd.core.stream import TCP_HEADER, TCP_MAGIC
from ringd.core.wire import WIRE_VERSION, Gossip
from ringd.localring import free_port
from ringd.net.discovery import Discovery
from ringd.net.probe import Prober, mdns_scan, ping_report, prober_sealer
from ringd.net.transport import Transport
from ringd.ping import Channel, Outcome, Verdict
from tests.net.udp_blackhole import UdpFilteredFront

KEY = os.urandom(32)
LOOPBACK = "127.0.0.1"


class Node:
    """A transport and a membership wired as the daemon wires them (control.py's pump)."""

    def __init__(self, name: str, key: bytes = KEY) -> None:
        self.name = name
        self.key = key
        self.node_id = secrets.token_hex(8)

    async def start(self) -> "Node":
        self.transport = Transport(Settings(bind_host=LOOPBACK, port=0, mdns=False),
                                   node_id=self.node_id, key=self.key,
                                   on_message=self.on_message)
        self.addr = await self.transport.start()
        meta = NodeMeta(phase=NodePhase.SERVING, model="tiny", epoch=7,
                        software_version=__version__)
        self.membership = Membership(self.node_id, self.name, self.addr, meta.encode(),
                                     rng=random.Random(1))
        self.membership.join([], time.monotonic())
        return self

    def on_message(self, sender: str, addr: tuple[str, int], msg: wire.Message) -> None:
        if isinstance(msg, Gossip):
            self.membership.receive(msg.payload, addr, time.monotonic())
            for to, payload in self.membership.outbox():
                self.transport.send(to, Gossip(payload), reliable=False)

    async def close(self) -> None:
        await self.transport.close()


def prober(key: bytes = KEY, timeout: float = 0.5) -> Prober:
    return Prober(prober_sealer(key), timeout=timeout)


async def test_a_node_answers_with_its_record_and_the_prober_does_not_join() -> None:
    node = await Node("node-a").start()
    try:
        rep = await ping_report(prober(), "node-a", *node.addr, count=2, interval=0.0)
        assert rep.verdict is Verdict.HEALTHY, rep.summary
        assert [(p.channel, p.outcome) for p in rep.probes] == [
            (Channel.UDP, Outcome.ANSWERED)] * 2 + [(Channel.TCP, Outcome.ANSWERED)] * 2
        assert all(p.rtt is not None and 0 < p.rtt < 0.5 for p in rep.probes)
        peer = rep.peer
        assert peer is not None
        assert (peer.node_id, peer.name, peer.model, peer.phase, peer.epoch) == (
            node.node_id, "node-a", "tiny", "serving", 7)
        assert (peer.cluster_id, peer.protocol_version, peer.software_version) == (
            cluster_id(KEY), PROTOCOL_VERSION, __version__)
        assert "node-a" in rep.summary and "plan epoch 7" in rep.summary
        assert [m.node_id for m in node.membership.members()] == [node.node_id]
    finally:
        await node.close()


async def test_a_node_of_another_cluster_is_named_by_its_cluster_tag() -> None:
    node = await Node("node-a").start()
    ours = os.urandom(32)
    try:
        rep = await ping_report(prober(ours, timeout=0.3), "node-a", *node.addr, count=1)
        assert rep.verdict is Verdict.OTHER_CLUSTER, rep.summary
        udp, tcp = rep.probes
        assert udp.outcome is Outcome.SILENT  # it drops our units unread
        assert tcp.outcome is Outcome.OTHER_CLUSTER
        assert tcp.their_tag == cluster_id(KEY)[:8]
        assert cluster_id(ours) in rep.summary and cluster_id(KEY)[:8] in rep.summary
        assert KEY.hex() not in rep.summary and ours.hex() not in rep.summary
        assert node.transport.counters["wrong_cluster"] >= 2  # our UDP unit, our handshake
    finally:
        await node.close()


async def test_nothing_listening_is_refused_on_both_channels() -> None:
    port = free_port()
    rep = await ping_report(prober(), "closed", LOOPBACK, port, count=2, interval=0.0)
    assert rep.verdict is Verdict.NO_ANSWER
    assert {p.outcome for p in rep.probes} == {Outcome.REFUSED}
    assert "nothing listens" in rep.summary and rep.hint


async def test_udp_dropped_but_tcp_relayed_is_udp_filtered() -> None:
    node = await Node("node-a").start()
    front = UdpFilteredFront(node.addr)
    try:
        rep = await ping_report(prober(timeout=0.3), "front", *front.addr, count=2,
                                interval=0.0)
        assert rep.verdict is Verdict.UDP_FILTERED, rep.summary
        assert [p.outcome for p in rep.probes if p.channel is Channel.UDP] == [Outcome.SILENT] * 2
        assert front.relayed == 2 and front.dropped == 2
        assert "UDP filtered" in rep.summary and f"UDP port {front.port}" in rep.hint
    finally:
        await asyncio.to_thread(front.close)
        await node.close()


async def test_a_udp_answer_sealed_under_another_key_shows_its_tag() -> None:
    """A listener that answers every datagram with a one-shot sealed under its own key."""
    theirs = os.urandom(32)
    loop = asyncio.get_running_loop()
    sealer = Sealer(theirs, "stranger", 1)
    endpoint = Endpoint(sealer, ReplayGuard())

    class Answer(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            endpoint.send_frame(addr, b"anything", time.monotonic(), reliable=False)
            for t in endpoint.datagrams_to_send(time.monotonic()):
                self.transport.sendto(b"".join(t.iov), addr)  # type: ignore[attr-defined]

    transport, _ = await loop.create_datagram_endpoint(Answer, local_addr=(LOOPBACK, 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        probes = await prober(timeout=0.3).udp((LOOPBACK, port), count=1)
        assert probes[0].outcome is Outcome.OTHER_CLUSTER
        assert probes[0].their_tag == cluster_id(theirs)[:8]
    finally:
        transport.close()


async def serve_tcp(greeting: bytes) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, LOOPBACK, 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_tcp_answer_in_another_wire_version_says_so() -> None:
    head = TCP_HEADER.pack(100, TCP_MAGIC, WIRE_VERSION + 1, b"abcd", 1, 1)
    server, port = await serve_tcp(head + bytes(100 - TCP_HEADER.size + 4))
    try:
        rep = await ping_report(prober(timeout=0.3), "old", LOOPBACK, port, count=1)
        assert rep.verdict is Verdict.OTHER_VERSION, rep.summary
        assert rep.probes[1].their_wire_version == WIRE_VERSION + 1
        assert str(WIRE_VERSION + 1) in rep.summary
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("greeting", [b"SSH-2.0-OpenSSH_9.6\r\n", b""])
async def test_a_listener_that_is_not_ringd(greeting: bytes) -> None:
    server, port = await serve_tcp(greeting)
    try:
        rep = await ping_report(prober(timeout=0.3), "sshd", LOOPBACK, port, count=1)
        assert rep.verdict is Verdict.NOT_RINGD, rep.summary
        assert rep.probes[1].outcome is Outcome.NOT_RINGD
    finally:
        server.close()
        await server.wait_closed()


async def test_mdns_scan_sees_its_own_record_and_ringd_nodes_of_any_cluster() -> None:
    ours, theirs = secrets.token_hex(8), secrets.token_hex(8)
    nodes = [Discovery(secrets.token_hex(8), c, 17411, 17412, [LOOPBACK], lambda p: None)
             for c in (ours, theirs)]
    await asyncio.gather(*(d.start() for d in nodes))
    try:
        scan = await mdns_scan([LOOPBACK], wait=1.5)
    finally:
        await asyncio.gather(*(d.close() for d in nodes))
    assert scan.works, scan.detail
    found = {r.node_id: r for r in scan.records}
    assert {d.node_id for d in nodes} <= set(found)
    for d in nodes:
        r = found[d.node_id]
        assert (r.cluster_id, r.addresses, r.port) == (d.cluster_id, (LOOPBACK,), 17411)
