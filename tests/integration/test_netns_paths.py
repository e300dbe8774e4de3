"""Two hosts in network namespaces joined by two links, one of them slowed in userspace
(20 ms each way): each daemon measures both paths to its peer, takes the fast one unless
its user pinned an interface, says so in status, and the ring answers across them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ringd.keys import load_or_create_key
from tests.integration.rings import RING_ARGS, answers_as_mlx_lm, need_bytes, stop_daemons
from tests.net.netns import BridgeLab, DelayedLink, NetnsUnavailable

HTTP_PORT = 7412
PEER_PORT = 7411
DELAY = 0.02  # seconds, each way, on the slow link


def ringctl(host, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(host.exec([sys.executable, "-m", "ringd.cli", *args,
                                     "--port", str(HTTP_PORT)]),
                          capture_output=True, text=True, timeout=timeout)


def status_of(host) -> dict:
    r = ringctl(host, "status", "--json")
    return json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}


def peer_path(status: dict) -> dict | None:
    """The path this node measured to its one peer (None until it has one)."""
    others = [m for m in status.get("members", ()) if not m.get("self")]
    return others[0].get("path") if len(others) == 1 else None


def measured(path: dict | None, addresses: set[str]) -> bool:
    """Both of the peer's addresses measured and answering."""
    return path is not None and {o["address"] for o in path["options"]
                                 if o["up"] and o["rtt_ms"] is not None} == addresses


@pytest.mark.netns
def test_each_node_takes_the_fast_link_unless_pinned_and_the_ring_answers(
        tiny_quantized_model_dir: Path, tmp_path: Path):
    try:
        lab = BridgeLab(2).__enter__()
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces unavailable: {e}")
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    slow: DelayedLink | None = None
    try:
        try:
            slow = DelayedLink(*lab.hosts, DELAY, ifname="eth1").__enter__()
        except NetnsUnavailable as e:
            pytest.skip(str(e))
        key = tmp_path / "cluster.key"
        load_or_create_key(key)
        budget = int(need_bytes(tiny_quantized_model_dir) * 0.75) + 1  # two stages
        a, b = lab.hosts
        for i, (host, peer, pin) in enumerate(((a, b, None), (b, a, "eth1")), 1):
            log = tmp_path / f"node{i}.log"
            logs.append(log)
            args = [sys.executable, "-m", "ringd", "run", f"--state-dir={tmp_path / f'state{i}'}",
                    f"--cluster-key-file={key}", f"--model-store={tiny_quantized_model_dir.parent}",
                    f"--model={tiny_quantized_model_dir.name}", f"--node-name=node{i}",
                    "--bind-host=0.0.0.0", f"--advertise-host={host.address}",
                    f"--port={PEER_PORT}", "--http-host=127.0.0.1", f"--http-port={HTTP_PORT}",
                    f"--memory-budget={budget}", "--no-mdns", f"--peer={peer.address}:{PEER_PORT}",
                    "--link-probe-interval=0.5", *(["--data-interface", pin] if pin else []),
                    *RING_ARGS]
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(host.exec(args), stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        want = ({b.address, slow.addresses[1]}, {a.address, slow.addresses[0]})
        deadline = time.monotonic() + 90
        while True:
            s1, s2 = status_of(a), status_of(b)
            if (s1.get("ready") and s2.get("ready") and measured(peer_path(s1), want[0])
                    and measured(peer_path(s2), want[1])):
                break
            dead = [p for p in procs if p.poll() is not None]
            assert not dead and time.monotonic() < deadline, "\n".join(
                f"--- {log.name}\n" + log.read_text()[-1500:] for log in logs)
            time.sleep(0.2)

        # node1: both paths measured, the slow one at least its two delays; the fast one taken
        p1 = peer_path(s1)
        rtt = {o["address"]: o["rtt_ms"] for o in p1["options"]}
        assert rtt[slow.addresses[1]] >= 2 * DELAY * 1000
        assert rtt[b.address] < rtt[slow.addresses[1]]
        assert (p1["address"], p1["interface"], p1["pinned"]) == (b.address, "eth0", False)
        # node2, pinned to eth1, takes the slow link although it measured the fast one faster
        p2 = peer_path(s2)
        rtt2 = {o["address"]: o["rtt_ms"] for o in p2["options"]}
        assert rtt2[a.address] < rtt2[slow.addresses[0]]
        assert (p2["address"], p2["interface"], p2["pinned"]) == (slow.addresses[0], "eth1",
                                                                 True)
        # ringctl status names the path it uses
        human = ringctl(a, "status")
        assert human.returncode == 0 and "node2 via eth0 (ethernet)" in human.stdout, human.stdout
        human = ringctl(b, "status")
        assert "node1 via eth1 (ethernet)" in human.stdout and "pinned" in human.stdout, \
            human.stdout

        # and the ring, one stage on each host, answers as mlx-lm does in one process
        prompt = "What is the capital of France?"
        r = ringctl(a, "prompt", "--raw", "--json", "--max-tokens", "16", prompt, timeout=60)
        assert r.returncode == 0, r.stderr
        assert answers_as_mlx_lm(tiny_quantized_model_dir, prompt, r, 16), r.stdout
        assert len({m["layers"] and tuple(m["layers"]) for m in s1["members"]}) == 2
    finally:
        codes = stop_daemons(procs)
        if slow is not None:
            slow.close()
        lab.close()
    assert codes == [0, 0], codes
