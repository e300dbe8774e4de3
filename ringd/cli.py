"""``ringctl``: a thin click shell over the local daemon's control API and the model store.

Every command turns :class:`ringd.errors.RingdError` into a clear message and a non-zero
exit code; no traceback reaches the user.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

import click

from ringd.config import Settings
from ringd.errors import RingdError

CONTEXT = {"auto_envvar_prefix": "RINGCTL", "help_option_names": ["-h", "--help"]}


def fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    raise SystemExit(code)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print RingdError (and interrupted runs) as a message, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RingdError as e:
            fail(str(e))
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            raise SystemExit(130) from None

    return wrapper


def settings_from(ctx: click.Context, **flags: Any) -> Settings:
    import os

    obj = ctx.find_root().obj or {}
    return Settings.load(obj.get("config"), env=os.environ, **flags)


@click.group(context_settings=CONTEXT)
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              envvar="RINGD_CONFIG", help="ringd TOML config file (also RINGD_CONFIG).")
@click.version_option(package_name="ringd")
@click.pass_context
def main(ctx: click.Context, config: str | None) -> None:
    """Talk to the local ringd node and manage models."""
    ctx.obj = {"config": config}


# ---------------------------------------------------------------------------- models
@main.group()
def model() -> None:
    """Manage the model store (import GGUF files, fetch the default model)."""


@model.command("import")
@click.argument("gguf", type=click.Path(dir_okay=False))
@click.option("--name", default=None, help="Name in the store (default: the file name without .gguf).")
@click.option("--store", type=click.Path(file_okay=False), default=None, help="Model store directory.")
@click.option("--force", is_flag=True, help="Replace an existing model of that name.")
@click.pass_context
@friendly
def model_import(ctx: click.Context, gguf: str, name: str | None, store: str | None, force: bool) -> None:
    """Convert a Llama-architecture GGUF file into an MLX model directory in the store."""
    from ringd.compute import store as model_store

    s = settings_from(ctx, model_store=store)
    path = model_store.import_gguf(Path(gguf), s.model_store, name=name, force=force,
                                   progress=lambda msg: click.echo(msg, err=True))
    click.echo(str(path))


@model.command("pull")
@click.option("--store", type=click.Path(file_okay=False), default=None, help="Model store directory.")
@click.pass_context
@friendly
def model_pull(ctx: click.Context, store: str | None) -> None:
    """Fetch the default model (SmolLM2-135M-Instruct) into the store if it is missing."""
    from ringd.compute import store as model_store

    s = settings_from(ctx, model_store=store)
    path = model_store.ensure_default_model(s.model_store, progress=lambda msg: click.echo(msg, err=True))
    click.echo(str(path))


@model.command("list")
@click.option("--store", type=click.Path(file_okay=False), default=None, help="Model store directory.")
@click.pass_context
@friendly
def model_list(ctx: click.Context, store: str | None) -> None:
    """List the models in the store."""
    from ringd.compute import store as model_store

    s = settings_from(ctx, model_store=store)
    models = model_store.list_models(s.model_store)
    if not models:
        click.echo(f"no models in {s.model_store}; run `ringctl model pull` or `ringctl model import FILE.gguf`")
        return
    for m in models:
        click.echo(f"{m.name:40s} {m.num_layers:4d} layers  {m.total_bytes / 2**20:10.1f} MiB  {m.path}")


@main.command()
@click.option("--key-file", type=click.Path(dir_okay=False), default=None,
              help="Where to write the key (default: cluster_key_file, or STATE_DIR/cluster.key).")
@click.option("--force", is_flag=True, help="Replace an existing key (every node must then get the new one).")
@click.pass_context
@friendly
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
    click.echo("copy this file, with mode 0600, to the same place on every node of the ring", err=True)


DEMO_PROMPT = "What is the capital of France? Answer in one sentence."


@main.command()
@click.argument("text", required=False, default=DEMO_PROMPT)
@click.option("--nodes", type=click.IntRange(1, 8), default=3, show_default=True, help="Daemons in the local ring.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--store", type=click.Path(file_okay=False), default=None, help="Model store directory.")
@click.pass_context
@friendly
def demo(ctx: click.Context, text: str, nodes: int, max_tokens: int, store: str | None) -> None:
    """Start a local ring of daemons with unequal memory, answer a prompt, stop the ring.

    Everything runs on this machine over loopback: each daemon holds only its layers.
    """
    from ringd.demo import run_demo

    s = settings_from(ctx, model_store=store)
    run_demo(s, text, nodes=nodes, max_tokens=max_tokens, echo=click.echo)


def _register() -> None:
    from ringd.cli_proof import bench, verify
    from ringd.cli_ring import prompt, status
    from ringd.cli_service import service

    for cmd in (status, prompt, verify, bench, service):
        main.add_command(cmd)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
