"""The ``ringd-manifest.json`` file of a model directory: its layout, read and written.

Layout (version 2)::

    {"version": 2,
     "model_id": "<32 hex>",            # hash of the canonical "model" object
     "model": {...},                    # ringd.core.model_manifest canonical object
     "local": {"kind": "full" | "shard",
               "files": {"<weight file>": {"size": N, "mtime_ns": N, "tensors": {name: hash}}},
               "small": {"<config/tokenizer file>": {"size": N, "mtime_ns": N, "hash": H}}}}

``local`` is this disk's business (which file holds which tensor, file stamps) and never
part of the model id. ``kind`` says who is the authority: ``full`` — the manifest was built
here from the directory's own files (it is rebuilt when they change: the model changed);
``shard`` — the directory was filled with tensors checked against a manifest from elsewhere
(:mod:`ringd.compute.shard_dir`): the manifest is the authority and files that no longer
match it are refused.

Version 1 (``{"version": 1, "files": {...}}``, per-file tensor hashes only) is read for its
hashes (:func:`read_v1_hashes`) so an upgrade does not hash the weights again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ringd.core.model_manifest import HASH_SIZE, ModelManifest
from ringd.errors import ModelError
from ringd.state import atomic_write

log = logging.getLogger(__name__)

MANIFEST_FILE = "ringd-manifest.json"
VERSION = 2
KIND_FULL = "full"
KIND_SHARD = "shard"


@dataclass(frozen=True)
class ManifestFile:
    """A parsed ``ringd-manifest.json``: the model's manifest and this disk's facts."""

    model: ModelManifest
    kind: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    small: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        # The canonical object is embedded as is; the file itself is indented for people.
        doc = {"version": VERSION, "model_id": self.model.model_id, "model": self.model.to_obj(),
               "local": {"kind": self.kind, "files": self.files, "small": self.small}}
        return json.dumps(doc, indent=1, sort_keys=True).encode()


def _raw(model_dir: Path) -> Any:
    """The JSON of the manifest file; None when absent. OSError/ValueError pass through."""
    try:
        return json.loads((Path(model_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def read_manifest_file(model_dir: Path, *, strict: bool = False) -> ManifestFile | None:
    """The version-2 manifest file of ``model_dir``; None if absent (or, unless ``strict``,
    unreadable or of another version: a full directory just builds it again)."""
    path = Path(model_dir) / MANIFEST_FILE
    try:
        raw = _raw(model_dir)
        if raw is None:
            return None
        if not isinstance(raw, dict) or raw.get("version") != VERSION:
            if strict:
                raise ModelError(f"{path} is not a version-{VERSION} manifest",
                                 hint="remove the model directory and fetch the model again")
            return None
        model = ModelManifest.from_obj(raw.get("model"), str(path))
        if raw.get("model_id") != model.model_id:
            raise ModelError(f"{path}: its model id does not match its contents",
                             hint="the file was edited or damaged; remove the model directory "
                                  "and fetch the model again")
        local = raw.get("local")
        kind = local.get("kind") if isinstance(local, dict) else None
        if kind not in (KIND_FULL, KIND_SHARD):
            raise ModelError(f"{path}: unknown kind {kind!r}")
        files = local.get("files", {})
        small = local.get("small", {})
        if not isinstance(files, dict) or not isinstance(small, dict):
            raise ModelError(f"{path}: bad local tables")
        return ManifestFile(model, kind, files, small)
    except (OSError, UnicodeDecodeError, ValueError, ModelError) as e:
        if strict:
            if isinstance(e, ModelError):
                raise
            raise ModelError(f"cannot read {path}: {e}",
                             hint="remove the model directory and fetch the model again") from None
        log.warning("%s is unusable (%s); building it again", path,
                    e.message if isinstance(e, ModelError) else e)
        return None


def read_v1_hashes(model_dir: Path) -> dict[str, dict[str, Any]]:
    """A version-1 manifest's per-file table (stamps and tensor hashes); {} otherwise."""
    try:
        raw = _raw(model_dir)
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    if isinstance(raw, dict) and raw.get("version") == 1 and isinstance(raw.get("files"), dict):
        return raw["files"]
    return {}


def is_shard_dir(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a shard-kind manifest (cheap: reads the kind only)."""
    try:
        raw = _raw(model_dir)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (isinstance(raw, dict) and isinstance(raw.get("local"), dict)
            and raw["local"].get("kind") == KIND_SHARD)


def write_manifest_file(model_dir: Path, mf: ManifestFile) -> None:
    """Replace the manifest file atomically and durably. OSError passes through."""
    atomic_write(Path(model_dir) / MANIFEST_FILE, mf.to_bytes(), mode=0o644)


def valid_stamp(entry: Any, size: int, mtime_ns: int) -> bool:
    return (isinstance(entry, dict) and entry.get("size") == size
            and entry.get("mtime_ns") == mtime_ns)


def valid_hashes(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("tensors"), dict)
            and all(isinstance(k, str) and isinstance(v, str) and len(v) == 2 * HASH_SIZE
                    for k, v in entry["tensors"].items()))
