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
  timed out, a peer left); carries a machine-readable ``code``.
"""

from __future__ import annotations


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
    """A generation request failed. ``code`` is stable and machine-readable.

    Codes: ``busy``, ``not_ready``, ``cancelled``, ``timeout``, ``peer_lost``,
    ``leaving``, ``bad_request``, ``context_length``, ``model_not_served``,
    ``coverage`` (a step did not pass through every layer exactly once), ``internal``.
    """

    def __init__(self, code: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code
