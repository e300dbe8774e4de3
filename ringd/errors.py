"""Error types, split by who is to blame.

Every error a user can see carries a message (what went wrong, where) and a hint
(what to do). The CLI prints ``str(error)``; it never shows a traceback.

- :class:`UsageError`      -- a user's input is wrong: a CLI argument, a config file, a request.
- :class:`ModelError`      -- a model file or directory cannot be used.
- :class:`PlanError`       -- the ring cannot hold the model (with numbers).
- :class:`RemoteProtocolError` -- a peer sent something malformed or not allowed. The
  network layer turns these into counted drops; they never escape to crash the daemon.
- :class:`LocalProtocolError`  -- our own code misused a core API (a bug in ringd).
- :class:`RequestError`    -- a generation request failed (busy, not ready, cancelled,
  timed out, a peer left); carries a machine-readable :class:`ErrorCode`.
- :class:`DaemonNotRunning` -- nothing answers on the daemon's control API (``ringctl``).

:class:`ErrorCode` lists every request error code once, each with its HTTP status (the API)
and its ``ringctl`` exit code (:class:`ExitCode`); :func:`exit_code` maps any error to one.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ExitCode(IntEnum):
    """``ringctl``'s exit codes (listed by ``ringctl --help``)."""

    #: The command did what was asked (``status``: the ring is ready).
    OK = 0
    #: The command failed, or its answer is no (``status``: not ready; ``verify``: mismatch;
    #: ``bench``: a rate above the ceiling; a request the ring failed to finish).
    FAILURE = 1
    #: What was asked is wrong: the command line, the config, or a request the daemon refused.
    USAGE = 2
    #: No ringd answers (``service status``: installed but not running).
    NOT_RUNNING = 3
    #: The ring cannot take the request now (busy, not ready, leaving): retry later.
    UNAVAILABLE = 4
    #: Interrupted with Ctrl-C (a running request is cancelled on the whole ring).
    INTERRUPTED = 130


class ErrorCode(StrEnum):
    """Every machine-readable request error code; compares equal to its string value."""

    BUSY = "busy"
    NOT_READY = "not_ready"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    PEER_LOST = "peer_lost"
    LEAVING = "leaving"
    BAD_REQUEST = "bad_request"
    CONTEXT_LENGTH = "context_length"
    MODEL_NOT_SERVED = "model_not_served"
    #: A step did not pass through every layer exactly once.
    COVERAGE = "coverage"
    INTERNAL = "internal"
    # Only the HTTP API refuses with these (never a ring request).
    INVALID_API_KEY = "invalid_api_key"
    #: A browser page of another site (or a DNS-rebound name) reaching the local API.
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TOO_LARGE = "request_too_large"

    @classmethod
    def parse(cls, value: object) -> "ErrorCode":
        """The code named by a peer or a daemon; :attr:`INTERNAL` for one this version lacks."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL

    @property
    def http_status(self) -> int:
        return _MAPPING[self][0]

    @property
    def exit_code(self) -> ExitCode:
        return _MAPPING[self][1]


_MAPPING: dict[ErrorCode, tuple[int, ExitCode]] = {
    ErrorCode.BAD_REQUEST: (400, ExitCode.USAGE),
    ErrorCode.CONTEXT_LENGTH: (400, ExitCode.USAGE),
    ErrorCode.INVALID_API_KEY: (401, ExitCode.USAGE),
    ErrorCode.FORBIDDEN: (403, ExitCode.USAGE),
    ErrorCode.NOT_FOUND: (404, ExitCode.USAGE),
    ErrorCode.MODEL_NOT_SERVED: (404, ExitCode.USAGE),
    ErrorCode.METHOD_NOT_ALLOWED: (405, ExitCode.USAGE),
    ErrorCode.REQUEST_TOO_LARGE: (413, ExitCode.USAGE),
    ErrorCode.BUSY: (429, ExitCode.UNAVAILABLE),
    ErrorCode.INTERNAL: (500, ExitCode.FAILURE),
    ErrorCode.COVERAGE: (500, ExitCode.FAILURE),
    ErrorCode.NOT_READY: (503, ExitCode.UNAVAILABLE),
    ErrorCode.LEAVING: (503, ExitCode.UNAVAILABLE),
    ErrorCode.PEER_LOST: (503, ExitCode.FAILURE),
    ErrorCode.CANCELLED: (503, ExitCode.FAILURE),
    ErrorCode.TIMEOUT: (504, ExitCode.FAILURE),
}


class RingdError(Exception):
    """Base class: ``message`` says what and where, ``hint`` says what to do."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class UsageError(RingdError):
    """The user's input (argument, config file, request) is wrong."""


class ConfigError(UsageError):
    """A configuration file, environment variable or flag has a bad value."""


class ModelError(RingdError):
    """A model file or directory is missing, truncated, or of an unsupported kind."""


class PlanError(RingdError):
    """The ring cannot hold the model; the message carries the numbers."""


class RemoteProtocolError(RingdError):
    """A peer sent a frame or message that is malformed or not allowed."""


class LocalProtocolError(RingdError):
    """ringd's own code misused a core API. Always a bug."""


class RequestError(RingdError):
    """A generation request failed. ``code`` (an :class:`ErrorCode`) is stable and
    machine-readable; a string naming a code is accepted (an unknown one is our bug)."""

    def __init__(self, code: ErrorCode | str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = ErrorCode(code)


class DaemonNotRunning(RingdError):
    """Nothing answers on the daemon's control API."""


def exit_code(error: RingdError) -> ExitCode:
    """``ringctl``'s exit code for an error: by its code, else by who is to blame."""
    if isinstance(error, RequestError):
        return error.code.exit_code
    if isinstance(error, DaemonNotRunning):
        return ExitCode.NOT_RUNNING
    if isinstance(error, UsageError):
        return ExitCode.USAGE
    return ExitCode.FAILURE
