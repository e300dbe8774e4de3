"""``ringctl ping HOST[:PORT]``: does a peer's port answer, and if not, why.

Sends the real membership ping (UDP, with ``asyncio-dgram``) and opens the TCP channel's
handshake, both sealed with this node's cluster key, prints each probe's round trip and one
verdict (:mod:`ringd.ping`). Exit 0 when the peer is healthy, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Callable

import click

from ringd.cli.common import Command, settings_from
from ringd.core.wire import WIRE_VERSION
from ringd.errors import ConfigError, ExitCode, UsageError
from ringd.ping import Channel, Outcome, PingReport, Probe


def parse_target(text: str, default_port: int) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[IPV6]`` or ``[IPV6]:PORT``."""
    text = text.strip()
    host, port = text, str(default_port)
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1:] and not text[end + 1:].startswith(":")):
            host = ""
        else:
            host, port = text[1:end], text[end + 2:] or port
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{text!r} is not HOST or HOST:PORT",
                         hint="e.g. `ringctl ping 192.168.1.20` or `ringctl ping mac2.local:7411`"
                              " ([::1]:7411 for IPv6)")
    return host, int(port)


def load_cluster_key(path: Path) -> bytes:
    """This node's cluster key; an error says why the command needs it."""
    from ringd.keys import load_key

    try:
        return load_key(path)
    except ConfigError as e:
        raise ConfigError(f"probes are sealed with this node's cluster key: {e.message}",
                          hint=e.hint or "pass --key-file, or run ringctl as the user ringd "
                                         "runs as") from None


def probe_line(p: Probe, timeout: float, names: dict[str, str] | None = None) -> str:
    """One probe, as ``ringctl ping`` prints it (``names``: node names by id, learned from
    earlier answers: a TCP handshake carries none)."""
    head = f"{p.channel.value} {p.seq}: "
    ms = f"{p.rtt * 1000:.3f} ms" if p.rtt is not None else ""
    if p.outcome is Outcome.ANSWERED and p.answer is not None:
        name = p.answer.name or (names or {}).get(p.answer.node_id)
        who = name or f"node {p.answer.node_id[:8]}"
        what = "ack from" if p.channel is Channel.UDP else "handshake from"
        return f"{head}{what} {who} in {ms}"
    text = {
        Outcome.SILENT: f"no answer within {timeout:g} s",
        Outcome.REFUSED: "refused: nothing listens there",
        Outcome.UNREACHABLE: f"cannot send: {p.detail}",
        Outcome.OTHER_CLUSTER: "answer sealed with another cluster key"
                               + (f" (its cluster id starts {p.their_tag})" if p.their_tag
                                  else ""),
        Outcome.OTHER_VERSION: f"answer in ringd wire format {p.their_wire_version} "
                               f"(ours {WIRE_VERSION})",
        Outcome.NOT_RINGD: f"not ringd: {p.detail}",
    }.get(p.outcome, p.outcome.value)
    return head + text + (f" after {ms}" if ms else "")


def summary_lines(report: PingReport) -> list[str]:
    """The statistics per channel and the verdict (with its hint)."""
    h, port = report.host, report.port
    same = report.target in (h, f"{h}:{port}", f"[{h}]", f"[{h}]:{port}")
    lines = [f"--- {h}:{port}" + ("" if same else f" ({report.target})")]
    for ch in Channel:
        probes = [p for p in report.probes if p.channel is ch]
        ok = [p.rtt for p in probes if p.outcome is Outcome.ANSWERED and p.rtt is not None]
        line = f"{ch.value}: {len(ok)}/{len(probes)} answered"
        if ok:
            line += (f", round trip min/avg/max {min(ok) * 1000:.3f}/"
                     f"{sum(ok) / len(ok) * 1000:.3f}/{max(ok) * 1000:.3f} ms")
        lines.append(line)
    lines.append(f"verdict: {report.summary}")
    if report.hint:
        lines.append(f"  hint: {report.hint}")
    return lines


async def run_ping(target: str, ip: str, port: int, key: bytes, *, encrypt: bool, count: int,
                   timeout: float, interval: float,
                   on_probe: Callable[[Probe], None] | None = None) -> PingReport:
    """Ping ``ip:port`` (``target`` is how the user named it) and judge."""
    from ringd.net.probe import Prober, ping_report, prober_sealer

    prober = Prober(prober_sealer(key, encrypt=encrypt), timeout=timeout)
    return await ping_report(prober, target, ip, port, count=count, interval=interval,
                             on_probe=on_probe)


@click.command(cls=Command)
@click.argument("target", metavar="HOST[:PORT]")
@click.option("--count", "-c", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Probes per channel (UDP, then TCP).")
@click.option("--timeout", type=click.FloatRange(0.05, 60), default=1.0, show_default=True,
              help="Seconds to wait for each answer.")
@click.option("--interval", type=click.FloatRange(0, 10), default=0.2, show_default=True,
              help="Seconds between probes.")
@click.option("--key-file", type=click.Path(dir_okay=False), default=None,
              help="The cluster key to seal probes with (default: cluster_key_file, or "
                   "STATE_DIR/cluster.key).")
@click.option("--json", "as_json", is_flag=True, help="Print the probes and verdict as JSON.")
@click.pass_context
def ping(ctx: click.Context, target: str, count: int, timeout: float, interval: float,
         key_file: str | None, as_json: bool) -> None:
    """Probe a peer's port and say why it does (not) answer.

    Sends the real membership ping over UDP and opens a TCP connection (the node sends its
    handshake), both sealed with this node's cluster key. Tells apart: no answer at all
    (nothing listens, a firewall, a wrong address), a node of another cluster key (both
    cluster ids), UDP filtered (TCP answers, UDP does not), another ringd version, and a
    healthy node with its name, model, phase and plan epoch. PORT defaults to `port`.
    Exit 0 when healthy, 1 otherwise.
    """
    from ringd.net.probe import resolve

    s = settings_from(ctx)
    host, port = parse_target(target, s.port)
    key = load_cluster_key(Path(key_file) if key_file else s.key_path)
    ip = asyncio.run(resolve(host, port))
    if not as_json:
        from ringd.keys import cluster_id

        named = f"{host} ({ip})" if host != ip else ip
        click.echo(f"PING {named} port {port} (cluster {cluster_id(key)}): {count} UDP "
                   f"membership pings, {count} TCP handshakes")
    names: dict[str, str] = {}

    def show(p: Probe) -> None:
        if p.answer is not None and p.answer.name:
            names[p.answer.node_id] = p.answer.name
        click.echo(probe_line(p, timeout, names))

    report = asyncio.run(run_ping(target, ip, port, key, encrypt=s.encrypt, count=count,
                                  timeout=timeout, interval=interval,
                                  on_probe=None if as_json else show))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        click.echo("\n".join(summary_lines(report)))
    raise SystemExit(int(ExitCode.OK if report.healthy else ExitCode.FAILURE))
