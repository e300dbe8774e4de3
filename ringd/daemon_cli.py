"""``ringd`` command line: ``ringd run`` with one option per setting (generated from Settings)."""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Callable

import click

from ringd.config import Settings

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
