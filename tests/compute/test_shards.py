"""Shards of a model compute exactly what the whole model computes, and hold only their part."""

from __future__ import annotations

import shutil
import struct
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from ringd.compute.engine import ShardEngine
from ringd.compute.model_info import inspect_model
from ringd.errors import LocalProtocolError, ModelError
from tests.compute.util import build_random_model, load_split, through

PROMPT = [5, 17, 42, 99, 100, 3, 250, 11, 64, 128, 7, 300]
SPLITS = [[0, 3, 6], [0, 1, 6], [0, 5, 6], [0, 2, 5, 6], [0, 1, 4, 6]]


@pytest.fixture(params=["float", "quantized"])
def model_dir(request: pytest.FixtureRequest, tiny_model_dir: Path,
              tiny_quantized_model_dir: Path) -> Path:
    return tiny_model_dir if request.param == "float" else tiny_quantized_model_dir


def _tolerance(logits: mx.array) -> float:
    return 1e-5 * max(1.0, float(mx.abs(logits).max()))


@pytest.mark.parametrize("cuts", SPLITS, ids=lambda c: "-".join(map(str, c)))
def test_shards_equal_whole_model_prefill_and_20_decode_steps(model_dir: Path,
                                                              cuts: list[int]) -> None:
    whole = [ShardEngine.load(model_dir, 0, 6)]
    parts = load_split(model_dir, cuts)
    for e in whole + parts:
        e.new_request("r")
    ids = mx.array(PROMPT, dtype=mx.int32)
    want, got = through(whole, "r", ids), through(parts, "r", ids)
    assert want.shape == got.shape == (whole[0].info.vocab_size,)
    assert want.dtype == got.dtype == mx.float32
    assert float(mx.abs(want - got).max()) <= _tolerance(want)
    for _ in range(20):
        tok = mx.argmax(want).reshape(1).astype(mx.int32)
        want, got = through(whole, "r", tok), through(parts, "r", tok)
        assert float(mx.abs(want - got).max()) <= _tolerance(want)
    assert [e.cache_len("r") for e in parts] == [len(PROMPT) + 20] * len(parts)


def test_chunked_prefill_matches_one_pass(model_dir: Path) -> None:
    whole = ShardEngine.load(model_dir, 0, 6)
    parts = load_split(model_dir, [0, 2, 4, 6])
    whole.new_request("r")
    for e in parts:
        e.new_request("r")
    ids = mx.array(PROMPT, dtype=mx.int32)
    want = whole.forward("r", ids)
    for s in (0, 5, 10):  # chunks of 5, 5, 2
        chunk = ids[s:s + 5]
        got = through(parts, "r", chunk, need_logits=s + 5 >= len(PROMPT))
    assert got is not None
    rtol = 1e-4 if whole.activation_dtype == mx.float32 else 2e-2
    assert mx.allclose(want, got, rtol=rtol, atol=rtol * float(mx.abs(want).max()))
    assert int(mx.argmax(want)) == int(mx.argmax(got))
    for _ in range(5):  # decode continues from the chunked cache
        tok = mx.argmax(want).reshape(1).astype(mx.int32)
        want, got = whole.forward("r", tok), through(parts, "r", tok)
        assert int(mx.argmax(want)) == int(mx.argmax(got))


def test_hidden_states_have_the_models_activation_dtype(tiny_model_dir: Path,
                                                        tiny_quantized_model_dir: Path) -> None:
    for d, dtype in ((tiny_model_dir, mx.float32), (tiny_quantized_model_dir, mx.bfloat16)):
        first = ShardEngine.load(d, 0, 2)
        assert first.info.activation_dtype == str(dtype).split(".")[-1]
        first.new_request("r")
        h = first.forward("r", mx.array(PROMPT, dtype=mx.int32))
        assert h.shape == (1, len(PROMPT), 128) and h.dtype == dtype


def test_row_split_projections_give_identical_results(model_dir: Path) -> None:
    plain = load_split(model_dir, [0, 3, 6], cpu_split=1)
    split = load_split(model_dir, [0, 3, 6], cpu_split=3)
    assert split[0].cpu_split == 3 and plain[0].cpu_split == 1
    assert split[0].loaded_bytes == plain[0].loaded_bytes
    for e in plain + split:
        e.new_request("r")
    ids = mx.array(PROMPT, dtype=mx.int32)
    a, b = through(plain, "r", ids), through(split, "r", ids)
    assert mx.array_equal(a, b)
    tok = mx.argmax(a).reshape(1).astype(mx.int32)
    assert mx.array_equal(through(plain, "r", tok), through(split, "r", tok))


def test_requests_have_separate_caches(tiny_model_dir: Path) -> None:
    e = ShardEngine.load(tiny_model_dir, 0, 6)
    e.new_request("a")
    alone = e.forward("a", mx.array(PROMPT, dtype=mx.int32))
    e.free_request("a")
    e.new_request("a")
    e.new_request("b")
    e.forward("b", mx.array([1, 2, 3, 4], dtype=mx.int32))
    both = e.forward("a", mx.array(PROMPT, dtype=mx.int32))
    assert sorted(e.active_requests()) == ["a", "b"]
    assert e.cache_len("a") == len(PROMPT) and e.cache_len("b") == 4
    assert mx.allclose(alone, both, rtol=1e-5, atol=1e-5)
    with pytest.raises(LocalProtocolError, match="already"):
        e.new_request("a")
    e.free_request("a")
    e.free_request("a")  # freeing twice is harmless
    assert e.active_requests() == ["b"]
    with pytest.raises(LocalProtocolError, match="no KV cache"):
        e.forward("a", mx.array([1], dtype=mx.int32))


def test_wrong_input_shapes_are_refused(tiny_model_dir: Path) -> None:
    first, second = load_split(tiny_model_dir, [0, 3, 6])
    first.new_request("r")
    second.new_request("r")
    with pytest.raises(LocalProtocolError, match="token ids"):
        first.forward("r", mx.zeros((1, 2, 128)))
    with pytest.raises(LocalProtocolError, match=r"\[1, T, 128\]"):
        second.forward("r", mx.zeros((1, 2, 64)))
    with pytest.raises(LocalProtocolError):
        second.forward("r", mx.array([1, 2], dtype=mx.int32))


@pytest.mark.parametrize("start,end", [(0, 0), (3, 2), (-1, 3), (0, 7), (6, 7)])
def test_layer_range_out_of_bounds(tiny_model_dir: Path, start: int, end: int) -> None:
    with pytest.raises(ModelError) as err:
        ShardEngine.load(tiny_model_dir, start, end)
    assert "6 layers" in str(err.value) and str(tiny_model_dir) in str(err.value)


def test_middle_third_holds_a_third_of_the_weights(tiny_model_dir: Path) -> None:
    info = inspect_model(tiny_model_dir)
    e = ShardEngine.load(tiny_model_dir, 2, 4)
    assert e.loaded_bytes == info.shard_bytes(2, 4) == sum(info.layer_bytes[2:4])
    assert e.loaded_bytes <= info.total_bytes / 3
    assert e.tensor_names and all(n.startswith(("model.layers.2.", "model.layers.3."))
                                  for n in e.tensor_names)
    first, last = ShardEngine.load(tiny_model_dir, 0, 2), ShardEngine.load(tiny_model_dir, 4, 6)
    assert first.loaded_bytes == info.shard_bytes(0, 2)
    assert last.loaded_bytes == info.shard_bytes(4, 6)
    assert first.loaded_bytes + e.loaded_bytes + last.loaded_bytes == info.total_bytes
    assert not any(n.startswith("lm_head") for n in first.tensor_names)
    assert not any(n.startswith("model.embed_tokens") for n in last.tensor_names)


def test_tied_last_shard_loads_the_embedding_as_head(tiny_quantized_model_dir: Path) -> None:
    info = inspect_model(tiny_quantized_model_dir)
    assert info.tie_word_embeddings
    last = ShardEngine.load(tiny_quantized_model_dir, 4, 6)
    assert any(n.startswith("model.embed_tokens.") for n in last.tensor_names)
    assert last.loaded_bytes == info.shard_bytes(4, 6)
    assert info.shard_bytes(0, 6) == info.total_bytes  # the embedding is counted once


def test_unowned_tensors_are_not_used(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Overwrite the data of every file the middle shard does not need with NaNs."""
    info = inspect_model(tiny_model_dir)
    copy = tmp_path / "poisoned"
    shutil.copytree(tiny_model_dir, copy)
    owned = ("model.layers.2.", "model.layers.3.")
    needed = {info.tensor_index[n].file for n in info.tensor_index if n.startswith(owned)}
    poisoned = [f for f in copy.glob("model*.safetensors") if f.name not in needed]
    assert len(poisoned) >= 3, "the fixture should spread the weights over several files"
    for f in poisoned:
        raw = bytearray(f.read_bytes())
        header = 8 + struct.unpack_from("<Q", raw)[0]
        raw[header:] = b"\xff" * (len(raw) - header)  # 0xffff... is NaN in every float dtype
        f.write_bytes(bytes(raw))
    x = mx.random.normal((1, 4, 128), key=mx.random.key(3))
    outs = []
    for d in (tiny_model_dir, copy):
        e = ShardEngine.load(d, 2, 4)
        e.new_request("r")
        outs.append(e.forward("r", x))
    assert not mx.isnan(outs[1]).any()
    assert mx.array_equal(outs[0], outs[1])
    first = ShardEngine.load(copy, 0, 2)  # the poison is real: the first shard sees it
    first.new_request("r")
    assert mx.isnan(first.forward("r", mx.array(PROMPT, dtype=mx.int32))).any()


def test_load_reads_only_the_shards_bytes(tiny_model_dir: Path) -> None:
    """Bytes read from disk while loading a middle shard (Linux: /proc/self/io)."""
    if not sys.platform.startswith("linux"):
        pytest.fail("this check reads /proc/self/io")
    info = inspect_model(tiny_model_dir)
    ShardEngine.load(tiny_model_dir, 0, 1)  # warm up imports

    def rchar() -> int:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
        raise AssertionError("no rchar in /proc/self/io")

    before = rchar()
    e = ShardEngine.load(tiny_model_dir, 2, 4)
    read = rchar() - before
    assert e.loaded_bytes <= read < e.loaded_bytes + 256 * 1024
    assert read < info.total_bytes / 2


_BASE = {"hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
         "vocab_size": 200, "max_position_embeddings": 512, "rope_theta": 10000.0}


@pytest.mark.parametrize("config", [
    {"model_type": "qwen2", "tie_word_embeddings": True},  # attention biases
    {"model_type": "qwen3", "head_dim": 16, "tie_word_embeddings": False},  # q/k norms
    {"model_type": "mistral", "tie_word_embeddings": False},
], ids=lambda c: c["model_type"])
def test_other_architectures_split_exactly_and_match_mlx_lm(tmp_path: Path, config: dict) -> None:
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    d = build_random_model(tmp_path / config["model_type"], {**_BASE, **config})
    reference, _ = load_model(d)
    cache = make_prompt_cache(reference)
    whole = [ShardEngine.load(d, 0, 4)]
    parts = load_split(d, [0, 1, 3, 4])
    for e in whole + parts:
        e.new_request("r")
    ids = mx.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=mx.int32)
    for _ in range(4):
        ref = reference(ids[None], cache=cache)[0, -1].astype(mx.float32)
        want, got = through(whole, "r", ids), through(parts, "r", ids)
        assert mx.array_equal(want, got)
        assert mx.allclose(ref, want, rtol=1e-5, atol=1e-5)
        ids = mx.argmax(want).reshape(1).astype(mx.int32)


def test_loaded_on_one_thread_runs_on_another(tmp_path: Path) -> None:
    """The daemon may load on one thread and compute on another (MLX streams are per thread)."""
    import threading

    d = build_random_model(tmp_path / "l3", {
        **_BASE, "model_type": "llama", "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 256}})
    loaded: list[ShardEngine] = []
    t = threading.Thread(target=lambda: loaded.extend(load_split(d, [0, 2, 4], cpu_split=2)))
    t.start()
    t.join()
    here = load_split(d, [0, 2, 4], cpu_split=2)
    for e in loaded + here:
        e.new_request("r")
    ids = mx.array([3, 1, 4, 1, 5], dtype=mx.int32)
    assert mx.array_equal(through(loaded, "r", ids), through(here, "r", ids))
