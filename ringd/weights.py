"""Weights over the network: a holder serves items' bytes, a new node fetches them.

Two asyncio adapters (loop thread only; no MLX) around the pure and file-level pieces:

- :class:`WeightServer` answers peers' :class:`ringd.core.wire.FetchRequest` from this
  node's model directories (:class:`ringd.compute.tensor_source.TensorSource`): the key and
  range are checked on the loop (dictionary look-ups), the bytes are read on the server's
  own small thread pool (never the event loop, never the MLX thread) and go back as a
  :class:`ringd.core.wire.FetchReply`. Requests waiting for a read are bounded (in all, and
  per peer in bytes with what the transport still holds for it); beyond that the answer is
  ``busy``. A peer's bad request gets a status, a
  file that cannot be read (changed, gone) gets ``not_held`` and one rate-limited log line;
  nothing a peer sends raises out of :meth:`WeightServer.receive`.
- :class:`Fetcher` drives one :class:`ringd.core.transfer.Transfer` at a time: it sends the
  requests the transfer decides, feeds it the replies (:meth:`Fetcher.receive`), runs the
  sink's ``write`` and ``finish`` (a :class:`ringd.compute.shard_dir.ShardDir`, or a
  :class:`ringd.compute.shard_dir.MemorySink` for the manifest and small files) on one
  worker thread in order, re-reads the holders (:meth:`Fetcher.holders_changed`, and every
  ``holders_every`` seconds), reports progress, and re-arms one timer.

Memory: the transfer bounds the bytes requested and not yet received; the fetcher also
bounds the bytes received and not yet written (``max_backlog``): when the disk is slower
than the network, requests wait. So a fetch needs its in-flight buffers, never its shard.

The daemon routes messages: ``FetchRequest`` to :meth:`WeightServer.receive`,
``FetchReply`` to :meth:`Fetcher.receive`; its ``send(node_id, msg)`` maps the node to its
address and sends with ``bulk=True`` (TCP: see :meth:`ringd.net.transport.Transport.send`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

from ringd.compute.tensor_source import NotHeld, TensorSource
from ringd.core import wire
from ringd.core.transfer import (HolderRejected, HolderStalled, ItemReceived, Transfer,
                                 TransferConfig, TransferDone, TransferFailed, TransferStats,
                                 WaitingForHolders)
from ringd.errors import LocalProtocolError, ModelError, RemoteProtocolError

log = logging.getLogger(__name__)

SendFn = Callable[[str, wire.Message], None]
WARN_EVERY = 60.0  # seconds between two warnings of one kind


class Sink(Protocol):
    """Where fetched bytes go: ``ShardDir`` or ``MemorySink`` (called from one thread)."""

    def write(self, key: str, offset: int, data: bytes | memoryview) -> None: ...

    def finish(self, key: str) -> bool: ...


class _Warnings:
    """At most one warning per kind a minute (then debug lines): a peer can't flood the log."""

    def __init__(self) -> None:
        self._last: dict[object, float] = {}

    def __call__(self, kind: object, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -WARN_EVERY) >= WARN_EVERY:
            if len(self._last) > 256:
                self._last.clear()
            self._last[kind] = now
            log.warning(msg, *args)
        else:
            log.debug(msg, *args)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """From a worker thread: run ``fn(*args)`` on the loop (nothing if the loop is gone)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop was closed: nobody is waiting for this any more
        pass


# ============================================================================ serving
class WeightServer:
    """Serves the items of this node's model directories to peers, in chunks.

    ``send(node_id, reply)``: the daemon's sender (``bulk=True``). ``source_for(model_id)``:
    the :class:`TensorSource` of a model this node holds, or None; called on the loop
    thread, so it must not block (a dictionary look-up). Sources stay open while reads may
    run on them: close one only after :meth:`close`, or accept that its in-flight reads
    fail (they are answered ``not_held``).

    Bounds: ``max_reads`` reads at a time; ``max_queued`` requests waiting or being read;
    per peer, ``max_peer_bytes`` bytes asked for and not yet answered, plus (with
    ``backlog(node_id)``: the bytes the transport still holds for that peer, e.g.
    ``Transport.queued_bytes`` of its address) the replies it has not taken yet. Beyond any
    of them the answer is ``busy``: a peer that asks without reading can't make the holder
    read (or buffer) for it without end.
    """

    def __init__(self, send: SendFn, source_for: Callable[[str], TensorSource | None], *,
                 max_reads: int = 4, max_queued: int = 256, max_peer_bytes: int = 32 << 20,
                 backlog: Callable[[str], int] | None = None,
                 read_delay: float = 0.0) -> None:
        if max_reads < 1 or max_queued < 1 or max_peer_bytes < wire.MAX_FETCH:
            raise LocalProtocolError("need max_reads, max_queued >= 1 and max_peer_bytes >= "
                                     f"{wire.MAX_FETCH}")
        self._send = send
        self._source_for = source_for
        self.max_queued = max_queued
        self.max_peer_bytes = max_peer_bytes
        self._backlog = backlog
        self._read_delay = read_delay  # test hook (the slow-serve fault): a slow disk
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_reads, thread_name_prefix="ringd-serve")
        self._queued = 0  # requests accepted and not yet answered
        self._per_peer: Counter[str] = Counter()  # bytes asked for, not yet answered
        self._closed = False
        self._warn = _Warnings()
        self.totals = dict.fromkeys(("requests", "ok", "not_held", "bad_request", "busy",
                                     "read_errors", "send_errors", "bytes_sent"), 0)

    # ---------------------------------------------------------------- input
    def receive(self, msg: wire.FetchRequest, sender: str) -> None:
        """A peer's request (loop thread). Answers it now (a refusal) or after the read."""
        if self._closed:
            return
        self.totals["requests"] += 1
        try:
            source = self._source_for(msg.model_id)
        except Exception:  # the daemon's callable failing is our bug, not the peer's
            log.exception("looking up model %s for a peer's request failed", msg.model_id[:12])
            source = None
        if source is None:
            self._reply(sender, msg, "not_held")
            return
        try:
            size = source.size(msg.key)
        except NotHeld:
            self._reply(sender, msg, "not_held")
            return
        except RemoteProtocolError:
            self._bad(sender, msg, "no such item")
            return
        except Exception as e:  # a source that cannot say: as a read error
            self.totals["read_errors"] += 1
            self._warn(("read", msg.model_id), "not serving model %s: %s", msg.model_id[:12], e)
            self._reply(sender, msg, "not_held")
            return
        if msg.offset + msg.length > size:
            self._bad(sender, msg, f"range outside the item ({size} bytes)")
            return
        asked = self._per_peer[sender] + msg.length
        if self._backlog is not None:
            try:
                asked += self._backlog(sender)
            except Exception:
                log.exception("reading the send backlog of %s failed", sender[:8])
        if self._queued >= self.max_queued or asked > self.max_peer_bytes:
            self._reply(sender, msg, "busy")
            return
        self._queued += 1
        self._per_peer[sender] += msg.length
        loop = asyncio.get_running_loop()
        fut = self._pool.submit(self._read, source, msg.key, msg.offset, msg.length)
        fut.add_done_callback(lambda f: _call_soon(loop, self._done, sender, msg, f))

    def _read(self, source: TensorSource, key: str, offset: int, length: int) -> bytes:
        if self._read_delay:
            time.sleep(self._read_delay)  # on a read thread, never the loop
        return source.read(key, offset, length)

    # ---------------------------------------------------------------- output
    def _done(self, sender: str, msg: wire.FetchRequest,
              fut: concurrent.futures.Future[bytes]) -> None:
        self._queued -= 1
        self._per_peer[sender] -= msg.length
        if self._per_peer[sender] <= 0:
            del self._per_peer[sender]
        if self._closed or fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            data = fut.result()
            self.totals["bytes_sent"] += len(data)
            self._reply(sender, msg, "ok", data)
            return
        if isinstance(exc, NotHeld):
            self._reply(sender, msg, "not_held")
        elif isinstance(exc, RemoteProtocolError):
            self._bad(sender, msg, str(exc))
        else:  # ModelError (the file changed, or cannot be read), or anything else
            self.totals["read_errors"] += 1
            self._warn(("read", msg.model_id), "not serving %s of model %s to %s: %s",
                       msg.key[:80], msg.model_id[:12], sender[:8], exc)
            self._reply(sender, msg, "not_held")

    def _bad(self, sender: str, msg: wire.FetchRequest, why: str) -> None:
        self._warn(("bad", sender), "peer %s asked for %r of model %s at %d+%d: %s",
                   sender[:8], msg.key[:80], msg.model_id[:12], msg.offset, msg.length, why)
        self._reply(sender, msg, "bad_request")

    def _reply(self, sender: str, msg: wire.FetchRequest, status: str,
               data: bytes = b"") -> None:
        self.totals[status] += 1
        try:
            self._send(sender, wire.FetchReply(msg.model_id, msg.key, msg.offset, status, data))
        except Exception as e:  # a send that fails must not reach the transport's caller
            self.totals["send_errors"] += 1
            self._warn(("send", sender), "cannot answer %s: %s", sender[:8], e)

    # ---------------------------------------------------------------- lifecycle
    def stats(self) -> dict[str, Any]:
        return {**self.totals, "queued": self._queued, "peers": len(self._per_peer)}

    def close(self) -> None:
        """Stop answering; reads not started are dropped (never waits for running ones)."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)


# ============================================================================ fetching
class Fetcher:
    """Fetches a model's items from the peers that hold them, one transfer at a time.

    ``send(node_id, request)``: the daemon's sender (``bulk=True``). ``config``: the
    transfer's tunables (chunk size at most :data:`ringd.core.wire.MAX_FETCH`).
    ``max_backlog``: bytes received and not yet written to the sink before requests wait
    (default: one holder's in-flight bytes; it only absorbs the disk's jitter).
    """

    def __init__(self, send: SendFn, *, config: TransferConfig = TransferConfig(),
                 max_backlog: int | None = None, progress_every: float = 0.5,
                 holders_every: float = 2.0, busy_retry: float = 0.02,
                 max_busy_retries: int = 40) -> None:
        if config.chunk_size > wire.MAX_FETCH:
            raise LocalProtocolError(f"chunk_size {config.chunk_size} is above the "
                                     f"{wire.MAX_FETCH} bytes one request may ask for")
        self._send = send
        self.config = config
        self.max_backlog = (max_backlog if max_backlog is not None
                            else config.max_in_flight_per_peer)
        self.progress_every = progress_every
        self.holders_every = holders_every
        self.busy_retry = busy_retry
        self.max_busy_retries = max_busy_retries
        self.stray = 0  # replies to no current request (late, another model, duplicates)
        self.asked_again = 0  # requests sent again after a holder said busy
        self._run: _Run | None = None

    def receive(self, msg: wire.FetchReply, sender: str) -> None:
        """A holder's reply (loop thread). Never raises on a peer's input."""
        run = self._run
        if run is None or msg.model_id != run.model_id:
            self.stray += 1
            return
        run.receive(msg, sender)

    def holders_changed(self) -> None:
        """Who holds what may have changed (gossip): re-read ``holders()`` now."""
        if self._run is not None:
            self._run.refresh_now()

    def stats(self) -> dict[str, Any] | None:
        """The current transfer's progress (``TransferStats.as_dict()``), or None."""
        run = self._run
        return None if run is None else run.transfer.stats(time.monotonic()).as_dict()

    async def fetch(self, model_id: str, items: Mapping[str, int], present: Collection[str],
                    sink: Sink, holders: Callable[[], Mapping[str, Collection[str]]], *,
                    on_progress: Callable[[TransferStats], None] | None = None,
                    wait_for_holders: float = 60.0) -> TransferStats:
        """Fetch ``items`` (key -> size) not in ``present`` into ``sink``.

        ``holders()``: node id -> the item keys it holds (from gossip; not this node);
        called on the loop thread, so it must not block. Returns the final stats once every
        item is written and checked. Raises :class:`ModelError` when the transfer fails
        (every holder of an item served wrong bytes: the reason names them), when no usable
        holder was there for ``wait_for_holders`` seconds, or when the sink fails (disk
        full: its error). When the task is cancelled it stops: nothing more is asked or
        written, and what the sink holds stays (a :class:`ringd.compute.shard_dir.ShardDir`
        resumes from it).
        """
        if self._run is not None:
            raise LocalProtocolError("Fetcher.fetch: another fetch is running")
        run = _Run(self, model_id, items, present, sink, holders, on_progress,
                   wait_for_holders)
        self._run = run
        try:
            run.start()
            return await run.done
        finally:
            self._run = None
            await run.close()


class _Worker:
    """One thread that runs a fetch's sink calls in order (``ShardDir`` is single-threaded).

    Results come back to the loop in batches: after a job, the thread schedules one call of
    ``on_results`` unless one is already pending, so a burst of chunk writes costs the loop
    one wake-up, not one each. :meth:`stop` drops the jobs not started; :meth:`stopped` is
    done once the thread has ended (the job it was running, finished).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_results: Callable[[list[tuple[Any, Any, BaseException | None]]], None]
                 ) -> None:
        self._loop = loop
        self._on_results = on_results
        self._jobs: queue.SimpleQueue[tuple[Any, Callable[..., Any], tuple[Any, ...]] | None]
        self._jobs = queue.SimpleQueue()
        self._results: deque[tuple[Any, Any, BaseException | None]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._stop = False
        self.stopped: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._work, name="ringd-fetch", daemon=True)
        self._thread.start()

    def submit(self, tag: Any, fn: Callable[..., Any], *args: Any) -> None:
        self._jobs.put((tag, fn, args))

    def stop(self) -> None:
        self._stop = True
        self._jobs.put(None)

    def _work(self) -> None:
        try:
            while (job := self._jobs.get()) is not None and not self._stop:
                tag, fn, args = job
                try:
                    result, exc = fn(*args), None
                except BaseException as e:  # handed to the loop, like a pool worker does
                    result, exc = None, e
                del job, fn, args
                self._results.append((tag, result, exc))
                with self._lock:
                    if self._scheduled:
                        continue
                    self._scheduled = True
                _call_soon(self._loop, self._deliver)
        finally:
            _call_soon(self._loop, self._ended)

    def _deliver(self) -> None:
        with self._lock:
            self._scheduled = False
        batch = []
        while self._results:
            batch.append(self._results.popleft())
        if batch:
            self._on_results(batch)

    def _ended(self) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)


class _Run:
    """One fetch: the transfer, its worker thread, its timer (loop thread only)."""

    def __init__(self, f: Fetcher, model_id: str, items: Mapping[str, int],
                 present: Collection[str], sink: Sink,
                 holders: Callable[[], Mapping[str, Collection[str]]],
                 on_progress: Callable[[TransferStats], None] | None,
                 wait_for_holders: float) -> None:
        self.f = f
        self.model_id = model_id
        self.loop = asyncio.get_running_loop()
        now = time.monotonic()
        self.sizes = dict(items)
        self.transfer = Transfer(self.sizes, present, now=now, config=f.config)
        self.sink = sink
        self.holders = holders
        self.on_progress = on_progress
        self.wait_for_holders = wait_for_holders
        self.done: asyncio.Future[TransferStats] = self.loop.create_future()
        self.worker = _Worker(self.loop, self._results)
        self.backlog = 0  # bytes handed to the worker, not yet written
        self.known: dict[str, frozenset[str]] = {}  # holders as last set in the transfer
        self.asked: dict[tuple[str, str, int], int] = {}  # request sent -> busy replies
        self.retries: list[tuple[float, str, str, int, int]] = []  # heap: busy, ask again
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None
        # The transfer's own deadline, read at each tick and timer (not on every reply:
        # requests sent meanwhile have later deadlines, so it can only be late by a tick).
        self.transfer_at: float | None = None
        self.next_tick = now
        self.next_holders = now
        self.waiting_since: float | None = None
        self.closed = False
        self.warn = _Warnings()

    # ---------------------------------------------------------------- inputs
    def start(self) -> None:
        self.flush()

    def refresh_now(self) -> None:
        self.next_holders = time.monotonic()
        self.flush()

    def receive(self, msg: wire.FetchReply, sender: str) -> None:
        now = time.monotonic()
        t = self.transfer
        asked = self.asked.pop((sender, msg.key, msg.offset), None)
        if msg.status == "ok":
            n = len(msg.data)
            if t.chunk_received(sender, msg.key, msg.offset, n, now):
                data = bytes(msg.data)  # out of the receive buffer, which is reused
                self.backlog += n
                self.worker.submit(("w", n), self.sink.write, msg.key, msg.offset, data)
        elif msg.status == "busy":
            size = self.sizes.get(msg.key)
            if asked is not None and asked < self.f.max_busy_retries and size is not None:
                self.asked[(sender, msg.key, msg.offset)] = asked + 1
                delay = min(self.f.busy_retry * (1 << min(asked, 5)),
                            self.f.config.request_timeout / 4)
                length = min(self.f.config.chunk_size, size - msg.offset)  # as first asked
                heapq.heappush(self.retries, (now + delay, sender, msg.key, msg.offset, length))
        else:  # not_held, bad_request: our view of its holdings was wrong; ask elsewhere
            if asked is not None:
                t.chunk_refused(sender, msg.key, now)
            if msg.status == "bad_request":
                self.warn(("bad", sender), "holder %s refused a request for %r of model %s",
                          sender[:8], msg.key[:80], self.model_id[:12])
        self.flush()

    def _results(self, batch: list[tuple[Any, Any, BaseException | None]]) -> None:
        """Jobs the worker finished (in order): writes free backlog, checks go to the core."""
        if self.closed or self.done.done():
            return
        now = time.monotonic()
        for tag, result, exc in batch:
            if exc is not None:  # the sink's error (ModelError: disk full, read-only) as is
                self._end(exc)
                return
            if isinstance(tag, tuple):  # ("w", n): n bytes of a chunk written
                self.backlog -= tag[1]
            else:  # an item's key: its check
                self.transfer.item_checked(tag, bool(result), now)
        self.flush()

    # ---------------------------------------------------------------- the one loop step
    def flush(self) -> None:
        """Feed what is due, send what the transfer asks, handle its events, re-arm."""
        if self.closed or self.done.done():
            return
        now = time.monotonic()
        t = self.transfer
        if now >= self.next_holders:
            self._refresh_holders(now)
        while self.retries and self.retries[0][0] <= now:
            _, peer, key, offset, length = heapq.heappop(self.retries)
            if (peer, key, offset) in self.asked:
                self.f.asked_again += 1
                self._ask(peer, key, offset, length)
        if now >= self.next_tick:
            self._tick(now)
            if self.done.done():
                return
        self._events(now)
        if self.backlog < self.f.max_backlog and not self.done.done():
            for r in t.requests_to_send(now):
                self.asked[(r.peer, r.key, r.offset)] = 0
                self._ask(r.peer, r.key, r.offset, r.length)
            self._events(now)
        if not self.done.done():
            self._rearm()

    def _ask(self, peer: str, key: str, offset: int, length: int) -> None:
        try:
            self.f._send(peer, wire.FetchRequest(self.model_id, key, offset, length))
        except Exception as e:  # the transfer asks again after its timeout
            self.warn(("send", peer), "cannot ask %s for model %s: %s", peer[:8],
                      self.model_id[:12], e)

    def _events(self, now: float) -> None:
        t = self.transfer
        while (ev := t.next_event()) is not None:
            if isinstance(ev, ItemReceived):
                self.worker.submit(ev.key, self.sink.finish, ev.key)
            elif isinstance(ev, HolderRejected):
                log.warning("node %s served bytes of %s (model %s) that do not match its "
                            "manifest: not fetching from it any more", ev.peer, ev.key,
                            self.model_id[:12])
            elif isinstance(ev, HolderStalled):
                log.info("node %s does not answer fetch requests (model %s): set aside for "
                         "%.0f s", ev.peer, self.model_id[:12], ev.until - now)
            elif isinstance(ev, WaitingForHolders):
                log.info("model %s: no node to fetch %d items from (%s...) yet; waiting",
                         self.model_id[:12], len(ev.keys), ev.keys[0][:80])
            elif isinstance(ev, TransferDone):
                self._end(None)
                return
            elif isinstance(ev, TransferFailed):
                self._end(ModelError(
                    f"fetching model {self.model_id[:12]} failed: {ev.reason}",
                    hint="that node's copy of the model is damaged: re-import or re-copy it "
                         "there (`ringctl model rm` then `ringctl model pull` or `import`)"))
                return

    def _refresh_holders(self, now: float) -> None:
        self.next_holders = now + self.f.holders_every
        try:
            current = {str(p): frozenset(keys) for p, keys in self.holders().items()}
        except Exception:
            log.exception("reading the holders of model %s failed", self.model_id[:12])
            return
        t = self.transfer
        for peer in [p for p in self.known if p not in current]:
            t.remove_holder(peer, now)
            del self.known[peer]
        for peer, keys in current.items():
            if self.known.get(peer) != keys:
                t.set_holder(peer, keys, now)
                self.known[peer] = keys

    def _tick(self, now: float) -> None:
        """Every ``progress_every``: progress, and how long nothing could be fetched."""
        self.next_tick = now + self.f.progress_every
        self.transfer.handle_timer(now)  # what is due, and which items no holder has
        self.transfer_at = self.transfer.get_timer()
        st = self.transfer.stats(now)
        if self.on_progress is not None:
            self._progress(st)
        stuck = st.state == "waiting" or not any(p.state == "ok" for p in st.peers)
        if not stuck:
            self.waiting_since = None
            return
        if self.waiting_since is None:
            self.waiting_since = now
        elif now - self.waiting_since >= self.wait_for_holders:
            self._end(self._no_holders(st, now - self.waiting_since))

    def _no_holders(self, st: TransferStats, waited: float) -> ModelError:
        first = st.waiting[0] if st.waiting else None
        what = (f"no node holds {first}" + (f" (and {len(st.waiting) - 1} more items)"
                                            if len(st.waiting) > 1 else "")
                if first else f"no node can serve the {st.items_total - st.items_done} items "
                              "still missing")
        peers = ", ".join(f"{p.peer} ({p.state}"
                          + (f": wrong bytes of {p.rejected_for}" if p.rejected_for else "")
                          + ")" for p in st.peers) or "none"
        return ModelError(
            f"fetching model {self.model_id[:12]}: {what} after waiting {waited:.0f} s; "
            f"holders: {peers}",
            hint="start a node that holds the model (or put it on one with `ringctl model "
                 "pull` or `import`)")

    def _progress(self, st: TransferStats) -> None:
        try:
            self.on_progress(st)  # type: ignore[misc]
        except Exception:
            log.exception("progress callback failed")

    def _rearm(self) -> None:
        times = [self.next_tick, self.next_holders]
        if self.transfer_at is not None:
            times.append(self.transfer_at)
        if self.retries:
            times.append(self.retries[0][0])
        at = min(times)
        if at != self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = at
            self.timer = self.loop.call_later(max(0.0, at - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self.timer, self.timer_at = None, None
        if self.closed or self.done.done():
            return
        now = time.monotonic()
        if self.transfer_at is not None and now >= self.transfer_at:
            self.transfer.handle_timer(now)
            self.transfer_at = self.transfer.get_timer()
        self.flush()

    # ---------------------------------------------------------------- the end
    def _end(self, error: BaseException | None) -> None:
        if self.done.done():
            return
        st = self.transfer.stats(time.monotonic())
        if self.on_progress is not None:
            self._progress(st)
        if error is None:
            self.done.set_result(st)
        else:
            self.done.set_exception(error)

    async def close(self) -> None:
        """Stop: no timer, nothing more asked; queued writes dropped, the running one waited
        for (the sink is the caller's again when this returns)."""
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.worker.stop()
        await self.worker.stopped
