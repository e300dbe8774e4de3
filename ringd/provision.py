"""Getting the ring's model onto this node's disk, from the peers that hold it.

A node needs the model in two steps, and fetches each from its peers (never from a copy
made by hand):

1. **To plan** (and to tokenize): the model's manifest -- its identity, every tensor's
   size and hash -- and its small files (config, tokenizer), fetched as soon as the ring's
   active model is one this node does not have. They become a shard directory in the
   store holding no tensor yet (:class:`ringd.compute.shard_dir.ShardDir`).
2. **To load its layers**, once a plan commits: exactly the tensors of its range, checked
   against the manifest before they count; a re-plan fetches only what is missing, and an
   interrupted fetch resumes with what was checked.

Who holds what comes from gossip (``holders(model_id)``: node id -> its
:class:`ringd.core.ringmeta.Holding`). Progress is reported through ``on_change`` (rate
limited): the control plane gossips it and ``status`` shows it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Mapping

from ringd.compute.shard_dir import ShardDir, manifest_sink, small_files, small_files_sink
from ringd.core.model_manifest import MANIFEST_KEY, ModelManifest, file_key
from ringd.core.proof import name_nodes
from ringd.core.ringmeta import Holding
from ringd.core.transfer import TransferStats
from ringd.errors import ModelError, RingdError
from ringd.models import LocalModel, ModelLibrary
from ringd.units import format_size
from ringd.weights import Fetcher

log = logging.getLogger(__name__)

Holders = Callable[[str], Mapping[str, Holding]]
#: Seconds between progress reports that change what this node gossips.
PROGRESS_EVERY = 2.0


class Provisioner:
    """Fetches what this node lacks of a model; one fetch at a time (the Fetcher's rule)."""

    def __init__(self, library: ModelLibrary, fetcher: Fetcher, *, holders: Holders,
                 spawn: Callable[[Any], asyncio.Task[Any]], on_change: Callable[[], None],
                 names: Callable[[], Mapping[str, str]] = dict,
                 wait_for_holders: float = 60.0) -> None:
        self.library = library
        self.fetcher = fetcher
        self._holders = holders
        self._spawn = spawn
        self._on_change = on_change
        self._names = names
        self.wait_for_holders = wait_for_holders
        self._manifest_task: asyncio.Task[Any] | None = None
        self._manifest_for: str | None = None
        self._manifest_error: str | None = None
        self._lock = asyncio.Lock()  # one fetch at a time
        #: What is being fetched ("manifest" or "layers N-M"), while a fetch runs.
        self.fetching: str | None = None
        self.progress: TransferStats | None = None
        self._reported = 0.0
        #: Holders that served bytes not matching the manifest: model id -> node id -> the
        #: item. They are not asked for that model again (until this node restarts).
        self.bad_holders: dict[str, dict[str, str]] = {}

    # ------------------------------------------------------------------ step 1: to plan
    def need_model(self, name: str, model_id: str) -> str | None:
        """None when ``model_id`` is in the store (at least its manifest and small files);
        else why not, and its fetch is started (once; again after a failure, when asked
        again for another model or after the view changed)."""
        if self.library.by_id(model_id) is not None:
            return None
        other = self.library.get(name)
        if other is not None:
            return (f"this node's store holds another model named {name} (id "
                    f"{other.model_id[:12]}), not the ring's {model_id[:12]}: remove it with "
                    f"`ringctl model rm {name}`")
        task = self._manifest_task
        if self._manifest_for == model_id and self._manifest_error:
            return self._manifest_error
        if task is None or task.done() or self._manifest_for != model_id:
            if task is not None and not task.done():
                task.cancel()
            self._manifest_for, self._manifest_error = model_id, None
            self._manifest_task = self._spawn(self._fetch_manifest(name, model_id))
        holders = ", ".join(sorted(self._named(p) for p in self._holders(model_id))) or "?"
        return f"fetching the manifest and files of {name} from {holders}"

    def retry(self) -> None:
        """Forget a failed manifest fetch (the view changed: holders may have come)."""
        self._manifest_error = None

    async def _fetch_manifest(self, name: str, model_id: str) -> None:
        try:
            async with self._lock:
                self.fetching = "manifest"
                holders = self._holders(model_id)
                size = max((h.manifest_size for h in holders.values()), default=0)
                if size <= 0:
                    raise ModelError(f"no node holds model {name} ({model_id[:12]}) yet")
                sink = manifest_sink(model_id, size)
                await self._fetch(model_id, {MANIFEST_KEY: size}, (), sink,
                                  lambda: {p: {MANIFEST_KEY} for p in self._holders(model_id)})
                model = ModelManifest.from_bytes(sink.data(MANIFEST_KEY), expect_id=model_id,
                                                 where=f"the manifest of {name} from a peer")
                files = small_files_sink(model)
                keys = {file_key(n) for n in model.files}
                await self._fetch(model_id, model.item_sizes(keys), (), files,
                                  lambda: {p: keys for p in self._holders(model_id)})
                dest = self.library.store / name
                shard = await asyncio.to_thread(ShardDir.create, dest, model,
                                                small_files(files, model))
                shard.close()
                await asyncio.to_thread(self.library.refresh, name)
                log.info("model %s (%s): manifest and files fetched into %s", name,
                         model_id[:12], dest)
        except RingdError as e:
            self._manifest_error = f"cannot fetch the manifest of {name}: {self._text(e)}"
            log.error("%s", self._manifest_error)
        finally:
            self.fetching = None
            self._on_change()

    # ------------------------------------------------------------------ step 2: to load
    async def ensure_layers(self, model: LocalModel, start: int, end: int) -> LocalModel:
        """``model`` holding every tensor a shard of layers ``[start, end)`` loads, fetched
        from peers as needed. Raises ModelError when they cannot be had."""
        names = model.info.shard_tensors(start, end)
        if not model.info.missing(names):
            return model
        async with self._lock:
            self.fetching = f"layers {start}-{end - 1}"
            manifest = model.manifest.model
            shard = await asyncio.to_thread(ShardDir.open, model.path, manifest)
            try:
                need = await asyncio.to_thread(shard.plan, names)
                log.info("fetching layers %d-%d of %s from peers: %s", start, end - 1,
                         model.name, format_size(need))
                present = await asyncio.to_thread(shard.present)

                def holders() -> dict[str, set[str]]:
                    return {p: manifest.holdings(h.ranges)
                            for p, h in self._holders(model.model_id).items()}

                try:
                    await self._fetch(model.model_id, manifest.item_sizes(names), present,
                                      shard, holders)
                except RingdError as e:
                    bad = self.bad_holders.get(model.model_id) or {}
                    why = "; ".join(f"node {self._named(p)} served bytes of {key} that do not "
                                    "match its manifest" for p, key in sorted(bad.items()))
                    raise ModelError(f"cannot fetch layers {start}-{end - 1} of {model.name}: "
                                     + (f"{why}; " if why else "") + self._text(e),
                                     hint=e.hint) from None
            finally:
                await asyncio.to_thread(shard.close)
                self.fetching = None
            fresh = await asyncio.to_thread(self.library.refresh, model.name)
        self._on_change()
        if fresh is None or fresh.info.missing(names):
            raise ModelError(f"{model.path}: layers {start}-{end - 1} are still incomplete "
                             "after the fetch", hint="see the ringd log")
        return fresh

    # ------------------------------------------------------------------ plumbing
    async def _fetch(self, model_id: str, items: Mapping[str, int], present: Any, sink: Any,
                     holders: Callable[[], Mapping[str, Any]]) -> TransferStats:
        self.progress = None
        bad = self.bad_holders.setdefault(model_id, {})

        def usable() -> dict[str, Any]:
            return {p: keys for p, keys in holders().items() if p not in bad}

        try:
            stats = await self.fetcher.fetch(model_id, items, present, sink, usable,
                                             on_progress=self._progressed,
                                             wait_for_holders=self.wait_for_holders)
        finally:
            self._reported = 0.0
            last = self.progress
            for p in last.peers if last is not None else ():
                if p.state == "rejected":
                    bad[p.peer] = p.rejected_for or "?"
                    log.warning("node %s served bytes of %s that do not match the manifest: "
                                "it is not used as a source of model %s any more",
                                self._named(p.peer), p.rejected_for, model_id[:12])
        self.progress = stats
        for p in stats.peers:
            if p.state == "rejected":
                bad[p.peer] = p.rejected_for or "?"
        return stats

    def _progressed(self, stats: TransferStats) -> None:
        self.progress = stats
        now = time.monotonic()
        if now - self._reported >= PROGRESS_EVERY:
            self._reported = now
            self._on_change()

    def fetch_progress(self) -> tuple[int, int] | None:
        """(bytes fetched and checked, bytes to fetch) while a fetch runs."""
        st = self.progress
        if self.fetching is None or st is None:
            return None
        return st.done_bytes, st.total_bytes

    def stats(self) -> dict[str, Any] | None:
        bad = {p: key for by in self.bad_holders.values() for p, key in by.items()}
        if self.fetching is None and self.progress is None and not bad:
            return None
        out = self.progress.as_dict() if self.progress is not None else {}
        return {"fetching": self.fetching, **out, "bad_holders": bad,
                "manifest_error": self._manifest_error}

    def _named(self, node_id: str) -> str:
        return self._names().get(node_id) or node_id[:8]

    def _text(self, e: RingdError) -> str:
        return name_nodes(e.message, dict(self._names()))
