"""``ringctl``: a thin click shell over the local daemon's control API, the model store and
the service manager.

One module per command group; :mod:`ringd.cli.common` holds what they share (the one error
handler, settings, ``--host``/``--port``, the client). This package only assembles them.
"""

from __future__ import annotations

import click

from ringd.cli import demo, doctor, keys, model, ping, proof, ring, service
from ringd.cli.common import CONTEXT, Group, exit_codes_help

__all__ = ["main"]


@click.group(cls=Group, context_settings=CONTEXT, epilog=exit_codes_help())
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              envvar="RINGD_CONFIG", help="ringd TOML config file (also RINGD_CONFIG).")
@click.version_option(package_name="ringd")
@click.pass_context
def main(ctx: click.Context, config: str | None) -> None:
    """Talk to the local ringd node and manage models."""
    ctx.obj = {"config": config}


# The submodules keep their names (``ringd.cli.service`` is the module, not its group).
for _command in (ring.status, ring.prompt, proof.verify, proof.bench, model.model, keys.keygen,
                 demo.demo, service.service, ping.ping, doctor.doctor):
    main.add_command(_command)
