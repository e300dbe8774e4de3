"""The reference of ``ringctl verify`` (layers streamed block by block), the comparison, the
test-only fault hook of the stage compute, and the memory bandwidth figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ringd.compute.bandwidth import apple_chip_bandwidth, measure_bandwidth
from ringd.compute.model_info import inspect_model
from ringd.compute.reference import compare, plan_blocks, reference_logits
from ringd.compute.stage import StageCompute
from ringd.compute.tensors import from_wire
from ringd.core import wire
from ringd.core.pipeline import Compute, Hidden, Sampled, tokens_tensor
from ringd.core.requests import SamplingParams
from ringd.errors import UsageError
from ringd.faults import FAULT_ENV, STALL_ENV, Fault, Faults

PROMPT = [5, 17, 42, 99, 100, 3, 250, 7]


def job(rid: str, tensor: wire.Tensor, *, new: bool, logits: bool = False) -> Compute:
    """One final step (a whole prompt, or a decode step) for a stage."""
    return Compute(rid, 0, 0, 1, "entry", 0, tensor, new, True,
                   SamplingParams(want_logits=logits))


def ring_steps(model_dir: Path, cuts: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy steps through stages as the ring runs them (prefill, then one token at a time)."""
    stages = [StageCompute.load(model_dir, a, b) for a, b in zip(cuts, cuts[1:])]
    x, tokens, logits = tokens_tensor(PROMPT), [], []
    for k in range(steps):
        out = x
        for st in stages[:-1]:
            result = st.step(job("r", out, new=k == 0))
            assert isinstance(result, Hidden)
            out = result.tensor
        sampled = stages[-1].step(job("r", out, new=k == 0, logits=True))
        assert isinstance(sampled, Sampled) and sampled.logits is not None
        tokens.append(sampled.token_id)
        logits.append(np.array(from_wire(sampled.logits)))
        x = tokens_tensor([sampled.token_id])
    return tokens, np.stack(logits)


def test_blocks_respect_the_budget_and_cover_every_layer(tiny_quantized_model_dir: Path) -> None:
    info = inspect_model(tiny_quantized_model_dir)
    assert plan_blocks(info, 10**12) == [(0, info.num_layers)]
    budget = info.shard_bytes(0, 2)
    blocks = plan_blocks(info, budget)
    assert blocks[0][0] == 0 and blocks[-1][1] == info.num_layers and len(blocks) > 2
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert all(info.shard_bytes(a, b) <= budget or b - a == 1 for a, b in blocks)
    assert plan_blocks(info, 1) == [(i, i + 1) for i in range(info.num_layers)]  # >= 1 layer


@pytest.mark.parametrize("which", ["float", "quantized"])
def test_streamed_reference_equals_the_ring(which: str, tiny_model_dir: Path,
                                            tiny_quantized_model_dir: Path) -> None:
    model_dir = tiny_model_dir if which == "float" else tiny_quantized_model_dir
    tokens, ring = ring_steps(model_dir, [0, 2, 5, 6], 6)
    info = inspect_model(model_dir)
    whole = reference_logits(model_dir, PROMPT, tokens, block_bytes=10**12)
    messages: list[str] = []
    streamed = reference_logits(model_dir, PROMPT, tokens, block_bytes=info.shard_bytes(1, 3),
                                progress=messages.append)
    assert len(messages) > 2 and messages[0].startswith("reference: layers 0-")
    assert whole.shape == streamed.shape == (6, info.vocab_size)
    # on the CPU the three agree bit for bit; the tolerance is for other backends
    assert np.array_equal(whole, streamed) and np.array_equal(whole, ring)
    v = compare(ring, streamed, tokens)
    assert v.match and v.max_abs_diff == 0.0 and v.first_divergent_step is None
    assert list(v.reference_tokens) == tokens


def test_compare_locates_the_first_divergent_step() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(5, 50)).astype(np.float32) * 4
    ring = ref.copy()
    ring[2:] += rng.normal(size=(3, 50)).astype(np.float32)  # diverges from step 2 on
    v = compare(ring, ref, [0] * 5)
    assert not v.match and v.first_divergent_step == 2 and v.step_diffs[:2] == (0.0, 0.0)
    assert v.max_abs_diff == pytest.approx(float(np.abs(ring - ref).max()))
    small = ref.copy()
    small[4, 7] += 0.5 * v.tolerance  # within the tolerance
    assert compare(small, ref, [0] * 5).match
    nan = ref.copy()
    nan[3, 0] = np.nan
    assert compare(nan, ref, [0] * 5).first_divergent_step == 3
    with pytest.raises(UsageError, match="different models"):
        compare(ref[:, :10], ref, [0] * 5)


def test_faults_are_read_per_node_name() -> None:
    env = {FAULT_ENV: "node2:skip-layers, node3:gap", STALL_ENV: "0.5"}
    assert Faults.from_env(env, "node2") == Faults(Fault.SKIP_LAYERS, 0.5)
    assert Faults.from_env(env, "node3").fault is Fault.GAP
    assert Faults.from_env(env, "node1").fault is None
    with pytest.raises(UsageError, match="unknown mode 'explode'"):
        Faults.from_env({FAULT_ENV: "node1:explode"}, "node1")
    with pytest.raises(UsageError, match="not a number of seconds"):
        Faults.from_env({STALL_ENV: "soon"}, "node1")
    assert Faults.from_env({}, "node2") == Faults()


def test_faulty_stages(tiny_quantized_model_dir: Path) -> None:
    md = tiny_quantized_model_dir
    hidden = StageCompute.load(md, 0, 2).step(job("a", tokens_tensor(PROMPT), new=True))
    # skip-layers: passes its input on and says it ran nothing; identity-layers claims it did
    for fault, claimed in ((Fault.SKIP_LAYERS, (2, 2)), (Fault.IDENTITY_LAYERS, (2, 4))):
        st = StageCompute.load(md, 2, 4, fault)
        assert st.layers == claimed and len(st.tensor_names) > 0
        assert st.step(job("a", hidden.tensor, new=True)) == hidden
    honest = StageCompute.load(md, 2, 4).step(job("a", hidden.tensor, new=True))
    assert isinstance(honest, Hidden) and honest != hidden
    gap = StageCompute.load(md, 2, 4, Fault.GAP)  # one layer fewer than assigned
    assert gap.layers == (2, 3)
    assert not any(n.startswith("model.layers.3.") for n in gap.tensor_names)


def test_memory_bandwidth_figures() -> None:
    assert apple_chip_bandwidth("Apple M2 Ultra") == 800e9
    assert apple_chip_bandwidth("Apple M4 Pro\n") == 273e9
    assert apple_chip_bandwidth("Intel(R) Xeon(R)") is None
    bw = measure_bandwidth(buffer_bytes=8 << 20, rounds=2)
    assert 1e8 < bw < 1e13  # bytes/s, a plausible range for any machine
