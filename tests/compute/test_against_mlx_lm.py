"""Greedy generation through shards equals mlx-lm's own generation, token for token."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ringd.compute.engine import ShardEngine, generate_local
from ringd.compute.model_info import inspect_model
from ringd.compute.tokenizer import Tokenizer
from ringd.core.requests import SamplingParams
from tests.compute.util import load_split, mlx_lm_greedy, shard_greedy

TINY_PROMPTS = ["The quick brown fox", "What is the capital of France?", "def add(a, b):",
                "Caf\u00e9 \u65e5\u672c"]
SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was"]


@pytest.mark.parametrize("which", ["float", "quantized"])
def test_tiny_model_through_shards_equals_mlx_lm(which: str, tiny_model_dir: Path,
                                                  tiny_quantized_model_dir: Path) -> None:
    from mlx_lm import load

    d = tiny_model_dir if which == "float" else tiny_quantized_model_dir
    model, tokenizer = load(str(d))
    eos = set(inspect_model(d).eos_token_ids)
    shards = load_split(d, [0, 1, 4, 6])
    whole = ShardEngine.load(d, 0, 6)
    for text in TINY_PROMPTS:
        prompt = tokenizer.encode(text)
        want = mlx_lm_greedy(model, tokenizer, prompt, 20)
        assert len(want) >= 5
        assert shard_greedy(shards, prompt, 20, eos) == want
        assert list(whole.generate(prompt, SamplingParams(max_tokens=20))) == want


def test_tiny_chunked_prefill_generation_equals_mlx_lm(tiny_model_dir: Path) -> None:
    from mlx_lm import load

    model, tokenizer = load(str(tiny_model_dir))
    prompt = tokenizer.encode(" ".join(TINY_PROMPTS * 3))
    assert len(prompt) > 40
    want = mlx_lm_greedy(model, tokenizer, prompt, 12)
    got = list(generate_local(tiny_model_dir, prompt, SamplingParams(max_tokens=12),
                              prefill_chunk=7))
    assert got == want


@pytest.fixture(scope="module")
def smol(default_model_dir: Path):
    from mlx_lm import load

    model, tokenizer = load(str(default_model_dir))
    return default_model_dir, model, tokenizer


def test_smollm2_through_three_shards_equals_mlx_lm(smol) -> None:
    d, model, tokenizer = smol
    info = inspect_model(d)
    assert info.num_layers == 30
    shards = load_split(d, [0, 7, 19, 30])
    for text in SMOL_PROMPTS:
        prompt = tokenizer.encode(text)
        want = mlx_lm_greedy(model, tokenizer, prompt, 12)
        assert len(want) >= 4
        assert shard_greedy(shards, prompt, 12, set(info.eos_token_ids)) == want


def test_smollm2_chat_answer_from_generate_local(smol) -> None:
    d, model, tokenizer = smol
    tok = Tokenizer.load(d)
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt == tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    out = list(generate_local(d, prompt, SamplingParams(max_tokens=24)))
    assert len(out) < 24  # stopped at the end-of-turn token, which is not yielded
    assert not set(out) & set(tok.eos_token_ids)
    assert "Paris" in tok.decode(out)


def test_acceptance_upstream_mlx_lm_generate_cli(default_model_dir: Path) -> None:
    """The unmodified upstream command answers from the imported directory."""
    r = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(default_model_dir),
         "--prompt", "What is the capital of France?", "--max-tokens", "24", "--temp", "0"],
        capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout, r.stdout
