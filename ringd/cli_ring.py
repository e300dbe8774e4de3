"""``ringctl status`` and ``ringctl prompt``: thin shells over the local daemon's control API.

Registered by :mod:`ringd.cli` with ``main.add_command``. Exit codes: 0 success (``status``:
the ring is ready), 1 failure (``status``: not ready), 2 no daemon answering, 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from ringd.client import Client, DaemonNotRunning
from ringd.errors import RingdError, UsageError
from ringd.units import format_size

BAR_WIDTH = 24
NO_PEER_HINT = (
    "this node sees no peer. On macOS, allow Local Network access for ringd "
    "(System Settings > Privacy & Security > Local Network) -- without it peers never appear; "
    "where multicast is blocked, list peers with --peer host:port (peers = [...] in the config)."
)


def _exit(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    raise SystemExit(code)


def handled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Errors as messages with exit codes (2: no daemon), never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DaemonNotRunning as e:
            _exit(str(e), 2)
        except RingdError as e:
            _exit(str(e), 1)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            raise SystemExit(130) from None

    return wrapper


def client_from(
    ctx: click.Context, host: str | None, port: int | None, *, stream_slack: float = 60.0
) -> Client:
    from ringd.cli import settings_from  # ringd.cli imports this module to register the commands

    s = settings_from(ctx, http_host=host, http_port=port)
    return Client(
        s.http_host, s.http_port, api_key=s.api_key, stream_timeout=s.request_timeout + stream_slack
    )


host_option = click.option(
    "--host", default=None, help="Address of the daemon's HTTP API (default: http_host)."
)
port_option = click.option(
    "--port", type=int, default=None, help="Port of the daemon's HTTP API (default: http_port)."
)


# ----------------------------------------------------------------------------- status
@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@host_option
@port_option
@click.pass_context
@handled
def status(ctx: click.Context, as_json: bool, host: str | None, port: int | None) -> None:
    """Show the ring: nodes, memory, layers, plan; ready (exit 0) or exactly why not (exit 1)."""
    st = client_from(ctx, host, port).status()
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
    else:
        click.echo(render_status(st))
    raise SystemExit(0 if st.get("ready") is True else 1)


def _s(v: Any) -> str:
    return "-" if v is None or v == "" else str(v)


def _size(v: Any) -> str:
    return format_size(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def layer_bar(layers: Any, num_layers: Any, width: int = BAR_WIDTH) -> str:
    """``[start, end)`` drawn over the model's depth: ``[####........]``; empty when unknown."""
    if not (isinstance(num_layers, int) and num_layers > 0):
        return ""
    start, end = _range(layers)
    cells = []
    for j in range(width):
        centre = (j + 0.5) * num_layers / width
        cells.append("#" if start is not None and start <= centre < end else ".")
    return "[" + "".join(cells) + "]"


def _range(layers: Any) -> tuple[int, int] | tuple[None, None]:
    if (
        isinstance(layers, (list, tuple))
        and len(layers) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
        and layers[1] > layers[0]
    ):
        return layers[0], layers[1]
    return None, None


def _layers_text(layers: Any) -> str:
    start, end = _range(layers)
    if start is None:
        return "none"
    return f"{start}-{end - 1} ({end - start})"  # type: ignore[operator]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def render_status(st: dict[str, Any]) -> str:
    """The human table for ``ringctl status``; tolerates missing keys."""
    node = st.get("node") if isinstance(st.get("node"), dict) else {}
    model = st.get("model") if isinstance(st.get("model"), dict) else None
    plan = st.get("plan") if isinstance(st.get("plan"), dict) else None
    members = [m for m in st.get("members") or [] if isinstance(m, dict)]
    lines = []

    if st.get("ready") is True:
        lines.append("ring: ready")
    else:
        lines.append(f"ring: NOT READY: {st.get('reason') or 'no reason given'}")
    if model:
        lines.append(
            f"model: {_s(model.get('name'))}, {_s(model.get('num_layers'))} layers, "
            f"{_size(model.get('total_bytes'))}"
        )
    else:
        lines.append("model: none")
    if plan:
        h = plan.get("hash")
        lines.append(
            f"plan: epoch {_s(plan.get('epoch'))}" + (f", hash {str(h)[:16]}" if h else "")
        )
    else:
        lines.append("plan: none committed")
    if st.get("fingerprint"):
        lines.append(f"ring fingerprint: {st['fingerprint']}")
    lines.append(
        f"this node: {_s(node.get('name'))} ({_s(node.get('id'))}) at {_s(node.get('addr'))}, "
        f"phase {_s(node.get('phase'))}"
    )

    num_layers = model.get("num_layers") if model else None
    if members:
        rows = [["", "NODE", "ADDRESS", "STATE", "PHASE", "USABLE", "TOTAL", "LAYERS", "", "RTT"]]
        for m in members:
            rtt = m.get("rtt_ms")
            rows.append(
                [
                    "*" if m.get("id") is not None and m.get("id") == node.get("id") else "",
                    _s(m.get("name") or m.get("id")),
                    _s(m.get("addr")),
                    _s(m.get("state")),
                    _s(m.get("phase")),
                    _size(m.get("usable_memory")),
                    _size(m.get("total_memory")),
                    layer_bar(m.get("layers"), num_layers) or "-",
                    _layers_text(m.get("layers")),
                    f"{rtt:.2f} ms"
                    if isinstance(rtt, (int, float)) and not isinstance(rtt, bool)
                    else "-",
                ]
            )
        lines.append("")
        lines.extend(_table(rows))
    for ex in (plan or {}).get("excluded") or []:
        if isinstance(ex, dict):
            names = {m.get("id"): m.get("name") for m in members}
            who = names.get(ex.get("node_id")) or ex.get("node_id")
            lines.append(f"excluded: {_s(who)}: {_s(ex.get('reason'))}")

    ceiling = st.get("ceiling")
    if isinstance(ceiling, dict):
        lines.extend(_ceiling_lines(ceiling))
    stats = st.get("stats")
    if isinstance(stats, dict) and stats:
        lines.append("stats: " + _stats_summary(stats) + "   (all counters: ringctl status --json)")

    peers = [m for m in members if m.get("id") != node.get("id")]
    if not peers:
        lines.append("")
        lines.append("note: " + NO_PEER_HINT)
    return "\n".join(lines)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _ceiling_lines(c: dict[str, Any]) -> list[str]:
    """The decode ceiling (issue 6) and the last measured rate, flagged when impossible."""
    lines = []
    single = c.get("single_stream_tps")
    if _num(single):
        agg = c.get("aggregate_tps") if isinstance(c.get("aggregate_tps"), dict) else {}
        more = ", ".join(f"{v:.1f} with {k} streams" for k, v in agg.items()
                         if k != "1" and _num(v))
        hop = f", {c['hop_us']:.0f} us per hop" if _num(c.get("hop_us")) else ""
        lines.append(f"ceiling: {single:.1f} tokens/s for one stream"
                     + (f" ({more})" if more else "") + hop)
    elif c.get("missing_bandwidth"):
        lines.append("ceiling: unknown (no memory bandwidth from "
                     + ", ".join(map(str, c["missing_bandwidth"])) + ")")
    measured = c.get("measured_tps")
    if _num(measured):
        line = f"last measured: {measured:.1f} tokens/s"
        if c.get("verdict") == "IMPOSSIBLE":
            line += (" -- IMPOSSIBLE: above the ceiling, layers were not run (a broken ring); "
                     "run `ringctl verify`")
        lines.append(line)
    return lines


_SUMMARY = {  # section -> counters worth a glance in the table view
    "runner": ("requests_served", "requests_failed", "tokens_generated", "coverage_errors"),
    "membership": ("suspicions", "failures", "rejected_payloads"),
}


def _stats_summary(stats: dict[str, Any]) -> str:
    """Top-level scalars, a few counters of the daemon's sections, and dropped frames."""
    parts = [f"{k}={_fmt_stat(v)}" for k, v in sorted(stats.items()) if not isinstance(v, (dict, list))]
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
@click.command()
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
@host_option
@port_option
@click.pass_context
@handled
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
        raise SystemExit(130) from None
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
