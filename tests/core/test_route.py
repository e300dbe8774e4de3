import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringd.core.route import (FRAME_HEADROOM, Route, Stage, check_activation, check_complete,
                              chunks, prefill_chunk_tokens)
from ringd.errors import LocalProtocolError, RequestError

ROUTE = Route(epoch=7, stages=(Stage("a", 0, 10), Stage("b", 10, 20), Stage("c", 20, 30)),
              num_layers=30)


def test_route_rejects_gaps_and_short_coverage():
    with pytest.raises(LocalProtocolError):
        Route(1, (Stage("a", 0, 10), Stage("b", 11, 30)), 30)
    with pytest.raises(LocalProtocolError):
        Route(1, (Stage("a", 0, 10),), 30)
    with pytest.raises(LocalProtocolError):
        Route(1, (), 0)


def test_route_navigation():
    assert ROUTE.next_stage("a") == Stage("b", 10, 20)
    assert ROUTE.next_stage("c") is None
    assert ROUTE.owner_of(19) == "b" and ROUTE.owner_of(30) is None
    assert ROUTE.first.node_id == "a" and ROUTE.last.node_id == "c"


def test_healthy_activation_is_accepted():
    assert (check_activation(ROUTE, "b", epoch=7, layer_lo=0, layer_hi=10, sender="a")
            == Stage("b", 10, 20))
    assert (check_activation(ROUTE, "a", epoch=7, layer_lo=0, layer_hi=0, sender="entry")
            == Stage("a", 0, 10))
    check_complete(ROUTE, layer_lo=0, layer_hi=30, sender="c", self_id="c")


def test_gap_names_the_skipped_node():
    with pytest.raises(RequestError) as e:
        check_activation(ROUTE, "c", epoch=7, layer_lo=0, layer_hi=10, sender="a")
    assert e.value.code == "coverage"
    assert "gap, layers [10, 20) (owned by b) were not computed" in e.value.message


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
