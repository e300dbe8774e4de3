"""Settings: one frozen dataclass, built from a TOML file < ``RINGD_*`` environment < flags.

Every field has a docstring-like ``help`` in its metadata; ``ringd run --help`` and the
README's configuration table are generated from the same place. Tests construct
``Settings(...)`` directly instead of patching globals.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import platformdirs

from ringd.errors import ConfigError
from ringd.units import parse_size

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
ENV_PREFIX = "RINGD_"


def _opt(default: Any = dataclasses.MISSING, *, help: str, kind: str | None = None,
         factory: Any = dataclasses.MISSING) -> Any:
    meta = {"help": help, "kind": kind}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def default_state_dir() -> Path:
    return Path(platformdirs.user_state_dir("ringd", appauthor=False))


def default_model_store() -> Path:
    return Path(platformdirs.user_data_dir("ringd", appauthor=False)) / "models"


@dataclass(frozen=True)
class Settings:
    """Everything a node can be told. Immutable; build with :meth:`load`."""

    # --- identity and files -------------------------------------------------
    state_dir: Path = _opt(factory=default_state_dir, kind="path",
                           help="Directory for the node id, epoch counter and cluster key. "
                                "Never a temp dir.")
    model_store: Path = _opt(factory=default_model_store, kind="path",
                             help="Directory holding models, one mlx-lm model directory each.")
    model: str = _opt(DEFAULT_MODEL,
                      help="Name of the model (a directory in the store) this node proposes "
                           "to serve.")
    cluster_key_file: Path | None = _opt(None, kind="path",
                                         help="File with the 32-byte cluster key (mode 0600). "
                                              "Default: STATE_DIR/cluster.key, created on "
                                              "first start.")
    node_name: str = _opt(factory=socket.gethostname, help="Human-readable name shown in status.")

    # --- network --------------------------------------------------------------
    bind_host: str = _opt("0.0.0.0", help="Address the peer ports (UDP and TCP) bind to.")
    advertise_host: str | None = _opt(None, help="Address peers should use to reach this node. "
                                                 "Default: detected.")
    advertise_port: int = _opt(0, help="Port peers should use to reach this node (a port "
                                       "mapped or forwarded to the peer port). 0: the peer "
                                       "port.")
    port: int = _opt(7411, help="Peer port, UDP and TCP (membership and activations). "
                                "0 picks a free port.")
    peers: tuple[str, ...] = _opt((), kind="list",
                                  help="Static peers as host:port, for networks where "
                                       "multicast (mDNS) is blocked.")
    mdns: bool = _opt(True, help="Find peers with mDNS/zeroconf.")
    mdns_interfaces: tuple[str, ...] = _opt((), kind="list",
                                            help="Interface addresses mDNS uses. "
                                                 "Empty: all interfaces.")
    datagram_size: int = _opt(0, help="Largest UDP payload sent (bytes). 0: follow each peer's "
                                      "path MTU (64 KB on loopback, 1472 on 1500-byte "
                                      "Ethernet); a set value is still lowered to the path MTU.")
    tcp_threshold: int = _opt(256 * 1024, kind="size",
                              help="Frames larger than this travel over TCP instead of UDP "
                                   "(prefill).")
    encrypt: bool = _opt(True, help="Encrypt peer frames (AES-128-OCB3). "
                                    "Frames are always authenticated.")
    data_interface: str | None = _opt(None, help="Local interface (e.g. bridge0, eth1) the "
                                                 "traffic to a peer takes when it reaches "
                                                 "that peer, whatever the link measurements "
                                                 "say. Default: the path with the lowest "
                                                 "measured round trip.")
    link_probe_interval: float = _opt(2.0, help="Seconds between round-trip probes of every "
                                                "path (address) to every peer. 0: no link "
                                                "measurement.")
    throughput_probe_interval: float = _opt(300.0, help="Seconds between short throughput "
                                                        "probes (4 MiB over TCP) of each "
                                                        "path, sent only while no request "
                                                        "runs. 0: none.")

    # --- local API ----------------------------------------------------------------
    http_host: str = _opt("127.0.0.1", help="Address of the local control and "
                                            "OpenAI-compatible HTTP API.")
    http_port: int = _opt(7412, help="Port of the local control and OpenAI-compatible HTTP API. "
                                     "0 picks a free port.")
    api_key: str | None = _opt(None, help="Bearer key required by the HTTP API. "
                                          "Required when http_host is not loopback.")

    # --- memory ---------------------------------------------------------------------
    memory_budget: int | None = _opt(None, kind="size",
                                     help="Memory this node offers the ring (e.g. 6GiB). "
                                          "Default: measured usable memory.")
    memory_reserve: int = _opt(2 * 1024**3, kind="size",
                               help="Memory kept free for the rest of the machine when "
                                    "measuring usable memory.")
    memory_bandwidth: int | None = _opt(
        None, kind="size",
        help="Memory bandwidth in bytes per second (e.g. 800GB), for the decode ceiling. "
             "Default: the chip's published figure on Apple silicon, measured elsewhere.")

    # --- membership timing --------------------------------------------------------------
    probe_interval: float = _opt(1.0, help="Seconds between failure-detector probes.")
    probe_timeout: float = _opt(0.5, help="Seconds to wait for a direct probe ack before "
                                          "asking others.")
    suspicion_timeout: float = _opt(4.0, help="Seconds a suspected member has to refute before "
                                              "it is declared failed.")
    indirect_probes: int = _opt(3, help="Members asked to probe a silent member on our behalf.")

    # --- generation -------------------------------------------------------------------
    max_concurrent: int = _opt(8, help="Requests in flight on the ring from this entry node; "
                                       "beyond it: 'busy'.")
    max_context: int = _opt(4096, help="Longest context (prompt + generated tokens) per request.")
    prefill_chunk: int = _opt(512, help="Tokens per prefill chunk (lowered if a chunk's "
                                        "activations would exceed one 64 MiB frame).")
    request_timeout: float = _opt(300.0, help="Seconds a request may run before it is failed "
                                              "with a timeout.")
    allow_model_switch: bool = _opt(False, help="Let a request for another model switch the "
                                                "ring when it is idle.")
    max_queued: int = _opt(32, help="Requests that wait (first come, first served) for a slot "
                                    "beyond max_concurrent, or for the ring to re-plan; beyond "
                                    "it: 'busy'.")
    queue_timeout: float = _opt(60.0, help="Seconds a request may wait in that queue.")
    step_timeout: float = _opt(120.0, help="Seconds without progress (a token, or a part of "
                                           "the prompt computed), while the ring serves, before "
                                           "a request fails naming the nodes that hold it.")
    schedule: str = _opt("decode-first", help="Order of this node's MLX jobs: decode-first (a "
                                              "running stream's next step goes before a long "
                                              "prompt, which runs in slices) or fifo.")
    prefill_slice: int = _opt(0, help="Tokens per prefill slice under decode-first (0: as many "
                                      "as take about 1.5 decode steps here, measured).")
    replan_drain: float = _opt(120.0, help="Seconds a node that joins waits, while requests "
                                           "run, before the ring re-plans with it (running "
                                           "requests then go on by replay).")

    # --- service -------------------------------------------------------------------------
    log_level: str = _opt("info", help="debug, info, warning or error.")
    log_json: bool = _opt(False, help="Write logs as JSON lines (for log shippers).")
    stall_timeout: float = _opt(30.0, help="Exit non-zero when the event loop is stuck this "
                                           "long (0: off).")
    shutdown_timeout: float = _opt(10.0, help="Seconds in-flight requests get to finish on "
                                              "SIGTERM.")

    def __post_init__(self) -> None:
        problems = []
        for name in ("port", "http_port", "advertise_port"):
            v = getattr(self, name)
            if not 0 <= v <= 65535:
                problems.append(f"{name} must be 0..65535, got {v}")
        if self.datagram_size != 0 and not 256 <= self.datagram_size <= 65000:
            problems.append(f"datagram_size must be 0 (follow the path MTU) or 256..65000 bytes, "
                            f"got {self.datagram_size}")
        for name in ("probe_interval", "probe_timeout", "suspicion_timeout", "request_timeout",
                     "queue_timeout", "step_timeout"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_concurrent", "max_context", "prefill_chunk", "indirect_probes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.schedule not in ("decode-first", "fifo"):
            problems.append(f"schedule must be decode-first or fifo, got {self.schedule!r}")
        for name in ("max_queued", "replan_drain", "prefill_slice", "link_probe_interval",
                     "throughput_probe_interval"):
            if getattr(self, name) < 0:
                problems.append(f"{name} cannot be negative, got {getattr(self, name)}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            problems.append(f"log_level must be debug, info, warning or error, "
                            f"got {self.log_level!r}")
        if problems:
            raise ConfigError("invalid settings: " + "; ".join(problems))

    @property
    def key_path(self) -> Path:
        return self.cluster_key_file or self.state_dir / "cluster.key"

    # ------------------------------------------------------------------------------
    @classmethod
    def load(cls, config_file: str | os.PathLike[str] | None = None,
             env: Mapping[str, str] | None = None, **flags: Any) -> "Settings":
        """File < environment < flags. ``None`` flag values mean "not given"."""
        values: dict[str, Any] = {}
        if config_file is None and env is not None and env.get(ENV_PREFIX + "CONFIG"):
            config_file = env[ENV_PREFIX + "CONFIG"]
        if config_file is not None:
            values.update(_read_toml(Path(config_file)))
        if env is not None:
            for f in dataclasses.fields(cls):
                raw = env.get(ENV_PREFIX + f.name.upper())
                if raw is not None and raw != "":
                    values[f.name] = _convert(f, raw,
                                              source=f"environment {ENV_PREFIX}{f.name.upper()}")
        for name, raw in flags.items():
            if raw is None or (isinstance(raw, tuple) and not raw):
                continue
            f = _FIELDS.get(name)
            if f is None:
                raise ConfigError(f"unknown setting {name!r}")
            values[name] = _convert(f, raw, source=f"option --{name.replace('_', '-')}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
        out.pop("api_key", None)
        return out


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist",
                          hint="create it, or leave out --config / RINGD_CONFIG") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}",
                          hint="check the line named above") from None
    section = data.get("ringd", data)
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: [ringd] must be a table")
    values = {}
    for key, raw in section.items():
        name = key.replace("-", "_")
        f = _FIELDS.get(name)
        if f is None:
            raise ConfigError(f"config file {path}: unknown setting {key!r}",
                              hint="known settings: " + ", ".join(sorted(_FIELDS)))
        values[name] = _convert(f, raw, source=f"config file {path}, key {key!r}")
    return values


def _convert(f: dataclasses.Field, raw: Any, *, source: str) -> Any:
    kind = f.metadata.get("kind")
    hint_type = typing.get_type_hints(Settings)[f.name]
    base = [a for a in typing.get_args(hint_type) if a is not type(None)]
    target = base[0] if base else hint_type
    try:
        if kind == "size":
            return parse_size(raw, what=source)
        if kind == "path":
            return Path(os.path.expanduser(str(raw)))
        if kind == "list":
            if isinstance(raw, str):
                return tuple(p.strip() for p in raw.split(",") if p.strip())
            if isinstance(raw, (list, tuple)) and all(isinstance(x, str) for x in raw):
                return tuple(raw)
            raise ValueError("expected a list of strings")
        if target is bool:
            if isinstance(raw, bool):
                return raw
            s = str(raw).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if target is int:
            if isinstance(raw, bool):
                raise ValueError("expected an integer")
            return int(raw)
        if target is float:
            if isinstance(raw, bool):
                raise ValueError("expected a number")
            return float(raw)
        if target is str:
            if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
                raise ValueError("expected a string")
            return str(raw)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: bad value {raw!r} for {f.name}: {e}",
                          hint=f"{f.name}: {f.metadata['help']}") from None
    raise AssertionError(f"no converter for {f.name}")  # pragma: no cover


def describe_settings() -> list[tuple[str, str, str]]:
    """(name, default, help) for every setting, for docs and ``--help``."""
    rows = []
    for f in dataclasses.fields(Settings):
        if f.default is not dataclasses.MISSING:
            d = repr(f.default)
        else:
            d = "(computed)"
        rows.append((f.name, d, f.metadata["help"]))
    return rows
