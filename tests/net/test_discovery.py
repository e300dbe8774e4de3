"""Discovery with real zeroconf: on 127.0.0.1 in this process, and between two network
namespaces on a Linux bridge (one discovery process in each)."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from typing import Callable

import pytest
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from ringd import PROTOCOL_VERSION
from ringd.net.discovery import SERVICE_TYPE, Discovery, PeerInfo, instance_name
from tests.net.netns import BridgeLab, NetnsUnavailable

LOOPBACK = ["127.0.0.1"]


def new_id() -> str:
    return secrets.token_hex(8)


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition fed by zeroconf callbacks (checked every 20 ms), or fail."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.02)


class Collector:
    def __init__(self) -> None:
        self.found: dict[str, PeerInfo] = {}
        self.removed: list[str] = []
        self.changed = asyncio.Event()

    def on_peer(self, p: PeerInfo) -> None:
        self.found[p.node_id] = p
        self.changed.set()

    def on_removed(self, p: PeerInfo) -> None:
        self.removed.append(p.node_id)
        self.changed.set()

    async def wait_for(self, node_id: str, timeout: float = 10.0) -> PeerInfo:
        async def loop() -> PeerInfo:
            while node_id not in self.found:
                self.changed.clear()
                await self.changed.wait()
            return self.found[node_id]
        return await asyncio.wait_for(loop(), timeout)


async def test_two_nodes_find_each_other_and_see_the_goodbye() -> None:
    cluster = new_id()
    ca, cb = Collector(), Collector()
    a_id, b_id = new_id(), new_id()
    a = Discovery(a_id, cluster, 17001, 17002, LOOPBACK, ca.on_peer, ca.on_removed)
    b = Discovery(b_id, cluster, 17003, 17004, LOOPBACK, cb.on_peer, cb.on_removed)
    t0 = time.monotonic()
    await asyncio.gather(a.start(), b.start())
    try:
        pa, pb = await asyncio.gather(cb.wait_for(a_id), ca.wait_for(b_id))
        elapsed = time.monotonic() - t0
        assert pa == PeerInfo(a_id, cluster, PROTOCOL_VERSION, ("127.0.0.1",), 17001, 17002,
                              instance_name(a_id))
        assert (pb.port, pb.http_port, pb.addresses) == (17003, 17004, ("127.0.0.1",))
        assert a_id not in ca.found and b_id not in cb.found  # own record skipped
        assert a.stats().found == 1 and a.stats().peers == 1
        assert elapsed < 3, elapsed  # ~10 ms here; generous for a loaded machine
        await a.close()
        await asyncio.wait_for(_until_event(cb, lambda: a_id in cb.removed), 10)
        assert b.stats().removed == 1 and b.stats().peers == 0
    finally:
        await a.close()
        await b.close()


async def _until_event(c: Collector, cond: Callable[[], bool]) -> None:
    while not cond():
        c.changed.clear()
        await c.changed.wait()


async def test_other_cluster_protocol_and_malformed_records_are_ignored_and_counted() -> None:
    cluster = new_id()
    ca = Collector()
    a_id, b_id, stranger, old, bad = new_id(), new_id(), new_id(), new_id(), new_id()
    a = Discovery(a_id, cluster, 17011, 17012, LOOPBACK, ca.on_peer)
    b = Discovery(b_id, cluster, 17013, 17014, LOOPBACK, lambda p: None)
    other = Discovery(stranger, new_id(), 17015, 17016, LOOPBACK, lambda p: None)
    older = Discovery(old, cluster, 17017, 17018, LOOPBACK, lambda p: None,
                      protocol=PROTOCOL_VERSION + 1)
    raw = AsyncZeroconf(interfaces=LOOPBACK)
    junk = AsyncServiceInfo(SERVICE_TYPE, instance_name(bad), port=17019, parsed_addresses=LOOPBACK,
                            server=f"junk-{bad}.local.",
                            properties={"id": bad, "cluster": cluster, "proto": "one",
                                        "port": "99999"})
    nodes = [a, b, other, older]
    try:
        await asyncio.gather(*(n.start() for n in nodes), raw.async_register_service(junk))
        await ca.wait_for(b_id)

        expected = {instance_name(stranger): "ignored_other_cluster",
                    instance_name(old): "ignored_other_protocol",
                    instance_name(bad): "malformed"}
        await until(lambda: expected.items() <= a.ignored().items())
        s = a.stats()
        assert set(ca.found) == {b_id}  # stranger, old and bad never reported
        # counters agree with the ignored records (>=: other tests on this host may advertise too)
        assert s.ignored_other_cluster >= 1 and s.ignored_other_protocol >= 1, s
        assert s.malformed >= 1, s
        assert instance_name(b_id) not in a.ignored()
    finally:
        await raw.async_close()
        for n in nodes:
            await n.close()


async def test_bad_interface_is_a_clear_config_error() -> None:
    from ringd.errors import ConfigError
    # 203.0.113.77 is not an address of this host
    d = Discovery(new_id(), "c", 1, 2, ["203.0.113.77"], lambda p: None)
    with pytest.raises(ConfigError, match="mdns_interfaces|mDNS"):
        await d.start()
    await d.close()


CHILD = """
import asyncio, json, sys, time
from ringd.net.discovery import Discovery

node_id, cluster, addr, peer_id = sys.argv[1:5]

async def main():
    found = asyncio.Event()
    def on_peer(p):
        if p.node_id == peer_id:
            print(json.dumps({"event": "peer", "node": p.node_id, "addresses": list(p.addresses),
                              "port": p.port, "t": time.monotonic() - t0}), flush=True)
            found.set()
    t0 = time.monotonic()
    d = Discovery(node_id, cluster, 7411, 7412, [addr], on_peer)
    await d.start()
    print(json.dumps({"event": "started", "t": time.monotonic() - t0}), flush=True)
    await found.wait()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await d.close()
    print(json.dumps({"event": "closed", "stats": vars(d.stats())}), flush=True)

asyncio.run(main())
"""


async def _events(proc: asyncio.subprocess.Process, until_event: str, timeout: float) -> list[dict]:
    out = []
    assert proc.stdout is not None
    while not out or out[-1]["event"] != until_event:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        if not line:
            err = await proc.stderr.read() if proc.stderr else b""
            pytest.fail(f"discovery process ended early: {err.decode()[-2000:]}")
        out.append(json.loads(line))
    return out


@pytest.mark.netns
async def test_discovery_between_network_namespaces_on_a_bridge() -> None:
    try:
        lab = await asyncio.to_thread(BridgeLab(2).__enter__)  # `ip` commands: off the loop
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces unavailable: {e}")
    procs: list[asyncio.subprocess.Process] = []
    try:
        a, b = lab.hosts
        ids, cluster = [new_id(), new_id()], new_id()
        for me, host, other in ((0, a, 1), (1, b, 0)):
            procs.append(await asyncio.create_subprocess_exec(
                *host.exec([sys.executable, "-c", CHILD, ids[me], cluster, host.address,
                            ids[other]]),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE))
        results = await asyncio.gather(*(_events(p, "peer", 15) for p in procs))
        for (host, other_host, other_id, events) in ((a, b, ids[1], results[0]),
                                                     (b, a, ids[0], results[1])):
            peer = events[-1]
            assert peer["node"] == other_id and peer["addresses"] == [other_host.address], events
            assert peer["t"] < 5, events  # ~0.1 s here
            print(f"{host.name}: started {events[0]['t']:.2f} s, found {other_host.name} "
                  f"{peer['t']:.2f} s after start")
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
        closed = await asyncio.gather(*(_events(p, "closed", 15) for p in procs))
        for c in closed:
            assert c[-1]["stats"]["found"] == 1 and c[-1]["stats"]["ignored_other_cluster"] == 0
        assert [await asyncio.wait_for(p.wait(), 10) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await asyncio.to_thread(lab.close)
