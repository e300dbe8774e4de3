"""Per-tensor hashes of a model directory (``ringd-manifest.json``) and shard fingerprints.

Every tensor's raw bytes, located with its safetensors header offsets, are hashed with
BLAKE2b (16 bytes). The manifest records, per weight file, its size and modification time
and the hashes of the tensors in it; a file whose size or mtime changed is hashed again.
The manifest is written at import (:func:`write_manifest`) and otherwise built on first use
(:func:`load_manifest`), atomically (temp file + rename); a read-only model directory keeps
it in memory only. Hashing reads every byte once (~1 GB/s per core).

A shard's fingerprint is :func:`ringd.core.proof.shard_fingerprint` over the (name, hash)
pairs of the tensors it loaded; :func:`expected_tensors` says which tensors layers
``[start, end)`` must hold (the same choice the shard engine makes).

No MLX here: only file reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ringd.compute.model_info import ModelInfo, inspect_model, read_safetensors_header
from ringd.core.proof import shard_fingerprint
from ringd.errors import ModelError
from ringd.state import atomic_write

log = logging.getLogger(__name__)

MANIFEST_FILE = "ringd-manifest.json"
MANIFEST_VERSION = 1
HASH_SIZE = 16
_CHUNK = 8 << 20
_HINT = "the file is truncated or damaged; re-import or re-copy the model directory"


@dataclass(frozen=True)
class Manifest:
    """Tensor name -> hex hash, for every tensor of a model directory's weight files."""

    path: Path
    tensors: dict[str, str]

    def hashes(self, names: Iterable[str]) -> list[tuple[str, str]]:
        out = []
        for n in names:
            h = self.tensors.get(n)
            if h is None:
                raise ModelError(f"{self.path}: tensor {n!r} is not in any weight file",
                                 hint="re-import or re-copy the model directory")
            out.append((n, h))
        return out

    def fingerprint(self, start: int, end: int, names: Iterable[str]) -> str:
        """Fingerprint of a shard of layers ``[start, end)`` that holds tensors ``names``."""
        return shard_fingerprint(start, end, self.hashes(names))

    def expected(self, info: ModelInfo, start: int, end: int) -> str:
        """The fingerprint layers ``[start, end)`` of ``info`` must have."""
        return self.fingerprint(start, end, expected_tensors(info, start, end))


def expected_tensors(info: ModelInfo, start: int, end: int) -> list[str]:
    """Names of the tensors a shard of layers ``[start, end)`` loads (as the shard engine does)."""
    n = info.num_layers
    if not 0 <= start < end <= n:
        raise ModelError(f"layer range [{start}, {end}) is outside {info.name} (0..{n - 1})")
    prefixes = [f"model.layers.{i}." for i in range(start, end)]
    if start == 0 or (end == n and info.tie_word_embeddings):
        prefixes.append("model.embed_tokens.")
    if end == n:
        prefixes.append("model.norm.")
        if not info.tie_word_embeddings:
            prefixes.append("lm_head.")
    return sorted(k for k in info.tensor_index if k.startswith(tuple(prefixes)))


# ----------------------------------------------------------------------------- hashing
def tensor_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute ``(begin, end)`` byte offsets of every tensor in a safetensors file."""
    header = read_safetensors_header(path)
    return {name: (e.offset, e.offset + e.nbytes) for name, e in header.items()}


def hash_file(path: Path) -> dict[str, str]:
    """Tensor name -> BLAKE2b hex of its raw bytes, for every tensor in one safetensors file."""
    spans = tensor_spans(path)
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


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e}",
                         hint="re-import or re-copy the model directory") from None
    return st.st_size, st.st_mtime_ns


def _weight_files(info: ModelInfo) -> list[str]:
    return sorted({t.file for t in info.tensor_index.values()})


def _read_recorded(model_dir: Path) -> dict[str, Any]:
    """The ``files`` table of an existing manifest; {} when absent or unusable."""
    path = model_dir / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.warning("%s is unreadable (%s); hashing the weights again", path, e)
        return {}
    ours = isinstance(data, dict) and data.get("version") == MANIFEST_VERSION
    files = data.get("files") if ours else None
    if not isinstance(files, dict):
        log.warning("%s has an unknown layout; hashing the weights again", path)
        return {}
    return files


def _valid_entry(entry: Any, stamp: tuple[int, int]) -> bool:
    return (isinstance(entry, dict)
            and entry.get("size") == stamp[0] and entry.get("mtime_ns") == stamp[1]
            and isinstance(entry.get("tensors"), dict)
            and all(isinstance(k, str) and isinstance(v, str) and len(v) == 2 * HASH_SIZE
                    for k, v in entry["tensors"].items()))


_lock = threading.Lock()
_cache: dict[Path, tuple[tuple[tuple[str, int, int], ...], Manifest]] = {}


def load_manifest(model_dir: Path) -> Manifest:
    """The manifest of ``model_dir``: read, with stale files hashed again (and saved).

    Cached in the process while no weight file changes size or mtime.
    """
    model_dir = Path(model_dir)
    info = inspect_model(model_dir)
    files = _weight_files(info)
    stamps = tuple((f, *_stamp(model_dir / f)) for f in files)
    with _lock:
        hit = _cache.get(model_dir)
        if hit is not None and hit[0] == stamps:
            return hit[1]
        recorded = _read_recorded(model_dir)
        table: dict[str, Any] = {}
        changed = False
        for f, size, mtime in stamps:
            entry = recorded.get(f)
            if not _valid_entry(entry, (size, mtime)):
                log.info("hashing %s (%.0f MiB) for the weights manifest", model_dir / f,
                         size / 2**20)
                entry = {"size": size, "mtime_ns": mtime, "tensors": hash_file(model_dir / f)}
                changed = True
            table[f] = entry
        changed = changed or set(recorded) != set(table)
        if changed:
            try:
                atomic_write(model_dir / MANIFEST_FILE,
                             json.dumps({"version": MANIFEST_VERSION, "files": table}, indent=1,
                                        sort_keys=True).encode(), mode=0o644)
            except OSError as e:
                log.warning("cannot write %s (%s); keeping the manifest in memory",
                            model_dir / MANIFEST_FILE, e)
        tensors = {name: h for entry in table.values() for name, h in entry["tensors"].items()}
        manifest = Manifest(model_dir, tensors)
        # A file that changed while it was hashed gets hashed again next time.
        if tuple((f, *_stamp(model_dir / f)) for f in files) == stamps:
            _cache[model_dir] = (stamps, manifest)
        return manifest


def write_manifest(model_dir: Path) -> Manifest:
    """Hash every weight file of ``model_dir`` now and save the manifest (at import)."""
    return load_manifest(model_dir)

