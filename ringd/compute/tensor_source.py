"""Serving a model's bytes to peers: tensors, small files and the manifest, by key, in chunks.

A holder answers a peer's ``(key, offset, length)`` from its own files with ``os.pread`` at
the tensor's safetensors offset — no MLX, nothing loaded, memory bounded by the chunk. A key
is a tensor name, ``file:NAME`` or ``manifest`` (:mod:`ringd.core.model_manifest`); it is
looked up in the manifest and this directory's headers, never used as a path. A key the
model does not have, or a range outside the item, is the peer's fault
(:class:`ringd.errors.RemoteProtocolError`); a key of the model this directory does not hold
is :class:`NotHeld` (a stale view of our holdings, not misbehaviour).

Before each read the file's size and mtime are compared with those it had when its hashes
were checked (:func:`ringd.compute.manifest.load_manifest`): a file changed since is refused
(:class:`ringd.errors.ModelError`) rather than served with bytes that may not match.

Reads block on the disk: call :meth:`TensorSource.read` from a worker thread, not the loop.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from ringd.compute.manifest import Manifest, load_manifest
from ringd.compute.model_info import inspect_model
from ringd.core.model_manifest import FILE_KEY_PREFIX, MANIFEST_KEY
from ringd.errors import ModelError, RemoteProtocolError

MAX_CHUNK = 16 << 20  # largest range one request may ask for


class NotHeld(RemoteProtocolError):
    """The key names an item of the model that this directory does not hold."""


@dataclass(frozen=True)
class _Span:
    file: str
    offset: int
    size: int


class TensorSource:
    """The bytes of one model directory (full or shard), by transfer key."""

    def __init__(self, model_dir: Path, manifest: Manifest | None = None) -> None:
        self.path = Path(model_dir)
        self.manifest = manifest if manifest is not None else load_manifest(self.path)
        model = self.manifest.model
        info = inspect_model(self.path)
        spans: dict[str, _Span] = {}
        for name, spec in model.tensors.items():
            t = info.tensor_index.get(name)
            if t is not None and t.file is not None:
                if t.nbytes != spec.size:
                    raise ModelError(f"{self.path / t.file}: tensor {name!r} has {t.nbytes} "
                                     f"bytes, the manifest says {spec.size}")
                spans[name] = _Span(t.file, t.offset, t.nbytes)
        for name, f in model.files.items():
            if (self.path / name).is_file():
                spans[FILE_KEY_PREFIX + name] = _Span(name, 0, f.size)
        self._spans = spans
        self._canonical = model.canonical_bytes()
        self._stamps: dict[str, tuple[int, int]] = {}
        for s in spans.values():
            if s.file not in self._stamps:
                st = _stat(self.path / s.file)
                self._stamps[s.file] = (st.st_size, st.st_mtime_ns)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    def keys(self) -> set[str]:
        """Every key this directory can serve (the manifest included)."""
        return set(self._spans) | {MANIFEST_KEY}

    def ranges(self) -> list[tuple[int, int]]:
        """The complete layer ranges held (what a node gossips)."""
        return self.manifest.model.complete_ranges(
            [k for k in self._spans if not k.startswith(FILE_KEY_PREFIX)])

    def size(self, key: str) -> int:
        if key == MANIFEST_KEY:
            return len(self._canonical)
        return self._span(key).size

    def read(self, key: str, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of item ``key``."""
        size = self.size(key)
        if not (isinstance(offset, int) and isinstance(length, int)
                and 0 <= offset and 0 < length <= MAX_CHUNK and offset + length <= size):
            raise RemoteProtocolError(f"range {offset}+{length} is outside item {key[:80]!r} "
                                      f"({size} bytes; at most {MAX_CHUNK} per request)")
        if key == MANIFEST_KEY:
            return self._canonical[offset:offset + length]
        span = self._span(key)
        fd = self._fd(span.file)
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != self._stamps[span.file]:
            raise ModelError(f"{self.path / span.file} changed since its hashes were checked; "
                             "not serving it", hint="the node checks it again on its next load")
        try:
            data = os.pread(fd, length, span.offset + offset)
        except OSError as e:
            raise ModelError(f"cannot read {self.path / span.file}: {e}") from None
        if len(data) != length:
            raise ModelError(f"{self.path / span.file} ended inside {key!r}",
                             hint="the file is truncated; re-copy the model directory")
        return data

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _span(self, key: str) -> _Span:
        if not isinstance(key, str):
            raise RemoteProtocolError("an item key must be a string")
        span = self._spans.get(key)
        if span is not None:
            return span
        model = self.manifest.model
        if key in model.tensors or (key.startswith(FILE_KEY_PREFIX)
                                    and key[len(FILE_KEY_PREFIX):] in model.files):
            raise NotHeld(f"this node does not hold {key!r} of model {self.model_id[:12]}")
        raise RemoteProtocolError(f"model {self.model_id[:12]} has no item {key[:80]!r}")

    def _fd(self, file: str) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                try:
                    fd = os.open(self.path / file, os.O_RDONLY)
                except OSError as e:
                    raise ModelError(f"cannot read {self.path / file}: {e}",
                                     hint="re-copy the model directory") from None
                self._fds[file] = fd
            return fd


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e}", hint="re-copy the model directory") from None
