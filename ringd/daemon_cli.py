"""``ringd`` command line: ``ringd run`` with one option per setting (generated from Settings),
a thin shell over :func:`ringd.daemon.run_node`."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import typing
from typing import Any, Callable

import click

from ringd.config import Settings
from ringd.errors import RingdError

_SKIP = {"api_key"}  # secrets never on a command line: use the config file or RINGD_API_KEY


def settings_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a click command with ``--<setting>`` for every Settings field."""
    hints = typing.get_type_hints(Settings)
    for f in reversed(dataclasses.fields(Settings)):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata["help"]
        kind = f.metadata.get("kind")
        base = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        if kind == "list":
            single = {"peers": "--peer", "mdns_interfaces": "--mdns-interface"}.get(f.name, flag)
            fn = click.option(single, f.name, multiple=True, help=help_ + " Repeatable.")(fn)
        elif base[0] is bool:
            fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_)(fn)
        else:
            fn = click.option(flag, f.name, default=None, type=str, help=help_)(fn)
    return fn


def build_settings(config: str | None, flags: dict[str, Any]) -> Settings:
    return Settings.load(config, env=os.environ, **flags)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ringd")
def cli() -> None:
    """ringd: one node of a ring that runs a language model too large for any one machine."""


@cli.command()
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              envvar="RINGD_CONFIG", help="TOML config file (also RINGD_CONFIG).")
@settings_options
def run(config: str | None, **flags: Any) -> None:
    """Run this node: find peers, agree on a plan, load this node's layers, serve."""
    from ringd.daemon import run_node

    try:
        settings = build_settings(config, flags)
    except RingdError as e:
        click.echo(f"ringd: {e}", err=True)
        sys.exit(2)
    code = run_node(settings, echo=lambda text: click.echo(text, err=True))
    # Everything is closed and saved. Leave without running C++ static destructors: MLX's
    # per-thread CPU streams can abort the process there ("terminate called without an
    # active exception"), which would turn a clean stop into a crash for systemd/launchd.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:  # plain `ringd` / `python -m ringd` runs the node
        args = ["run"]
    cli.main(args=args, prog_name="ringd")
