"""``ringctl status`` and ``ringctl prompt``: thin shells over the local daemon's control API.

``status`` renders the daemon's :class:`ringd.status.Status` (a table, or ``--json``) and
exits 0 when the ring is ready, 1 when not. Other exit codes: ``ringctl --help``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from ringd.cli.common import Command, client_from, daemon_options, read_status
from ringd.core.swim_wire import MemberState
from ringd.core.timing import slowest
from ringd.errors import ExitCode, UsageError
from ringd.status import Ceiling, Status
from ringd.units import format_size

BAR_WIDTH = 24
NO_PEER_HINT = (
    "this node sees no peer. On macOS, allow Local Network access for ringd "
    "(System Settings > Privacy & Security > Local Network) -- without it peers never appear; "
    "where multicast is blocked, list peers with --peer host:port (peers = [...] in the config). "
    "`ringctl doctor` checks each cause."
)
#: Members whose phase is not known any more (their last word is stale).
GONE = (MemberState.DEAD, MemberState.LEFT)


# ----------------------------------------------------------------------------- status
@click.command(cls=Command)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--watch", is_flag=True,
              help="Keep showing it (every --interval seconds), with a progress bar per node "
                   "that fetches weights; ends when the ring is ready (or on Ctrl-C).")
@click.option("--interval", type=click.FloatRange(0.1, 60), default=1.0, show_default=True)
@daemon_options
@click.pass_context
def status(ctx: click.Context, as_json: bool, watch: bool, interval: float, host: str | None,
           port: int | None) -> None:
    """Show the ring: nodes, memory, layers, plan; ready (exit 0) or exactly why not (exit 1)."""
    client = client_from(ctx, host, port)
    st = read_status(client)
    if watch and not as_json:
        st = watch_status(client, st, interval)
    elif as_json:
        click.echo(json.dumps(st.to_json(), indent=2, sort_keys=True))
    else:
        click.echo(render_status(st))
    raise SystemExit(int(ExitCode.OK if st.ready else ExitCode.FAILURE))


def watch_status(client: Any, st: Status, interval: float) -> Status:
    """Redraw the status until the ring is ready. On a terminal: the table and a progress bar
    per fetching node, in place; otherwise (a log, a pipe) one line each time the state
    changes, quietly."""
    tty = sys.stdout.isatty()
    last = ""
    while True:
        if tty:
            click.echo("\033[H\033[2J" + render_status(st) + progress_bars(st), nl=False)
            click.echo("")
        else:
            line = render_status(st).splitlines()[0] + _fetch_summary(st)
            if line != last:
                click.echo(line)
                last = line
        if st.ready:
            return st
        time.sleep(interval)
        st = read_status(client)


def progress_bars(st: Status) -> str:
    """One bar per node fetching weights (bytes fetched and checked, of how many)."""
    from tqdm import tqdm

    lines = []
    for m in st.members:
        if m.fetch is None or not m.fetch[1]:
            continue
        done, total = m.fetch
        lines.append(tqdm.format_meter(done, total, 0, ncols=78, prefix=(m.name or m.id)[:16],
                                       unit="B", unit_scale=True, unit_divisor=1024))
    return ("\n\nfetching weights:\n" + "\n".join(lines)) if lines else ""


def _fetch_summary(st: Status) -> str:
    parts = [f"{m.name or m.id} {100 * m.fetch[0] // m.fetch[1]}%" for m in st.members
             if m.fetch is not None and m.fetch[1]]
    return f" (fetching: {', '.join(parts)})" if parts else ""


def _s(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)


def _size(v: int | None) -> str:
    return "-" if v is None else format_size(v)


def layer_bar(layers: tuple[int, int] | None, num_layers: int | None,
              width: int = BAR_WIDTH) -> str:
    """``[start, end)`` drawn over the model's depth: ``[####........]``; empty when unknown."""
    if not num_layers or num_layers <= 0:
        return ""
    cells = []
    for j in range(width):
        centre = (j + 0.5) * num_layers / width
        cells.append("#" if layers is not None and layers[0] <= centre < layers[1] else ".")
    return "[" + "".join(cells) + "]"


def layers_text(layers: tuple[int, int] | None) -> str:
    if layers is None:
        return "none"
    start, end = layers
    return f"{start}-{end - 1} ({end - start})"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def render_status(st: Status) -> str:
    """The human table for ``ringctl status``."""
    node, model, plan = st.node, st.model, st.plan
    lines = ["ring: ready" if st.ready else f"ring: NOT READY: {st.reason or 'no reason given'}"]
    if model:
        lines.append(f"model: {model.name}, {model.num_layers} layers, "
                     f"{_size(model.total_bytes)}")
    else:
        lines.append("model: none")
    if plan:
        lines.append(f"plan: epoch {plan.epoch}"
                     + (f", hash {plan.hash[:16]}" if plan.hash else ""))
    else:
        lines.append("plan: none committed")
    if st.fingerprint:
        lines.append(f"ring fingerprint: {st.fingerprint}")
    lines.append(f"this node: {_s(node.name)} ({node.id}) at {_s(node.addr)}, "
                 f"phase {_s(node.phase and node.phase.value)}")

    num_layers = model.num_layers if model else None
    if st.members:
        rows = [["", "NODE", "ADDRESS", "STATE", "PHASE", "USABLE", "TOTAL", "LAYERS", "", "RTT"]]
        for m in st.members:
            gone = m.state in GONE and not m.is_self  # (a daemon of another version)
            phase = "?" if m.phase is None or gone else m.phase.value
            if m.fetch is not None and not gone:
                done, total = m.fetch
                phase += f" {100 * done // total}%" if total else ""
            rows.append([
                "*" if m.is_self or m.id == node.id else "",
                m.name or m.id,
                _s(m.addr),
                m.state.value,
                phase,
                _size(m.usable_memory),
                _size(m.total_memory),
                layer_bar(m.layers, num_layers) or "-",
                layers_text(m.layers),
                (f"{m.rtt_ms:.2f} ms" if m.rtt_ms is not None else "-")
                + (" (tcp)" if m.channel == "tcp" else ""),
            ])
        lines.append("")
        lines.extend(_table(rows))
    names = {m.id: m.name for m in st.members}
    for ex in plan.excluded if plan else ():
        lines.append(f"excluded: {names.get(ex.node_id) or ex.node_id}: {_s(ex.reason)}")

    fetch = st.stats.get("fetch") if isinstance(st.stats, dict) else None
    if isinstance(fetch, dict) and (fetch.get("fetching") or fetch.get("bad_holders")):
        lines.append(fetch_line(fetch, names))
    if st.ceiling is not None:
        lines.extend(_ceiling_lines(st.ceiling))
    timing = timing_line(st)
    if timing:
        lines.append(timing)
    paths = paths_line(st)
    if paths:
        lines.append(paths)
    if st.stats:
        lines.append("stats: " + _stats_summary(st.stats)
                     + "   (all counters: ringctl status --json)")

    if not any(m.id != node.id for m in st.members):
        lines.append("")
        lines.append("note: " + NO_PEER_HINT)
    return "\n".join(lines)


def fetch_line(f: dict, names: dict[str, str]) -> str:
    """What this node fetches from its peers, how far along, how fast, from whom."""
    def num(key: str) -> float:
        v = f.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0

    peers = [p for p in f.get("peers") or () if isinstance(p, dict)]
    sources = ", ".join(str(names.get(p.get("peer")) or p.get("peer")) for p in peers) or "?"
    if f.get("fetching"):
        line = (f"fetching {f.get('fetching')}: {_size(int(num('done_bytes')))} of "
                f"{_size(int(num('total_bytes')))} at {_size(int(num('rate')))}/s from "
                f"{sources}")
    else:
        line = f"fetched {_size(int(num('done_bytes')))} from {sources}"
    bad = f.get("bad_holders")
    if isinstance(bad, dict) and bad:
        line += "; not used any more (served wrong bytes): " + ", ".join(
            f"{names.get(p) or p} ({key})" for p, key in sorted(bad.items()))
    return line


def _ceiling_lines(c: Ceiling) -> list[str]:
    """The decode ceiling (issue 6) and the last measured rate, flagged when impossible."""
    lines = []
    if c.single_stream_tps is not None:
        more = ", ".join(f"{v:.1f} with {k} streams" for k, v in sorted(c.aggregate_tps.items())
                         if k != 1)
        hop = f", {c.hop_us:.0f} us per hop"
        lines.append(f"ceiling: {c.single_stream_tps:.1f} tokens/s for one stream"
                     + (f" ({more})" if more else "") + hop)
    elif c.missing_bandwidth:
        lines.append("ceiling: unknown (no memory bandwidth from "
                     + ", ".join(c.missing_bandwidth) + ")")
    if c.measured_tps is not None:
        line = f"last measured: {c.measured_tps:.1f} tokens/s"
        if c.verdict == "IMPOSSIBLE":
            line += (" -- IMPOSSIBLE: above the ceiling, layers were not run (a broken ring); "
                     "run `ringctl verify`")
        lines.append(line)
    return lines


def timing_line(st: Status) -> str | None:
    """Recent tokens/s, and the ring's slowest stage and link (from the step timings every
    node gossips); None when nothing was measured."""
    names = {m.id: m.name or m.id for m in st.members}
    ring = [names.get(a.node_id, a.node_id) for a in st.plan.assignments] if st.plan else []
    timings = {names[m.id]: m.timings for m in st.members if m.timings is not None}
    me = next((m for m in st.members if m.is_self or m.id == st.node.id), None)
    parts = []
    step = me.timings.decode_step_ms if me is not None and me.timings is not None else None
    if step is not None and step.p50:
        parts.append(f"recent: {1000 / step.p50:.1f} tokens/s (a token every "
                     f"{_ms(step.p50)}" + (f", p99 {_ms(step.p99)})" if step.p99 else ")"))
    elif st.ceiling is not None and st.ceiling.measured_tps is not None:
        parts.append(f"recent: {st.ceiling.measured_tps:.1f} tokens/s")
    stage, link = slowest(timings, ring)
    if stage is not None:
        p99 = timings[stage[0]].compute_ms.p99
        parts.append(f"slowest stage: {stage[0]}, compute {_ms(stage[1])}"
                     + (f" (p99 {_ms(p99)})" if p99 else ""))
    if link is not None:
        parts.append(f"slowest link: {link[0]} -> {link[1]}, {_ms(link[2])} round trip")
    return "; ".join(parts) or None


def paths_line(st: Status) -> str | None:
    """The path to each peer the link measurements chose (interface, kind, round trip,
    throughput), and how many others were measured."""
    parts = []
    for m in st.members:
        p = m.path
        if p is None:
            continue
        text = f"{m.name or m.id} via {p.interface} ({p.kind})"
        if p.rtt_ms is not None:
            text += f" {_ms(p.rtt_ms)}"
        if p.throughput:
            text += f", {format_size(int(p.throughput))}/s"
        if p.pinned:
            text += ", pinned"
        others = [o for o in p.options if o.address != p.address and o.up]
        if others:
            text += f" (+{len(others)} other path{'s' if len(others) > 1 else ''})"
        parts.append(text)
    return ("paths: " + "; ".join(parts)) if parts else None


def _ms(v: float) -> str:
    return f"{v:.0f} ms" if v >= 10 else f"{v:.2g} ms"


_SUMMARY = {  # section -> counters worth a glance in the table view
    "runner": ("requests_served", "requests_failed", "tokens_generated", "coverage_errors"),
    "membership": ("suspicions", "failures", "rejected_payloads"),
}


def _stats_summary(stats: dict[str, Any]) -> str:
    """Top-level scalars, a few counters of the daemon's sections, and dropped frames."""
    parts = [f"{k}={_fmt_stat(v)}" for k, v in sorted(stats.items())
             if not isinstance(v, (dict, list))]
    for section, keys in _SUMMARY.items():
        sub = stats.get(section)
        if isinstance(sub, dict):
            sub = sub.get("counters", sub) if section == "membership" else sub
            parts += [f"{k}={_fmt_stat(sub[k])}" for k in keys if k in sub]
    transport = stats.get("transport")
    if isinstance(transport, dict) and isinstance(transport.get("drops"), dict):
        drops = {k: v for k, v in transport["drops"].items() if isinstance(v, int) and v}
        parts.append("dropped_frames=" + (_fmt_stat(drops) if drops else "0"))
    return ", ".join(parts)


def _fmt_stat(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_fmt_stat(x)}" for k, x in sorted(v.items())) + "}"
    return str(v)


# ----------------------------------------------------------------------------- prompt
@click.command(cls=Command)
@click.argument("text", required=False)
@click.option(
    "--file",
    "file",
    type=str,
    default=None,
    help="Read the prompt from a file ('-': standard input).",
)
@click.option("--system", default=None, help="System prompt (chat template).")
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Most tokens to generate.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(0.0, 10.0),
    default=0.0,
    show_default=True,
    help="Sampling temperature; 0 is greedy.",
)
@click.option(
    "--top-p",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=1.0,
    show_default=True,
    help="Nucleus sampling mass.",
)
@click.option(
    "--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="Top-k cut; 0 is off."
)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None, help="Seed for sampling.")
@click.option("--stop", multiple=True, help="Stop sequence (repeatable); not printed.")
@click.option("--model", default=None, help="Model name (default: the one the ring serves).")
@click.option("--raw", is_flag=True, help="No chat template: plain text completion.")
@click.option("--json", "as_json", is_flag=True, help="Print NDJSON events instead of text.")
@daemon_options
@click.pass_context
def prompt(
    ctx: click.Context,
    text: str | None,
    file: str | None,
    system: str | None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: tuple[str, ...],
    model: str | None,
    raw: bool,
    as_json: bool,
    host: str | None,
    port: int | None,
) -> None:
    """Send a prompt to the ring and stream the answer. Ctrl-C cancels it on the whole ring."""
    body: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "stop": list(stop),
        "model": model,
    }
    user = read_prompt(text, file)
    if raw:
        if system is not None:
            raise UsageError(
                "--system needs the chat template", hint="drop --raw, or put the text in the prompt"
            )
        body["prompt"] = user
    else:
        body["messages"] = (
            [{"role": "system", "content": system}] if system is not None else []
        ) + [{"role": "user", "content": user}]
    client = client_from(ctx, host, port)
    events = client.stream_generate(body)
    ended_with_newline = True
    try:
        for ev in events:
            if as_json:
                click.echo(json.dumps(ev))
            elif ev.get("type") == "token" and ev.get("text"):
                click.echo(ev["text"], nl=False)
                sys.stdout.flush()
                ended_with_newline = ev["text"].endswith("\n")
            if ev.get("type") == "finish":
                if not as_json and not ended_with_newline:
                    click.echo("")
                click.echo(_finish_line(ev), err=True)
    except KeyboardInterrupt:
        click.echo("\ncancelled", err=True)
        raise SystemExit(int(ExitCode.INTERRUPTED)) from None
    finally:
        events.close()


def read_prompt(text: str | None, file: str | None) -> str:
    """The prompt from the argument, ``--file`` (``-``: stdin), or piped stdin."""
    if text is not None and file is not None:
        raise UsageError("give the prompt as an argument or with --file, not both")
    if text == "-" or file == "-" or (text is None and file is None and not sys.stdin.isatty()):
        out = sys.stdin.read()
        where = "standard input"
    elif file is not None:
        try:
            out = Path(file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"prompt file {file} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read prompt file {file}: {e}") from None
        where = file
    elif text is not None:
        out, where = text, "the argument"
    else:
        raise UsageError(
            "no prompt given", hint='ringctl prompt "your question", --file PATH, or pipe it in'
        )
    if not out.strip():
        raise UsageError(f"the prompt from {where} is empty")
    return out


def _finish_line(ev: dict[str, Any]) -> str:
    def num(k: str) -> float | None:
        v = ev.get(k)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    ttft, tps = num("time_to_first_token"), num("tokens_per_second")
    return (
        f"{_s(ev.get('completion_tokens'))} tokens ({_s(ev.get('reason'))}), "
        f"time to first token {'-' if ttft is None else f'{ttft:.2f} s'}, "
        f"{'-' if tps is None else f'{tps:.1f}'} tokens/s"
    )
