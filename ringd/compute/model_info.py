"""What a model directory holds, read from ``config.json`` and safetensors headers only.

No MLX import here: the planner and the CLI use these numbers without loading weights.
A model directory is in the mlx-lm layout: ``config.json``, ``model*.safetensors``
(with ``model.safetensors.index.json`` when split) and tokenizer files.

A *shard directory* (:mod:`ringd.compute.shard_dir`) holds only some tensors, and a
manifest (kind ``shard``) that lists them all: its :class:`ModelInfo` describes the whole
model from the manifest, and the tensors it lacks have no file (``TensorEntry.file`` is
None; :meth:`ModelInfo.holds` says whether a layer range is all there). A directory with
only the manifest, ``config.json`` and the tokenizer files is a shard directory holding
nothing: enough to plan.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ringd.compute.manifest_file import MANIFEST_FILE, is_shard_dir, read_manifest_file
from ringd.core.model_manifest import DTYPE_SIZES, ModelManifest
from ringd.errors import ModelError

#: model_type values whose mlx-lm classes have the Llama layout
#: (``model.embed_tokens``, ``model.layers[i]``, ``model.norm``, ``lm_head``).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_MAX_HEADER = 100 * 1024 * 1024
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")

_FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as stored: its file, dtype (safetensors spelling), shape and size.

    ``file`` is None for a tensor a shard directory does not hold (yet).
    """

    file: str | None
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # where its bytes begin in the file


@dataclass(frozen=True)
class ModelInfo:
    """Sizes and hyper-parameters of a model directory (nothing loaded)."""

    name: str
    path: Path
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_kv_heads: int
    head_dim: int
    layer_bytes: tuple[int, ...]
    embed_bytes: int
    norm_bytes: int
    head_bytes: int  # bytes the last shard holds for the output head (embedding bytes when tied)
    tie_word_embeddings: bool
    total_bytes: int  # bytes of all weight tensors of the model (each once)
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    activation_dtype: str  # dtype of hidden states between shards: float16, bfloat16 or float32
    kv_bytes_per_token_per_layer: int  # keys + values of one token in one layer
    tensor_index: dict[str, TensorEntry] = field(repr=False, compare=False)
    config: dict[str, Any] = field(repr=False, compare=False)
    local_bytes: int = 0  # bytes of weight tensors present in this directory
    manifest: ModelManifest | None = field(default=None, repr=False, compare=False)
    """The authoritative manifest of a shard directory (None for a full directory)."""

    @property
    def partial(self) -> bool:
        """Whether this directory lacks some of the model's tensors."""
        return self.local_bytes < self.total_bytes

    def shard_tensors(self, start: int, end: int) -> list[str]:
        """Names (sorted) of the tensors a shard of layers ``[start, end)`` loads."""
        n = self.num_layers
        if not 0 <= start < end <= n:
            raise ModelError(f"layer range [{start}, {end}) is outside {self.name} (0..{n - 1})")
        prefixes = [f"model.layers.{i}." for i in range(start, end)]
        if start == 0 or (end == n and self.tie_word_embeddings):
            prefixes.append("model.embed_tokens.")
        if end == n:
            prefixes.append("model.norm.")
            if not self.tie_word_embeddings:
                prefixes.append("lm_head.")
        return sorted(k for k in self.tensor_index if k.startswith(tuple(prefixes)))

    def missing(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` this directory does not hold."""
        return [n for n in names if self.tensor_index[n].file is None]

    def complete_ranges(self) -> list[tuple[int, int]]:
        """Maximal layer ranges whose shard tensors are all here (what this node can serve)."""
        if self.manifest is None:
            return [(0, self.num_layers)]
        return self.manifest.complete_ranges(
            [k for k, t in self.tensor_index.items() if t.file is not None])

    def holds(self, start: int, end: int) -> bool:
        """Whether every tensor of a shard of layers ``[start, end)`` is here."""
        return not self.missing(self.shard_tensors(start, end))

    def shard_bytes(self, start: int, end: int) -> int:
        """Weight bytes a shard holding layers ``[start, end)`` loads."""
        if not 0 <= start < end <= self.num_layers:
            raise ModelError(f"layer range [{start}, {end}) is outside model {self.name!r}, "
                             f"which has {self.num_layers} layers")
        total = sum(self.layer_bytes[start:end])
        if start == 0:
            total += self.embed_bytes
        if end == self.num_layers:
            total += self.norm_bytes
            if not (self.tie_word_embeddings and start == 0):
                total += self.head_bytes
        return total


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} is missing: {what}",
                         hint="re-import or re-copy the model directory "
                              "(ringctl model import FILE.gguf, or ringctl model pull)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}",
                         hint="the file is damaged; "
                              "re-import or re-copy the model directory") from None


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors header and check every tensor lies inside the file."""
    hint = "the file is truncated or damaged; re-import or re-copy the model directory"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{path} is not a safetensors file ({size} bytes)", hint=hint)
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ModelError(f"{path}: header length {n} does not fit in a {size}-byte file",
                                 hint=hint)
            raw = f.read(n)
    except FileNotFoundError:
        raise ModelError(f"weight file {path} is missing",
                         hint="re-import or re-copy the model directory") from None
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e}", hint=hint) from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{path}: bad safetensors header ({e})", hint=hint) from None
    data_len = size - 8 - n
    out: dict[str, TensorEntry] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = meta["dtype"]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
            itemsize = DTYPE_SIZES[dtype]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: bad header entry for tensor {name!r}", hint=hint) from None
        count = 1
        for d in shape:
            count *= d
        if end > data_len or begin < 0 or end - begin != count * itemsize:
            raise ModelError(
                f"{path}: tensor {name!r} needs bytes {begin}..{end} of the data section, "
                f"but the file holds {data_len}", hint=hint)
        out[name] = TensorEntry(path.name, dtype, shape, end - begin, 8 + n + begin)
    return out


def _weight_files(path: Path, shard: bool = False) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = _read_json(index, "the index of the weight files")
        try:
            names = sorted(set(data["weight_map"].values()))
        except (KeyError, AttributeError, TypeError):
            raise ModelError(f"{index} has no weight_map",
                             hint="re-import or re-copy the model directory") from None
        return [path / n for n in names]
    files = sorted(path.glob("model*.safetensors"))
    if not files and not shard:
        raise ModelError(f"no weight files (model*.safetensors) in {path}",
                         hint="re-import or re-copy the model directory")
    return files


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _promote(dtypes: set[str]) -> str:
    floats = {_FLOAT_DTYPES[d] for d in dtypes if d in _FLOAT_DTYPES}
    if len(floats) == 1:
        return floats.pop()
    return "float32"


def inspect_model(path: Path) -> ModelInfo:
    """Read a model directory's sizes and hyper-parameters; ModelError if it is unusable."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model directory {path} does not exist",
                         hint="list the store with `ringctl model list`")
    config = _read_json(path / "config.json", "every model directory needs its config.json")
    if not isinstance(config, dict):
        raise ModelError(f"{path / 'config.json'} is not a JSON object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{path / 'config.json'}: model_type {model_type!r} is not supported",
            hint="ringd runs these model types: " + ", ".join(SUPPORTED_MODEL_TYPES))
    try:
        num_layers = int(config["num_hidden_layers"])
        hidden = int(config["hidden_size"])
        vocab = int(config["vocab_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{path / 'config.json'}: missing or bad hyper-parameter {e}",
                         hint="re-import or re-copy the model directory") from None
    if num_layers < 1:
        raise ModelError(f"{path / 'config.json'}: num_hidden_layers is {num_layers}")

    shard = is_shard_dir(path)
    tensors: dict[str, TensorEntry] = {}
    for f in _weight_files(path, shard):
        tensors.update(read_safetensors_header(f))
    manifest = None
    if shard:
        manifest = read_manifest_file(path, strict=True).model  # type: ignore[union-attr]
        tensors = _with_manifest(path, tensors, manifest, num_layers, config)

    tied = bool(config.get("tie_word_embeddings", True))
    if not tied and "lm_head.weight" not in tensors:
        raise ModelError(f"{path}: config.json says the head is not tied to the embedding, "
                         "but the weight files hold no lm_head.weight",
                         hint="the weights are incomplete; "
                              "re-import or re-copy the model directory")
    # Precomputed rotary frequencies in old checkpoints are not weights (mlx-lm drops them).
    tensors = {k: v for k, v in tensors.items() if "rotary_emb.inv_freq" not in k}
    layer_bytes = [0] * num_layers
    embed = norm = head = 0
    for name, t in tensors.items():
        m = _LAYER_RE.match(name)
        if m:
            i = int(m.group(1))
            if i < num_layers:
                layer_bytes[i] += t.nbytes
        elif name.startswith("model.embed_tokens."):
            embed += t.nbytes
        elif name.startswith("model.norm."):
            norm += t.nbytes
        elif name.startswith("lm_head."):
            head += t.nbytes
    missing = [i for i, b in enumerate(layer_bytes) if b == 0]
    if missing or embed == 0:
        what = f"layers {missing[:5]}" if missing else "the token embedding"
        raise ModelError(f"{path}: the weight files hold no tensors for {what}",
                         hint="the weights are incomplete; "
                              "re-import or re-copy the model directory")
    if tied:
        head = embed
        # mlx-lm drops a stored lm_head of a tied model; so does the shard engine.
        tensors = {k: v for k, v in tensors.items() if not k.startswith("lm_head.")}

    eos = _ids(config.get("eos_token_id"))
    gen = path / "generation_config.json"
    if gen.exists():
        try:
            eos = tuple(dict.fromkeys(eos + _ids(json.loads(gen.read_text()).get("eos_token_id"))))
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    act = _promote({t.dtype for t in tensors.values()})
    act_size = 4 if act == "float32" else 2
    return ModelInfo(
        name=path.name, path=path, model_type=model_type, num_layers=num_layers,
        hidden_size=hidden, vocab_size=vocab, num_kv_heads=kv_heads, head_dim=head_dim,
        layer_bytes=tuple(layer_bytes), embed_bytes=embed, norm_bytes=norm, head_bytes=head,
        tie_word_embeddings=tied, total_bytes=sum(t.nbytes for t in tensors.values()),
        eos_token_ids=eos, bos_token_id=config.get("bos_token_id"), activation_dtype=act,
        kv_bytes_per_token_per_layer=2 * kv_heads * head_dim * act_size,
        tensor_index=tensors, config=config,
        local_bytes=sum(t.nbytes for t in tensors.values() if t.file is not None),
        manifest=manifest,
    )


def _with_manifest(path: Path, present: dict[str, TensorEntry], manifest: ModelManifest,
                   num_layers: int, config: dict[str, Any]) -> dict[str, TensorEntry]:
    """A shard directory's tensors: every one of the manifest, with the files of those here."""
    where = path / MANIFEST_FILE
    hint = ("the directory changed since its tensors were fetched; remove it "
            "(`ringctl model rm`) and let the node fetch them again")
    if manifest.num_layers != num_layers:
        raise ModelError(f"{where} lists {manifest.num_layers} layers, config.json says "
                         f"{num_layers}", hint=hint)
    if manifest.tied != bool(config.get("tie_word_embeddings", True)):
        raise ModelError(f"{where}: the output head is {'' if manifest.tied else 'not '}tied "
                         "to the embedding, config.json says otherwise", hint=hint)
    out: dict[str, TensorEntry] = {}
    for name, spec in manifest.tensors.items():
        got = present.get(name)
        if got is None:
            out[name] = TensorEntry(None, spec.dtype, spec.shape, spec.size)
        elif (got.dtype, got.shape, got.nbytes) != (spec.dtype, spec.shape, spec.size):
            raise ModelError(f"{path / str(got.file)}: tensor {name!r} is {got.dtype} "
                             f"{list(got.shape)}, the manifest says {spec.dtype} "
                             f"{list(spec.shape)}", hint=hint)
        else:
            out[name] = got
    extra = sorted(set(present) - set(out))
    if extra:
        raise ModelError(f"{path}: its weight files hold tensors the manifest does not list "
                         f"(e.g. {', '.join(extra[:3])})", hint=hint)
    return out
