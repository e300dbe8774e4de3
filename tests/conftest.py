"""Shared fixtures: tiny random Llamas (float and quantized), the real default model, and
``no_blocking_in_loop``, which fails a test whose event loop made a blocking call.

The tiny models are real mlx-lm model directories (config.json, split safetensors with an
index, tokenizer.json, tokenizer_config.json with a ChatML template) that unmodified
mlx-lm loads. They are built once per session under pytest's temporary directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.loopguard import BlockingCall, forbid_blocking_in_loop

pytest_plugins = ["pytester"]  # tests/test_loopguard.py runs the fixture in a pytest of its own

TINY_LAYERS = 6
TINY_HIDDEN = 128
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "A ring of machines passes activations from one node to the next.",
    "Each node holds a contiguous block of transformer layers.",
    "Tokens are sampled on the last node and sent back to the first.",
    "Caf\u00e9, na\u00efve, r\u00e9sum\u00e9, \u00fcber, \u65e5\u672c\u8a9e, "
    "\U0001F600 and \u00a9 are text too.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159",
] * 4


def build_tiny_tokenizer(out: Path, vocab_size: int = 384) -> int:
    """Train a byte-level BPE on a fixed corpus; write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(_CORPUS, trainer=trainer)
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHATML, "model_max_length": 2048, "clean_up_tokenization_spaces": False,
    }, indent=2))
    return tk.get_vocab_size()


def tiny_config(vocab_size: int, **over: Any) -> dict[str, Any]:
    cfg = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": TINY_HIDDEN, "num_hidden_layers": TINY_LAYERS, "intermediate_size": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 2,
    }
    cfg.update(over)
    return cfg


def build_tiny_model(out: Path, *, quantized: bool, seed: int = 7,
                     max_file_bytes: int = 600_000) -> Path:
    """A random Llama in the mlx-lm layout, weights split over several files.

    Float: float32, untied head. Quantized: bfloat16 (MLX's float16 quantized kernels are
    slow on CPU), 4-bit blocks and an 8-bit tied embedding (group size 32): the same
    per-module layout as the imported SmolLM2.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from ringd.compute.store import save_weights

    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tiny_tokenizer(out)
    cfg = tiny_config(vocab, tie_word_embeddings=quantized)
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    # Spread the logits so greedy choices are far from ties, and (tied case) let the
    # blocks move the residual stream enough that the output is not the input token.
    if quantized:
        model.model.embed_tokens.weight = mx.random.normal((vocab, TINY_HIDDEN)) * 0.2
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight = layer.self_attn.o_proj.weight * 10
            layer.mlp.down_proj.weight = layer.mlp.down_proj.weight * 10
    else:
        model.model.embed_tokens.weight = mx.random.normal((vocab, TINY_HIDDEN))
        model.lm_head.weight = mx.random.normal((vocab, TINY_HIDDEN)) * 0.2
    if quantized:
        model.set_dtype(mx.bfloat16)
        q = {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}
        nn.quantize(model, group_size=32, bits=4,
                    class_predicate=lambda p, m: q.get(p, hasattr(m, "to_quantized")))
        cfg["quantization"] = q
        cfg["quantization_config"] = q
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    save_weights(out, weights, max_file_bytes=max_file_bytes)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6-layer float32 Llama (hidden 128, untied head), weights in several files."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-float", quantized=False)


@pytest.fixture(scope="session")
def tiny_quantized_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same shape, bfloat16, 4-bit blocks + 8-bit tied embedding (group size 32)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-q4", quantized=True)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model (SmolLM2-135M-Instruct) in the configured store; fetched once."""
    from ringd.compute.store import ensure_default_model
    from ringd.config import Settings

    settings = Settings.load(env=os.environ)
    return ensure_default_model(settings.model_store)


@pytest.fixture
def no_blocking_in_loop() -> Iterator[list[BlockingCall]]:
    """Fail the test when code on a running event loop's thread made a blocking call
    (tests/loopguard.py says which calls); the call itself raises BlockingCallInLoop."""
    with forbid_blocking_in_loop() as calls:
        yield calls
    if calls:
        pytest.fail(f"{len(calls)} blocking call(s) on the event loop's thread:\n\n"
                    + "\n".join(map(str, calls)), pytrace=False)
