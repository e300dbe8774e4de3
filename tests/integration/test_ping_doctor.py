"""``ringctl ping`` and ``ringctl doctor`` against real daemons on loopback.

One two-node ring of the tiny model (mDNS confined to 127.0.0.1, static peers too) for the
whole module. ping: a healthy node (what it prints is the node's own status), the same node
probed with another cluster key ("different cluster", both ids, and the node logs it), a
closed port (no answer), and the node behind a port where UDP is dropped in userspace and
TCP relayed ("UDP filtered"). doctor: the healthy ring passes; with the second node
stopped (SIGTERM) it fails on the peers, naming it. Commands run through click's runner, as a user
runs them: every outcome is a message, never a traceback.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner, Result

from ringd.cli import main
from ringd.keys import cluster_id, generate_key_file, load_key
from ringd.localring import LocalNode, LocalRing, free_port
from tests.integration.conftest import BUDGET, RING_ARGS
from tests.net.udp_blackhole import UdpFilteredFront

LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def ring(tiny_store: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[LocalRing]:
    store, name = tiny_store
    r = LocalRing(tmp_path_factory.mktemp("pingring"), [BUDGET, BUDGET], name, store,
                  mdns=True, extra_args=RING_ARGS)
    r.start()
    try:
        r.wait_ready(120)
        yield r
    finally:
        r.stop(timeout=10.0)


def config_for(ring: LocalRing, node: LocalNode, tmp_path: Path, *,
               key: Path | None = None) -> Path:
    """A ringctl config for ``node``'s machine: its key, its ports, mDNS on loopback, and
    the other nodes as static peers (as the daemon was started)."""
    peers = ", ".join(f'"{LOOPBACK}:{n.port}"' for n in ring.nodes if n is not node)
    path = tmp_path / f"ringctl-{node.name}.toml"
    path.write_text(f'state_dir = "{node.state_dir}"\n'
                    f'cluster_key_file = "{key or ring.base / "cluster.key"}"\n'
                    f"port = {node.port}\nhttp_port = {node.http_port}\n"
                    f'mdns_interfaces = ["{LOOPBACK}"]\npeers = [{peers}]\n')
    return path


def ringctl(config: Path, *args: str) -> Result:
    result = CliRunner().invoke(main, ["--config", str(config), *args])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception,
                                                                       SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def status_of(node: LocalNode) -> dict[str, Any]:
    return node.client.status()


def test_ping_a_healthy_node_prints_what_its_status_says(ring: LocalRing, tmp_path: Path) -> None:
    node = ring.nodes[0]
    st = status_of(node)
    res = ringctl(config_for(ring, ring.nodes[1], tmp_path), "ping", f"{LOOPBACK}:{node.port}",
                  "--count", "2")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert [ln.split(":")[0] for ln in lines[1:5]] == ["udp 1", "udp 2", "tcp 1", "tcp 2"]
    assert all(f"from {node.name} in " in ln for ln in lines[1:5]), lines
    me = next(m for m in st["members"] if m["self"])
    assert lines[-1] == (f"verdict: healthy: {node.name} (id {st['node']['id'][:8]}), model "
                         f"{st['model']['name']}, phase {me['phase']}, plan epoch "
                         f"{st['plan']['epoch']}, ringd {me['software_version']}")

    res = ringctl(config_for(ring, ring.nodes[1], tmp_path), "ping", f"{LOOPBACK}:{node.port}",
                  "--count", "1", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["verdict"] == "healthy"
    assert out["cluster_id"] == cluster_id(load_key(ring.base / "cluster.key"))
    assert (out["peer"]["node_id"], out["peer"]["name"], out["peer"]["epoch"]) == (
        st["node"]["id"], node.name, st["plan"]["epoch"])
    assert [p["outcome"] for p in out["probes"]] == ["answered", "answered"]
    # the prober is not a member of the ring
    assert {m["id"] for m in status_of(node)["members"]} == {m["id"] for m in st["members"]}


def test_ping_with_another_key_says_different_cluster_with_both_ids(ring: LocalRing,
                                                                     tmp_path: Path) -> None:
    node = ring.nodes[0]
    other = tmp_path / "other.key"
    ours = cluster_id(generate_key_file(other))
    ring_key = load_key(ring.base / "cluster.key")
    res = ringctl(config_for(ring, ring.nodes[1], tmp_path, key=other), "ping",
                  f"{LOOPBACK}:{node.port}", "--count", "1", "--timeout", "0.5")
    assert res.exit_code == 1, res.output
    verdict = res.output.splitlines()[-2]
    assert verdict.startswith("verdict: different cluster")
    assert f"our cluster id {ours}" in verdict and f"theirs {cluster_id(ring_key)[:8]}" in verdict
    assert ring_key.hex() not in res.output and load_key(other).hex() not in res.output
    assert "hint:" in res.output.splitlines()[-1]
    # the node saw our handshake and says so in its log
    deadline = time.monotonic() + 10
    while "another cluster's key?" not in ring.tail(node, 200):
        assert time.monotonic() < deadline, ring.tail(node, 20)
        time.sleep(0.05)


def test_ping_a_closed_port_gets_no_answer(ring: LocalRing, tmp_path: Path) -> None:
    res = ringctl(config_for(ring, ring.nodes[1], tmp_path), "ping",
                  f"{LOOPBACK}:{free_port()}", "--count", "2")
    assert res.exit_code == 1, res.output
    assert "refused: nothing listens there" in res.output
    assert "verdict: no answer: nothing listens on" in res.output and "hint:" in res.output


def test_ping_through_a_udp_filter_says_udp_filtered(ring: LocalRing, tmp_path: Path) -> None:
    node = ring.nodes[0]
    front = UdpFilteredFront((LOOPBACK, node.port))
    try:
        res = ringctl(config_for(ring, ring.nodes[1], tmp_path), "ping",
                      f"{LOOPBACK}:{front.port}", "--count", "2", "--timeout", "0.4")
    finally:
        front.close()
    assert res.exit_code == 1, res.output
    assert front.dropped == 2 and front.relayed == 2
    assert "udp 1: no answer within 0.4 s" in res.output
    assert f"tcp 1: handshake from node {status_of(node)['node']['id'][:8]}" in res.output
    assert "verdict: UDP filtered" in res.output


def doctor(ring: LocalRing, tmp_path: Path) -> dict[str, Any]:
    res = ringctl(config_for(ring, ring.nodes[0], tmp_path), "doctor", "--json",
                  "--wait", "1.5", "--timeout", "0.5")
    out = json.loads(res.output)
    assert res.exit_code == (0 if out["ok"] else 1)
    return {c["name"]: c for c in out["checks"]}


def test_doctor_passes_on_a_healthy_ring_and_names_the_stopped_node(ring: LocalRing,
                                                                     tmp_path: Path) -> None:
    node2 = ring.nodes[1]
    node2_id = status_of(node2)["node"]["id"]
    checks = doctor(ring, tmp_path)
    assert {n: c["state"] for n, c in checks.items()} == {
        "daemon": "pass", "cluster key": "pass", "addresses": "pass", "mdns": "pass",
        "peers": "pass", "local network": "skip", "metal": "skip"}, checks
    assert any(node2_id[:8] in n for n in checks["mdns"]["notes"]), checks["mdns"]
    assert len(checks["peers"]["notes"]) == 1
    assert checks["peers"]["notes"][0].startswith(f"{node2.name} at {LOOPBACK}:{node2.port} "
                                                  "(mDNS, static peer, member, alive)")

    ring.kill(node2, signal.SIGTERM)  # stopped as a service manager stops it
    checks = doctor(ring, tmp_path)
    assert checks["peers"]["state"] == "fail"
    assert checks["daemon"]["state"] in ("pass", "fail")  # node1 may be re-planning alone
    assert "1 of 1 peer not answering" in checks["peers"]["detail"]
    note = checks["peers"]["notes"][0]
    assert note.startswith(f"{node2.name} at {LOOPBACK}:{node2.port}") and "no answer" in note
    assert checks["peers"]["fix"]
