"""What a model is, tensor by tensor: the canonical manifest and the model id. Pure.

A :class:`ModelManifest` lists every weight tensor of a model (name, dtype, shape, byte
size, BLAKE2b-16 hash of its raw bytes), grouped as a shard engine loads them: the token
embedding, one group per transformer layer, the final norm and the output head (empty when
the head is tied to the embedding), plus the small files a node needs beside the weights
(``config.json``, tokenizer files) with their sizes and hashes. It says nothing of where
the bytes lie on a disk: which file holds a tensor, file times and the like are local
(:mod:`ringd.compute.manifest` keeps them apart).

Its canonical form (:meth:`ModelManifest.canonical_bytes`: sorted keys, no whitespace) is
what nodes exchange; the **model id** is the BLAKE2b-16 hash of it, so two nodes with the
same id agree on every byte they serve. A manifest alone is enough to plan (bytes per layer
and ends: :meth:`ModelManifest.shape`) and to check fingerprints
(:meth:`ModelManifest.fingerprint`, the same digest as :func:`ringd.core.proof.shard_fingerprint`
over the loaded tensors), without any weight file.

A manifest from a peer is checked whole before use (:meth:`ModelManifest.from_bytes` with the
id the peer claims): names, groups, sizes and hashes; every bad field is a
:class:`ringd.errors.ModelError` naming where it came from.

Transfer items (:mod:`ringd.core.transfer`) are named by *keys*: a tensor by its name, a
small file by ``"file:" + name`` (tensor names never hold a colon), the canonical manifest
by ``"manifest"`` (no tensor of a group has that name).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from ringd.core.plan import ModelShape
from ringd.core.proof import shard_fingerprint
from ringd.errors import LocalProtocolError, ModelError

FORMAT = "ringd-model/2"
HASH_SIZE = 16  # bytes of BLAKE2b per tensor or file: 32 hex digits
FILE_KEY_PREFIX = "file:"
MANIFEST_KEY = "manifest"  # the canonical manifest itself, as a transfer item
MAX_LAYERS = 10_000
MAX_TENSORS = 1_000_000
MAX_SMALL_FILE = 64 << 20  # config and tokenizer files: bytes each
MAX_MANIFEST_BYTES = 256 << 20  # canonical form, for a peer's copy

#: safetensors dtype -> bytes per element
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
    "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}

#: files beside the weights that a node needs (and that are shared when present)
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
               "chat_template.json")

Group = Union[int, str]  # a layer index, or "embed", "norm", "head"
ENDS = ("embed", "norm", "head")

_TENSOR_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]{0,299}")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_HEX = re.compile(r"[0-9a-f]{32}")
_LAYER = re.compile(r"model\.layers\.(\d{1,9})\.")
_END_PREFIX = {"embed": "model.embed_tokens.", "norm": "model.norm.", "head": "lm_head."}


def blake2b_hex(data: bytes | memoryview) -> str:
    """The hash the manifest records for a tensor's raw bytes or a small file."""
    return hashlib.blake2b(data, digest_size=HASH_SIZE).hexdigest()


def group_of(name: str, num_layers: int) -> Group | None:
    """Which group tensor ``name`` belongs to, or None (not a weight a shard loads)."""
    m = _LAYER.match(name)
    if m:
        i = int(m.group(1))
        return i if i < num_layers else None
    for end, prefix in _END_PREFIX.items():
        if name.startswith(prefix):
            return end
    return None


def file_key(name: str) -> str:
    return FILE_KEY_PREFIX + name


def is_file_key(key: str) -> bool:
    return key.startswith(FILE_KEY_PREFIX)


def check_file_name(name: str, where: str = "manifest") -> str:
    """``name`` if it is a plain small-file name (no path, not a weight file); else ModelError."""
    if (not isinstance(name, str) or not _FILE_NAME.fullmatch(name)
            or name.endswith(".safetensors") or name in ("ringd-manifest.json",
                                                         "model.safetensors.index.json")):
        raise ModelError(f"{where}: {name!r} is not an allowed model file name",
                         hint="the manifest is damaged or was not made by ringd")
    return name


@dataclass(frozen=True)
class TensorSpec:
    """One weight tensor: safetensors dtype, shape, byte size, hash, and its group."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    size: int
    hash: str
    group: Group


@dataclass(frozen=True)
class FileSpec:
    """A small file beside the weights (config, tokenizer): name, size and hash."""

    name: str
    size: int
    hash: str


@dataclass(frozen=True)
class ModelManifest:
    """A model's identity: every tensor (by group) and small file, with sizes and hashes.

    Build one with :meth:`build` (from local tensors) or :meth:`from_bytes` (a peer's or a
    file's canonical form). ``tensors`` is in canonical order: embedding, layers 0..n-1,
    norm, head; names sorted within a group.
    """

    num_layers: int
    tensors: Mapping[str, TensorSpec]
    files: Mapping[str, FileSpec]
    canonical: bytes = field(init=False, repr=False, compare=False)
    model_id: str = field(init=False, compare=False)
    _groups: dict[Group, list[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        obj = self.to_obj()
        _validate(obj, "manifest")  # our own builds obey the rules a peer's copy must
        data = _dumps(obj)
        object.__setattr__(self, "canonical", data)
        object.__setattr__(self, "model_id", model_id_of(data))
        groups: dict[Group, list[str]] = {}
        for t in self.tensors.values():
            groups.setdefault(t.group, []).append(t.name)
        object.__setattr__(self, "_groups", groups)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, num_layers: int, tensors: Iterable[tuple[str, str, Iterable[int], int, str]],
              files: Iterable[tuple[str, int, str]]) -> "ModelManifest":
        """From ``(name, dtype, shape, size, hash)`` tensors and ``(name, size, hash)`` files.

        Tensors of no group (see :func:`group_of`) are left out; callers that care check
        :func:`group_of` first.
        """
        specs = []
        for name, dtype, shape, size, digest in tensors:
            g = group_of(name, num_layers)
            if g is not None:
                specs.append(TensorSpec(name, dtype, tuple(int(d) for d in shape), int(size),
                                        digest, g))
        return cls(num_layers, _ordered(specs, num_layers),
                   {n: FileSpec(n, int(s), h) for n, s, h in sorted(files)})

    @classmethod
    def from_obj(cls, obj: Any, where: str = "manifest") -> "ModelManifest":
        """From the canonical JSON object; ModelError naming ``where`` if anything is off."""
        _validate(obj, where)
        n = obj["num_layers"]
        specs = []
        for group, table in _obj_groups(obj):
            for name, t in table.items():
                specs.append(TensorSpec(name, t["dtype"], tuple(t["shape"]), t["size"],
                                        t["hash"], group))
        files = {k: FileSpec(k, v["size"], v["hash"]) for k, v in sorted(obj["files"].items())}
        return cls(n, _ordered(specs, n), files)

    @classmethod
    def from_bytes(cls, data: bytes, *, expect_id: str | None = None,
                   where: str = "manifest") -> "ModelManifest":
        """Parse a canonical form (a peer's copy); ModelError if it is not the ``expect_id``."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ModelError(f"{where}: {len(data)} bytes is larger than any manifest "
                             f"({MAX_MANIFEST_BYTES})")
        if expect_id is not None and model_id_of(data) != expect_id:
            raise ModelError(f"{where}: its hash is not the model id {expect_id[:12]}",
                             hint="the manifest was damaged or is of another model")
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, ValueError) as e:
            raise ModelError(f"{where}: not JSON ({e})") from None
        m = cls.from_obj(obj, where)
        if expect_id is not None and m.model_id != expect_id:
            raise ModelError(f"{where}: not in canonical form (model id {m.model_id[:12]} "
                             f"instead of {expect_id[:12]})")
        return m

    def to_obj(self) -> dict[str, Any]:
        """The canonical JSON object (grouped by layer; no local facts)."""
        groups: dict[Group, dict[str, Any]] = {g: {} for g in (*ENDS, *range(self.num_layers))}
        for t in self.tensors.values():
            if t.group not in groups:
                raise LocalProtocolError(f"tensor {t.name!r}: no group {t.group!r} in a "
                                         f"{self.num_layers}-layer model")
            groups[t.group][t.name] = {
                "dtype": t.dtype, "shape": list(t.shape), "size": t.size, "hash": t.hash}
        return {
            "format": FORMAT, "num_layers": self.num_layers,
            "files": {f.name: {"size": f.size, "hash": f.hash} for f in self.files.values()},
            "embed": groups["embed"], "norm": groups["norm"], "head": groups["head"],
            "layers": [groups[i] for i in range(self.num_layers)],
        }

    def canonical_bytes(self) -> bytes:
        return self.canonical

    # ------------------------------------------------------------------ groups and sizes
    @property
    def tied(self) -> bool:
        """Whether the output head is the token embedding (no head tensors)."""
        return not self.group_tensors("head")

    def group_tensors(self, group: Group) -> list[str]:
        """Names of a group's tensors (sorted)."""
        return list(self._groups.get(group, ()))

    def groups_for(self, start: int, end: int) -> list[Group]:
        """The groups a shard of layers ``[start, end)`` loads (as the shard engine does)."""
        n = self.num_layers
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= n):
            raise ModelError(f"layer range [{start}, {end}) is outside the model (0..{n - 1})")
        out: list[Group] = []
        if start == 0 or (end == n and self.tied):
            out.append("embed")
        out.extend(range(start, end))
        if end == n:
            out.append("norm")
            if not self.tied:
                out.append("head")
        return out

    def tensors_for(self, start: int, end: int) -> list[str]:
        """Names (sorted) of the tensors a shard of layers ``[start, end)`` loads."""
        return sorted(n for g in self.groups_for(start, end) for n in self.group_tensors(g))

    def group_bytes(self, group: Group) -> int:
        return sum(self.tensors[n].size for n in self._groups.get(group, ()))

    @property
    def layer_bytes(self) -> tuple[int, ...]:
        sizes = [0] * self.num_layers
        for t in self.tensors.values():
            if isinstance(t.group, int):
                sizes[t.group] += t.size
        return tuple(sizes)

    @property
    def embed_bytes(self) -> int:
        return self.group_bytes("embed")

    @property
    def norm_bytes(self) -> int:
        return self.group_bytes("norm")

    @property
    def head_bytes(self) -> int:
        """Bytes the last shard holds for the output head (the embedding's when tied)."""
        return self.embed_bytes if self.tied else self.group_bytes("head")

    @property
    def total_bytes(self) -> int:
        """Bytes of every weight tensor (each once)."""
        return sum(t.size for t in self.tensors.values())

    def shard_bytes(self, start: int, end: int) -> int:
        """Weight bytes a shard of layers ``[start, end)`` loads."""
        return sum(self.group_bytes(g) for g in self.groups_for(start, end))

    def shape(self, name: str, kv_bytes_per_layer: int = 0) -> ModelShape:
        """What the planner needs: bytes per layer and ends (norm counted with the head)."""
        return ModelShape(name, self.layer_bytes, self.embed_bytes,
                          self.head_bytes + self.norm_bytes, kv_bytes_per_layer)

    # ------------------------------------------------------------------ fingerprints
    def hashes(self, names: Iterable[str]) -> list[tuple[str, str]]:
        out = []
        for n in names:
            t = self.tensors.get(n)
            if t is None:
                raise ModelError(f"tensor {n!r} is not in the model's manifest",
                                 hint="re-import or re-copy the model directory")
            out.append((n, t.hash))
        return out

    def fingerprint(self, start: int, end: int, names: Iterable[str] | None = None) -> str:
        """Fingerprint of a shard of layers ``[start, end)`` holding ``names`` (default: the
        tensors that range must hold)."""
        if names is None:
            names = self.tensors_for(start, end)
        return shard_fingerprint(start, end, self.hashes(names))

    # ------------------------------------------------------------------ holdings
    def complete_ranges(self, present: Collection[str]) -> list[tuple[int, int]]:
        """Maximal layer ranges ``[a, b)`` whose shard tensors are all in ``present``: what
        a node holding those tensors can serve (and gossips)."""
        have = set(present)
        n = self.num_layers

        def full(group: Group) -> bool:
            return all(name in have for name in self.group_tensors(group))

        layer_ok = [full(i) for i in range(n)]
        ends_ok = full("norm") and (full("embed") if self.tied else full("head"))
        out = []
        i = 0
        while i < n:
            if not layer_ok[i]:
                i += 1
                continue
            j = i
            while j < n and layer_ok[j]:
                j += 1
            a, b = i, j
            if a == 0 and not full("embed"):
                a = 1
            if b == n and not ends_ok:
                b = n - 1
            if a < b:
                out.append((a, b))
            i = j
        return out

    # ------------------------------------------------------------------ transfer items
    def item_sizes(self, keys: Iterable[str]) -> dict[str, int]:
        """Byte size of each transfer item (tensor name or ``file:NAME``)."""
        out = {}
        for k in keys:
            if is_file_key(k):
                f = self.files.get(k[len(FILE_KEY_PREFIX):])
                size = None if f is None else f.size
            else:
                t = self.tensors.get(k)
                size = None if t is None else t.size
            if size is None:
                raise LocalProtocolError(f"{k!r} is not an item of model {self.model_id[:12]}")
            out[k] = size
        return out

    def holdings(self, ranges: Iterable[tuple[int, int]]) -> set[str]:
        """Item keys a node gossiping these complete layer ranges holds (its files too)."""
        keys = {file_key(f) for f in self.files}
        for a, b in ranges:
            keys.update(self.tensors_for(a, b))
        return keys


def model_id_of(canonical: bytes) -> str:
    """The model id: 32 hex digits over a manifest's canonical bytes."""
    return hashlib.blake2b(canonical, digest_size=HASH_SIZE, person=b"ringd-model").hexdigest()


# ----------------------------------------------------------------------------- internals
def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _group_key(g: Group) -> tuple[int, int]:
    if isinstance(g, int):
        return (1, g)
    return (0, 0) if g == "embed" else (2, ENDS.index(g))


def _ordered(specs: list[TensorSpec], num_layers: int) -> dict[str, TensorSpec]:
    specs.sort(key=lambda t: (_group_key(t.group), t.name))
    return {t.name: t for t in specs}


def _obj_groups(obj: dict[str, Any]) -> list[tuple[Group, dict[str, Any]]]:
    return ([("embed", obj["embed"])] + list(enumerate(obj["layers"]))
            + [("norm", obj["norm"]), ("head", obj["head"])])


def _bad(where: str, what: str) -> ModelError:
    return ModelError(f"{where}: {what}",
                      hint="the manifest is damaged or was not made by this ringd version")


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _validate(obj: Any, where: str) -> None:
    """Every rule of the canonical object; ModelError (naming ``where``) on the first broken."""
    if not isinstance(obj, dict):
        raise _bad(where, "not a JSON object")
    if obj.get("format") != FORMAT:
        raise _bad(where, f"format {obj.get('format')!r} is not {FORMAT!r}")
    extra = set(obj) - {"format", "num_layers", "files", "embed", "norm", "head", "layers"}
    if extra:
        raise _bad(where, f"unknown fields {sorted(extra)}")
    n = obj.get("num_layers")
    if not _is_int(n, 1, MAX_LAYERS):
        raise _bad(where, f"num_layers {n!r} is not 1..{MAX_LAYERS}")
    layers = obj.get("layers")
    if not isinstance(layers, list) or len(layers) != n:
        raise _bad(where, f"'layers' is not a list of {n} groups")
    for k in ("files", "embed", "norm", "head"):
        if not isinstance(obj.get(k), dict):
            raise _bad(where, f"{k!r} is not an object")
    files = obj["files"]
    if "config.json" not in files:
        raise _bad(where, "no config.json among its files")
    for name, f in files.items():
        check_file_name(name, where)
        if (not isinstance(f, dict) or set(f) != {"size", "hash"}
                or not _is_int(f["size"], 0, MAX_SMALL_FILE)
                or not isinstance(f["hash"], str) or not _HEX.fullmatch(f["hash"])):
            raise _bad(where, f"file {name!r}: bad size or hash")
    count = 0
    for group, table in _obj_groups(obj):
        if not isinstance(table, dict):
            raise _bad(where, f"layer {group} is not an object")
        if not table and group != "head":
            raise _bad(where, f"group {group!r} has no tensors")
        count += len(table)
        if count > MAX_TENSORS:
            raise _bad(where, f"more than {MAX_TENSORS} tensors")
        for name, t in table.items():
            if not isinstance(name, str) or not _TENSOR_NAME.fullmatch(name):
                raise _bad(where, f"tensor name {name!r} is not allowed")
            if group_of(name, n) != group:
                raise _bad(where, f"tensor {name!r} is filed under group {group!r}")
            _check_tensor(t, name, where)


def _check_tensor(t: Any, name: str, where: str) -> None:
    if not isinstance(t, dict) or set(t) != {"dtype", "shape", "size", "hash"}:
        raise _bad(where, f"tensor {name!r}: needs exactly dtype, shape, size, hash")
    dtype, shape, size, digest = t["dtype"], t["shape"], t["size"], t["hash"]
    if dtype not in DTYPE_SIZES:
        raise _bad(where, f"tensor {name!r}: unknown dtype {dtype!r}")
    if (not isinstance(shape, (list, tuple)) or len(shape) > 8
            or not all(_is_int(d, 0, 1 << 40) for d in shape)):
        raise _bad(where, f"tensor {name!r}: bad shape {shape!r}")
    count = 1
    for d in shape:
        count *= d
    if not _is_int(size, 0, 1 << 46) or size != count * DTYPE_SIZES[dtype]:
        raise _bad(where, f"tensor {name!r}: size {size!r} is not that of {dtype} {list(shape)}")
    if not isinstance(digest, str) or not _HEX.fullmatch(digest):
        raise _bad(where, f"tensor {name!r}: bad hash {digest!r}")
