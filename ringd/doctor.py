"""The checks of ``ringctl doctor``: each turns facts into a verdict and a fix. Pure.

The facts are gathered elsewhere (``ringd.cli.doctor``: the daemon's status, the key file,
this machine's interfaces, an mDNS scan, pings of the peers; :mod:`ringd.hostfacts`: the
platform seam for what only a Mac has) and passed in, so every check is tested with the
facts of any machine, a Mac's included, on any machine.

A check passes, fails (with a fix), or is skipped (it does not apply here, or what it
needs is missing: the reason says which). ``ringctl doctor`` exits 0 when none fails.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Mapping, Sequence

from ringd.errors import DaemonNotRunning, RingdError
from ringd.ping import PingReport, Verdict
from ringd.status import Status
from ringd.units import format_size

MIB = 1024 * 1024
#: Interface names of VPNs, tunnels, containers and VMs: an address there is rarely the one
#: LAN peers can reach.
VIRTUAL_INTERFACES = ("utun", "tun", "tap", "wg", "tailscale", "zt", "docker", "br-", "veth",
                      "virbr", "vboxnet", "vmnet", "bridge", "awdl", "llw", "ppp", "ipsec")
LOCAL_NETWORK_PANE = "System Settings > Privacy & Security > Local Network"
STATIC_PEERS_HINT = ("where multicast does not get through (another subnet, a VPN, Wi-Fi client "
                     "isolation, a firewall on UDP 5353), list the peers: peers = "
                     "[\"host:port\"] in the config, or --peer host:port")


class State(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    name: str
    state: State
    #: What was found (one line).
    detail: str
    #: What to do, when it fails.
    fix: str | None = None
    #: More lines worth showing (interfaces, records found, each peer).
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state.value, "detail": self.detail,
                "fix": self.fix, "notes": list(self.notes)}


def passed(checks: Sequence[Check]) -> bool:
    return not any(c.state is State.FAIL for c in checks)


# ----------------------------------------------------------------------------- facts
@dataclass(frozen=True)
class Interface:
    """A network interface of this machine and its addresses ``(ip, prefix length)``."""

    name: str
    addresses: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Record:
    """A ringd node's mDNS record, of any cluster."""

    node_id: str
    cluster_id: str
    addresses: tuple[str, ...]
    port: int


@dataclass(frozen=True)
class MdnsScan:
    """What mDNS shows from this machine (:func:`ringd.net.probe.mdns_scan`)."""

    #: A probe record published on the configured interfaces was seen back.
    works: bool
    #: Why not, or how long it took.
    detail: str
    #: ringd records (any cluster) that resolved, and those that did not parse.
    records: tuple[Record, ...] = ()
    malformed: int = 0
    #: Other DNS-SD service types seen (printers, AirPlay...): the network has Bonjour.
    service_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class MacFacts:
    """What only a Mac has (gathered by :func:`ringd.hostfacts.mac_facts`)."""

    #: Physical memory (``hw.memsize``).
    memsize: int | None = None
    #: ``sysctl iogpu.wired_limit_mb``: 0 is the default limit.
    wired_limit_mb: int | None = None
    #: Metal's recommended working set in bytes (what MLX may keep wired), from MLX.
    working_set: int | None = None


# ----------------------------------------------------------------------------- checks
def check_daemon(status: Status | None, problem: RingdError | None, where: str) -> Check:
    """Is the daemon running, and does its ring serve?"""
    name = "daemon"
    if status is None:
        if problem is None or isinstance(problem, DaemonNotRunning):
            return Check(name, State.FAIL, f"no ringd answers at {where}",
                         "start it: `ringd run`, or `ringctl service install` for a "
                         "background service; if it runs elsewhere, point ringctl at its HTTP "
                         "API with --host/--port (or http_host/http_port)")
        return Check(name, State.FAIL, f"ringd at {where}: {problem.message}", problem.hint)
    who = f"{status.node.name or '?'} (id {status.node.id[:8]})"
    if status.ready:
        model = status.model.name if status.model else "?"
        epoch = f", plan epoch {status.plan.epoch}" if status.plan else ""
        nodes = len(status.plan.assignments) if status.plan else 1
        return Check(name, State.PASS,
                     f"{who} at {where} serves {model} on a ring of {nodes} node"
                     f"{'s' if nodes != 1 else ''}{epoch}")
    return Check(name, State.FAIL, f"{who} at {where} runs but its ring does not serve: "
                 f"{status.reason or 'no reason given'}",
                 "`ringctl status` shows every node and the plan; the checks below say "
                 "whether it is the network")


def check_key(problem: RingdError | None, path: str, cluster_id: str | None, mode: int,
              *, daemon_cluster_id: str | None, scan: MdnsScan | None,
              reports: Sequence[tuple[str, PingReport]], self_id: str | None = None) -> Check:
    """Present, mode 0600, and the same cluster id as the daemon and the peers."""
    name = "cluster key"
    if problem is not None or cluster_id is None:
        return Check(name, State.FAIL, problem.message if problem else f"{path}: unreadable",
                     problem.hint if problem else None)
    problems, notes = [], []
    fix = ("every node of a ring needs the same key file: copy one (mode 0600) to "
           "cluster_key_file (default STATE_DIR/cluster.key) on each node, restart ringd there")
    if daemon_cluster_id is not None and daemon_cluster_id != cluster_id:
        problems.append(f"the daemon runs with cluster id {daemon_cluster_id}, but {path} is "
                        f"{cluster_id}")
        fix = ("ringctl reads another configuration than the daemon: run it with the daemon's "
               "(--config or RINGD_CONFIG), or restart ringd if its key file was replaced")
    foreign = [r for r in (scan.records if scan else ()) if r.cluster_id != cluster_id]
    for r in foreign:
        problems.append(f"node {r.node_id[:8]} at {_record_addr(r)} (mDNS) has cluster id "
                        f"{r.cluster_id}")
    for label, rep in reports:
        if rep.verdict is Verdict.OTHER_CLUSTER:
            problems.append(f"{label} answers under another cluster key")
    same = {r.node_id for r in (scan.records if scan else ())
            if r.cluster_id == cluster_id and r.node_id != self_id}
    same |= {rep.peer.node_id for _, rep in reports
             if rep.peer is not None and rep.peer.cluster_id == cluster_id}
    if daemon_cluster_id is not None:
        notes.append(f"the daemon's cluster id: {daemon_cluster_id}")
    if problems:
        return Check(name, State.FAIL, f"cluster id {cluster_id} ({path}); " + "; ".join(problems),
                     fix, tuple(notes))
    also = (["the daemon"] if daemon_cluster_id is not None else []) + (
        [f"{len(same)} other node{'s' if len(same) != 1 else ''}"] if same else [])
    return Check(name, State.PASS, f"{path}: mode {mode:04o}, cluster id {cluster_id}"
                 + (f", the same for {' and '.join(also)}" if also else ""), None, tuple(notes))


def _record_addr(r: Record) -> str:
    return f"{','.join(r.addresses)}:{r.port}"


def interfaces_note(interfaces: Sequence[Interface]) -> str:
    return "interfaces: " + "; ".join(
        f"{i.name} {', '.join(f'{a}/{n}' for a, n in i.addresses)}"
        for i in interfaces if i.addresses)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]").split("%")[0])
    except ValueError:
        return None


def _networks(interfaces: Sequence[Interface]) -> list[tuple[Interface, str, Any]]:
    out = []
    for i in interfaces:
        for addr, prefix in i.addresses:
            try:
                out.append((i, addr, ipaddress.ip_network(f"{addr.split('%')[0]}/{prefix}",
                                                          strict=False)))
            except ValueError:
                continue
    return out


def check_addresses(advertised: str | None, *, explicit: bool, interfaces: Sequence[Interface],
                    peer_hosts: Sequence[str], source: str,
                    record: Record | None = None) -> Check:
    """The address peers use to reach this node (``advertised``, host:port, as the daemon
    says or ``source`` tells where it came from): is it this machine's, and on the network
    its peers are on? ``record``: this node's mDNS record, whose addresses peers that find
    it by mDNS try."""
    name = "addresses"
    notes = (interfaces_note(interfaces),) + (
        (f"its mDNS record gives {_record_addr(record)}",) if record is not None else ())
    if advertised is None:
        return Check(name, State.SKIP, "the address this node advertises is not known", None,
                     notes)
    host = advertised.rpartition(":")[0]
    ip = _ip(host)
    where = f"peers reach this node at {advertised} ({source})"
    if ip is None:
        return Check(name, State.PASS, f"{where}: a name, resolved by each peer", None, notes)
    remote = sorted({str(p) for h in peer_hosts if (p := _ip(h)) is not None
                     and not p.is_loopback and not p.is_unspecified})
    nets = _networks(interfaces)
    on_peers_net = [(i, a) for i, a, net in nets
                    if not net.network_address.is_loopback
                    and any(ipaddress.ip_address(r) in net for r in remote)]
    suggest = (f" (on their network this machine is {on_peers_net[0][1]}: "
               f"advertise_host = \"{on_peers_net[0][1]}\")" if on_peers_net else "")
    if ip.is_loopback:
        if remote:
            return Check(name, State.FAIL, f"{where}, a loopback address: nodes on other "
                         f"machines ({', '.join(remote)}) cannot reach it",
                         f"set advertise_host to this machine's address on its peers' "
                         f"network{suggest}", notes)
        return Check(name, State.PASS, f"{where}: loopback, so only nodes on this machine "
                     "can reach it", None, notes)
    mine = [(i, net) for i, a, net in nets if _ip(a) == ip]
    if not mine:
        if explicit:
            return Check(name, State.PASS, f"{where}: set by advertise_host, not an address "
                         "of this machine (a forwarded port?)", None, notes)
        return Check(name, State.FAIL, f"{where}, which is not an address of this machine "
                     "(any more: a new DHCP lease, a VPN that went down?)",
                     "restart ringd (it picks its address when it starts), or set "
                     f"advertise_host{suggest}", notes)
    iface, net = mine[0]
    virtual = iface.name.lower().startswith(VIRTUAL_INTERFACES)
    if remote and not any(ipaddress.ip_address(r) in net for r in remote) and on_peers_net:
        better, addr = on_peers_net[0]
        return Check(name, State.FAIL, f"{where}, on {iface.name}, but its peers "
                     f"({', '.join(remote)}) are on {better.name}",
                     f"set advertise_host = \"{addr}\" (ringd picked the first address it "
                     "found)", notes)
    note = ": a VPN or virtual interface, peers must reach it there" if virtual else ""
    return Check(name, State.PASS, f"{where}, on {iface.name}{note}", None, notes)


def check_mdns(enabled: bool, scan: MdnsScan | None, *, interfaces: Sequence[str],
               static_peers: Sequence[str], self_id: str | None, cluster_id: str | None,
               macos: bool) -> Check:
    """Does mDNS work on the configured interfaces, and which ringd nodes does it show?"""
    name = "mdns"
    where = ", ".join(interfaces) if interfaces else "all interfaces"
    if not enabled:
        if static_peers:
            return Check(name, State.PASS, f"off (mdns = false); static peers: "
                         f"{', '.join(static_peers)}")
        return Check(name, State.FAIL, "mDNS is off and no static peer is listed: this node "
                     "has no way to find peers",
                     "set mdns = true, or list peers = [\"host:port\"] in the config")
    if scan is None:
        return Check(name, State.SKIP, "not scanned")
    if not scan.works:
        fix = (f"multicast does not get through on {where}: "
               + (f"allow Local Network access for this terminal ({LOCAL_NETWORK_PANE}); "
                  if macos else "")
               + "check mdns_interfaces; " + STATIC_PEERS_HINT)
        return Check(name, State.FAIL, f"mDNS does not work here: {scan.detail}", fix)
    notes = tuple(f"ringd node {r.node_id[:8]} at {_record_addr(r)}"
                  + (" (this node)" if r.node_id == self_id else "")
                  + ("" if cluster_id is None or r.cluster_id == cluster_id
                     else f" of another cluster ({r.cluster_id})") for r in scan.records)
    others = [r for r in scan.records if r.node_id != self_id]
    found = (f"it shows {len(others)} other ringd node{'s' if len(others) != 1 else ''}"
             if others else "it shows no other ringd node")
    extra = f"; {scan.malformed} malformed ringd records" if scan.malformed else ""
    return Check(name, State.PASS, f"works on {where} ({scan.detail}); {found}{extra}", None,
                 notes)


def check_peers(reports: Sequence[tuple[str, PingReport]], *, unresolved: Sequence[str] = (),
                skipped: str | None = None) -> Check:
    """Does every peer found (mDNS, static, or known to the daemon) answer ``ringctl ping``?
    ``unresolved``: static peers whose names do not resolve; ``skipped``: why no peer could
    be pinged at all."""
    name = "peers"
    if skipped is not None:
        return Check(name, State.SKIP, skipped)
    notes = tuple(f"{label}: {rep.summary}" for label, rep in reports)
    notes += tuple(f"static peer {text}: its name does not resolve" for text in unresolved)
    if not reports and not unresolved:
        return Check(name, State.FAIL, "no peer to try: mDNS shows no other ringd node, no "
                     "static peer is listed, and the daemon knows none",
                     "start ringd on the other machines (same cluster key); " + STATIC_PEERS_HINT)
    bad = [(label, rep) for label, rep in reports if not rep.healthy]
    total = len(reports) + len(unresolved)
    if bad or unresolved:
        fix = (f"{bad[0][0]}: {bad[0][1].hint}" if bad and bad[0][1].hint
               else "fix the name in peers, or give the node's IP address")
        return Check(name, State.FAIL, f"{len(bad) + len(unresolved)} of {total} peer"
                     f"{'s' if total != 1 else ''} not answering as a ring peer should", fix,
                     notes)
    return Check(name, State.PASS, f"{total} peer{'s answer' if total != 1 else ' answers'} "
                 "over UDP and TCP", None, notes)


def check_local_network(system: str, scan: MdnsScan | None, *, cluster_id: str | None,
                        self_id: str | None, daemon_discovery: Mapping[str, Any] | None) -> Check:
    """macOS: the symptom of a Local Network permission not granted to ringd -- its mDNS finds
    nothing while this terminal sees ringd nodes of its cluster."""
    name = "local network"
    if system != "Darwin":
        return Check(name, State.SKIP, "macOS only (the Local Network permission)")
    if scan is None:
        return Check(name, State.SKIP, "mDNS is off")
    if not scan.works:
        return Check(name, State.FAIL, "mDNS from this terminal does not even see its own "
                     "record: on a Mac the usual cause is Local Network access not granted",
                     f"{LOCAL_NETWORK_PANE}: allow your terminal app and ringd, then run "
                     "`ringctl doctor` again")
    peers = [r for r in scan.records if r.node_id != self_id and r.cluster_id == cluster_id]
    if daemon_discovery is None:
        return Check(name, State.SKIP, "the daemon's mDNS counters are not known (is it "
                     "running with mdns on?)")
    if not daemon_discovery.get("found") and peers:
        return Check(name, State.FAIL, f"ringd's mDNS has found no peer, while this terminal "
                     f"sees {len(peers)} node{'s' if len(peers) != 1 else ''} of its cluster: "
                     "the symptom of Local Network access not granted to ringd",
                     f"{LOCAL_NETWORK_PANE}: allow ringd (for the service, the Python that "
                     "runs it), then restart it (the service: `launchctl kickstart -k "
                     "gui/$(id -u)/org.ringd.ringd`)")
    what = ("ringd's mDNS finds peers" if daemon_discovery.get("found")
            else "no other node of this cluster to find")
    return Check(name, State.PASS, f"no symptom: {what}")


def check_metal(system: str, facts: MacFacts | None, budget: int | None, source: str) -> Check:
    """macOS: the memory this node offers (``budget``, from ``source``) against the most
    Metal lets MLX keep wired."""
    name = "metal"
    if system != "Darwin":
        return Check(name, State.SKIP, "macOS only (Metal's working-set limit)")
    if facts is None or not (facts.working_set or facts.wired_limit_mb):
        return Check(name, State.SKIP, "Metal's working set could not be read (is MLX "
                     "installed with Metal?)")
    limit = facts.working_set or (facts.wired_limit_mb or 0) * MIB
    how = (f"iogpu.wired_limit_mb = {facts.wired_limit_mb}" if facts.wired_limit_mb
           else "the default limit")
    ram = f" of {format_size(facts.memsize)} RAM" if facts.memsize else ""
    if budget is None:
        return Check(name, State.PASS, f"Metal's working set is {format_size(limit)}{ram} "
                     f"({how}); the memory offered is measured within it")
    if budget <= limit:
        return Check(name, State.PASS, f"{source} {format_size(budget)} fits Metal's working "
                     f"set {format_size(limit)}{ram} ({how})")
    want_mb = -(-budget // MIB)
    raise_it = (f", or raise the limit: sudo sysctl iogpu.wired_limit_mb={want_mb} (until the "
                "next reboot)" if facts.memsize is None or want_mb * MIB < facts.memsize
                else "")
    return Check(name, State.FAIL, f"{source} {format_size(budget)} is more than Metal's "
                 f"working set {format_size(limit)}{ram} ({how}): MLX cannot keep more wired, "
                 "so layers planned beyond it will not fit",
                 f"lower memory_budget to {format_size(limit)} or less{raise_it}")
