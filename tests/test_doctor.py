"""The checks of ``ringctl doctor`` (ringd.doctor, pure) with the facts of any machine passed
in -- a Mac's included (Metal's working set, the Local Network symptom), here on Linux.
Statuses are ones a node builds (tests/statuses.py); ping reports come from ringd.ping's
judge. Real daemons: tests/integration/test_ping_doctor.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from ringd.cli import main

from ringd.cli.doctor import render
from ringd.doctor import (
    Check,
    Interface,
    MacFacts,
    MdnsScan,
    Record,
    State,
    check_addresses,
    check_daemon,
    check_key,
    check_local_network,
    check_mdns,
    check_metal,
    check_peers,
    passed,
)
from ringd.errors import ConfigError, DaemonNotRunning
from ringd.keys import generate_key_file
from ringd.localring import free_port
from ringd.ping import Channel, Outcome, PeerAnswer, Probe, judge
from tests.statuses import node_status, plan_of, ring_members

GIB = 1024**3
OURS = "0123456789abcdef"
THEIRS = "a1b2c3d4e5f60718"
LAN = Interface("en0", (("192.168.1.10", 24), ("fe80::1%en0", 64)))
VPN = Interface("utun3", (("10.8.0.2", 32),))
LO = Interface("lo0", (("127.0.0.1", 8), ("::1", 128)))


def healthy(host: str = "192.168.1.20", cluster: str = OURS):
    a = PeerAnswer(node_id="fedcba9876543210", protocol_version=2, name="mac2",
                   addr=f"{host}:7411", phase="serving", model="tiny", epoch=3)
    hs = PeerAnswer(node_id="fedcba9876543210", protocol_version=2, cluster_id=cluster)
    return judge(host, host, 7411, OURS, [Probe(Channel.UDP, 1, Outcome.ANSWERED, 0.001, answer=a),
                                          Probe(Channel.TCP, 1, Outcome.ANSWERED, 0.001,
                                                answer=hs)])


def silent(host: str = "192.168.1.30"):
    return judge(host, host, 7411, OURS, [Probe(Channel.UDP, 1, Outcome.SILENT),
                                          Probe(Channel.TCP, 1, Outcome.SILENT)])


def other_cluster(host: str = "192.168.1.40"):
    return judge(host, host, 7411, OURS, [Probe(Channel.TCP, 1, Outcome.OTHER_CLUSTER,
                                                their_tag=THEIRS[:8])])


# ------------------------------------------------------------------------------ daemon
def test_daemon_not_running_fails_with_how_to_start_it() -> None:
    c = check_daemon(None, DaemonNotRunning("nothing at 127.0.0.1:7412"), "127.0.0.1:7412")
    assert c.state is State.FAIL and "no ringd answers at 127.0.0.1:7412" in c.detail
    assert "ringd run" in (c.fix or "")


def test_daemon_ready_passes_and_not_ready_says_why() -> None:
    members = ring_members()
    c = check_daemon(node_status(members, plan_of(members)), None, "127.0.0.1:7412")
    assert c.state is State.PASS and "alpha (id a1) at 127.0.0.1:7412 serves" in c.detail
    assert "plan epoch 3" in c.detail
    st = node_status(members, plan_of(members), serving=False, reason="waiting for peers")
    c = check_daemon(st, None, "127.0.0.1:7412")
    assert c.state is State.FAIL and "waiting for peers" in c.detail


# --------------------------------------------------------------------------------- key
def test_key_problem_is_the_key_loaders_message_and_hint() -> None:
    err = ConfigError("cluster key file /k can be read by other users (mode 0644)",
                      hint="run `chmod 600 /k`")
    c = check_key(err, "/k", None, 0o644, daemon_cluster_id=None, scan=None, reports=[])
    assert (c.state, c.detail, c.fix) == (State.FAIL, err.message, err.hint)


def test_key_passes_when_daemon_and_peers_share_the_cluster_id() -> None:
    scan = MdnsScan(True, "ok", (Record("me", OURS, ("192.168.1.10",), 7411),
                                 Record("n2", OURS, ("192.168.1.20",), 7411)))
    c = check_key(None, "/k", OURS, 0o600, daemon_cluster_id=OURS, scan=scan,
                  reports=[("mac2", healthy())], self_id="me")
    assert c.state is State.PASS
    assert "mode 0600" in c.detail and "the daemon and 2 other nodes" in c.detail


@pytest.mark.parametrize("case", ["daemon", "mdns", "ping"])
def test_key_fails_on_any_other_cluster_id(case: str) -> None:
    scan = MdnsScan(True, "ok", (Record("n3", THEIRS, ("192.168.1.40",), 7411),)
                    if case == "mdns" else ())
    c = check_key(None, "/k", OURS, 0o600, daemon_cluster_id=THEIRS if case == "daemon" else OURS,
                  scan=scan, reports=[("mac4", other_cluster())] if case == "ping" else [])
    assert c.state is State.FAIL and c.fix
    assert {"daemon": THEIRS, "mdns": THEIRS, "ping": "another cluster key"}[case] in c.detail


# --------------------------------------------------------------------------- addresses
def test_the_lan_address_passes() -> None:
    c = check_addresses("192.168.1.10:7411", explicit=False, interfaces=[LO, LAN, VPN],
                        peer_hosts=["192.168.1.20"], source="as the daemon says")
    assert c.state is State.PASS and "on en0" in c.detail
    assert c.notes == ("interfaces: lo0 127.0.0.1/8, ::1/128; en0 192.168.1.10/24, "
                       "fe80::1%en0/64; utun3 10.8.0.2/32",)


def test_a_vpn_address_while_peers_are_on_the_lan_fails_and_names_the_right_one() -> None:
    c = check_addresses("10.8.0.2:7411", explicit=False, interfaces=[LO, LAN, VPN],
                        peer_hosts=["192.168.1.20"], source="as the daemon says")
    assert c.state is State.FAIL and "on utun3" in c.detail and "en0" in c.detail
    assert 'advertise_host = "192.168.1.10"' in (c.fix or "")


def test_the_mdns_record_of_this_node_is_shown() -> None:
    c = check_addresses("192.168.1.10:7411", explicit=False, interfaces=[LAN], peer_hosts=[],
                        source="s", record=Record("me", OURS, ("192.168.1.10", "10.8.0.2"), 7411))
    assert c.notes[1] == "its mDNS record gives 192.168.1.10,10.8.0.2:7411"


def test_a_vpn_address_alone_passes_with_a_note() -> None:
    c = check_addresses("10.8.0.2:7411", explicit=False, interfaces=[LO, LAN, VPN],
                        peer_hosts=[], source="as the daemon says")
    assert c.state is State.PASS and "VPN or virtual" in c.detail


def test_loopback_is_fine_for_a_local_ring_not_for_remote_peers() -> None:
    local = check_addresses("127.0.0.1:7411", explicit=False, interfaces=[LO, LAN],
                            peer_hosts=["127.0.0.1"], source="s")
    assert local.state is State.PASS and "only nodes on this machine" in local.detail
    remote = check_addresses("127.0.0.1:7411", explicit=False, interfaces=[LO, LAN],
                             peer_hosts=["192.168.1.20"], source="s")
    assert remote.state is State.FAIL and 'advertise_host = "192.168.1.10"' in (remote.fix or "")


def test_an_address_this_machine_no_longer_has() -> None:
    stale = check_addresses("192.168.7.7:7411", explicit=False, interfaces=[LO, LAN],
                            peer_hosts=[], source="s")
    assert stale.state is State.FAIL and "not an address of this machine" in stale.detail
    forwarded = check_addresses("203.0.113.5:7411", explicit=True, interfaces=[LO, LAN],
                                peer_hosts=[], source="s")
    assert forwarded.state is State.PASS


# -------------------------------------------------------------------------------- mDNS
def test_mdns_off_needs_static_peers() -> None:
    off = dict(interfaces=(), self_id=None, cluster_id=OURS, macos=False)
    assert check_mdns(False, None, static_peers=(), **off).state is State.FAIL  # type: ignore[arg-type]
    assert check_mdns(False, None, static_peers=("h:1",), **off).state is State.PASS  # type: ignore[arg-type]


def test_mdns_that_does_not_see_its_own_record_fails_and_on_a_mac_names_the_pane() -> None:
    scan = MdnsScan(False, "a record published on all interfaces was not seen back within 3 s")
    linux = check_mdns(True, scan, interfaces=(), static_peers=(), self_id=None,
                       cluster_id=OURS, macos=False)
    mac = check_mdns(True, scan, interfaces=(), static_peers=(), self_id=None,
                     cluster_id=OURS, macos=True)
    assert linux.state is mac.state is State.FAIL
    assert "Local Network" not in (linux.fix or "") and "Local Network" in (mac.fix or "")


def test_mdns_lists_what_it_shows() -> None:
    scan = MdnsScan(True, "seen back in 4 ms", (Record("me00000000", OURS, ("10.0.0.1",), 7411),
                                                Record("n3", THEIRS, ("10.0.0.3",), 7411)), 1)
    c = check_mdns(True, scan, interfaces=("10.0.0.1",), static_peers=(), self_id="me00000000",
                   cluster_id=OURS, macos=False)
    assert c.state is State.PASS and "1 other ringd node" in c.detail and "1 malformed" in c.detail
    assert c.notes == ("ringd node me000000 at 10.0.0.1:7411 (this node)",
                       f"ringd node n3 at 10.0.0.3:7411 of another cluster ({THEIRS})")


# ------------------------------------------------------------------------------- peers
def test_peers() -> None:
    assert check_peers([]).state is State.FAIL
    assert check_peers([], skipped="needs the key").state is State.SKIP
    ok = check_peers([("mac2", healthy())])
    assert ok.state is State.PASS and ok.notes[0].startswith("mac2: healthy: mac2")
    bad = check_peers([("mac2", healthy()), ("mac3", silent())], unresolved=["nowhere:7411"])
    assert bad.state is State.FAIL and "2 of 3" in bad.detail
    assert (bad.fix or "").startswith("mac3: a firewall")
    assert "static peer nowhere:7411: its name does not resolve" in bad.notes


# --------------------------------------------------------------- macOS, facts passed in
def test_local_network_symptom_only_on_a_mac() -> None:
    scan = MdnsScan(True, "ok", (Record("n2", OURS, ("192.168.1.20",), 7411),))
    kw = dict(cluster_id=OURS, self_id="me")
    assert check_local_network("Linux", scan, daemon_discovery={"found": 0},
                               **kw).state is State.SKIP  # type: ignore[arg-type]
    blind = check_local_network("Darwin", scan, daemon_discovery={"found": 0}, **kw)  # type: ignore[arg-type]
    assert blind.state is State.FAIL and "Local Network" in (blind.fix or "")
    sees = check_local_network("Darwin", scan, daemon_discovery={"found": 1}, **kw)  # type: ignore[arg-type]
    assert sees.state is State.PASS
    alone = check_local_network("Darwin", MdnsScan(True, "ok", (), 0, ("_airplay._tcp.local.",)),
                                daemon_discovery={"found": 0}, **kw)  # type: ignore[arg-type]
    assert alone.state is State.PASS  # printers only: nothing ringd could have missed
    terminal = check_local_network("Darwin", MdnsScan(False, "not seen back"),
                                   daemon_discovery=None, **kw)  # type: ignore[arg-type]
    assert terminal.state is State.FAIL and "terminal" in (terminal.fix or "")


def test_metal_budget_against_the_working_set() -> None:
    mac = MacFacts(memsize=32 * GIB, wired_limit_mb=0, working_set=int(21.3 * GIB))
    assert check_metal("Linux", mac, 30 * GIB, "memory_budget").state is State.SKIP
    fits = check_metal("Darwin", mac, 20 * GIB, "memory_budget")
    assert fits.state is State.PASS and "the default limit" in fits.detail
    over = check_metal("Darwin", mac, 28 * GIB, "memory_budget")
    assert over.state is State.FAIL and "memory_budget 28.0 GiB" in over.detail
    assert "sudo sysctl iogpu.wired_limit_mb=28672" in (over.fix or "")
    beyond_ram = check_metal("Darwin", mac, 40 * GIB, "memory_budget")
    assert beyond_ram.state is State.FAIL and "sysctl" not in (beyond_ram.fix or "")
    raised = MacFacts(memsize=32 * GIB, wired_limit_mb=28672, working_set=None)
    assert check_metal("Darwin", raised, 28 * GIB, "memory_budget").state is State.PASS
    unknown = MacFacts(memsize=32 * GIB, wired_limit_mb=0, working_set=None)
    assert check_metal("Darwin", unknown, 28 * GIB, "memory_budget").state is State.SKIP
    assert check_metal("Darwin", mac, None, "memory_budget").state is State.PASS


def test_render_and_exit_rule() -> None:
    checks = [Check("daemon", State.PASS, "fine"),
              Check("peers", State.FAIL, "1 of 1", "do this", ("mac2: no answer",)),
              Check("metal", State.SKIP, "macOS only")]
    assert not passed(checks) and passed([checks[0], checks[2]])
    assert render(checks).splitlines() == [
        "PASS  daemon  fine",
        "FAIL  peers   1 of 1",
        "              - mac2: no answer",
        "              fix: do this",
        "SKIP  metal   macOS only",
        "1 check failed",
    ]


# ---------------------------------------------------------------- the command, no daemon
def doctor_cli(tmp_path: Path, config: str) -> tuple[Result, dict[str, dict[str, Any]]]:
    path = tmp_path / "ringctl.toml"
    path.write_text(f'state_dir = "{tmp_path}"\nhttp_port = {free_port()}\nmdns = false\n'
                    + config)
    result = CliRunner().invoke(main, ["--config", str(path), "doctor", "--json",
                                       "--timeout", "0.3"])
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result, {c["name"]: c for c in json.loads(result.output)["checks"]}


def test_doctor_without_daemon_key_or_peers_says_what_to_do(tmp_path: Path) -> None:
    res, checks = doctor_cli(tmp_path, "")
    assert res.exit_code == 1
    assert {n: c["state"] for n, c in checks.items()} == {
        "daemon": "fail", "cluster key": "fail", "addresses": "pass", "mdns": "fail",
        "peers": "skip", "local network": "skip", "metal": "skip"}
    for name in ("daemon", "cluster key", "mdns"):
        assert checks[name]["detail"] and checks[name]["fix"], checks[name]
    assert checks["cluster key"]["detail"] == (f"cluster key file {tmp_path / 'cluster.key'} "
                                               "does not exist")
    assert "ringctl keygen" in checks["cluster key"]["fix"]
    assert "from the config: the daemon does not answer" in checks["addresses"]["detail"]


def test_doctor_pings_static_peers_and_names_those_that_fail(tmp_path: Path) -> None:
    generate_key_file(tmp_path / "cluster.key")
    closed = free_port()
    res, checks = doctor_cli(tmp_path, f'peers = ["no-such-host.invalid:7411", '
                                       f'"127.0.0.1:{closed}"]\n')
    assert res.exit_code == 1
    assert checks["cluster key"]["state"] == "pass" and checks["mdns"]["state"] == "pass"
    peers = checks["peers"]
    assert peers["state"] == "fail" and "2 of 2" in peers["detail"]
    assert peers["notes"] == [
        f"127.0.0.1:{closed} (static peer): no answer: nothing listens on 127.0.0.1:{closed} "
        "(the host refused UDP and TCP)",
        "static peer no-such-host.invalid:7411: its name does not resolve"]
