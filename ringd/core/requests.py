"""Generation requests and their events: plain frozen dataclasses shared by every layer.

No I/O, no MLX. The engine samples with :class:`SamplingParams`; the HTTP API and
``ringctl prompt`` build :class:`GenerationRequest`; whatever runs the request (the ring,
or one node holding the whole model) yields :class:`TokenEvent` then one
:class:`FinishEvent`, or raises :class:`ringd.errors.RequestError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ringd.errors import RequestError


MAX_STOP_SEQUENCES = 8
MAX_STOP_LENGTH = 256


_NUM = (float, int)


@dataclass(slots=True)
class SamplingParams:
    """How the last shard picks a token. ``temperature == 0`` means greedy.

    The one sampling type: the API and ``ringctl`` build it, the entry sends it with every
    activation (without ``stop``, which only the entry applies), the last stage samples with
    it. Validates on construction; not frozen (a frozen dataclass costs ~6x to build and one
    is decoded with every activation) but treated as immutable: change it with
    :func:`dataclasses.replace`.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    #: The last stage attaches its float32 logits to every token (``ringctl verify``).
    want_logits: bool = False

    def __post_init__(self) -> None:
        t, p, k, seed, m = self.temperature, self.top_p, self.top_k, self.seed, self.max_tokens
        if (type(t) in _NUM and 0.0 <= t <= 10.0 and type(p) in _NUM and 0.0 < p <= 1.0
                and type(k) is int and 0 <= k <= _I31 and type(m) is int and 1 <= m <= _I31
                and (seed is None or (type(seed) is int and 0 <= seed <= _U63))
                and type(self.want_logits) is bool and type(self.stop) is tuple
                and (not self.stop or _stops_ok(self.stop))):
            return
        if not (type(t) in _NUM and 0.0 <= t <= 10.0):
            raise RequestError("bad_request", f"temperature must be between 0 and 10, got {t!r}")
        if not (type(p) in _NUM and 0.0 < p <= 1.0):
            raise RequestError("bad_request", f"top_p must be in (0, 1], got {p!r}")
        if not (type(k) is int and 0 <= k <= _I31):
            raise RequestError("bad_request", f"top_k must be 0 (off) or positive, got {k!r}")
        if not (seed is None or (type(seed) is int and 0 <= seed <= _U63)):
            raise RequestError("bad_request", f"seed must be between 0 and 2**63-1, got {seed!r}")
        if not (type(m) is int and 1 <= m <= _I31):
            raise RequestError("bad_request", f"max_tokens must be at least 1, got {m!r}")
        if type(self.want_logits) is not bool:
            raise RequestError("bad_request", "want_logits must be true or false")
        raise RequestError(
            "bad_request",
            f"stop: at most {MAX_STOP_SEQUENCES} non-empty sequences of at most "
            f"{MAX_STOP_LENGTH} characters")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


_I31 = (1 << 31) - 1
_U63 = (1 << 63) - 1


def _stops_ok(stops: tuple[str, ...]) -> bool:
    return len(stops) <= MAX_STOP_SEQUENCES and all(
        type(s) is str and 0 < len(s) <= MAX_STOP_LENGTH for s in stops)


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt as a user sends it: chat ``messages`` (role/content dicts) or raw ``prompt``."""

    params: SamplingParams = field(default_factory=SamplingParams)
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise RequestError("bad_request",
                               "give either chat messages or a prompt, not both or neither")


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token; ``text`` is the newly printable text (may be empty mid-character)."""

    index: int
    token_id: int
    text: str


@dataclass(frozen=True)
class FinishEvent:
    """The end of a request. ``reason``: ``stop`` (EOS or stop string) or ``length``."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float
    tokens_per_second: float
    extra: dict[str, Any] = field(default_factory=dict)

