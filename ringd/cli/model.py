"""``ringctl model import | pull | list``: the model store on this machine."""

from __future__ import annotations

from pathlib import Path

import click

from ringd.cli.common import Group, settings_from

store_option = click.option("--store", type=click.Path(file_okay=False), default=None,
                            help="Model store directory.")


@click.group(cls=Group)
def model() -> None:
    """Manage the model store (import GGUF files, fetch the default model)."""


@model.command("import")
@click.argument("gguf", type=click.Path(dir_okay=False))
@click.option("--name", default=None,
              help="Name in the store (default: the file name without .gguf).")
@store_option
@click.option("--force", is_flag=True, help="Replace an existing model of that name.")
@click.pass_context
def model_import(ctx: click.Context, gguf: str, name: str | None, store: str | None,
                 force: bool) -> None:
    """Convert a Llama-architecture GGUF file into an MLX model directory in the store."""
    from ringd.compute import store as model_store

    s = settings_from(ctx, model_store=store)
    path = model_store.import_gguf(Path(gguf), s.model_store, name=name, force=force,
                                   progress=lambda msg: click.echo(msg, err=True))
    click.echo(str(path))


@model.command("pull")
@store_option
@click.pass_context
def model_pull(ctx: click.Context, store: str | None) -> None:
    """Fetch the default model (SmolLM2-135M-Instruct) into the store if it is missing."""
    from ringd.compute import store as model_store

    s = settings_from(ctx, model_store=store)
    path = model_store.ensure_default_model(s.model_store,
                                            progress=lambda msg: click.echo(msg, err=True))
    click.echo(str(path))


@model.command("list")
@store_option
@click.pass_context
def model_list(ctx: click.Context, store: str | None) -> None:
    """List the models in the store."""
    from ringd.compute import store as model_store

    s = settings_from(ctx, model_store=store)
    models = model_store.list_models(s.model_store)
    if not models:
        click.echo(f"no models in {s.model_store}; "
                   "run `ringctl model pull` or `ringctl model import FILE.gguf`")
        return
    for m in models:
        click.echo(f"{m.name:40s} {m.num_layers:4d} layers  {m.total_bytes / 2**20:10.1f} MiB  "
                   f"{m.path}")
