"""Tokenizer, chat template, streaming detokenizer; the memory probe's arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringd.compute.memory import combine, usable_memory
from ringd.compute.tokenizer import Tokenizer
from ringd.errors import ModelError, UsageError

GiB = 1024**3
TEXT = ("Caf\u00e9 au lait \U0001F680\U0001F30D \u65e5\u672c\u8a9e, "
        "na\u00efve r\u00e9sum\u00e9 \u00a9 2025!")


@pytest.fixture(params=["tiny", "smollm2"])
def tok(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Tokenizer:
    if request.param == "tiny":
        return Tokenizer.load(tiny_model_dir)
    return Tokenizer.load(request.getfixturevalue("default_model_dir"))


def test_stream_decoder_never_splits_a_character(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT) // 4
    dec = tok.new_decoder()
    pieces = [dec.add(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p == "") > 0  # multi-token characters were held back


def test_flush_returns_an_incomplete_tail(tiny_model_dir: Path) -> None:
    tok = Tokenizer.load(tiny_model_dir)
    ids = tok.encode("\U0001F680")  # not in the tiny vocabulary: several byte tokens
    assert len(ids) > 1
    dec = tok.new_decoder()
    assert [dec.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert "\ufffd" in dec.flush()  # the incomplete bytes, as the decoder renders them
    dec2 = tok.new_decoder()
    assert "".join(dec2.add(i) for i in ids) + dec2.flush() == "\U0001F680"


def test_chat_template(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "Hello there"}]
    ids = tok.encode_chat(msgs)
    text = tok._hf.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and "Hello there<|im_end|>" in text
    without = tok.encode_chat(msgs, add_generation_prompt=False)
    assert ids[: len(without)] == without and len(ids) > len(without)
    assert 2 in tok.eos_token_ids


def test_missing_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_model_without_chat_template(tiny_model_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.load(d)
    assert not tok.has_chat_template
    with pytest.raises(UsageError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])


def test_memory_arithmetic() -> None:
    assert combine(10 * GiB, 16 * GiB, 2 * GiB, None) == (8 * GiB, 16 * GiB)
    assert combine(1 * GiB, 16 * GiB, 2 * GiB, None) == (0, 16 * GiB)
    # Apple silicon: the Metal working set caps what the ring may plan on.
    assert combine(60 * GiB, 64 * GiB, 2 * GiB, 48 * GiB) == (48 * GiB, 64 * GiB)
    assert combine(20 * GiB, 64 * GiB, 2 * GiB, 48 * GiB) == (18 * GiB, 64 * GiB)


def test_usable_memory_here() -> None:
    usable, total = usable_memory(2 * GiB)
    assert 0 <= usable < total
    more, _ = usable_memory(0)
    assert more >= usable
