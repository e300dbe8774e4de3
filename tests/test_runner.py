"""RingRunner's reaction to frames the transport's epoch filter dropped."""

from __future__ import annotations

from types import SimpleNamespace

from ringd.config import Settings
from ringd.core import wire
from ringd.core.pipeline import Route, Stage, prefill_chunk_tokens
from ringd.core.stream import TCP_MAX_FRAME
from ringd.runner import STALE_TOLD, RingRunner


def _activation(rid: str, epoch: int, step: int = 0) -> wire.Activation:
    return wire.Activation(rid, step, step, epoch, 0, 0, "entry-node", wire.Sampling(), True,
                           wire.Tensor("int32", (1,), bytes(4)))


def test_a_stale_activation_is_answered_once_per_request_to_its_entry() -> None:
    sent: list[tuple[str, wire.Message]] = []
    runner = RingRunner(Settings(), "n1", None, "m", (), lambda node, msg: sent.append((node, msg)))  # type: ignore[arg-type]
    for step in range(3):  # one request's steps keep coming: one answer
        runner.on_stale(_activation("req-1", epoch=4, step=step), "n0", 5)
    runner.on_stale(wire.Token("req-2", 0, 4, 7, 0, 4), "n0", 5)  # a token has no one to tell
    runner.on_stale(_activation("req-3", epoch=6), "n2", 5)
    assert [(node, type(m), m.request_id, m.code) for node, m in sent] == [
        ("entry-node", wire.Error, "req-1", "coverage"), ("entry-node", wire.Error, "req-3", "coverage")]
    assert "node n0 sent an activation of plan epoch 4 to node n1, which serves epoch 5" in sent[0][1].message
    assert "plan epoch 6" in sent[1][1].message
    for i in range(STALE_TOLD):  # the memory of answered requests is bounded
        runner.on_stale(_activation(f"flood-{i}", epoch=4), "n0", 5)
    assert len(runner._stale_told) == STALE_TOLD
    runner.on_stale(_activation("req-1", epoch=4, step=9), "n0", 5)  # forgotten: answered again
    assert sent[-1][1].request_id == "req-1"


def test_prompts_go_in_chunks_whose_activations_fit_one_frame(caplog) -> None:
    """prefill_chunk = 4096 on a 405B-shaped model (hidden 16384, bfloat16) would make 128 MiB
    activation frames, which every peer refuses: the runner lowers the chunk, and says so."""
    sent: list[tuple[str, wire.Message]] = []
    runner = RingRunner(Settings(prefill_chunk=4096), "n1", None, "m", (),  # type: ignore[arg-type]
                        lambda node, msg: sent.append((node, msg)))
    info = SimpleNamespace(hidden_size=16384, activation_dtype="bfloat16")
    route = Route(3, (Stage("n1", 0, 10), Stage("n2", 10, 20)), 20)
    runner.serve(route, SimpleNamespace(engine=SimpleNamespace(info=info), fault=None))  # type: ignore[arg-type]
    assert "prompts go in chunks of" in caplog.text
    runner._send_prompt(route, "r", list(range(5000)), wire.Sampling())
    sizes = [m.tensor.shape[0] for _, m in sent]
    fit = prefill_chunk_tokens(4096, 16384, 2, TCP_MAX_FRAME)
    assert sizes == [fit] * (5000 // fit) + [5000 % fit] and sum(sizes) == 5000
    assert fit * 16384 * 2 < TCP_MAX_FRAME < 4096 * 16384 * 2
    assert [m.final for _, m in sent] == [False] * (len(sent) - 1) + [True]
