"""`ringctl service ...` through click's runner: dry runs, a real install into a temporary
root, uninstall, status, and the exact service-manager argv through the runner seam."""

from __future__ import annotations

import os
import plistlib
import subprocess
from pathlib import Path
from typing import Sequence

import click
import pytest
from click.testing import CliRunner

import ringd.cli.service as cli_service
from ringd.cli.service import service
from ringd.service.units import (LABEL, Scope, render_env_file, render_launchd_plist,
                                 render_systemd_unit)


class FakeRunner:
    """Records argv; launchctl cannot run here, so this stands in for it."""

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail or {}

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        rc = self.fail.get(argv[1], 0)
        return subprocess.CompletedProcess(list(argv), rc, "state = running\n" if rc == 0 else "",
                                           "" if rc == 0 else f"{argv[1]} went wrong\n")


def invoke(args: list[str], runner: FakeRunner | None = None,
           config: str | None = None) -> click.testing.Result:
    @click.group()
    @click.pass_context
    def main(ctx: click.Context) -> None:  # stands in for ringctl's main group
        ctx.obj = {"config": config, **({"service_runner": runner} if runner else {})}

    main.add_command(service)
    return CliRunner().invoke(main, ["service", *args], catch_exceptions=False)


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777
            for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    return h


def test_dry_run_prints_files_and_commands_and_writes_nothing(tmp_path: Path, home: Path) -> None:
    root = tmp_path / "root"
    r = invoke(["install", "--scope", "system", "--manager", "systemd", "--root", str(root),
                "--exec", "/opt/ringd/bin/ringd", "--dry-run"], config="/etc/ringd/ringd.toml")
    assert r.exit_code == 0, r.output
    unit = render_systemd_unit(Scope.SYSTEM, "/opt/ringd/bin/ringd",
                               config_file="/etc/ringd/ringd.toml")
    assert (f"--- would write {root}/etc/systemd/system/ringd.service (mode 0644):\n{unit}"
            in r.output)
    assert (f"--- would write {root}/etc/ringd/ringd.env (mode 0600, only if missing):\n"
            f"{render_env_file()}" in r.output)
    assert "\nsystemctl daemon-reload\nsystemctl enable ringd.service\n" \
           "systemctl restart --no-block ringd.service\n" in r.output
    assert "would NOT run these commands (--root given" in r.output
    assert not root.exists() and files_under(home) == {}


def test_install_into_a_root_then_uninstall(tmp_path: Path, home: Path) -> None:
    root = tmp_path / "root"
    r = invoke(["install", "--scope", "system", "--manager", "systemd", "--root", str(root),
                "--exec", "/opt/ringd/bin/ringd"])
    assert r.exit_code == 0, r.output
    assert files_under(root) == {"etc/systemd/system/ringd.service": 0o644,
                                 "etc/ringd/ringd.env": 0o600}
    assert (root / "etc/systemd/system/ringd.service").read_text() == \
        render_systemd_unit(Scope.SYSTEM, "/opt/ringd/bin/ringd")
    assert "did not tell the service manager (--root given" in r.output

    env = root / "etc/ringd/ringd.env"
    env.write_text("RINGD_LOG_LEVEL=debug\n")  # the user's edit survives a reinstall
    r = invoke(["install", "--scope", "system", "--manager", "systemd", "--root", str(root),
                "--exec", "/opt/ringd/bin/ringd"])
    assert r.exit_code == 0 and f"kept {env} (exists)" in r.output
    assert env.read_text() == "RINGD_LOG_LEVEL=debug\n"

    r = invoke(["status", "--scope", "system", "--manager", "systemd", "--root", str(root)])
    assert r.exit_code == 3 and "installed, up to date" in r.output, r.output
    (root / "etc/systemd/system/ringd.service").write_text(
        "[Service]\nExecStart=/opt/ringd/bin/ringd run\n")
    r = invoke(["status", "--scope", "system", "--manager", "systemd", "--root", str(root)])
    assert "differs from what `ringctl service install` writes now" in r.output

    r = invoke(["uninstall", "--scope", "system", "--manager", "systemd", "--root", str(root)])
    assert r.exit_code == 0 and files_under(root) == {"etc/ringd/ringd.env": 0o600}
    assert "state directory (node id, cluster key) and the model store are kept" in r.output
    r = invoke(["uninstall", "--scope", "system", "--manager", "systemd", "--root", str(root),
                "--purge"])
    assert r.exit_code == 0 and files_under(root) == {}
    r = invoke(["status", "--scope", "system", "--manager", "systemd", "--root", str(root)])
    assert r.exit_code == 1 and "not installed" in r.output


def test_user_scope_install_into_a_root_uses_the_home(tmp_path: Path, home: Path) -> None:
    root = tmp_path / "root"
    r = invoke(["install", "--manager", "systemd", "--root", str(root), "--exec", "/x/ringd"])
    assert r.exit_code == 0, r.output
    rel = str(home.relative_to("/"))
    assert files_under(root) == {f"{rel}/.config/systemd/user/ringd.service": 0o644,
                                 f"{rel}/.config/ringd/ringd.env": 0o600}


def test_launchd_agent_install_runs_the_exact_launchctl_commands(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_service, "manager_unusable",
                        lambda manager, scope: None)  # pretend macOS
    fake = FakeRunner()
    r = invoke(["install", "--manager", "launchd", "--exec", "/opt/ringd"], runner=fake)
    assert r.exit_code == 0, r.output
    plist_path = home / "Library/LaunchAgents" / f"{LABEL}.plist"
    uid = os.getuid()
    assert fake.calls == [["launchctl", "bootout", f"gui/{uid}/{LABEL}"],
                          ["launchctl", "enable", f"gui/{uid}/{LABEL}"],
                          ["launchctl", "bootstrap", f"gui/{uid}", str(plist_path)]]
    assert plist_path.read_bytes() == render_launchd_plist(Scope.USER, "/opt/ringd", home=str(home))
    assert (plist_path.stat().st_mode & 0o777) == 0o644
    assert (plistlib.loads(plist_path.read_bytes())["StandardErrorPath"]
            == f"{home}/Library/Logs/ringd.log")

    fake.calls.clear()
    r = invoke(["status", "--manager", "launchd"], runner=fake)
    assert (r.exit_code == 0 and "installed, up to date" in r.output
            and "state = running" in r.output)
    assert fake.calls == [["launchctl", "print", f"gui/{uid}/{LABEL}"]]

    fake = FakeRunner(fail={"bootout": 3})  # not loaded: fine for uninstall
    r = invoke(["uninstall", "--manager", "launchd"], runner=fake)
    assert r.exit_code == 0, r.output
    assert fake.calls == [["launchctl", "bootout", f"gui/{uid}/{LABEL}"]]
    assert not plist_path.exists()


def test_a_failing_command_is_a_clear_error(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_service, "manager_unusable", lambda manager, scope: None)
    fake = FakeRunner(fail={"bootstrap": 5})
    r = invoke(["install", "--manager", "launchd", "--exec", "/opt/ringd"], runner=fake)
    assert r.exit_code == 1
    assert "`launchctl bootstrap gui/" in r.output and "failed with exit code 5" in r.output
    assert "bootstrap went wrong" in r.output and "hint:" in r.output


def test_without_a_usable_manager_install_refuses_and_writes_nothing(
        tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_service, "manager_unusable",
                        lambda manager, scope: "systemd is not running on this machine "
                                               "(PID 1 is 'init')")
    fake = FakeRunner()
    r = invoke(["install", "--manager", "systemd", "--exec", "/x/ringd"], runner=fake)
    assert r.exit_code == 2 and fake.calls == []
    assert "cannot install the systemd service here: systemd is not running" in r.output
    assert "--dry-run" in r.output and "--root" in r.output
    assert files_under(home) == {}


def test_run_as_only_for_system_scope(tmp_path: Path, home: Path) -> None:
    r = invoke(["install", "--run-as", "ringd", "--root", str(tmp_path), "--exec", "/x/ringd"])
    assert r.exit_code == 2 and "--run-as is for --scope system" in r.output
