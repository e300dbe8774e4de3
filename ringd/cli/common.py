"""What every ``ringctl`` command shares: error handling, settings, the daemon's address.

Every command is a :class:`Command` (groups are :class:`Group`, whose commands are
:class:`Command` too), and :meth:`Command.invoke` is the one place where errors become
messages: a :class:`ringd.errors.RingdError` prints its message and hint and exits with
:func:`ringd.errors.exit_code`; Ctrl-C prints "interrupted" and exits 130. No traceback.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any, Callable, TypeVar

import click

from ringd.client import Client
from ringd.config import Settings
from ringd.errors import ErrorCode, ExitCode, RingdError, exit_code
from ringd.status import Status

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT = {"auto_envvar_prefix": "RINGCTL", "help_option_names": ["-h", "--help"]}

_EXIT_MEANING = {
    ExitCode.OK: "done (status: the ring is ready; verify: match)",
    ExitCode.FAILURE: "failed, or the answer is no (status: not ready; verify: mismatch; "
                      "bench: IMPOSSIBLE; service status: not installed)",
    ExitCode.USAGE: "wrong command line, config or request",
    ExitCode.NOT_RUNNING: "no ringd answers (service status: installed, not running)",
    ExitCode.UNAVAILABLE: "the ring cannot take the request now: retry later",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C cancels a running request on the whole ring)",
}


def exit_codes_help(width: int = 78) -> str:
    """The exit-code table of ``ringctl --help``, with the request error codes of each."""
    lines = ["\b", "Exit codes:"]
    for code in ExitCode:
        text = _EXIT_MEANING[code]
        names = [e.value for e in ErrorCode if e.exit_code is code]
        if names:
            text += "; request errors " + ", ".join(names)
        lines += textwrap.wrap(text, width, initial_indent=f"  {code.value:<4} ",
                               subsequent_indent=" " * 7)
    return "\n".join(lines)


def fail(error: RingdError) -> None:
    """Print ``error`` (message and hint) and exit with its exit code."""
    click.echo(f"error: {error}", err=True)
    raise SystemExit(int(exit_code(error))) from None


class Command(click.Command):
    """A ringctl command: errors become a message and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RingdError as e:
            fail(e)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            raise SystemExit(int(ExitCode.INTERRUPTED)) from None


class Group(click.Group):
    """A ringctl group: its commands are :class:`Command`, its subgroups :class:`Group`."""

    command_class = Command
    group_class = type


def settings_from(ctx: click.Context, **flags: Any) -> Settings:
    """Settings from the config file of ``ringctl --config``, the environment and ``flags``."""
    obj = ctx.find_root().obj or {}
    return Settings.load(obj.get("config"), env=os.environ, **flags)


def daemon_options(fn: F) -> F:
    """``--host`` and ``--port`` of the daemon's HTTP API."""
    fn = click.option("--port", type=int, default=None,
                      help="Port of the daemon's HTTP API (default: http_port).")(fn)
    return click.option("--host", default=None,
                        help="Address of the daemon's HTTP API (default: http_host).")(fn)


def client_from(ctx: click.Context, host: str | None, port: int | None, *,
                stream_slack: float = 60.0) -> Client:
    """A client for the daemon named by the settings and ``--host``/``--port``."""
    s = settings_from(ctx, http_host=host, http_port=port)
    return Client(s.http_host, s.http_port, api_key=s.api_key,
                  stream_timeout=s.request_timeout + stream_slack)


def read_status(client: Client) -> Status:
    """The daemon's status, read against the contract (a malformed one is a clear error)."""
    return Status.from_json(client.status(), source=f"ringd at {client.where}")
