"""One logging configuration for the daemon, set up once at the entry point.

- the node id on every line (:func:`set_node_id` once the state directory is read);
- text lines, or JSON lines for log shippers;
- under systemd (stderr is the journal, ``JOURNAL_STREAM``) text lines carry no timestamp
  but a ``<N>`` syslog priority prefix, so ``journalctl -p warning`` works;
- repeated warnings (same logger, level and message template within a window) are
  suppressed; the next one that passes says ``(repeated N times)``.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.config
import os
import sys
import threading
import time
from collections import OrderedDict
from typing import IO, Any, Callable, Mapping

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}
_MAX_KEYS = 1024
_QUIET_LIBRARIES = ("zeroconf", "asyncio", "aiohttp.access")

_node_id: str | None = None


def set_node_id(node_id: str | None) -> None:
    """Put ``node_id`` on every following line (before it is known lines show ``-``)."""
    global _node_id
    _node_id = node_id


def under_journal(stream: IO[str], environ: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal stream systemd gave us (``JOURNAL_STREAM=dev:ino``)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class NodeIdFilter(logging.Filter):
    """Adds ``record.node_id``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.node_id = _node_id or "-"
        return True


class RepeatFilter(logging.Filter):
    """Suppresses records at ``min_level`` or above whose (logger, level, template) was let
    through less than ``window`` seconds ago; counts them into ``record.repeated`` of the
    next one let through. Keys are bounded (oldest forgotten first)."""

    def __init__(self, window: float = 10.0, min_level: int = logging.WARNING,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = _MAX_KEYS) -> None:
        super().__init__()
        self.window = window
        self.min_level = min_level
        self.clock = clock
        self.max_keys = max_keys
        self._seen: OrderedDict[tuple[str, int, str], list[float | int]] = OrderedDict()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        record.repeated = 0
        if record.levelno < self.min_level or self.window <= 0:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.window:
                entry[1] += 1
                return False
            if entry is not None:
                record.repeated = int(entry[1])
                self._seen.move_to_end(key)
            self._seen[key] = [now, 0]
            while len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
        return True


class TextFormatter(logging.Formatter):
    """``TIME LEVEL [node] logger: message``; without time and with ``<N>`` under the journal."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()} [{getattr(record, 'node_id', '-')}] {record.name}: " \
               + record.getMessage()
        repeated = getattr(record, "repeated", 0)
        if repeated:
            text += f" (repeated {repeated} times)"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        if self.journal:
            prefix = f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>"
            return "\n".join(prefix + line for line in text.split("\n"))
        stamp = datetime.datetime.fromtimestamp(record.created).isoformat(timespec="milliseconds")
        return f"{stamp} {text}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC ISO 8601), level, node, logger, msg, [repeated, exc]."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "node": getattr(record, "node_id", "-"),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        repeated = getattr(record, "repeated", 0)
        if repeated:
            out["repeated"] = repeated
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str, json_lines: bool, node_id: str | None,
                      stream: IO[str] | None = None, *, repeat_window: float = 10.0,
                      clock: Callable[[], float] = time.monotonic,
                      environ: Mapping[str, str] | None = None) -> None:
    """Configure the root logger once (replacing any earlier setup of ours).

    ``level``: debug, info, warning or error. ``stream``: default ``sys.stderr``.
    ``repeat_window``: seconds within which a repeated warning is suppressed (0: never).
    """
    lvl = _LEVELS.get(level.lower())
    if lvl is None:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, got {level!r}")
    stream = sys.stderr if stream is None else stream
    set_node_id(node_id)
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if json_lines
        else {"()": TextFormatter, "journal": under_journal(stream, environ)}
    )
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "node": {"()": NodeIdFilter},
            "repeat": {"()": RepeatFilter, "window": repeat_window, "clock": clock},
        },
        "formatters": {"ringd": formatter},
        "handlers": {
            "ringd": {"class": "logging.StreamHandler", "stream": stream, "formatter": "ringd",
                      "filters": ["node", "repeat"]},
        },
        "loggers": {name: {"level": lvl if lvl == logging.DEBUG else max(lvl, logging.WARNING)}
                    for name in _QUIET_LIBRARIES},
        "root": {"level": lvl, "handlers": ["ringd"]},
    })
    logging.captureWarnings(True)
