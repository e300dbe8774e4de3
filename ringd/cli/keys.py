"""``ringctl keygen``: the cluster key every node of a ring shares."""

from __future__ import annotations

from pathlib import Path

import click

from ringd.cli.common import Command, settings_from


@click.command(cls=Command)
@click.option("--key-file", type=click.Path(dir_okay=False), default=None,
              help="Where to write the key (default: cluster_key_file, or STATE_DIR/cluster.key).")
@click.option("--force", is_flag=True,
              help="Replace an existing key (every node must then get the new one).")
@click.pass_context
def keygen(ctx: click.Context, key_file: str | None, force: bool) -> None:
    """Create the cluster key: 32 random bytes in a file of mode 0600.

    Copy that file to every node of the ring (never pass the key on a command line).
    Nodes without it cannot join, read or forge the ring's frames.
    """
    from ringd.keys import cluster_id, generate_key_file

    s = settings_from(ctx)
    path = Path(key_file) if key_file else s.key_path
    key = generate_key_file(path, overwrite=force)
    click.echo(f"wrote a new cluster key to {path} (cluster id {cluster_id(key)})")
    click.echo("copy this file, with mode 0600, to the same place on every node of the ring",
               err=True)
