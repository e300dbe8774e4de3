import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringd.core.textstream import StopMatcher, TextStream
from ringd.errors import LocalProtocolError


def test_stop_matcher_holds_back_prefixes():
    m = StopMatcher(["</s>", "END"])
    assert m.feed("Hello <") == ("Hello ", False)
    assert m.feed("/") == ("", False)
    assert m.feed("p> E") == ("</p> ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("Dtail") == ("", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_stop_matcher_flushes_held_text_at_the_end():
    m = StopMatcher(["STOP"])
    assert m.feed("abcST") == ("abc", False)
    assert m.flush() == "ST"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="abXY", max_size=5), max_size=12),
       st.lists(st.text(alphabet="abXY", min_size=1, max_size=3), max_size=3))
def test_stop_matcher_equals_cutting_the_whole_text(pieces, stops):
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        emit, stopped = m.feed(p)
        out.append(emit)
        if stopped:
            break
    out.append(m.flush())
    whole = "".join(pieces)
    # character by character: the first stop sequence to be complete cuts the text at its start
    ends = [(i + len(s), -len(s)) for s in stops if (i := whole.find(s)) >= 0]
    cut = (min(ends)[0] + min(ends)[1]) if ends else len(whole)
    assert "".join(out) == whole[:cut]




class FakeDecoder:
    """Token i decodes to WORDS[i]; multi-byte characters are held until the next token, as
    a byte-level detokenizer holds an incomplete UTF-8 sequence (token 9 is half of one)."""

    WORDS = {1: "Hello", 2: " world", 3: ".", 4: " The", 5: " END", 6: " tail", 9: ""}

    def __init__(self) -> None:
        self.held = ""

    def add(self, token_id: int) -> str:
        if token_id == 9:
            self.held = "é"
            return ""
        out, self.held = self.held + self.WORDS[token_id], ""
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


EOS = (0,)


def run(tokens: list[tuple[int, str | None]], stops: tuple[str, ...] = (), start: float = 10.0):
    ts = TextStream(FakeDecoder(), stops, EOS, started=start)
    events = []
    for i, (tok, reason) in enumerate(tokens):
        ev, done = ts.feed(tok, reason, now=start + 1.0 + 0.5 * i)
        events.append(ev)
        if done:
            break
    return ts, events


def test_text_and_finish_reason_follow_the_sampling_node():
    ts, events = run([(1, None), (2, None), (3, "length")])
    assert "".join(e.text for e in events) == "Hello world."
    assert [e.index for e in events] == [0, 1, 2] and [e.token_id for e in events] == [1, 2, 3]
    fin = ts.finish(prompt_tokens=7, extra={"request_id": "r"})
    assert (fin.reason, fin.prompt_tokens, fin.completion_tokens) == ("length", 7, 3)
    assert fin.extra == {"request_id": "r"}


def test_eos_is_counted_and_flushes_what_the_decoder_held():
    ts, events = run([(1, None), (9, None), (0, "stop")])
    assert [e.text for e in events] == ["Hello", "", "é"]
    assert ts.finish(3).reason == "stop" and ts.finish(3).completion_tokens == 3


def test_a_stop_string_ends_the_request_before_the_ring_does():
    ts, events = run([(1, None), (4, None), (5, None), (6, None)], stops=("END",))
    assert "".join(e.text for e in events) == "Hello The "
    assert len(events) == 3 and ts.reason == "stop"
    with pytest.raises(LocalProtocolError):
        ts.feed(6, None, 20.0)


def test_held_back_prefix_is_released_at_the_last_token():
    ts, events = run([(1, None), (4, "length")], stops=("The end",))
    assert "".join(e.text for e in events) == "Hello The"
    assert ts.finish(2).reason == "length"


def test_rates_come_from_the_clock_passed_in():
    ts, _ = run([(1, None), (2, None), (3, None), (4, "length")], start=10.0)
    fin = ts.finish(5)
    assert fin.time_to_first_token == pytest.approx(1.0)  # first token at 11.0
    assert fin.tokens_per_second == pytest.approx(3 / 1.5)  # 3 tokens after the first in 1.5 s
    one, _ = run([(1, "length")])
    assert one.finish(1).tokens_per_second == 0.0


def test_finish_before_done_is_a_bug():
    ts = TextStream(FakeDecoder(), (), EOS, started=0.0)
    ts.feed(1, None, 1.0)
    with pytest.raises(LocalProtocolError):
        ts.finish(1)
