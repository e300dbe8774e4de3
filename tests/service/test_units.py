"""Unit file and plists: rendered, checked by systemd-analyze where present, parsed always;
the repository copies are the renderings; install plans carry the exact commands."""

from __future__ import annotations

import dataclasses
import os
import plistlib
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from ringd.config import Settings
from ringd.service.units import (
    LABEL,
    Manager,
    Remove,
    Run,
    Scope,
    Write,
    install_plan,
    manager_unusable,
    render_env_file,
    render_launchd_plist,
    render_systemd_unit,
    status_plan,
    uninstall_plan,
)

REPO = Path(__file__).resolve().parents[2]
RINGD = str(Path(shutil.which("ringd") or REPO / ".venv/bin/ringd"))


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """systemd unit syntax: [Section], Key=Value lines (keys may repeat), # comments."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            current = sections.setdefault(m.group(1), [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None and re.fullmatch(r"[A-Za-z]+", key), f"bad line {raw!r}"
        current.append((key, value))
    return sections


def one(section: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in section if k == key]
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


@pytest.mark.parametrize("scope", list(Scope))
def test_systemd_unit_has_the_required_settings(scope: Scope) -> None:
    unit = parse_unit(render_systemd_unit(scope, "/opt/ring d/bin/ringd",
                                          config_file="/etc/ringd/r.toml"))
    s = unit["Service"]
    assert one(s, "Type") == "notify" and one(s, "NotifyAccess") == "main"
    assert one(s, "ExecStart") == '"/opt/ring d/bin/ringd" run'
    assert one(s, "WatchdogSec") == "30" and one(s, "Restart") == "on-failure"
    assert int(one(s, "RestartSec")) > 0 and one(s, "KillSignal") == "SIGTERM"
    assert one(s, "RestartPreventExitStatus") == "2"
    assert int(one(s, "TimeoutStopSec")) > Settings().shutdown_timeout
    assert one(s, "StateDirectory") == "ringd" and one(s, "StateDirectoryMode") == "0700"
    assert one(s, "EnvironmentFile") == "-%E/ringd/ringd.env"
    env = [v for k, v in s if k == "Environment"]
    assert "RINGD_STATE_DIR=%S/ringd" in env and "RINGD_CONFIG=/etc/ringd/r.toml" in env
    assert one(s, "StandardError") == "journal"
    assert int(one(unit["Unit"], "StartLimitBurst")) > 1
    assert one(unit["Unit"], "StartLimitIntervalSec")
    wanted = "multi-user.target" if scope is Scope.SYSTEM else "default.target"
    assert one(unit["Install"], "WantedBy") == wanted
    assert ("User" in dict(s)) is False  # only as a comment unless asked for
    as_user = parse_unit(render_systemd_unit(Scope.SYSTEM, run_as="ringd"))
    assert one(as_user["Service"], "User") == "ringd"


@pytest.mark.parametrize("scope", list(Scope))
def test_systemd_analyze_verify_accepts_the_unit(scope: Scope, tmp_path: Path) -> None:
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    path = unit_dir / "ringd.service"
    path.write_text(render_systemd_unit(scope, RINGD, config_file="/etc/ring d/x%y.toml",
                                        run_as=None))
    parse_unit(path.read_text())
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # parsed above; nothing more to ask on this machine
        return
    argv = [analyze, *(["--user"] if scope is Scope.USER else []), "verify", str(path)]
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path), "SYSTEMD_LOG_LEVEL": "info"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    # verify exits 0 even for unknown keys: any message at all is a finding
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr


@pytest.mark.parametrize("scope", list(Scope))
def test_launchd_plist_has_the_required_keys(scope: Scope) -> None:
    plist = plistlib.loads(render_launchd_plist(scope, "/opt/ringd", home="/Users/ann",
                                                config_file="/etc/r.toml", run_as="_ringd"))
    assert plist["Label"] == LABEL
    assert plist["ProgramArguments"] == ["/opt/ringd", "run"]
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] >= 5 and plist["ExitTimeOut"] > Settings().shutdown_timeout
    log = "/Users/ann/Library/Logs/ringd.log" if scope is Scope.USER else "/Library/Logs/ringd.log"
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == log
    env = plist["EnvironmentVariables"]
    assert env["RINGD_CONFIG"] == "/etc/r.toml" and env["PYTHONUNBUFFERED"] == "1"
    if scope is Scope.SYSTEM:
        assert env["RINGD_STATE_DIR"].startswith("/Library/") and plist["UserName"] == "_ringd"
    else:
        assert "UserName" not in plist


def test_repository_copies_are_the_renderings() -> None:
    hint = "regenerate with: .venv/bin/python -m ringd.service.units ."
    assert (REPO / "systemd/ringd.service").read_text() == render_systemd_unit(Scope.SYSTEM), hint
    assert (REPO / f"launchd/{LABEL}.plist").read_bytes() == render_launchd_plist(Scope.USER), hint
    assert (REPO / f"launchd/{LABEL}.daemon.plist").read_bytes() == \
        render_launchd_plist(Scope.SYSTEM), hint
    for name in (f"launchd/{LABEL}.plist", f"launchd/{LABEL}.daemon.plist"):
        assert plistlib.loads((REPO / name).read_bytes())["Label"] == LABEL
    parse_unit((REPO / "systemd/ringd.service").read_text())


def test_env_file_names_only_real_settings() -> None:
    known = {"RINGD_" + f.name.upper() for f in dataclasses.fields(Settings)} | {"RINGD_CONFIG"}
    for text in ((REPO / "systemd/ringd.env.example").read_text(), render_env_file()):
        names = set(re.findall(r"^#?(RINGD_[A-Z_]+)=", text, re.M))
        assert names <= known, names - known
        assert {"RINGD_STATE_DIR", "RINGD_LOG_LEVEL", "RINGD_STALL_TIMEOUT",
                "RINGD_API_KEY"} <= names
    assert set(re.findall(r"^#?(RINGD_[A-Z_]+)=", render_env_file(), re.M)) == known
    # every line is a comment or blank: the defaults stay the code's defaults
    assert all(not line or line.startswith("#") for line in render_env_file().splitlines())


def runs(plan) -> list[tuple[str, ...]]:
    return [s.argv for s in plan.steps if isinstance(s, Run)]


def test_systemd_plans_carry_the_exact_commands() -> None:
    p = install_plan(Manager.SYSTEMD, Scope.USER, exec_path="/x/ringd", home="/home/ann", uid=1000)
    assert runs(p) == [("systemctl", "--user", "daemon-reload"),
                       ("systemctl", "--user", "enable", "ringd.service"),
                       ("systemctl", "--user", "restart", "--no-block", "ringd.service")]
    writes = [s for s in p.steps if isinstance(s, Write)]
    assert [(str(w.path), w.mode, w.keep_existing) for w in writes] == [
        ("/home/ann/.config/systemd/user/ringd.service", 0o644, False),
        ("/home/ann/.config/ringd/ringd.env", 0o600, True)]
    p = install_plan(Manager.SYSTEMD, Scope.SYSTEM, exec_path="/x/ringd", home="/root", uid=0,
                     root=Path("/stage"))
    assert [str(s.path) for s in p.steps if isinstance(s, Write)] == [
        "/stage/etc/systemd/system/ringd.service", "/stage/etc/ringd/ringd.env"]
    assert runs(p)[0] == ("systemctl", "daemon-reload")
    u = uninstall_plan(Manager.SYSTEMD, Scope.SYSTEM, home="/root", uid=0, purge=True)
    assert [type(s).__name__ for s in u.steps] == ["Run", "Remove", "Remove", "Run"]
    assert runs(u) == [("systemctl", "disable", "--now", "ringd.service"),
                       ("systemctl", "daemon-reload")]
    assert runs(status_plan(Manager.SYSTEMD, Scope.USER, home="/h", uid=5)) == [
        ("systemctl", "--user", "status", "--no-pager", "--lines=10", "ringd.service")]


def test_launchd_plans_carry_the_exact_commands() -> None:
    p = install_plan(Manager.LAUNCHD, Scope.USER, exec_path="/x/ringd", home="/Users/ann", uid=501)
    plist = f"/Users/ann/Library/LaunchAgents/{LABEL}.plist"
    assert p.service_file == PurePosixPath(plist)
    assert runs(p) == [("launchctl", "bootout", f"gui/501/{LABEL}"),
                       ("launchctl", "enable", f"gui/501/{LABEL}"),
                       ("launchctl", "bootstrap", "gui/501", plist)]
    assert [s.check for s in p.steps if isinstance(s, Run)] == [False, True, True]
    p = install_plan(Manager.LAUNCHD, Scope.SYSTEM, exec_path="/x/ringd", home="/var/root", uid=0)
    assert runs(p)[-1] == ("launchctl", "bootstrap", "system",
                           f"/Library/LaunchDaemons/{LABEL}.plist")
    u = uninstall_plan(Manager.LAUNCHD, Scope.USER, home="/Users/ann", uid=501)
    assert u.steps == (Run(("launchctl", "bootout", f"gui/501/{LABEL}"), check=False),
                       Remove(PurePosixPath(plist)))
    assert runs(status_plan(Manager.LAUNCHD, Scope.SYSTEM, home="/", uid=0)) == [
        ("launchctl", "print", f"system/{LABEL}")]


def test_manager_detection_on_this_machine() -> None:
    reason = manager_unusable(Manager.SYSTEMD, Scope.SYSTEM, platform="linux")
    assert (reason is None) == Path("/run/systemd/system").is_dir()
    if reason:
        assert "systemd is not running" in reason and "PID 1" in reason
    assert manager_unusable(Manager.LAUNCHD, Scope.USER,
                            platform="linux") == "launchd exists only on macOS"
    assert manager_unusable(Manager.LAUNCHD, Scope.USER, platform="darwin") is None
