"""Honest ceilings: the numbers from issue 6 and the README projection."""

from __future__ import annotations

import pytest

from ringd.core.ceiling import (
    GB,
    LLAMA_405B_4BIT_BYTES,
    M2_ULTRA,
    aggregate_ceiling,
    decode_ceiling,
    is_impossible,
    project,
    projection_table,
    render_projection_table,
    token_time,
)
from ringd.errors import LocalProtocolError

THREE_M2 = [(76 * GB, 800 * GB)] * 3  # 228 GB over 3 M2 Ultras


def test_single_stream_ceiling_matches_the_issue() -> None:
    # ~228 GB at 800 GB/s is ~0.285 s per token: a ceiling of ~3.5 tokens/s
    assert token_time(THREE_M2, []) == pytest.approx(0.285)
    assert decode_ceiling(THREE_M2, []) == pytest.approx(3.509, abs=1e-3)
    assert decode_ceiling(THREE_M2, [0.001] * 3) == pytest.approx(1 / 0.288)
    # the published 7.3 tokens/s would need twice the memory bandwidth
    assert is_impossible(7.3, decode_ceiling(THREE_M2, []))
    assert not is_impossible(3.6, 3.5)  # within the 5% tolerance
    assert is_impossible(3.7, 3.5, tolerance=0.05)


def test_concurrency_overlaps_up_to_the_slowest_stage() -> None:
    single = decode_ceiling(THREE_M2, [])
    assert aggregate_ceiling(THREE_M2, [], 1) == pytest.approx(single)
    assert aggregate_ceiling(THREE_M2, [], 2) == pytest.approx(2 * single)
    stage_limit = 800 / 76  # one M2 Ultra reading its 76 GB shard
    assert aggregate_ceiling(THREE_M2, [], 3) == pytest.approx(stage_limit)
    assert aggregate_ceiling(THREE_M2, [], 8) == pytest.approx(stage_limit)
    lopsided = [(100 * GB, 800 * GB), (28 * GB, 800 * GB)]
    assert aggregate_ceiling(lopsided, [], 8) == pytest.approx(8.0)  # the 100 GB node limits
    with pytest.raises(LocalProtocolError):
        aggregate_ceiling(THREE_M2, [], 0)
    with pytest.raises(LocalProtocolError):
        decode_ceiling([(1, 0)], [])
    with pytest.raises(LocalProtocolError):
        decode_ceiling([], [])


def test_projection_table_for_llama_405b() -> None:
    hop = 150e-6
    rows = projection_table(hop)
    m2, m4, m3 = rows
    assert (m2.nodes, m4.nodes, m3.nodes) == (3, 8, 2)
    assert sum(m4.shard_bytes) == pytest.approx(LLAMA_405B_4BIT_BYTES)
    c = {r.setup: dict(r.ceilings) for r in rows}
    assert c["3x M2 Ultra Mac Studio"][1] == pytest.approx(1 / (0.285 + 3 * hop))
    assert c["3x M2 Ultra Mac Studio"][3] == pytest.approx(3 / (0.285 + 3 * hop))
    assert c["3x M2 Ultra Mac Studio"][8] == pytest.approx(800 / 76)
    assert c["8x M4 Pro Mac mini"][1] == pytest.approx(1 / (228 / 273 + 8 * hop))
    assert c["8x M4 Pro Mac mini"][8] == pytest.approx(min(8 / (228 / 273 + 8 * hop), 273 / 28.5))
    assert c["2x M3 Ultra Mac Studio"][1] == pytest.approx(1 / (228 / 819 + 2 * hop))
    assert c["2x M3 Ultra Mac Studio"][3] == pytest.approx(819 / 114)
    table = render_projection_table(rows, hop)
    assert table.splitlines()[0] == (
        "| ring | weights per node | 1 stream | 3 concurrent (total) | 8 concurrent (total) |"
    )
    assert "| 3x M2 Ultra Mac Studio | 76.0 GB | 3.5 tok/s | 10.5 tok/s | 10.5 tok/s |" in table
    assert "150 µs per hop" in table
    assert project(LLAMA_405B_4BIT_BYTES, [M2_ULTRA], hop).ceilings[0][1] == pytest.approx(
        800 / 228
    )
