"""Model directories: sizes from headers only, and clear errors for damaged directories."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ringd.compute.engine import ShardEngine
from ringd.compute.model_info import inspect_model
from ringd.errors import ModelError


@pytest.fixture
def copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    return d


def test_sizes_come_from_the_headers(tiny_model_dir: Path) -> None:
    info = inspect_model(tiny_model_dir)
    assert (info.num_layers, info.hidden_size, info.num_kv_heads, info.head_dim) == (6, 128, 2, 32)
    assert len(set(info.layer_bytes)) == 1 and info.layer_bytes[0] > 0
    assert info.embed_bytes == info.vocab_size * 128 * 4
    assert info.head_bytes == info.embed_bytes and not info.tie_word_embeddings
    assert info.norm_bytes == 128 * 4
    assert info.total_bytes == (sum(info.layer_bytes) + info.embed_bytes + info.head_bytes
                                + info.norm_bytes)
    files = list(tiny_model_dir.glob("*.safetensors"))
    headers = sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in files)
    assert info.total_bytes == sum(f.stat().st_size for f in files) - headers
    assert info.kv_bytes_per_token_per_layer == 2 * 2 * 32 * 4  # float32 activations
    assert info.eos_token_ids == (2,) and info.bos_token_id == 0
    parts = [info.shard_bytes(0, 2), info.shard_bytes(2, 5), info.shard_bytes(5, 6)]
    assert sum(parts) == info.total_bytes
    with pytest.raises(ModelError, match="6 layers"):
        info.shard_bytes(4, 9)


def test_model_info_does_not_import_mlx(tiny_model_dir: Path) -> None:
    code = ("import sys; from ringd.compute.model_info import inspect_model; "
            f"inspect_model(__import__('pathlib').Path({str(tiny_model_dir)!r})); "
            "assert not any(m == 'mlx' or m.startswith('mlx.') for m in sys.modules), "
            "'mlx imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _errors(d: Path) -> list[str]:
    out = []
    for fn in (lambda: inspect_model(d), lambda: ShardEngine.load(d, 0, 2)):
        with pytest.raises(ModelError) as err:
            fn()
        assert err.value.hint, "every model error says what to do"
        out.append(str(err.value))
    return out


def test_missing_config(copy: Path) -> None:
    (copy / "config.json").unlink()
    for msg in _errors(copy):
        assert str(copy / "config.json") in msg and "missing" in msg


def test_truncated_safetensors(copy: Path) -> None:
    f = copy / "model-00003-of-00007.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    for msg in _errors(copy):
        assert str(f) in msg and "the file holds" in msg and "truncated" in msg


def test_safetensors_header_cut_short(copy: Path) -> None:
    f = copy / "model-00002-of-00007.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    for msg in _errors(copy):
        assert str(f) in msg and "does not fit" in msg


def test_missing_weight_file(copy: Path) -> None:
    (copy / "model-00004-of-00007.safetensors").unlink()
    for msg in _errors(copy):
        assert str(copy / "model-00004-of-00007.safetensors") in msg and "missing" in msg


def test_unsupported_model_type(copy: Path) -> None:
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (copy / "config.json").write_text(json.dumps(cfg))
    for msg in _errors(copy):
        assert "'mamba'" in msg and str(copy / "config.json") in msg


def test_bad_json_and_missing_directory(copy: Path, tmp_path: Path) -> None:
    (copy / "config.json").write_text("{not json")
    for msg in _errors(copy):
        assert str(copy / "config.json") in msg
    with pytest.raises(ModelError, match="does not exist"):
        inspect_model(tmp_path / "nowhere")


def test_weights_not_matching_the_config(copy: Path) -> None:
    cfg = json.loads((copy / "config.json").read_text())
    cfg["intermediate_size"] = 512
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="do not match") as err:
        ShardEngine.load(copy, 0, 2)
    assert str(copy) in str(err.value)
