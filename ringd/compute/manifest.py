"""The manifest of a model directory (``ringd-manifest.json``) and shard fingerprints.

The manifest (:class:`ringd.core.model_manifest.ModelManifest`) lists every tensor of the
model — name, dtype, shape, size and the BLAKE2b-16 hash of its raw bytes, located with its
safetensors header offsets — grouped by layer, and the config and tokenizer files with their
hashes. Its canonical hash is the **model id**. The file also keeps, per weight file, its
size and modification time (:mod:`ringd.compute.manifest_file`), so that only a file whose
stamp changed is hashed again. Hashing reads every byte once (~1 GB/s per core).

Two kinds of directory:

- **full** (imported, pulled, copied): the manifest is built from the files on first use
  (:func:`load_manifest`) and at import (:func:`write_manifest`), atomically (temp file +
  rename); a read-only directory keeps it in memory only. A file that changed is hashed
  again, which gives a new manifest and a new model id (the model changed).
- **shard** (filled from peers, :mod:`ringd.compute.shard_dir`): the manifest came from
  elsewhere and is the authority. A file that changed is hashed again and must still give
  the manifest's hashes, else :class:`ModelError`: such a directory is refused, never served.

A shard's fingerprint is :func:`ringd.core.proof.shard_fingerprint` over the (name, hash)
pairs of the tensors it loaded; :func:`expected_tensors` says which tensors layers
``[start, end)`` must hold (the same choice the shard engine makes). The manifest alone
gives every range's expected fingerprint, so a node can check others' without their files.

No MLX here: only file reads.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ringd.compute.manifest_file import (KIND_FULL, KIND_SHARD, MANIFEST_FILE, ManifestFile,
                                         read_manifest_file, read_v1_hashes, valid_hashes,
                                         valid_stamp, write_manifest_file)
from ringd.compute.model_info import ModelInfo, inspect_model, read_safetensors_header
from ringd.core.model_manifest import (HASH_SIZE, MAX_SMALL_FILE, SMALL_FILES, ModelManifest,
                                       blake2b_hex)
from ringd.errors import ModelError

log = logging.getLogger(__name__)

__all__ = ["MANIFEST_FILE", "Manifest", "check_files", "expected_tensors", "hash_file",
           "hash_small_file", "load_manifest", "tensor_spans", "write_manifest"]

MANIFEST_VERSION = 2
_CHUNK = 8 << 20
_HINT = "the file is truncated or damaged; re-import or re-copy the model directory"
_SHARD_HINT = ("the directory changed since its tensors were fetched and checked; remove it "
               "(`ringctl model rm NAME`) and let the node fetch them again")


@dataclass(frozen=True)
class Manifest:
    """The manifest of the model directory ``path`` (kind ``full`` or ``shard``)."""

    path: Path
    model: ModelManifest
    kind: str

    @property
    def model_id(self) -> str:
        return self.model.model_id

    @property
    def tensors(self) -> dict[str, str]:
        """Tensor name -> hex hash, for every tensor of the model."""
        return {n: t.hash for n, t in self.model.tensors.items()}

    def hashes(self, names: Iterable[str]) -> list[tuple[str, str]]:
        try:
            return self.model.hashes(names)
        except ModelError as e:
            raise ModelError(f"{self.path}: {e.message}", hint=e.hint) from None

    def fingerprint(self, start: int, end: int, names: Iterable[str]) -> str:
        """Fingerprint of a shard of layers ``[start, end)`` that holds tensors ``names``."""
        return self.model.fingerprint(start, end, list(names))

    def expected_fingerprint(self, start: int, end: int) -> str:
        """The fingerprint layers ``[start, end)`` must have (from the manifest alone)."""
        return self.model.fingerprint(start, end)

    def expected(self, info: ModelInfo | None, start: int, end: int) -> str:
        """The fingerprint layers ``[start, end)`` must have (``info`` is not needed)."""
        return self.expected_fingerprint(start, end)


def expected_tensors(info: ModelInfo, start: int, end: int) -> list[str]:
    """Names of the tensors a shard of layers ``[start, end)`` loads (as the shard engine does)."""
    return info.shard_tensors(start, end)


# ----------------------------------------------------------------------------- hashing
def tensor_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute ``(begin, end)`` byte offsets of every tensor in a safetensors file."""
    return {name: (e.offset, e.offset + e.nbytes)
            for name, e in read_safetensors_header(path).items()}


def hash_file(path: Path) -> dict[str, str]:
    """Tensor name -> BLAKE2b hex of its raw bytes, for every tensor in one safetensors file."""
    return hash_spans(path, tensor_spans(path))


def hash_spans(path: Path, spans: dict[str, tuple[int, int]]) -> dict[str, str]:
    """Name -> BLAKE2b hex of the bytes ``[begin, end)`` of ``path``, for each span."""
    out = {}
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    try:
        with path.open("rb", buffering=0) as f:
            for name, (begin, end) in sorted(spans.items(), key=lambda kv: kv[1]):
                h = hashlib.blake2b(digest_size=HASH_SIZE)
                f.seek(begin)
                left = end - begin
                while left:
                    got = f.readinto(view[:min(left, _CHUNK)])
                    if not got:
                        raise ModelError(f"{path} ended inside tensor {name!r}", hint=_HINT)
                    h.update(view[:got])
                    left -= got
                out[name] = h.hexdigest()
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e}", hint=_HINT) from None
    return out


def hash_small_file(path: Path) -> tuple[int, str]:
    """Size and hash of a config or tokenizer file."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SMALL_FILE + 1)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e}", hint=_HINT) from None
    if len(data) > MAX_SMALL_FILE:
        raise ModelError(f"{path} is larger than {MAX_SMALL_FILE >> 20} MiB",
                         hint="a config or tokenizer file this large is not one")
    return len(data), blake2b_hex(data)


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e}",
                         hint="re-import or re-copy the model directory") from None
    return st.st_size, st.st_mtime_ns


def _weight_files(info: ModelInfo) -> list[str]:
    return sorted({t.file for t in info.tensor_index.values() if t.file is not None})


def _small_files(model_dir: Path) -> list[str]:
    return [n for n in SMALL_FILES if (model_dir / n).is_file()]


# ----------------------------------------------------------------------------- loading
_lock = threading.Lock()
_cache: dict[Path, tuple[tuple[tuple[str, int, int], ...], Manifest]] = {}


def load_manifest(model_dir: Path) -> Manifest:
    """The manifest of ``model_dir``, checked against its files.

    Full directory: read, with changed files hashed again (and saved). Shard directory:
    read, with changed files hashed again and compared (ModelError if they differ). Cached
    in the process while no weight, config or tokenizer file changes size or mtime.
    """
    model_dir = Path(model_dir)
    info = inspect_model(model_dir)
    names = _weight_files(info) + _small_files(model_dir)
    stamps = tuple((f, *_stamp(model_dir / f)) for f in names)
    with _lock:
        hit = _cache.get(model_dir)
        if hit is not None and hit[0] == stamps:
            return hit[1]
        if info.manifest is not None:
            manifest = _load_shard(model_dir, info, stamps)
        else:
            manifest = _load_full(model_dir, info, stamps)
        # A file that changed while it was hashed gets hashed again next time.
        if tuple((f, *_stamp(model_dir / f)) for f in names) == stamps:
            _cache[model_dir] = (stamps, manifest)
        return manifest


def write_manifest(model_dir: Path) -> Manifest:
    """Hash every weight file of ``model_dir`` now and save the manifest (at import)."""
    return load_manifest(model_dir)


def _load_full(model_dir: Path, info: ModelInfo,
               stamps: tuple[tuple[str, int, int], ...]) -> Manifest:
    old = read_manifest_file(model_dir)
    if old is not None and old.kind == KIND_FULL:
        rec_files, rec_small = old.files, old.small
    else:
        rec_files, rec_small = read_v1_hashes(model_dir), {}
    weight = set(_weight_files(info))
    files: dict[str, Any] = {}
    small: dict[str, Any] = {}
    changed = old is None or old.kind != KIND_FULL
    for f, size, mtime in stamps:
        path = model_dir / f
        if f in weight:
            entry = rec_files.get(f)
            if not (valid_stamp(entry, size, mtime) and valid_hashes(entry)):
                log.info("hashing %s (%.0f MiB) for the weights manifest", path, size / 2**20)
                entry = {"size": size, "mtime_ns": mtime, "tensors": hash_file(path)}
                changed = True
            files[f] = entry
        else:
            entry = rec_small.get(f)
            if not (valid_stamp(entry, size, mtime) and isinstance(entry.get("hash"), str)):
                got_size, digest = hash_small_file(path)
                entry = {"size": got_size, "mtime_ns": mtime, "hash": digest}
                changed = True
            small[f] = entry
    changed = changed or set(rec_files) != set(files) or set(rec_small) != set(small)
    tensors = []
    for name, t in info.tensor_index.items():
        digest = files[str(t.file)]["tensors"].get(name)
        if digest is None:  # a header lists it, the hash table does not: hash the file again
            files[str(t.file)]["tensors"] = hash_file(model_dir / str(t.file))
            digest = files[str(t.file)]["tensors"][name]
            changed = True
        tensors.append((name, t.dtype, t.shape, t.nbytes, digest))
    model = ModelManifest.build(info.num_layers, tensors,
                                [(f, e["size"], e["hash"]) for f, e in small.items()])
    if changed:
        try:
            write_manifest_file(model_dir, ManifestFile(model, KIND_FULL, files, small))
        except OSError as e:
            log.warning("cannot write %s (%s); keeping the manifest in memory",
                        model_dir / MANIFEST_FILE, e)
    return Manifest(model_dir, model, KIND_FULL)


def _load_shard(model_dir: Path, info: ModelInfo,
                stamps: tuple[tuple[str, int, int], ...]) -> Manifest:
    mf = read_manifest_file(model_dir, strict=True)
    assert mf is not None and info.manifest is not None
    model = mf.model
    weight = set(_weight_files(info))
    files, small = dict(mf.files), dict(mf.small)
    changed = False
    for f, size, mtime in stamps:
        path = model_dir / f
        if f in weight:
            if valid_stamp(files.get(f), size, mtime):
                continue
            log.info("checking %s (%.0f MiB) against the manifest", path, size / 2**20)
            got = hash_file(path)
            bad = sorted(n for n, h in got.items()
                         if n not in model.tensors or model.tensors[n].hash != h)
            if bad:
                raise ModelError(f"{path}: {len(bad)} tensors do not match the model's manifest "
                                 f"(e.g. {', '.join(bad[:3])})", hint=_SHARD_HINT)
            files[f] = {"size": size, "mtime_ns": mtime, "tensors": got}
        else:
            spec = model.files.get(f)
            if spec is None:
                continue  # a file the model does not have (not served, not checked)
            if valid_stamp(small.get(f), size, mtime):
                continue
            got_size, digest = hash_small_file(path)
            if (got_size, digest) != (spec.size, spec.hash):
                raise ModelError(f"{path} is not the file the model's manifest lists",
                                 hint=_SHARD_HINT)
            small[f] = {"size": size, "mtime_ns": mtime, "hash": digest}
        changed = True
    missing_small = sorted(set(model.files) - {f for f, _, _ in stamps})
    if missing_small:
        raise ModelError(f"{model_dir}: {', '.join(missing_small)} missing", hint=_SHARD_HINT)
    if changed:
        try:
            write_manifest_file(model_dir, ManifestFile(model, KIND_SHARD, files, small))
        except OSError as e:
            log.warning("cannot write %s (%s)", model_dir / MANIFEST_FILE, e)
    return Manifest(model_dir, model, KIND_SHARD)


def check_files(model_dir: Path) -> list[str]:
    """Hash every weight and small file of ``model_dir`` now (whatever the stamps say) and
    list what differs from its manifest on disk: empty when all match."""
    model_dir = Path(model_dir)
    info = inspect_model(model_dir)
    mf = read_manifest_file(model_dir)
    if mf is None:
        return [f"{model_dir / MANIFEST_FILE} is missing or unusable"]
    problems = []
    for f in _weight_files(info):
        for name, h in hash_file(model_dir / f).items():
            spec = mf.model.tensors.get(name)
            if spec is not None and spec.hash != h:
                problems.append(f"{model_dir / f}: tensor {name} differs from the manifest")
    for name, spec in mf.model.files.items():
        path = model_dir / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif hash_small_file(path) != (spec.size, spec.hash):
            problems.append(f"{path} differs from the manifest")
    return problems
