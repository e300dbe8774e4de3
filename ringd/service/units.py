"""Service definitions for systemd and launchd, and the steps that install or remove them.

Rendering and planning are pure: :func:`install_plan`, :func:`uninstall_plan` and
:func:`status_plan` return an ordered list of steps (write a file, remove a file, run a
command) that ``ringctl service`` prints (``--dry-run``) or carries out. The files in the
repository's ``systemd/`` and ``launchd/`` directories are these renderings with the
default executable path; ``python -m ringd.service.units DIR`` rewrites them.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import plistlib
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

from ringd.config import ENV_PREFIX, Settings

LABEL = "org.ringd.ringd"
UNIT_NAME = "ringd.service"
DEFAULT_EXEC = "/usr/local/bin/ringd"
WATCHDOG_SEC = 30
STOP_TIMEOUT_SEC = 30
RESTART_SEC = 5
THROTTLE_SEC = 10
MACOS_SYSTEM_DATA = "/Library/Application Support/ringd"


class Manager(enum.Enum):
    SYSTEMD = "systemd"
    LAUNCHD = "launchd"

    @classmethod
    def for_platform(cls, platform: str = sys.platform) -> "Manager":
        return cls.LAUNCHD if platform == "darwin" else cls.SYSTEMD


class Scope(enum.Enum):
    USER = "user"      # systemd --user unit / launchd LaunchAgent (the logged-in session, its GPU)
    SYSTEM = "system"  # system unit / LaunchDaemon (headless nodes)


@dataclass(frozen=True)
class Write:
    path: PurePosixPath
    content: bytes
    mode: int
    keep_existing: bool = False  # configuration the user may have edited: never overwrite


@dataclass(frozen=True)
class Remove:
    path: PurePosixPath


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    check: bool = True  # False: a failure is expected when there is nothing to undo


Step = Write | Remove | Run


@dataclass(frozen=True)
class Plan:
    manager: Manager
    scope: Scope
    service_file: PurePosixPath  # where the unit/plist lives on the target system
    steps: tuple[Step, ...]
    notes: tuple[str, ...] = ()


# --------------------------------------------------------------------------- rendering
def _sd_quote(word: str) -> str:
    if word and not any(c in word for c in ' \t"\'\\$%;'):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return '"' + escaped + '"'


def render_systemd_unit(scope: Scope, exec_path: str = DEFAULT_EXEC, *,
                        config_file: str | None = None, run_as: str | None = None) -> str:
    """The ``ringd.service`` unit for ``scope``."""
    system = scope is Scope.SYSTEM
    env = ["PYTHONUNBUFFERED=1", f"{ENV_PREFIX}STATE_DIR=%S/ringd"]  # %S: expanded by systemd
    if system:  # a system service has no home of its own: keep the models with the state
        env.append(f"{ENV_PREFIX}MODEL_STORE=%S/ringd/models")
    if config_file:
        env.append(_sd_quote(f"{ENV_PREFIX}CONFIG={config_file}"))
    if run_as:
        user_lines = f"User={run_as}\nGroup={run_as}\n"
    else:
        user_lines = (
            "# Run as a dedicated user (create it first; it must own the state directory):\n"
            "#User=ringd\n#Group=ringd\n"
            "# DynamicUser=yes works too: systemd then keeps the state in\n"
            "# /var/lib/private/ringd and hands it to the new uid on every start, so the\n"
            "# node id survives; do not point RINGD_STATE_DIR elsewhere with DynamicUser.\n")
    network = "After=network-online.target\nWants=network-online.target\n" if system else ""
    return f"""\
# ringd: one node of a ring that runs a language model across machines.
# Written by `ringctl service install --scope {scope.value}`; reinstalling overwrites it.
# Configure ringd in %E/ringd/ringd.env (RINGD_* variables; %E is /etc for the system
# manager, ~/.config for a user) or in a TOML file named by RINGD_CONFIG, not here.

[Unit]
Description=ringd node (one language model across a ring of machines)
{network}\
# After 5 failed starts within 10 minutes, stop trying (`systemctl reset-failed ringd`).
StartLimitIntervalSec=600
StartLimitBurst=5

[Service]
Type=notify
NotifyAccess=main
ExecStart={_sd_quote(exec_path)} run
EnvironmentFile=-%E/ringd/ringd.env
{chr(10).join("Environment=" + e for e in env)}
# Node id, boot epoch and cluster key; %S is /var/lib (system) or ~/.local/state (user).
StateDirectory=ringd
StateDirectoryMode=0700
# READY=1 comes once the node has joined a ring and loaded its layers, which lasts as long
# as the other nodes take to appear; so no start timeout. The watchdog covers a stuck loop.
TimeoutStartSec=infinity
WatchdogSec={WATCHDOG_SEC}
# SIGTERM: refuse new requests, tell peers we leave, let running requests finish; SIGKILL after.
KillSignal=SIGTERM
TimeoutStopSec={STOP_TIMEOUT_SEC}
Restart=on-failure
RestartSec={RESTART_SEC}
# Exit code 2 means a configuration or usage error: restarting would not help.
RestartPreventExitStatus=2
StandardOutput=journal
StandardError=journal
SyslogIdentifier=ringd
NoNewPrivileges=yes
{"PrivateTmp=yes" + chr(10) if system else ""}\
{user_lines}
[Install]
WantedBy={"multi-user.target" if system else "default.target"}
"""


def render_env_file() -> str:
    """The environment file: every setting, commented out at its default."""
    lines = [
        "# ringd settings for the service (systemd EnvironmentFile). Uncomment and edit;",
        "# then `systemctl restart ringd` (add --user for a user service).",
        "# A TOML file works too: set RINGD_CONFIG=/path/to/ringd.toml.",
        "# Keep this file private (mode 0600) if it holds RINGD_API_KEY.",
        "",
        f"#{ENV_PREFIX}CONFIG=",
    ]
    for f in dataclasses.fields(Settings):
        lines.append("")
        lines.append(f"# {f.metadata['help']}")
        if f.name == "state_dir":
            lines.append("# (the unit sets it to %S/ringd: /var/lib/ringd, "
                         "or ~/.local/state/ringd for a user)")
        if f.default is dataclasses.MISSING or f.default is None:
            value = ""
        elif isinstance(f.default, bool):
            value = "true" if f.default else "false"
        elif isinstance(f.default, tuple):
            value = ",".join(f.default)
        else:
            value = str(f.default)
        lines.append(f"#{ENV_PREFIX}{f.name.upper()}={value}")
    return "\n".join(lines) + "\n"


def _launchd_log(scope: Scope, home: str) -> str:
    return f"{home}/Library/Logs/ringd.log" if scope is Scope.USER else "/Library/Logs/ringd.log"


def render_launchd_plist(scope: Scope, exec_path: str = DEFAULT_EXEC, *, home: str = "/Users/you",
                         config_file: str | None = None, run_as: str | None = None) -> bytes:
    """The LaunchAgent (user scope) or LaunchDaemon (system scope) property list."""
    env = {"PYTHONUNBUFFERED": "1"}
    if scope is Scope.SYSTEM:
        env[f"{ENV_PREFIX}STATE_DIR"] = MACOS_SYSTEM_DATA
        env[f"{ENV_PREFIX}MODEL_STORE"] = f"{MACOS_SYSTEM_DATA}/models"
    if config_file:
        env[f"{ENV_PREFIX}CONFIG"] = config_file
    log = _launchd_log(scope, home)
    plist: dict[str, object] = {
        "Label": LABEL,
        "ProgramArguments": [exec_path, "run"],
        "RunAtLoad": True,
        # restart after a crash or a stall exit, not after exit 0
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": THROTTLE_SEC,
        "ExitTimeOut": STOP_TIMEOUT_SEC,
        "ProcessType": "Interactive",  # no background throttling of the compute
        "StandardOutPath": log,
        "StandardErrorPath": log,
        "EnvironmentVariables": env,
    }
    if run_as and scope is Scope.SYSTEM:
        plist["UserName"] = run_as
    body = plistlib.dumps(plist, sort_keys=False)
    kind = "LaunchAgent (per user)" if scope is Scope.USER else "LaunchDaemon (system)"
    # no "--" inside an XML comment
    comment = (f"<!-- ringd {kind}. Written by `ringctl service install` (scope {scope.value});"
               f" reinstalling overwrites it. -->\n").encode()
    head, sep, rest = body.partition(b"<plist")
    return head + comment + sep + rest


# --------------------------------------------------------------------------- planning
def _rooted(root: Path | None, path: str) -> PurePosixPath:
    p = PurePosixPath(path)
    return PurePosixPath(root) / p.relative_to("/") if root is not None else p


def service_path(manager: Manager, scope: Scope, home: str) -> str:
    if manager is Manager.SYSTEMD:
        return (f"/etc/systemd/system/{UNIT_NAME}" if scope is Scope.SYSTEM
                else f"{home}/.config/systemd/user/{UNIT_NAME}")
    return (f"/Library/LaunchDaemons/{LABEL}.plist" if scope is Scope.SYSTEM
            else f"{home}/Library/LaunchAgents/{LABEL}.plist")


def env_file_path(scope: Scope, home: str) -> str:
    return "/etc/ringd/ringd.env" if scope is Scope.SYSTEM else f"{home}/.config/ringd/ringd.env"


def _systemctl(scope: Scope, *args: str) -> tuple[str, ...]:
    return ("systemctl", *(("--user",) if scope is Scope.USER else ()), *args)


def _launchd_domain(scope: Scope, uid: int) -> str:
    return "system" if scope is Scope.SYSTEM else f"gui/{uid}"


def install_plan(manager: Manager, scope: Scope, *, exec_path: str, home: str, uid: int,
                 root: Path | None = None, config_file: str | None = None,
                 run_as: str | None = None) -> Plan:
    """Write the service file (and, for systemd, an env file if there is none), then load it."""
    target = service_path(manager, scope, home)
    if manager is Manager.SYSTEMD:
        unit = render_systemd_unit(scope, exec_path, config_file=config_file, run_as=run_as)
        steps: list[Step] = [
            Write(_rooted(root, target), unit.encode(), 0o644),
            Write(_rooted(root, env_file_path(scope, home)), render_env_file().encode(), 0o600,
                  keep_existing=True),
            Run(_systemctl(scope, "daemon-reload")),
            Run(_systemctl(scope, "enable", UNIT_NAME)),
            # restart, not start: a reinstall replaces a running daemon; --no-block because
            # READY=1 only comes once a ring has formed.
            Run(_systemctl(scope, "restart", "--no-block", UNIT_NAME)),
        ]
        u = " --user" if scope is Scope.USER else ""
        notes = [f"follow it with `journalctl{u} -u ringd -f`; `systemctl{u} status ringd` shows "
                 "'active' once it has joined a ring and loaded its layers",
                 f"settings: {env_file_path(scope, home)} (kept if it exists)"]
        if scope is Scope.USER:
            notes.append("to start it at boot without logging in: `loginctl enable-linger $USER`")
        else:
            notes.append("the system service keeps models in /var/lib/ringd/models: "
                         "`sudo RINGD_MODEL_STORE=/var/lib/ringd/models ringctl model pull`")
    else:
        domain = _launchd_domain(scope, uid)
        plist = render_launchd_plist(scope, exec_path, home=home, config_file=config_file,
                                     run_as=run_as)
        steps = [
            Write(_rooted(root, target), plist, 0o644),
            # an older copy, if loaded
            Run(("launchctl", "bootout", f"{domain}/{LABEL}"), check=False),
            Run(("launchctl", "enable", f"{domain}/{LABEL}")),
            Run(("launchctl", "bootstrap", domain, target)),
        ]
        notes = [f"logs: {_launchd_log(scope, home)}",
                 "macOS asks once to allow ringd on the local network; "
                 "without it peers never appear"]
        if scope is Scope.SYSTEM:
            notes.append("a LaunchDaemon is for headless nodes; on a Mac where someone logs in, "
                         "--scope user runs ringd in that session")
    return Plan(manager, scope, PurePosixPath(target), tuple(steps), tuple(notes))


def uninstall_plan(manager: Manager, scope: Scope, *, home: str, uid: int, root: Path | None = None,
                   purge: bool = False) -> Plan:
    """Stop and unload the service, remove its file (and with ``purge`` the env file).
    The state directory (node id, cluster key) and the models are never removed."""
    target = service_path(manager, scope, home)
    if manager is Manager.SYSTEMD:
        steps: list[Step] = [
            Run(_systemctl(scope, "disable", "--now", UNIT_NAME), check=False),
            Remove(_rooted(root, target)),
        ]
        if purge:
            steps.append(Remove(_rooted(root, env_file_path(scope, home))))
        steps.append(Run(_systemctl(scope, "daemon-reload")))
    else:
        steps = [
            Run(("launchctl", "bootout", f"{_launchd_domain(scope, uid)}/{LABEL}"), check=False),
            Remove(_rooted(root, target)),
        ]
    notes = ("the state directory (node id, cluster key) and the model store are kept",)
    return Plan(manager, scope, PurePosixPath(target), tuple(steps), notes)


def status_plan(manager: Manager, scope: Scope, *, home: str, uid: int) -> Plan:
    """Ask the service manager about ringd."""
    target = service_path(manager, scope, home)
    if manager is Manager.SYSTEMD:
        argv = _systemctl(scope, "status", "--no-pager", "--lines=10", UNIT_NAME)
    else:
        argv = ("launchctl", "print", f"{_launchd_domain(scope, uid)}/{LABEL}")
    return Plan(manager, scope, PurePosixPath(target), (Run(argv, check=False),))


def manager_unusable(manager: Manager, scope: Scope, *, platform: str = sys.platform,
                     environ: dict[str, str] | None = None) -> str | None:
    """Why the service manager cannot be told anything here, or None when it can."""
    env = dict(os.environ) if environ is None else environ
    if manager is Manager.LAUNCHD:
        return None if platform == "darwin" else "launchd exists only on macOS"
    if platform != "linux":
        return "systemd exists only on Linux"
    if not Path("/run/systemd/system").is_dir():
        try:
            pid1 = Path("/proc/1/comm").read_text().strip()
        except OSError:
            pid1 = "unknown"
        return f"systemd is not running on this machine (PID 1 is {pid1!r})"
    if scope is Scope.USER:
        runtime = env.get("XDG_RUNTIME_DIR")
        if not runtime or not Path(runtime, "systemd").is_dir():
            return ("no systemd user manager for this session (XDG_RUNTIME_DIR unset or without "
                    "systemd); log in normally, or use --scope system")
    return None


def describe(step: Step) -> str:
    """One line saying what a step does, for dry runs and progress output."""
    if isinstance(step, Write):
        extra = ", only if missing" if step.keep_existing else ""
        return f"write {step.path} (mode {step.mode:04o}{extra})"
    if isinstance(step, Remove):
        return f"remove {step.path}"
    return "run " + shlex.join(step.argv) + ("" if step.check else "   (a failure here is fine)")


def write_examples(directory: Path) -> list[Path]:
    """Write the repository's example unit, env file and plists (default executable path)."""
    files = {
        directory / "systemd" / "ringd.service": render_systemd_unit(Scope.SYSTEM).encode(),
        directory / "systemd" / "ringd.env.example": render_env_file().encode(),
        directory / "launchd" / f"{LABEL}.plist": render_launchd_plist(Scope.USER),
        directory / "launchd" / f"{LABEL}.daemon.plist": render_launchd_plist(Scope.SYSTEM),
    }
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return list(files)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    for p in write_examples(Path(args[0] if args else ".")):
        sys.stdout.write(f"wrote {p}\n")


if __name__ == "__main__":  # pragma: no cover
    main()
