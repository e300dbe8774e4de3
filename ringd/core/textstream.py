"""A request's text as the user sees it: token ids in, text events out.

One :class:`TextStream` per request turns the sampled token ids into newly printable text
(through the tokenizer's incremental decoder), holds back text that may begin a stop
string and cuts at the first complete one (:class:`StopMatcher`), decides the finish reason
and measures the rates. Every way a request runs -- a ring of nodes, or one node holding the
whole model (a one-stage ring) -- goes through it.

Pure: the decoder is passed in, ``now`` is passed in.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

from ringd.core.requests import FinishEvent, TokenEvent
from ringd.errors import LocalProtocolError


class Decoder(Protocol):
    """The tokenizer's incremental detokenizer
    (:meth:`ringd.compute.tokenizer.Tokenizer.new_decoder`)."""

    def add(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class StopMatcher:
    """Streams text through stop sequences: emits what is safe, holds back a possible prefix.

    ``feed(text)`` returns ``(emit, stopped)``. Once stopped, the text before the stop
    sequence has been emitted and the rest is dropped (OpenAI semantics: the stop string
    itself is not returned). The result does not depend on how the text is split.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self.held + text
        if not self.stops:
            self.held = ""
            return buf, False
        found = [(i + len(s), i) for s in self.stops if (i := buf.find(s)) >= 0]
        if found:  # the stop sequence that is complete first wins, as it would token by token
            self.stopped = True
            self.held = ""
            return buf[: min(found)[1]], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out


class TextStream:
    """One request's tokens -> :class:`TokenEvent` s, then one :class:`FinishEvent`.

    ``feed(token_id, finish_reason, now)`` takes each sampled token in order with the
    reason the sampling node gave on the last one (``stop`` at EOS, ``length`` at the token
    limit; None before). It returns the event and whether the request is done: the ring's
    last token, or a stop string completed (the text after it is dropped, OpenAI style).
    EOS is counted as a token; its text is whatever the decoder held back.
    """

    def __init__(self, decoder: Decoder, stops: Iterable[str], eos: Iterable[int],
                 started: float) -> None:
        self._decoder = decoder
        self._stopper = StopMatcher(stops)
        self._eos = frozenset(eos)
        self.started = started
        self.tokens = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.reason: str | None = None  # set once done

    def feed(self, token_id: int, finish_reason: str | None, now: float) -> tuple[TokenEvent, bool]:
        if self.reason is not None:
            raise LocalProtocolError("the text stream is already finished")
        self.tokens += 1
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        last = finish_reason is not None
        if token_id in self._eos:
            text = self._decoder.flush()
        else:
            text = self._decoder.add(token_id) + (self._decoder.flush() if last else "")
        emit, stopped = self._stopper.feed(text)
        if last and not stopped:
            emit += self._stopper.flush()
        if stopped or last:
            self.reason = "stop" if stopped or finish_reason == "stop" else "length"
        return TokenEvent(self.tokens - 1, token_id, emit), self.reason is not None

    @property
    def tokens_per_second(self) -> float:
        """Decode rate: tokens after the first over the time between the first and the last."""
        if self.tokens < 2 or self.first_at is None or self.last_at is None:
            return 0.0
        span = self.last_at - self.first_at
        return (self.tokens - 1) / span if span > 0 else 0.0

    def finish(self, prompt_tokens: int, extra: dict[str, Any] | None = None) -> FinishEvent:
        """The closing event (after ``feed`` said done)."""
        if self.reason is None:
            raise LocalProtocolError("the text stream has not finished")
        first = self.first_at if self.first_at is not None else self.started
        return FinishEvent(reason=self.reason, prompt_tokens=prompt_tokens,
                           completion_tokens=self.tokens,
                           time_to_first_token=first - self.started,
                           tokens_per_second=self.tokens_per_second, extra=dict(extra or {}))
