"""Three hosts in network namespaces on a Linux bridge find each other with mDNS alone
(no static peers), form one ring and answer a prompt through it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ringd.keys import load_or_create_key
from tests.integration.rings import RING_ARGS, answers_as_mlx_lm, need_bytes, stop_daemons
from tests.net.netns import BridgeLab, NetnsUnavailable

HTTP_PORT = 7412
PEER_PORT = 7411


def ringctl(host, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(host.exec([sys.executable, "-m", "ringd.cli", *args,
                                     "--port", str(HTTP_PORT)]),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.netns
def test_ring_across_namespaces_forms_by_mdns_and_answers(tiny_quantized_model_dir: Path,
                                                          tmp_path: Path):
    try:
        lab = BridgeLab(3).__enter__()
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces unavailable: {e}")
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        key = tmp_path / "cluster.key"
        load_or_create_key(key)
        unit = int(need_bytes(tiny_quantized_model_dir) * 1.5 / 6) + 1
        for i, host in enumerate(lab.hosts, 1):
            log = tmp_path / f"{host.name}.log"
            logs.append(log)
            args = [sys.executable, "-m", "ringd", "run", f"--state-dir={tmp_path / f'state{i}'}",
                    f"--cluster-key-file={key}", f"--model-store={tiny_quantized_model_dir.parent}",
                    f"--model={tiny_quantized_model_dir.name}", f"--node-name=host{i}",
                    "--bind-host=0.0.0.0", f"--advertise-host={host.address}",
                    f"--port={PEER_PORT}", "--http-host=127.0.0.1", f"--http-port={HTTP_PORT}",
                    f"--memory-budget={unit * i}", "--mdns", f"--mdns-interface={host.address}",
                    *RING_ARGS]
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(host.exec(args), stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + 90
        statuses: list[dict] = []
        while True:
            statuses = []
            for host in lab.hosts:
                r = ringctl(host, "status", "--json")
                statuses.append(json.loads(r.stdout) if r.stdout.strip().startswith("{") else {})
            if all(s.get("ready") for s in statuses):
                break
            dead = [p for p in procs if p.poll() is not None]
            assert not dead and time.monotonic() < deadline, "\n".join(
                f"--- {log.name}\n" + log.read_text()[-1500:] for log in logs)
            time.sleep(0.2)
        assert len({s["plan"]["hash"] for s in statuses}) == 1
        addrs = {m["addr"] for m in statuses[0]["members"]}
        assert addrs == {f"{h.address}:{PEER_PORT}" for h in lab.hosts}
        spans = sorted((a["end"] - a["start"], a["node_id"])
                       for a in statuses[0]["plan"]["assignments"])
        ids_by_budget = [s["node"]["id"] for s in statuses]  # host1..3 have budgets 1:2:3
        assert spans[-1][1] == ids_by_budget[2] and spans[0][0] <= spans[-1][0]

        prompt = "What is the capital of France?"
        r = ringctl(lab.hosts[0], "prompt", "--raw", "--json", "--max-tokens", "16", prompt,
                    timeout=60)
        assert r.returncode == 0, r.stderr
        assert answers_as_mlx_lm(tiny_quantized_model_dir, prompt, r, 16), r.stdout
    finally:
        codes = stop_daemons(procs)
        lab.close()
    assert codes == [0, 0, 0], codes
