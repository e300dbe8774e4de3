"""Helpers for the compute tests: run a prompt through shards, mlx-lm's reference, GGUF files."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx

from ringd.compute.engine import ShardEngine


def through(engines: list[ShardEngine], rid: str, x: mx.array, **kw: Any) -> mx.array | None:
    """One forward pass through consecutive shards."""
    for e in engines:
        x = e.forward(rid, x, **kw)
    return x


def shard_greedy(engines: list[ShardEngine], prompt: list[int], max_tokens: int,
                 eos: set[int], rid: str = "g") -> list[int]:
    """Greedy generation passing activations shard to shard, as the ring does."""
    for e in engines:
        e.new_request(rid)
    try:
        ids = mx.array(prompt, dtype=mx.int32)
        if len(prompt) > 1:
            through(engines, rid, ids[:-1], need_logits=False)
        logits = through(engines, rid, ids[-1:])
        out: list[int] = []
        while len(out) < max_tokens:
            tok = int(mx.argmax(logits).item())
            if tok in eos:
                break
            out.append(tok)
            logits = through(engines, rid, mx.array([tok], dtype=mx.int32))
        return out
    finally:
        for e in engines:
            e.free_request(rid)


def mlx_lm_greedy(model: Any, tokenizer: Any, prompt: list[int], max_tokens: int) -> list[int]:
    """mlx-lm's own greedy generation (stream_generate), without the EOS token."""
    from mlx_lm.generate import stream_generate

    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)
            if r.finish_reason != "stop"]


def load_split(model_dir: Path, cuts: list[int], **kw: Any) -> list[ShardEngine]:
    return [ShardEngine.load(model_dir, a, b, **kw) for a, b in zip(cuts, cuts[1:])]


# --------------------------------------------------------------------------- GGUF files
def _permute(w: mx.array, n_head: int) -> mx.array:
    """llama.cpp's Q/K row order for interleaved rotary embedding."""
    rows = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, rows, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_llama_gguf(model_dir: Path, out: Path, *, architecture: str = "llama",
                     extra_tensors: dict[str, mx.array] | None = None) -> Path:
    """Write an unquantized float model directory as a llama.cpp-style GGUF file."""
    cfg = json.loads((model_dir / "config.json").read_text())
    weights: dict[str, mx.array] = {}
    for f in sorted(model_dir.glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors: dict[str, mx.array] = {}
    for name, w in weights.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            if module == "self_attn.q_proj":
                w = _permute(w, heads)
            elif module == "self_attn.k_proj":
                w = _permute(w, kv)
            tensors[f"blk.{i}.{_GGUF_BLOCK[module]}.{suffix}"] = w
        else:
            top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
                   "lm_head": "output"}[name.rsplit(".", 1)[0]]
            tensors[f"{top}.weight"] = w
    tensors.update(extra_tensors or {})

    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv_: kv_[1])
    specials = {t["id"]: t["content"] for t in tok["added_tokens"]}
    tokens = [specials.get(i, t) for t, i in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    tcfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    meta: dict[str, Any] = {
        "general.architecture": architecture,
        "general.name": "tiny",
        "llama.block_count": u32(cfg["num_hidden_layers"]),
        "llama.context_length": u32(cfg["max_position_embeddings"]),
        "llama.embedding_length": u32(cfg["hidden_size"]),
        "llama.feed_forward_length": u32(cfg["intermediate_size"]),
        "llama.attention.head_count": u32(heads),
        "llama.attention.head_count_kv": u32(kv),
        "llama.attention.layer_norm_rms_epsilon": mx.array(cfg["rms_norm_eps"], dtype=mx.float32),
        "llama.rope.freq_base": mx.array(cfg["rope_theta"], dtype=mx.float32),
        "llama.rope.dimension_count": u32(cfg["hidden_size"] // heads),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array(
            [3 if i in specials else 1 for i in range(len(tokens))], dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(cfg["bos_token_id"]),
        "tokenizer.ggml.eos_token_id": u32(cfg["eos_token_id"]),
        "tokenizer.chat_template": tcfg["chat_template"],
    }
    mx.save_gguf(str(out), tensors, meta)
    return out


def patch_gguf_tensor(path: Path, name: str, type_id: int, dims: tuple[int, ...]) -> None:
    """Rewrite one tensor's type and dims in a GGUF header (same number of dims)."""
    data = bytearray(path.read_bytes())
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", data, at)
    assert n_dims == len(dims)
    struct.pack_into(f"<{n_dims}Q", data, at + 4, *dims)
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, type_id)
    path.write_bytes(bytes(data))


def build_random_model(out: Path, config: dict[str, Any], seed: int = 3) -> Path:
    """A random model of any supported mlx-lm architecture, weights only (no tokenizer)."""
    import importlib

    from mlx.utils import tree_flatten

    from ringd.compute.store import save_weights

    module = {"mistral": "llama"}.get(config["model_type"], config["model_type"])
    arch = importlib.import_module(f"mlx_lm.models.{module}")
    mx.random.seed(seed)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    out.mkdir(parents=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    save_weights(out, weights, max_file_bytes=400_000)
    (out / "config.json").write_text(json.dumps(config))
    return out
