"""What ``ringctl ping`` saw, and the one verdict it draws. Pure: no sockets, no clock.

:mod:`ringd.net.probe` sends the probes and records one :class:`Probe` per probe: over UDP
the real membership ping (a sealed one-shot unit carrying ``Gossip(Ping)``), over TCP a
connection and the handshake a node sends on every connection. :func:`judge` turns them
into a :class:`PingReport` whose :class:`Verdict` tells the usual reasons apart:

- nothing answers at all (nothing listens there, a firewall, a wrong address);
- the answer is sealed under another cluster key (both cluster ids are named: ours in
  full, theirs as far as the clear header of their frames shows it, 8 hex digits);
- a node of another ringd version;
- TCP answers but UDP does not (UDP filtered), or the other way round;
- something that is not ringd listens on that port;
- healthy: the node's name, model, phase and plan epoch, from its own record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from ringd import PROTOCOL_VERSION
from ringd.core.ringmeta import NodeMeta
from ringd.core.swim_wire import Member
from ringd.core.wire import WIRE_VERSION
from ringd.errors import RemoteProtocolError


class Channel(StrEnum):
    UDP = "udp"
    TCP = "tcp"


class Outcome(StrEnum):
    """What one probe got back."""

    #: An authenticated answer (UDP: the node's Ack; TCP: its handshake).
    ANSWERED = "answered"
    #: Nothing came back in time.
    SILENT = "silent"
    #: The host said nothing listens there (ICMP port unreachable; TCP reset).
    REFUSED = "refused"
    #: This machine could not send at all (no route, network down); ``detail`` says why.
    UNREACHABLE = "unreachable"
    #: An answer sealed under another cluster key (another cluster tag, or a bad tag).
    OTHER_CLUSTER = "other_cluster"
    #: An answer in another wire format version.
    OTHER_VERSION = "other_version"
    #: A TCP listener that does not speak ringd (or closed without a handshake).
    NOT_RINGD = "not_ringd"


@dataclass(frozen=True)
class PeerAnswer:
    """Who answered, as its own authenticated record says."""

    node_id: str
    protocol_version: int
    name: str = ""
    #: host:port the node gives as its own (its membership address).
    addr: str | None = None
    software_version: str = ""
    #: From the TCP handshake (the full id: the handshake is authenticated).
    cluster_id: str | None = None
    phase: str | None = None
    model: str | None = None
    #: The plan epoch the node proposes, or the committed plan's once committed.
    epoch: int | None = None
    plan_hash: str | None = None
    #: Why its metadata could not be read (another version?), if it could not.
    meta_problem: str | None = None


@dataclass(frozen=True)
class Probe:
    channel: Channel
    seq: int
    outcome: Outcome
    #: Seconds from sending to the answer (TCP: connect and handshake).
    rtt: float | None = None
    detail: str = ""
    answer: PeerAnswer | None = None
    #: The cluster tag (8 hex digits: the start of the cluster id) in the clear header of
    #: an answer that did not authenticate.
    their_tag: str | None = None
    #: The wire version of an answer in another one.
    their_wire_version: int | None = None


def answer_of(member: Member) -> PeerAnswer:
    """A node's record (the source of its Ack) as a :class:`PeerAnswer`; its metadata is
    read with the ring's schema, and a record whose metadata does not read says why."""
    base = dict(node_id=member.node_id, name=member.name,
                addr=f"{member.addr[0]}:{member.addr[1]}",
                protocol_version=member.protocol_version)
    try:
        meta = NodeMeta.decode(member.meta)
    except RemoteProtocolError as e:
        return PeerAnswer(**base, meta_problem=e.message)  # type: ignore[arg-type]
    return PeerAnswer(**base, software_version=meta.software_version,  # type: ignore[arg-type]
                      phase=meta.phase.value, model=meta.model or None, epoch=meta.epoch,
                      plan_hash=meta.plan_hash)


class Verdict(StrEnum):
    HEALTHY = "healthy"
    NO_ANSWER = "no_answer"
    OTHER_CLUSTER = "other_cluster"
    OTHER_VERSION = "other_version"
    UDP_FILTERED = "udp_filtered"
    TCP_FILTERED = "tcp_filtered"
    NOT_RINGD = "not_ringd"


@dataclass(frozen=True)
class PingReport:
    #: HOST[:PORT] as given, the address it resolved to, the port.
    target: str
    host: str
    port: int
    #: Our cluster id (from our key; never the key).
    cluster_id: str
    probes: tuple[Probe, ...]
    verdict: Verdict
    #: The one-line verdict, and what to do (None when healthy).
    summary: str
    hint: str | None
    peer: PeerAnswer | None

    @property
    def healthy(self) -> bool:
        return self.verdict is Verdict.HEALTHY

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target, "host": self.host, "port": self.port,
            "cluster_id": self.cluster_id, "verdict": self.verdict.value,
            "summary": self.summary, "hint": self.hint,
            "peer": None if self.peer is None else asdict(self.peer),
            "their_cluster_tag": _first(self.probes, "their_tag"),
            "probes": [{"channel": p.channel.value, "seq": p.seq, "outcome": p.outcome.value,
                        "rtt_ms": None if p.rtt is None else round(p.rtt * 1000, 3),
                        "detail": p.detail or None} for p in self.probes],
        }


def _first(probes: tuple[Probe, ...], field: str) -> Any:
    return next((getattr(p, field) for p in probes if getattr(p, field) is not None), None)


def describe_peer(p: PeerAnswer) -> str:
    """``node2 (id 0123abcd), model tiny, phase serving, plan epoch 3, ringd 0.1.0``."""
    parts = [f"{p.name} (id {p.node_id[:8]})" if p.name else f"node {p.node_id[:8]}"]
    if p.meta_problem:
        parts.append(f"metadata unreadable: {p.meta_problem}")
    else:
        for label, value in (("model", p.model), ("phase", p.phase), ("plan epoch", p.epoch)):
            if value is not None:
                parts.append(f"{label} {value}")
    if p.software_version:
        parts.append(f"ringd {p.software_version}")
    return ", ".join(parts)


def judge(target: str, host: str, port: int, cluster_id: str,
          probes: tuple[Probe, ...] | list[Probe]) -> PingReport:
    """The verdict on ``probes`` sent to ``host:port`` by a prober of cluster ``cluster_id``."""
    probes = tuple(probes)
    where = f"{host}:{port}"
    udp = [p for p in probes if p.channel is Channel.UDP]
    tcp = [p for p in probes if p.channel is Channel.TCP]
    udp_ok = [p for p in udp if p.outcome is Outcome.ANSWERED]
    tcp_ok = [p for p in tcp if p.outcome is Outcome.ANSWERED]
    peer = _merge_answers([p.answer for p in udp_ok + tcp_ok if p.answer is not None])
    who = describe_peer(peer) if peer is not None else where

    def report(verdict: Verdict, summary: str, hint: str | None) -> PingReport:
        return PingReport(target, host, port, cluster_id, probes, verdict, summary, hint, peer)

    same_version = "install the same ringd version on every node"
    versions = {a.protocol_version for p in udp_ok + tcp_ok if (a := p.answer) is not None}
    if peer is not None and versions != {PROTOCOL_VERSION}:
        theirs = ", ".join(str(v) for v in sorted(versions - {PROTOCOL_VERSION}))
        return report(Verdict.OTHER_VERSION,
                      f"another version: {who} speaks peer protocol "
                      f"{theirs}, this ringd {PROTOCOL_VERSION}: the two never join one ring",
                      same_version)
    if udp_ok and tcp_ok:
        lost = len(udp) - len(udp_ok)
        loss = f" ({lost} of {len(udp)} UDP probes unanswered)" if lost else ""
        return report(Verdict.HEALTHY,
                      f"healthy: {who}{loss}", None)
    other = [p for p in probes if p.outcome is Outcome.OTHER_CLUSTER]
    if other:
        tag = _first(tuple(other), "their_tag")
        theirs = f"{tag}... (the start of its cluster id)" if tag else "unknown"
        same_tag = tag is not None and cluster_id.startswith(tag)
        why = (" (the ids start alike, yet its frames fail authentication with our key)"
               if same_tag else "")
        return report(Verdict.OTHER_CLUSTER,
                      f"different cluster: {where} is a ringd node sealed with another cluster "
                      f"key; our cluster id {cluster_id}, theirs {theirs}{why}",
                      "every node of a ring needs the same key file: copy one (mode 0600) to "
                      "cluster_key_file (default STATE_DIR/cluster.key) on each node and "
                      "restart ringd there; `ringctl doctor` on each prints its cluster id")
    wire = [p for p in probes if p.outcome is Outcome.OTHER_VERSION]
    if wire:
        v = _first(tuple(wire), "their_wire_version")
        return report(Verdict.OTHER_VERSION,
                      f"another version: {where} speaks ringd wire format {v}, this ringd "
                      f"{WIRE_VERSION}", same_version)
    if udp_ok:
        return report(Verdict.TCP_FILTERED,
                      f"TCP filtered: {where} answers over UDP ({who}) but not over TCP "
                      f"({_why(tcp)}): prefills and weight transfers to it will fail",
                      f"allow TCP port {port} too: prefill activations and weights travel "
                      "over TCP")
    if tcp_ok:
        return report(Verdict.UDP_FILTERED,
                      f"UDP filtered: {where} answers over TCP ({who}) but not over UDP "
                      f"({_why(udp)}); ringd's membership runs over UDP only, so this node "
                      "and that one will not see each other",
                      f"allow UDP port {port} (as well as TCP) between the two machines; a "
                      "machine with several addresses may also answer from another one: set "
                      "bind_host (or advertise_host) on it to the address peers use")
    if any(p.outcome is Outcome.NOT_RINGD for p in tcp):
        detail = next(p.detail for p in tcp if p.outcome is Outcome.NOT_RINGD)
        return report(Verdict.NOT_RINGD,
                      f"not ringd: something listens on TCP {where} but does not speak ringd "
                      f"({detail})",
                      "check the port: a node's peer port is `port` in its config (default "
                      "7411; its HTTP API port, 7412, is another thing)")
    return _no_answer(report, where, probes)


def _merge_answers(answers: list[PeerAnswer]) -> PeerAnswer | None:
    """The UDP answer (the node's full record) with the TCP handshake's cluster id."""
    if not answers:
        return None
    full = next((a for a in answers if a.addr is not None), answers[0])
    cid = next((a.cluster_id for a in answers if a.cluster_id), None)
    return full if cid is None or full.cluster_id else PeerAnswer(**{**asdict(full),
                                                                     "cluster_id": cid})


def _why(probes: list[Probe]) -> str:
    outcomes = {p.outcome for p in probes}
    if outcomes == {Outcome.REFUSED}:
        return "refused"
    if Outcome.UNREACHABLE in outcomes:
        return next(p.detail for p in probes if p.outcome is Outcome.UNREACHABLE) or "unreachable"
    return "no answer"


def _no_answer(report: Any, where: str, probes: tuple[Probe, ...]) -> PingReport:
    outcomes = {p.outcome for p in probes}
    if Outcome.UNREACHABLE in outcomes:
        detail = next(p.detail for p in probes if p.outcome is Outcome.UNREACHABLE)
        return report(Verdict.NO_ANSWER, f"no answer: this machine cannot reach {where} "
                      f"({detail})",
                      "check the address and this machine's network (its route to that "
                      "address, a VPN that takes the traffic)")
    if outcomes == {Outcome.REFUSED}:
        return report(Verdict.NO_ANSWER,
                      f"no answer: nothing listens on {where} (the host refused UDP and TCP)",
                      "is ringd running there, and is this its peer port? `ringctl status` "
                      "on that machine shows its address and port")
    return report(Verdict.NO_ANSWER,
                  f"no answer from {where}: nothing came back over UDP or TCP",
                  "a firewall drops the peer port, or the address is wrong (an old DHCP "
                  "address, a VPN address): check it with `ringctl status` on that machine, "
                  f"and allow UDP and TCP port {where.rpartition(':')[2]} there")
