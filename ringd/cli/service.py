"""``ringctl service install | uninstall | status``: run ringd under systemd or launchd.

:mod:`ringd.cli` registers the group with ``main.add_command(service)``. Every command that
talks to the service manager goes through one runner callable (``ctx.obj["service_runner"]``,
default :func:`run_command`) so tests can check the exact argv.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence
from xml.parsers.expat import ExpatError

import click

from ringd.cli.common import Group
from ringd.errors import ExitCode, RingdError, UsageError
from ringd.service.units import (Manager, Plan, Remove, Run, Scope, Write, describe, install_plan,
                                 manager_unusable, status_plan, uninstall_plan)
from ringd.state import atomic_write

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_command(argv: Sequence[str]) -> "subprocess.CompletedProcess[str]":
    """Run a service-manager command, capturing its output."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        return subprocess.CompletedProcess(list(argv), 127, "", f"{argv[0]}: command not found\n")


def find_ringd() -> str:
    """The ``ringd`` executable of this installation (next to this Python first, then PATH)."""
    beside = Path(sys.executable).parent / "ringd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute())
    found = shutil.which("ringd")
    if found:
        return str(Path(found).absolute())
    raise UsageError("cannot find the ringd executable",
                     hint="install ringd (pip install ringd) or pass --exec /path/to/ringd")


class _Options:
    def __init__(self, ctx: click.Context, scope: str, manager: str, root: str | None,
                 dry_run: bool) -> None:
        self.scope = Scope(scope)
        self.manager = Manager.for_platform() if manager == "auto" else Manager(manager)
        self.root = Path(root).absolute() if root else None
        self.dry_run = dry_run
        obj = ctx.find_root().obj or {}
        self.runner: Runner = obj.get("service_runner", run_command)
        config = obj.get("config")
        self.config_file = str(Path(config).absolute()) if config else None
        self.home = str(Path.home())
        self.uid = os.getuid()
        self.unusable = (
            "--root given: the files go under the root; the service manager is not told"
            if self.root else manager_unusable(self.manager, self.scope))


def _common(fn: Callable[..., None]) -> Callable[..., None]:
    fn = click.option("--dry-run", is_flag=True,
                      help="Print the files and commands; change nothing.")(fn)
    fn = click.option("--root", type=click.Path(file_okay=False), default=None,
                      help="Write files under this directory instead of / (for tests and images); "
                           "the service manager is not told.")(fn)
    fn = click.option("--manager", type=click.Choice(["auto", "systemd", "launchd"]),
                      default="auto", show_default=True,
                      help="Service manager (auto: launchd on macOS, else systemd).")(fn)
    fn = click.option("--scope", type=click.Choice(["user", "system"]), default="user",
                      show_default=True,
                      help="user: a service of your login (systemd --user, LaunchAgent); "
                           "system: a machine-wide service (needs root).")(fn)
    return fn


def _echo_plan(plan: Plan, verb: str, o: _Options) -> None:
    click.echo(f"ringd service {verb} ({plan.manager.value}, {plan.scope.value} scope) -- "
               "dry run, nothing is changed")
    runs = [s for s in plan.steps if isinstance(s, Run)]
    for step in plan.steps:
        if isinstance(step, Write):
            click.echo(f"--- would {describe(step)}:")
            click.echo(step.content.decode(), nl=False)
        elif isinstance(step, Remove):
            click.echo(f"--- would {describe(step)}")
    if runs:
        if o.unusable:
            click.echo(f"--- would NOT run these commands ({o.unusable}); elsewhere they are:")
        else:
            click.echo("--- would run, in order:")
        for r in runs:
            click.echo(shlex.join(r.argv) + ("" if r.check else "   # a failure here is fine"))
    for note in plan.notes:
        click.echo(f"note: {note}")


def _execute(plan: Plan, o: _Options) -> None:
    run_commands = o.unusable is None
    for step in plan.steps:
        if isinstance(step, Write):
            path = Path(step.path)
            if step.keep_existing and path.exists():
                click.echo(f"kept {path} (exists)")
                continue
            try:
                path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                atomic_write(path, step.content, mode=step.mode)
            except PermissionError:
                raise UsageError(f"no permission to write {path}",
                                 hint="a system service needs root: run with sudo, "
                                      "or use --scope user") from None
            click.echo(f"wrote {path} (mode {step.mode:04o})")
        elif isinstance(step, Remove):
            try:
                Path(step.path).unlink()
                click.echo(f"removed {step.path}")
            except FileNotFoundError:
                click.echo(f"{step.path} was not there")
            except PermissionError:
                raise UsageError(f"no permission to remove {step.path}",
                                 hint="a system service needs root: run with sudo") from None
        elif run_commands:
            proc = o.runner(step.argv)
            click.echo(f"ran {shlex.join(step.argv)}"
                       + (f" (exit {proc.returncode})" if proc.returncode else ""))
            if proc.returncode != 0 and step.check:
                raise RingdError(f"`{shlex.join(step.argv)}` failed with exit code "
                                 f"{proc.returncode}: "
                                 f"{(proc.stderr or proc.stdout).strip()[-500:]}",
                                 hint="the files are in place; fix the cause and run the command "
                                      "again")
    if not run_commands:
        click.echo(f"did not tell the service manager ({o.unusable}); the commands would be:")
        for step in plan.steps:
            if isinstance(step, Run):
                click.echo("  " + shlex.join(step.argv))
    for note in plan.notes:
        click.echo(f"note: {note}")


def _refuse_if_unusable(o: _Options, verb: str) -> None:
    if o.unusable and o.root is None and not o.dry_run:
        raise UsageError(f"cannot {verb} the {o.manager.value} service here: {o.unusable}",
                         hint="--dry-run shows what would be written and run; --root DIR writes "
                              "the files under DIR without telling the service manager")


@click.group("service", cls=Group)
def service() -> None:
    """Run ringd as a service: systemd on Linux, launchd on macOS."""


@service.command("install")
@_common
@click.option("--exec", "exec_path", type=click.Path(dir_okay=False), default=None,
              help="Path of the ringd executable (default: the one installed with this ringctl).")
@click.option("--run-as", default=None,
              help="System scope: the user the service runs as (default root).")
@click.pass_context
def install(ctx: click.Context, scope: str, manager: str, root: str | None, dry_run: bool,
            exec_path: str | None, run_as: str | None) -> None:
    """Write the service definition and start ringd (it starts again at boot or login)."""
    o = _Options(ctx, scope, manager, root, dry_run)
    if run_as and o.scope is Scope.USER:
        raise UsageError("--run-as is for --scope system", hint="a user service runs as you")
    _refuse_if_unusable(o, "install")
    exe = str(Path(exec_path).absolute()) if exec_path else find_ringd()
    plan = install_plan(o.manager, o.scope, exec_path=exe, home=o.home, uid=o.uid, root=o.root,
                        config_file=o.config_file, run_as=run_as)
    if dry_run:
        _echo_plan(plan, "install", o)
    else:
        _execute(plan, o)


@service.command("uninstall")
@_common
@click.option("--purge", is_flag=True,
              help="Also remove the environment file (the state directory is always kept).")
@click.pass_context
def uninstall(ctx: click.Context, scope: str, manager: str, root: str | None, dry_run: bool,
              purge: bool) -> None:
    """Stop ringd and remove the service definition."""
    o = _Options(ctx, scope, manager, root, dry_run)
    _refuse_if_unusable(o, "uninstall")
    plan = uninstall_plan(o.manager, o.scope, home=o.home, uid=o.uid, root=o.root, purge=purge)
    if dry_run:
        _echo_plan(plan, "uninstall", o)
    else:
        _execute(plan, o)


@service.command("status")
@_common
@click.pass_context
def status(ctx: click.Context, scope: str, manager: str, root: str | None, dry_run: bool) -> None:
    """Say whether the service is installed, current, and running.

    Exit code: 0 running, 1 not installed, 3 installed but not running (or cannot tell).
    """
    o = _Options(ctx, scope, manager, root, dry_run)
    plan = status_plan(o.manager, o.scope, home=o.home, uid=o.uid)
    local = Path(o.root, plan.service_file.relative_to("/")) if o.root else Path(plan.service_file)
    click.echo(f"{o.manager.value}, {o.scope.value} scope: {local}")
    if not local.exists():
        click.echo("not installed (`ringctl service install` installs it)")
        ctx.exit(int(ExitCode.FAILURE))
    current = next(s for s in install_plan(
        o.manager, o.scope, exec_path=_installed_exec(local) or "", home=o.home, uid=o.uid,
        config_file=o.config_file).steps if isinstance(s, Write))
    same = local.read_bytes() == current.content
    click.echo("installed, " + ("up to date" if same else
                                "but it differs from what `ringctl service install` writes now "
                                "(reinstall to update)"))
    if dry_run or o.unusable:
        for step in plan.steps:
            if isinstance(step, Run):
                click.echo(f"would run {shlex.join(step.argv)}"
                           + (f" -- not here: {o.unusable}" if o.unusable else ""))
        ctx.exit(int(ExitCode.NOT_RUNNING))
    (run,) = [s for s in plan.steps if isinstance(s, Run)]
    proc = o.runner(run.argv)
    click.echo((proc.stdout or "") + (proc.stderr or ""), nl=False)
    ctx.exit(int(ExitCode.OK if proc.returncode == 0 else ExitCode.NOT_RUNNING))


def _installed_exec(path: Path) -> str | None:
    """The ringd path recorded in an installed unit or plist (to compare like with like)."""
    data = path.read_bytes()
    if path.suffix == ".plist":
        try:
            args = plistlib.loads(data).get("ProgramArguments") or [None]
        except (plistlib.InvalidFileException, ExpatError, ValueError, AttributeError):
            return None  # unreadable: it counts as different
        return args[0] if isinstance(args[0], str) else None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("ExecStart="):
            try:
                words = shlex.split(line[len("ExecStart="):])
            except ValueError:
                return None
            return words[0].replace("%%", "%").replace("$$", "$") if words else None
    return None
