"""Generation requests and their events: plain frozen dataclasses shared by every layer.

No I/O, no MLX. The engine samples with :class:`SamplingParams`; the HTTP API and
``ringctl prompt`` build :class:`GenerationRequest`; whatever runs the request (the ring,
or one node holding the whole model) yields :class:`TokenEvent` then one
:class:`FinishEvent`, or raises :class:`ringd.errors.RequestError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Protocol

from ringd.errors import RequestError

if TYPE_CHECKING:  # the status contract sits above core (it reads membership and plans)
    from ringd.status import Status

MAX_STOP_SEQUENCES = 8
MAX_STOP_LENGTH = 256


@dataclass(frozen=True)
class SamplingParams:
    """How the last shard picks a token. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature <= 10.0):
            raise RequestError("bad_request", f"temperature must be between 0 and 10, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise RequestError("bad_request", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError("bad_request", f"top_k must be 0 (off) or positive, got {self.top_k}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise RequestError("bad_request", f"seed must be between 0 and 2**63-1, got {self.seed}")
        if self.max_tokens < 1:
            raise RequestError("bad_request", f"max_tokens must be at least 1, got {self.max_tokens}")
        if len(self.stop) > MAX_STOP_SEQUENCES or any(
            not s or len(s) > MAX_STOP_LENGTH for s in self.stop
        ):
            raise RequestError(
                "bad_request",
                f"stop: at most {MAX_STOP_SEQUENCES} non-empty sequences of at most {MAX_STOP_LENGTH} characters",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt as a user sends it: chat ``messages`` (role/content dicts) or raw ``prompt``."""

    params: SamplingParams = field(default_factory=SamplingParams)
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise RequestError("bad_request", "give either chat messages or a prompt, not both or neither")


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


class Backend(Protocol):
    """What the HTTP API and the control API need from whatever runs requests."""

    def served_models(self) -> list[str]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]: ...

    def status(self) -> Status: ...
