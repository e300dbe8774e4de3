"""A shard directory: an mlx-lm model directory holding only the tensors of some layers.

Filled from peers (or any source) with tensors checked against the model's manifest, so a
node needs neither the whole model nor a copy made by hand. Layout::

    NAME/
      ringd-manifest.json            the model's manifest (kind "shard": the authority)
      config.json, tokenizer*.json   the model's small files, checked against the manifest
      model.safetensors.index.json   weight_map naming only the tensors present
      model-embed.safetensors        one file per group: embedding, each layer, norm, head
      model-layer-00017.safetensors
      model-norm.safetensors
      .partial/                      groups being filled (same layout, preallocated)

Rules:

- **One file per group.** A layer range needs whole groups, so a node gets exactly the
  files of its layers and a re-plan adds (or drops) whole files: only the delta moves.
- **Nothing counts before it is checked.** A tensor's bytes are written at their final
  place in the group's file under ``.partial/``, in chunks, in any order; :meth:`ShardDir.finish`
  hashes them from the disk and compares with the manifest. When every tensor of a group is
  checked the file is synced and renamed into the directory, then the index is replaced
  (temp file, fsync, rename): the index only ever names complete, checked files, so the
  directory stays loadable (:func:`ringd.compute.engine.ShardEngine.load` for the ranges it
  holds) whatever happens. The index (and the manifest's stamps) are rewritten at most every
  ``SAVE_EVERY`` seconds while groups are being filled, and at once when the last one is
  published or the directory is closed: rewriting them per group cost ~70 ms a group
  (indented JSON of the whole manifest, six fsyncs), more than fetching a small layer.
- **Resumable.** After an interruption (process killed, peer gone) :meth:`ShardDir.open`
  hashes the tensors already in ``.partial/`` files: those that match count, only the others
  are fetched again. A group file renamed in but missing from the index (killed between the
  two, or before the next save) is checked and adopted.
- **Re-plans keep what they hold by default.** Tensors of layers no longer assigned stay on
  disk: the node can serve them to peers, a later re-plan back costs nothing, and disk is
  cheaper than the network. :meth:`ShardDir.prune` drops them when space is wanted.
- **Disk full, read-only store:** :class:`ringd.errors.ModelError` naming the path and the
  bytes needed; the space is checked and reserved (``posix_fallocate`` where there is one)
  before fetching, and the directory stays valid after any failure.

One process fills a directory at a time (a lock under ``.partial/``); call a ``ShardDir``
from one thread at a time (its I/O blocks: run it on a worker thread).

:class:`MemorySink` is the same write/finish face for the small items fetched first (the
manifest, config and tokenizer files), checked in memory before the directory is created.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ringd.compute.manifest import load_manifest
from ringd.compute.manifest_file import (KIND_SHARD, ManifestFile, read_manifest_file,
                                         write_manifest_file)
from ringd.units import format_size
from ringd.core.model_manifest import (FILE_KEY_PREFIX, HASH_SIZE, MANIFEST_KEY, Group,
                                       ModelManifest, blake2b_hex, group_of, model_id_of)
from ringd.errors import LocalProtocolError, ModelError
from ringd.state import atomic_write

log = logging.getLogger(__name__)

PARTIAL = ".partial"
INDEX = "model.safetensors.index.json"
INDEX_FORMAT = "ringd-shard"
SPACE_MARGIN = 64 << 20  # bytes left free on the disk beyond what a fetch needs
SAVE_EVERY = 1.0  # seconds: at most this long between publishing a group and indexing it
_READ = 8 << 20
_GROUP_FILE = re.compile(r"model-(embed|norm|head|layer-(\d{5,9}))\.safetensors")
_RM_HINT = ("free space on that disk (`ringctl model rm NAME` removes a model), or point "
            "model_store at a larger disk")


def group_file(group: Group) -> str:
    """The file a group's tensors live in."""
    if isinstance(group, int):
        return f"model-layer-{group:05d}.safetensors"
    return f"model-{group}.safetensors"


def _group_of_file(name: str, num_layers: int) -> Group | None:
    m = _GROUP_FILE.fullmatch(name)
    if m is None:
        return None
    if m.group(2) is not None:
        i = int(m.group(2))
        return i if i < num_layers else None
    return m.group(1)


@dataclass(frozen=True)
class GroupLayout:
    """A group file as this module writes it: header, and each tensor's absolute span."""

    group: Group
    file: str
    head: bytes  # 8-byte length + JSON header (padded with spaces to 8 bytes)
    spans: dict[str, tuple[int, int]]  # name -> (offset in the file, size)
    size: int  # bytes of the whole file


def group_layout(model: ModelManifest, group: Group) -> GroupLayout:
    """The one layout of a group's file (tensors in name order, contiguous)."""
    names = sorted(model.group_tensors(group))
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    pos = 0
    for n in names:
        t = model.tensors[n]
        header[n] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.size]}
        pos += t.size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    base = len(head)
    spans = {n: (base + header[n]["data_offsets"][0], model.tensors[n].size) for n in names}
    return GroupLayout(group, group_file(group), head, spans, base + pos)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _store_error(path: Path, e: OSError, need: int | None = None) -> ModelError:
    """A write failure as the user should see it: where, why, and how much space is needed."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        needed = f" ({format_size(need)} still needed)" if need is not None else ""
        return ModelError(f"no space left on the disk of {path}{needed}", hint=_RM_HINT)
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ModelError(f"cannot write {path}: {e.strerror}",
                          hint="the model store must be writable by ringd; set model_store to "
                               "a writable directory")
    return ModelError(f"cannot write {path}: {e}", hint="check the disk holding the model store")


def _hash_region(fd: int, offset: int, size: int) -> str:
    h = hashlib.blake2b(digest_size=HASH_SIZE)
    left, pos = size, offset
    while left:
        data = os.pread(fd, min(left, _READ), pos)
        if not data:
            break  # short file: the hash will not match
        h.update(data)
        pos += len(data)
        left -= len(data)
    return h.hexdigest()


class ShardDir:
    """A shard directory being filled: plan, write chunks, finish tensors, prune."""

    def __init__(self, path: Path, mf: ManifestFile, lock_fd: int) -> None:
        self.path = path
        self.model = mf.model
        self._files = dict(mf.files)
        self._small = dict(mf.small)
        self._lock_fd = lock_fd
        self._partial = path / PARTIAL
        self._published: dict[Group, GroupLayout] = {}
        self._filling: dict[Group, GroupLayout] = {}
        self._verified: set[str] = set()  # checked tensors in .partial files
        self._fds: dict[Group, int] = {}
        self._unsaved: list[GroupLayout] = []  # published, not yet in the index
        self._saved_at = time.monotonic()

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, dest: Path, model: ModelManifest, files: Mapping[str, bytes]) -> "ShardDir":
        """Make ``dest`` a shard directory of ``model`` holding no tensor yet, or open it.

        ``files``: the bytes of every small file the manifest lists (config, tokenizer), each
        checked against its hash. The directory appears whole or not at all.
        """
        dest = Path(dest)
        if dest.exists():
            return cls.open(dest, model)
        for name, spec in model.files.items():
            data = files.get(name)
            if data is None or len(data) != spec.size or blake2b_hex(data) != spec.hash:
                raise ModelError(f"{name} for {dest} is not the file the model's manifest lists",
                                 hint="fetch it again from another node")
        stage = dest.parent / f".fetch-{dest.name}-{uuid.uuid4().hex[:8]}"
        try:
            stage.mkdir(parents=True)
            small = {}
            for name, data in files.items():
                if name not in model.files:
                    continue
                atomic_write(stage / name, data, mode=0o644)
                st = (stage / name).stat()
                small[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                               "hash": model.files[name].hash}
            write_manifest_file(stage, ManifestFile(model, KIND_SHARD, {}, small))
            _write_index(stage, {})
            (stage / PARTIAL).mkdir()
            _fsync_dir(stage)
            os.rename(stage, dest)
            _fsync_dir(dest.parent)
        except OSError as e:
            shutil.rmtree(stage, ignore_errors=True)
            raise _store_error(dest, e, sum(f.size for f in model.files.values())) from None
        log.info("created shard directory %s for model %s", dest, model.model_id[:12])
        return cls.open(dest, model)

    @classmethod
    def open(cls, dest: Path, model: ModelManifest | None = None) -> "ShardDir":
        """Open an existing shard directory (and check it is of ``model`` when given)."""
        dest = Path(dest)
        mf = read_manifest_file(dest, strict=True)
        if mf is None:
            raise ModelError(f"{dest} has no manifest",
                             hint="remove the directory and let the node fetch the model again")
        if mf.kind != KIND_SHARD:
            raise ModelError(f"{dest} holds a whole model, not a shard directory",
                             hint="it needs nothing fetched; to replace it, remove it first")
        if model is not None and mf.model.model_id != model.model_id:
            raise ModelError(f"{dest} holds another model ({mf.model.model_id[:12]}, not "
                             f"{model.model_id[:12]})",
                             hint="remove it (`ringctl model rm NAME`) or fetch under another "
                                  "name")
        partial = dest / PARTIAL
        try:
            partial.mkdir(exist_ok=True)
            lock_fd = os.open(partial / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _store_error(partial, e) from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise ModelError(f"another process is filling {dest}",
                             hint="wait for it, or stop it (is a second ringd running with "
                                  "the same model store?)") from None
        sd = cls(dest, mf, lock_fd)
        try:
            sd._recover()
        except BaseException:
            sd.close()
            raise
        return sd

    def _recover(self) -> None:
        load_manifest(self.path)  # published files still what was checked (else ModelError)
        mf = read_manifest_file(self.path, strict=True)
        assert mf is not None
        self._files, self._small = dict(mf.files), dict(mf.small)
        n = self.model.num_layers
        listed = set(_read_index(self.path).values())
        for f in sorted(listed):
            g = _group_of_file(f, n)
            if g is None:
                raise ModelError(f"{self.path / INDEX} names {f!r}, not a file of a shard "
                                 "directory", hint="remove the directory and fetch again")
            self._published[g] = group_layout(self.model, g)
        # A group renamed in but not yet in the index: adopt it if it checks out.
        for p in sorted(self.path.glob("model-*.safetensors")):
            g = _group_of_file(p.name, n)
            if g is None or p.name in listed:
                continue
            layout = group_layout(self.model, g)
            if self._check_whole(p, layout):
                log.info("adopting %s (complete, checked)", p)
                self._published[g] = layout
                self._record(layout)
            else:
                p.unlink()
        # Groups being filled: the tensors whose bytes already match count.
        for p in sorted(self._partial.glob("model-*.safetensors")):
            g = _group_of_file(p.name, n)
            layout = group_layout(self.model, g) if g is not None else None
            if layout is None or g in self._published or not _same_layout(p, layout):
                p.unlink()
                continue
            self._filling[g] = layout
            fd = self._fd(g)
            for name, (off, size) in layout.spans.items():
                if _hash_region(fd, off, size) == self.model.tensors[name].hash:
                    self._verified.add(name)
            if all(t in self._verified for t in layout.spans):
                self._publish(g)
        if self._verified:
            log.info("%s: %d tensors (%s) already fetched and checked", self.path,
                     len(self._verified), format_size(self._bytes(self._verified)))

    # ------------------------------------------------------------------ what is here
    def present(self) -> set[str]:
        """Tensors here and checked (published, or complete in ``.partial``)."""
        out = set(self._verified)
        for layout in self._published.values():
            out.update(layout.spans)
        return out

    def missing(self, names: Collection[str]) -> list[str]:
        have = self.present()
        return [n for n in names if n not in have]

    def ranges(self) -> list[tuple[int, int]]:
        """Complete layer ranges in the directory (loadable and servable)."""
        names = [n for layout in self._published.values() for n in layout.spans]
        return self.model.complete_ranges(names)

    def disk_bytes(self) -> int:
        """Bytes of the group files (published and being filled) on disk."""
        return sum(layout.size for layout in (*self._published.values(),
                                              *self._filling.values()))

    # ------------------------------------------------------------------ filling
    def plan(self, names: Collection[str]) -> int:
        """Prepare to receive ``names`` (tensor names): check and reserve the space, create
        the group files. Returns the bytes still to fetch."""
        for n in names:
            if n not in self.model.tensors:
                raise LocalProtocolError(f"{n!r} is not a tensor of model "
                                         f"{self.model.model_id[:12]}")
        todo = self.missing(names)
        groups = {group_of(n, self.model.num_layers) for n in todo}
        new = [group_layout(self.model, g) for g in sorted(groups, key=_order)
               if g is not None and g not in self._filling]
        fetch = self._bytes(todo)
        need = sum(layout.size for layout in new) + self._unreserved()
        try:
            free = shutil.disk_usage(self.path).free
        except OSError as e:
            raise _store_error(self.path, e) from None
        if need + SPACE_MARGIN > free:
            raise ModelError(f"not enough space in {self.path} for {len(todo)} tensors: "
                             f"{format_size(need)} needed (and {format_size(SPACE_MARGIN)} "
                             f"spare), {format_size(free)} free", hint=_RM_HINT)
        for layout in new:
            self._create(layout, need)
        return fetch

    def write(self, name: str, offset: int, data: bytes | memoryview) -> None:
        """Put bytes ``[offset, offset + len(data))`` of tensor ``name`` in place."""
        layout = self._layout_for(name)
        base, size = layout.spans[name]
        if not 0 <= offset <= offset + len(data) <= size:
            raise LocalProtocolError(f"write of {len(data)} bytes at {offset} is outside "
                                     f"{name!r} ({size} bytes)")
        if name in self._verified or layout.group in self._published:
            return  # already checked; a late duplicate
        fd = self._fd(layout.group)
        view = memoryview(data)
        pos = base + offset
        try:
            while view:
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
        except OSError as e:
            raise _store_error(self._partial / layout.file, e, self._bytes(self.missing(
                list(layout.spans)))) from None

    def finish(self, name: str) -> bool:
        """Check tensor ``name``'s bytes on disk against the manifest. True: it counts (and its
        group is published when complete). False: the bytes are wrong (it stays missing)."""
        layout = self._layout_for(name)
        if name in self._verified or layout.group in self._published:
            return True
        base, size = layout.spans[name]
        try:
            ok = _hash_region(self._fd(layout.group), base, size) == self.model.tensors[name].hash
        except OSError as e:
            raise ModelError(f"cannot read {self._partial / layout.file}: {e}") from None
        if not ok:
            return False
        self._verified.add(name)
        if all(t in self._verified for t in layout.spans):
            self._publish(layout.group)
        return True

    def prune(self, keep: Collection[str]) -> int:
        """Remove the groups none of whose tensors is in ``keep``; returns bytes freed."""
        keep = set(keep)
        self._save_published()
        drop = [g for g, layout in self._published.items() if not keep & set(layout.spans)]
        freed = 0
        if drop:
            for g in drop:
                layout = self._published.pop(g)
                self._files.pop(layout.file, None)
            self._save()  # the index stops naming them before they go
            for g in drop:
                p = self.path / group_file(g)
                freed += p.stat().st_size if p.exists() else 0
                p.unlink(missing_ok=True)
        for g in [g for g, layout in self._filling.items() if not keep & set(layout.spans)]:
            layout = self._filling.pop(g)
            fd = self._fds.pop(g, None)
            if fd is not None:
                os.close(fd)
            self._verified.difference_update(layout.spans)
            p = self._partial / layout.file
            freed += p.stat().st_size if p.exists() else 0
            p.unlink(missing_ok=True)
        if freed:
            log.info("%s: dropped %d groups (%s)", self.path, len(drop), format_size(freed))
        return freed

    def close(self) -> None:
        try:
            self._save_published()
        except ModelError as e:  # the next open checks and adopts the groups not indexed
            log.warning("%s", e)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = -1

    def __enter__(self) -> "ShardDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _bytes(self, names: Collection[str]) -> int:
        return sum(self.model.tensors[n].size for n in names)

    def _layout_for(self, name: str) -> GroupLayout:
        g = group_of(name, self.model.num_layers) if name in self.model.tensors else None
        if g is None:
            raise LocalProtocolError(f"{name!r} is not a tensor of model "
                                     f"{self.model.model_id[:12]}")
        layout = self._filling.get(g) or self._published.get(g)
        if layout is None:
            raise LocalProtocolError(f"tensor {name!r} was not planned (call plan() first)")
        return layout

    def _fd(self, g: Group) -> int:
        fd = self._fds.get(g)
        if fd is None:
            p = self._partial / self._filling[g].file
            try:
                fd = os.open(p, os.O_RDWR)
            except OSError as e:
                raise _store_error(p, e) from None
            self._fds[g] = fd
        return fd

    def _unreserved(self) -> int:
        """Bytes the groups being filled may still take on disk (sparse files)."""
        out = 0
        for layout in self._filling.values():
            try:
                st = (self._partial / layout.file).stat()
            except OSError:
                continue
            out += max(0, layout.size - st.st_blocks * 512)
        return out

    def _create(self, layout: GroupLayout, need: int) -> None:
        p = self._partial / layout.file
        try:
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise _store_error(p, e, need) from None
        try:
            os.pwrite(fd, layout.head, 0)
            os.ftruncate(fd, layout.size)
            if hasattr(os, "posix_fallocate") and layout.size > len(layout.head):
                try:
                    os.posix_fallocate(fd, len(layout.head), layout.size - len(layout.head))
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
        except OSError as e:
            os.close(fd)
            p.unlink(missing_ok=True)
            raise _store_error(p, e, need) from None
        self._fds[layout.group] = fd
        self._filling[layout.group] = layout

    def _publish(self, g: Group) -> None:
        layout = self._filling.pop(g)
        src, dst = self._partial / layout.file, self.path / layout.file
        fd = self._fds.pop(g, None)
        try:
            if fd is not None:
                os.fsync(fd)
                os.close(fd)
            os.replace(src, dst)
            self._published[g] = layout
            self._verified.difference_update(layout.spans)
            self._unsaved.append(layout)
        except OSError as e:
            raise _store_error(dst, e) from None
        log.debug("%s: %s complete", self.path, layout.file)
        if not self._filling or time.monotonic() - self._saved_at >= SAVE_EVERY:
            self._save_published()

    def _save_published(self) -> None:
        """Name the groups published since the last save in the manifest and the index."""
        if self._unsaved:
            layouts, self._unsaved = self._unsaved, []
            for layout in layouts:
                self._stamp(layout)
            self._save()
            self._saved_at = time.monotonic()

    def _record(self, layout: GroupLayout) -> None:
        """Stamp a published group in the manifest's local table, then name it in the index."""
        self._stamp(layout)
        self._save()

    def _stamp(self, layout: GroupLayout) -> None:
        try:
            st = (self.path / layout.file).stat()
        except OSError as e:
            raise _store_error(self.path / layout.file, e) from None
        self._files[layout.file] = {
            "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "tensors": {n: self.model.tensors[n].hash for n in layout.spans}}

    def _save(self) -> None:
        try:
            write_manifest_file(self.path, ManifestFile(self.model, KIND_SHARD, self._files,
                                                        self._small))
            _write_index(self.path, {n: layout.file for layout in self._published.values()
                                     for n in layout.spans}, self.model)
            _fsync_dir(self.path)
        except OSError as e:
            raise _store_error(self.path, e) from None

    def _check_whole(self, path: Path, layout: GroupLayout) -> bool:
        if not _same_layout(path, layout):
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            return all(_hash_region(fd, off, size) == self.model.tensors[n].hash
                       for n, (off, size) in layout.spans.items())
        finally:
            os.close(fd)


def _order(g: Group | None) -> tuple[int, int]:
    """Embedding, layers, then the other ends."""
    if isinstance(g, int):
        return (1, g)
    return (0, 0) if g == "embed" else (2, 0 if g == "norm" else 1)


def _same_layout(path: Path, layout: GroupLayout) -> bool:
    try:
        if path.stat().st_size != layout.size:
            return False
        with path.open("rb") as f:
            return f.read(len(layout.head)) == layout.head
    except OSError:
        return False


def _read_index(path: Path) -> dict[str, str]:
    try:
        data = json.loads((path / INDEX).read_text(encoding="utf-8"))
        wm = data["weight_map"]
        if not isinstance(wm, dict):
            raise ValueError("weight_map is not an object")
        return {str(k): str(v) for k, v in wm.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"cannot read {path / INDEX}: {e}",
                         hint="remove the directory and let the node fetch the model again"
                         ) from None


def _write_index(path: Path, weight_map: dict[str, str],
                 model: ModelManifest | None = None) -> None:
    total = sum(model.tensors[n].size for n in weight_map) if model is not None else 0
    index = {"metadata": {"format": INDEX_FORMAT, "total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    atomic_write(path / INDEX, json.dumps(index, indent=1).encode(), mode=0o644)


# ----------------------------------------------------------------------------- small items
class MemorySink:
    """Small items fetched into memory and checked whole: the manifest, config, tokenizer.

    ``items``: key -> size; ``check(key, data)``: whether the bytes are right.
    """

    def __init__(self, items: Mapping[str, int], check: Callable[[str, bytes], bool]) -> None:
        self._bufs = {k: bytearray(size) for k, size in items.items()}
        self._check = check
        self._done: set[str] = set()

    def write(self, key: str, offset: int, data: bytes | memoryview) -> None:
        buf = self._bufs.get(key)
        if buf is None or not 0 <= offset <= offset + len(data) <= len(buf):
            raise LocalProtocolError(f"write of {len(data)} bytes at {offset} does not fit "
                                     f"item {key!r}")
        buf[offset:offset + len(data)] = data

    def finish(self, key: str) -> bool:
        ok = self._check(key, bytes(self._bufs[key]))
        if ok:
            self._done.add(key)
        return ok

    def data(self, key: str) -> bytes:
        if key not in self._done:
            raise LocalProtocolError(f"item {key!r} is not complete and checked")
        return bytes(self._bufs[key])


def manifest_sink(model_id: str, size: int) -> MemorySink:
    """Receives the canonical manifest (``manifest`` item) and checks it is ``model_id``."""
    return MemorySink({MANIFEST_KEY: size}, lambda _k, data: model_id_of(data) == model_id)


def small_files_sink(model: ModelManifest) -> MemorySink:
    """Receives every small file of ``model`` (``file:NAME`` items), each checked by hash."""
    def check(key: str, data: bytes) -> bool:
        spec = model.files[key[len(FILE_KEY_PREFIX):]]
        return len(data) == spec.size and blake2b_hex(data) == spec.hash

    return MemorySink({FILE_KEY_PREFIX + n: f.size for n, f in model.files.items()}, check)


def small_files(sink: MemorySink, model: ModelManifest) -> dict[str, bytes]:
    """The checked bytes of every small file, for :meth:`ShardDir.create`."""
    return {n: sink.data(FILE_KEY_PREFIX + n) for n in model.files}
