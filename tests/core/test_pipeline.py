import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringd.core.pipeline import (FRAME_HEADROOM, RequestTable, Route, Stage, StopMatcher, check_activation,
                                 check_complete, chunks, prefill_chunk_tokens)
from ringd.errors import LocalProtocolError, RequestError

ROUTE = Route(epoch=7, stages=(Stage("a", 0, 10), Stage("b", 10, 20), Stage("c", 20, 30)), num_layers=30)


def test_route_rejects_gaps_and_short_coverage():
    with pytest.raises(LocalProtocolError, match="not contiguous"):
        Route(1, (Stage("a", 0, 10), Stage("b", 11, 30)), 30)
    with pytest.raises(LocalProtocolError, match="covers 10 of 30 layers"):
        Route(1, (Stage("a", 0, 10),), 30)
    with pytest.raises(LocalProtocolError, match="at least one stage"):
        Route(1, (), 0)


def test_route_navigation():
    assert ROUTE.next_stage("a") == Stage("b", 10, 20)
    assert ROUTE.next_stage("c") is None
    assert ROUTE.owner_of(19) == "b" and ROUTE.owner_of(30) is None
    assert ROUTE.first.node_id == "a" and ROUTE.last.node_id == "c"


def test_healthy_activation_is_accepted():
    assert check_activation(ROUTE, "b", epoch=7, layer_lo=0, layer_hi=10, sender="a") == Stage("b", 10, 20)
    assert check_activation(ROUTE, "a", epoch=7, layer_lo=0, layer_hi=0, sender="entry") == Stage("a", 0, 10)
    check_complete(ROUTE, layer_lo=0, layer_hi=30, sender="c", self_id="c")


def test_gap_names_the_skipped_node():
    with pytest.raises(RequestError) as e:
        check_activation(ROUTE, "c", epoch=7, layer_lo=0, layer_hi=10, sender="a")
    assert e.value.code == "coverage"
    assert e.value.message.endswith(": gap, layers [10, 20) (owned by b) were not computed")
    assert e.value.message.startswith("node c owns layers [20, 30) but received an activation "
                                      "from node a that passed through [0, 10)")


def test_overlap_is_refused():
    with pytest.raises(RequestError, match="overlap"):
        check_activation(ROUTE, "b", epoch=7, layer_lo=0, layer_hi=15, sender="x")


def test_foreign_epoch_is_refused():
    with pytest.raises(RequestError, match="epoch 6"):
        check_activation(ROUTE, "b", epoch=6, layer_lo=0, layer_hi=10, sender="a")


def test_incomplete_step_cannot_be_sampled():
    with pytest.raises(RequestError) as e:
        check_complete(ROUTE, layer_lo=0, layer_hi=20, sender="b", self_id="c")
    assert e.value.code == "coverage"


def test_request_table_lifecycle():
    t = RequestTable(capacity=2, idle_timeout=5.0)
    r, created = t.admit("r1", entry="e", epoch=1, position=0, length=4, now=0.0)
    assert created and r.next_position == 4
    r, created = t.admit("r1", entry="e", epoch=1, position=4, length=1, now=1.0)
    assert not created and r.next_position == 5
    with pytest.raises(RequestError, match="expected position 5"):
        t.admit("r1", entry="e", epoch=1, position=7, length=1, now=1.0)
    with pytest.raises(RequestError, match="unknown here at position 3"):
        t.admit("r2", entry="e", epoch=1, position=3, length=1, now=1.0)
    t.admit("r2", entry="e", epoch=1, position=0, length=1, now=1.0)
    with pytest.raises(RequestError) as e:
        t.admit("r3", entry="e", epoch=1, position=0, length=1, now=1.0)
    assert e.value.code == "busy"
    assert t.next_deadline() == 6.0
    assert t.expired(6.5) == ["r1", "r2"]
    assert t.end("r1", 7.0) and not t.end("r1", 7.0)
    with pytest.raises(RequestError) as e:
        t.admit("r1", entry="e", epoch=1, position=0, length=1, now=8.0)
    assert e.value.code == "cancelled"
    assert t.clear(9.0) == ["r2"] and t.next_deadline() is None


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


@given(st.integers(0, 2000), st.integers(1, 600))
def test_chunks_cover_exactly(n, size):
    pieces = list(chunks(n, size))
    assert [i for s, e in pieces for i in range(s, e)] == list(range(n))
    assert all(e - s <= size for s, e in pieces)


def test_prefill_chunks_are_lowered_to_fit_one_frame():
    mib = 1 << 20
    # Llama-3.1-405B: hidden 16384, bfloat16: 32 KiB a token; a 64 MiB frame holds 2046 of them
    assert prefill_chunk_tokens(512, 16384, 2, 64 * mib) == 512
    n = prefill_chunk_tokens(4096, 16384, 2, 64 * mib)
    assert n * 16384 * 2 + FRAME_HEADROOM <= 64 * mib < (n + 1) * 16384 * 2 + FRAME_HEADROOM
    assert prefill_chunk_tokens(4096, 16384, 4, 64 * mib) == n // 2
    assert prefill_chunk_tokens(8, 1 << 30, 4, 64 * mib) == 1  # never 0: one token always goes
