"""The models in this node's store, as the ring sees them.

Each model directory in the store -- a whole model, or a shard directory filled from peers
-- is known by its manifest (:mod:`ringd.core.model_manifest`): its model id, and the layer
ranges complete on this disk. Those are what this node gossips (:meth:`ModelLibrary.holdings`)
and serves to peers (:meth:`ModelLibrary.source_for`). Reading a directory hashes files the
manifest has not seen yet (once): every method that reads the disk blocks -- call it on a
worker thread.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from ringd.compute.manifest import Manifest, load_manifest
from ringd.compute.model_info import ModelInfo, inspect_model
from ringd.compute.tensor_source import TensorSource
from ringd.core.ringmeta import Holding
from ringd.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalModel:
    """One model directory of the store."""

    name: str
    path: Path
    info: ModelInfo
    manifest: Manifest
    #: Layer ranges whose shard tensors are all on this disk (what it can serve and load).
    ranges: tuple[tuple[int, int], ...]
    #: Bytes of its canonical manifest (what a node without the model fetches first).
    manifest_size: int

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def whole(self) -> bool:
        return not self.info.partial

    def holding(self) -> Holding:
        return Holding(self.name, self.model_id, self.ranges, self.manifest_size)


class ModelLibrary:
    """The store's models by name and by id; thread-safe."""

    def __init__(self, store: Path) -> None:
        self.store = Path(store)
        self._lock = threading.Lock()
        self._models: dict[str, LocalModel] = {}
        self._sources: dict[str, TensorSource] = {}

    def scan(self) -> list[LocalModel]:
        """Read every model directory of the store (blocking)."""
        found: dict[str, LocalModel] = {}
        if self.store.is_dir():
            for d in sorted(self.store.iterdir()):
                if d.name.startswith(".") or not d.is_dir():
                    continue
                model = self._read(d)
                if model is not None:
                    found[model.name] = model
        with self._lock:
            old, self._models = self._models, found
            self._drop_sources(old, found)
        return list(found.values())

    def refresh(self, name: str) -> LocalModel | None:
        """Read model ``name`` again (after a fetch added tensors); None when it is gone."""
        model = self._read(self.store / name)
        with self._lock:
            old = dict(self._models)
            if model is None:
                self._models.pop(name, None)
            else:
                self._models[name] = model
            self._drop_sources(old, self._models)
        return model

    def get(self, name: str) -> LocalModel | None:
        with self._lock:
            return self._models.get(name)

    def by_id(self, model_id: str) -> LocalModel | None:
        with self._lock:
            return next((m for m in self._models.values() if m.model_id == model_id), None)

    def models(self) -> list[LocalModel]:
        with self._lock:
            return list(self._models.values())

    def holdings(self) -> tuple[Holding, ...]:
        """What this node gossips: every model it holds, with its complete layer ranges."""
        return tuple(m.holding() for m in self.models())

    def source_for(self, model_id: str) -> TensorSource | None:
        """A reader of ``model_id``'s items from this disk, for peers (None: not held)."""
        with self._lock:
            src = self._sources.get(model_id)
            if src is not None:
                return src
            model = next((m for m in self._models.values() if m.model_id == model_id), None)
            if model is None:
                return None
            src = self._sources[model_id] = TensorSource(model.path, model.manifest)
            return src

    def close(self) -> None:
        with self._lock:
            for src in self._sources.values():
                src.close()
            self._sources.clear()

    # ------------------------------------------------------------------ internals
    def _read(self, path: Path) -> LocalModel | None:
        if not (path / "config.json").is_file():
            return None
        try:
            manifest = load_manifest(path)
            info = inspect_model(path)
        except ModelError as e:
            log.warning("model directory %s cannot be served: %s", path, e)
            return None
        return LocalModel(path.name, path, info, manifest, tuple(info.complete_ranges()),
                          len(manifest.model.canonical_bytes()))

    def _drop_sources(self, old: dict[str, LocalModel], new: dict[str, LocalModel]) -> None:
        """Close readers of models that changed or went (a new one opens on demand)."""
        for name, model in old.items():
            now = new.get(name)
            if now is None or now.manifest is not model.manifest or now.ranges != model.ranges:
                src = self._sources.pop(model.model_id, None)
                if src is not None:
                    src.close()
