"""``ringctl doctor``: every check a person would otherwise make by hand when nodes do not
see each other, each with a verdict and a fix.

It gathers the facts at once (the daemon's status, the cluster key, this machine's
interfaces, an mDNS self-test and scan, a ``ringctl ping`` of every peer found by mDNS,
listed as static or known to the daemon, and on a Mac its memory facts), then judges them
with :mod:`ringd.doctor`. Exit 0 when no check fails, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from dataclasses import dataclass, field
from typing import Any

import click

from ringd.cli.common import Command, client_from, daemon_options, read_status, settings_from
from ringd.client import Client
from ringd.config import Settings
from ringd.doctor import Check, Interface, MacFacts, MdnsScan, State, passed
from ringd.errors import ExitCode, RingdError
from ringd.ping import PingReport
from ringd.status import Status

#: Most peer addresses pinged (mDNS, static and members together).
MAX_PEERS = 16


@dataclass
class Facts:
    """Everything the checks judge, as gathered."""

    settings: Settings
    where: str
    system: str
    status: Status | None = None
    status_problem: RingdError | None = None
    key: bytes | None = None
    key_problem: RingdError | None = None
    key_mode: int = 0
    interfaces: list[Interface] = field(default_factory=list)
    scan: MdnsScan | None = None
    #: (label, report) per peer address pinged; static peers that did not resolve.
    reports: list[tuple[str, PingReport]] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)
    mac: MacFacts | None = None


def _load_key(facts: Facts) -> None:
    from ringd.keys import load_key

    path = facts.settings.key_path
    try:
        facts.key = load_key(path)
        facts.key_mode = stat.S_IMODE(os.stat(path).st_mode)
    except RingdError as e:
        facts.key_problem = e
    except OSError as e:
        facts.key_problem = RingdError(f"cannot read {path}: {e.strerror or e}")


async def _status(client: Client, facts: Facts) -> None:
    try:
        facts.status = await asyncio.to_thread(read_status, client)
    except RingdError as e:
        facts.status_problem = e


def _candidates(facts: Facts, static: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """(label, ip, port) of every peer address to ping, this node's own left out."""
    st = facts.status
    self_id = st.node.id if st else None
    self_addr = st.node.addr if st else None
    found: dict[tuple[str, int], list[str]] = {}
    names: dict[tuple[str, int], tuple[int, str]] = {}  # the best name known: (rank, name)

    def add(ip: str, port: int, source: str, name: str, rank: int, node_id: str | None) -> None:
        if node_id is not None and node_id == self_id or f"{ip}:{port}" == self_addr:
            return
        key = (ip, port)
        if key not in found and len(found) >= MAX_PEERS:
            return
        found.setdefault(key, []).append(source)
        if rank > names.get(key, (-1, ""))[0]:
            names[key] = (rank, name)

    cluster = _cluster_id(facts)
    for r in facts.scan.records if facts.scan else ():
        if r.cluster_id == cluster:
            for ip in r.addresses:
                add(ip, r.port, "mDNS", f"node {r.node_id[:8]}", 1, r.node_id)
    for text, ip, port in static:
        add(ip, port, "static peer", text, 0, None)
    for m in st.members if st else ():
        if m.addr and not m.is_self:
            host, _, port = m.addr.rpartition(":")
            if port.isdigit():
                add(host, int(port), f"member, {m.state.value}", m.name or m.id[:8], 2, m.id)
    out = []
    for (ip, port), sources in found.items():
        name, where = names[(ip, port)][1], f"{ip}:{port}"
        out.append((f"{name if name == where else f'{name} at {where}'} ({', '.join(sources)})",
                    ip, port))
    return out


def _cluster_id(facts: Facts) -> str | None:
    from ringd.keys import cluster_id

    return cluster_id(facts.key) if facts.key is not None else None


async def gather(settings: Settings, client: Client, *, wait: float, timeout: float,
                 system: str | None = None) -> Facts:
    """Every fact the checks need, gathered concurrently where it can be."""
    from ringd import hostfacts
    from ringd.net.peers import parse_peer
    from ringd.net.probe import Prober, mdns_scan, ping_report, prober_sealer, resolve

    facts = Facts(settings, client.where, system or hostfacts.system())
    _load_key(facts)
    s = settings

    async def scan() -> None:
        if s.mdns:
            facts.scan = await mdns_scan(list(s.mdns_interfaces) or None, wait=wait)

    async def interfaces() -> None:
        facts.interfaces = await asyncio.to_thread(hostfacts.interfaces)

    async def mac() -> None:
        if facts.system == "Darwin":
            facts.mac = await asyncio.to_thread(hostfacts.mac_facts)

    static: list[tuple[str, str, int]] = []

    async def statics() -> None:
        for text in s.peers:
            try:
                host, port = parse_peer(text)
                static.append((text, await resolve(host, port), port))
            except RingdError:
                facts.unresolved.append(text)

    await asyncio.gather(_status(client, facts), scan(), interfaces(), mac(), statics())
    if facts.key is not None:
        prober = Prober(prober_sealer(facts.key, encrypt=s.encrypt), timeout=timeout)
        targets = _candidates(facts, static)
        reports = await asyncio.gather(*(ping_report(prober, label, ip, port, count=2,
                                                     interval=0.1)
                                         for label, ip, port in targets))
        facts.reports = [(label, r) for (label, _, _), r in zip(targets, reports)]
    return facts


def judge(facts: Facts) -> list[Check]:
    """The checks, in the order they are printed."""
    from ringd import doctor as d
    from ringd.net.peers import default_advertise

    s, st = facts.settings, facts.status
    cluster = _cluster_id(facts)
    stats: dict[str, Any] = st.stats if st is not None else {}
    transport = stats.get("transport") if isinstance(stats.get("transport"), dict) else {}
    discovery = stats.get("discovery") if isinstance(stats.get("discovery"), dict) else None
    if st is not None:
        advertised, source = st.node.addr, "as the daemon says"
    else:
        advertised = (f"{s.advertise_host or default_advertise(s.bind_host)}:"
                      f"{s.advertise_port or s.port}")
        source = "from the config: the daemon does not answer"
    peer_hosts = [r.host for _, r in facts.reports]
    me = next((m for m in st.members if m.is_self), None) if st is not None else None
    budget, budget_from = ((me.usable_memory, "the memory this node offers")
                           if me is not None and me.usable_memory
                           else (s.memory_budget, "memory_budget"))
    checks = [
        d.check_daemon(st, facts.status_problem, facts.where),
        d.check_key(facts.key_problem, str(s.key_path), cluster, facts.key_mode,
                    daemon_cluster_id=transport.get("cluster_id") if transport else None,
                    scan=facts.scan, reports=facts.reports,
                    self_id=st.node.id if st else None),
        d.check_addresses(advertised, explicit=s.advertise_host is not None,
                          interfaces=facts.interfaces, peer_hosts=peer_hosts, source=source,
                          record=next((r for r in facts.scan.records
                                       if st is not None and r.node_id == st.node.id), None)
                          if facts.scan else None),
        d.check_mdns(s.mdns, facts.scan, interfaces=s.mdns_interfaces, static_peers=s.peers,
                     self_id=st.node.id if st else None, cluster_id=cluster,
                     macos=facts.system == "Darwin"),
        d.check_peers(facts.reports, unresolved=facts.unresolved,
                      skipped=None if facts.key is not None
                      else "needs the cluster key to seal its probes"),
        d.check_local_network(facts.system, facts.scan if s.mdns else None, cluster_id=cluster,
                              self_id=st.node.id if st else None, daemon_discovery=discovery),
        d.check_metal(facts.system, facts.mac, budget, budget_from),
    ]
    return checks


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks) + 2
    lines = []
    for c in checks:
        lines.append(f"{c.state.value.upper():<5} {c.name:<{width}}{c.detail}")
        pad = " " * (6 + width)
        lines += [f"{pad}- {n}" for n in c.notes]
        if c.fix and c.state is State.FAIL:
            lines.append(f"{pad}fix: {c.fix}")
    failed = sum(c.state is State.FAIL for c in checks)
    lines.append(f"{failed} check{'s' if failed != 1 else ''} failed" if failed
                 else "all checks passed")
    return "\n".join(lines)


@click.command(cls=Command)
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.option("--wait", type=click.FloatRange(0.5, 60), default=3.0, show_default=True,
              help="Seconds to listen to mDNS.")
@click.option("--timeout", type=click.FloatRange(0.05, 60), default=1.0, show_default=True,
              help="Seconds to wait for each ping answer.")
@daemon_options
@click.pass_context
def doctor(ctx: click.Context, as_json: bool, wait: float, timeout: float, host: str | None,
           port: int | None) -> None:
    """Say why this node does not see its peers: every check, a verdict and a fix.

    Checks that the daemon runs and serves; the cluster key (present, mode 0600, the same
    cluster id as the daemon and the peers); the address peers reach this node at; that
    mDNS works here (a record published on the configured interfaces is seen back) and
    which ringd nodes it shows; that every peer (mDNS, static, known to the daemon) answers
    `ringctl ping`; on a Mac, the Local Network permission and Metal's working set against
    the memory offered. Exit 0 when every check passes, 1 otherwise.
    """
    s = settings_from(ctx, http_host=host, http_port=port)
    client = client_from(ctx, host, port)
    facts = asyncio.run(gather(s, client, wait=wait, timeout=timeout))
    checks = judge(facts)
    if as_json:
        click.echo(json.dumps({"ok": passed(checks), "checks": [c.to_json() for c in checks]},
                              indent=2, sort_keys=True))
    else:
        click.echo(render(checks))
    raise SystemExit(int(ExitCode.OK if passed(checks) else ExitCode.FAILURE))
