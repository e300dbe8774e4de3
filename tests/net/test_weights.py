"""Weights over real transports on loopback: WeightServer (holders) and Fetcher (new nodes).

Each node is a real :class:`Transport` (encryption on) with a WeightServer and a Fetcher,
wired as the daemon wires them: requests to the server, replies to the fetcher, every send
``bulk=True``. Holders serve copies of the tiny model fixtures.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from ringd.compute.engine import ShardEngine
from ringd.compute.manifest import load_manifest
from ringd.compute.mlx_thread import mlx_executor
from ringd.compute.model_info import inspect_model
from ringd.compute.shard_dir import ShardDir, manifest_sink, small_files, small_files_sink
from ringd.compute.tensor_source import TensorSource
from ringd.config import Settings
from ringd.core.model_manifest import MANIFEST_KEY, ModelManifest
from ringd.core.transfer import TransferConfig, TransferStats
from ringd.core.wire import FetchReply, FetchRequest, Message
from ringd.errors import LocalProtocolError, ModelError
from ringd.net.transport import Transport
from ringd.weights import Fetcher, WeightServer
from tests.net.test_udp import Inbox, on_both_loops

KEY = bytes(range(32))
SETTINGS = Settings(bind_host="127.0.0.1", port=0, mdns=False)
# small chunks: every tensor takes several, several in flight per holder
CFG = TransferConfig(chunk_size=16 << 10, max_in_flight_per_peer=64 << 10,
                     max_in_flight=256 << 10, request_timeout=0.5, max_retries=2,
                     holder_backoff=30.0)


class Node:
    """One node: a transport, a weight server over ``sources``, a fetcher."""

    def __init__(self, name: str, book: dict[str, tuple[str, int]],
                 sources: dict[str, Any] | None = None, *, config: TransferConfig = CFG,
                 serve: Callable[[FetchRequest, str], bool] | None = None,
                 **server_kw: Any) -> None:
        self.name = name
        self.book = book  # node id -> address, shared by the nodes of a test
        self.sources = sources or {}
        self.serve = serve  # a test's filter in front of the server (False: drop the request)
        self.server = WeightServer(self.send, self.sources.get, **server_kw)
        self.fetcher = Fetcher(self.send, config=config, progress_every=0.02)
        self.inbox = Inbox()  # replies when the node has no fetch running
        self.transport: Transport | None = None

    async def start(self) -> "Node":
        self.transport = Transport(SETTINGS, node_id=self.name, key=KEY,
                                   on_message=self._on_message)
        self.book[self.name] = await self.transport.start()
        return self

    def send(self, node_id: str, msg: Message) -> None:
        assert self.transport is not None
        self.transport.send(self.book[node_id], msg, bulk=True)

    def _on_message(self, sender: str, addr: tuple[str, int], msg: Message) -> None:
        if isinstance(msg, FetchRequest):
            if self.serve is None or self.serve(msg, sender):
                self.server.receive(msg, sender)
        elif isinstance(msg, FetchReply):
            if self.fetcher._run is None:
                self.inbox.put((sender, FetchReply(msg.model_id, msg.key, msg.offset,
                                                   msg.status, bytes(msg.data))))
            self.fetcher.receive(msg, sender)

    async def close(self) -> None:
        self.server.close()
        if self.transport is not None:
            await self.transport.close()


def holding(*sources: tuple[str, TensorSource]) -> Callable[[], dict[str, set[str]]]:
    return lambda: {name: s.keys() for name, s in sources}


async def holder_copy(src: Path, dest: Path, corrupt: Collection[str] = ()) -> TensorSource:
    """A copy of ``src`` whose manifest is built, then (silent bit rot) a byte of each of
    ``corrupt``'s tensors flipped with the file's mtime put back: its stamp still matches."""
    def make() -> TensorSource:
        shutil.copytree(src, dest)
        load_manifest(dest)  # hashes recorded with the files' stamps
        index = inspect_model(dest).tensor_index
        for name in corrupt:
            t = index[name]
            path = dest / t.file
            st = path.stat()
            with path.open("r+b") as f:
                f.seek(t.offset + t.nbytes // 2)
                b = f.read(1)
                f.seek(t.offset + t.nbytes // 2)
                f.write(bytes([b[0] ^ 0x5A]))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        return TensorSource(dest)

    return await asyncio.to_thread(make)


async def new_shard_dir(node: Node, model_id: str, holders: Callable[[], dict[str, set[str]]],
                        manifest_size: int, dest: Path) -> tuple[ModelManifest, ShardDir]:
    """What a new node does first: the manifest, then the small files, then the directory."""
    ms = manifest_sink(model_id, manifest_size)
    await node.fetcher.fetch(model_id, {MANIFEST_KEY: manifest_size}, (), ms, holders)
    model = ModelManifest.from_bytes(ms.data(MANIFEST_KEY), expect_id=model_id)
    fs = small_files_sink(model)
    st = await node.fetcher.fetch(model_id, model.item_sizes(model.holdings([])), (), fs,
                                  holders)
    assert st.state == "done" and st.done_bytes == sum(f.size for f in model.files.values())
    sd = await asyncio.to_thread(ShardDir.create, dest, model, small_files(fs, model))
    return model, sd


async def fetch_range(node: Node, model: ModelManifest, sd: ShardDir, start: int, end: int,
                      holders: Callable[[], dict[str, set[str]]], **kw: Any) -> TransferStats:
    want = model.tensors_for(start, end)
    await asyncio.to_thread(sd.plan, want)
    return await node.fetcher.fetch(model.model_id, model.item_sizes(want), sd.present(), sd,
                                    holders, **kw)


def tensors_on_disk(path: Path) -> dict[str, bytes]:
    info = inspect_model(path)
    out = {}
    for name, t in info.tensor_index.items():
        if t.file is not None:
            with (path / t.file).open("rb") as f:
                f.seek(t.offset)
                out[name] = f.read(t.nbytes)
    return out


async def nodes(book: dict, *specs: tuple[str, dict[str, Any]], **kw: Any) -> list[Node]:
    return [await Node(name, book, sources, **kw).start() for name, sources in specs]


# ----------------------------------------------------------------------------- the happy path
@pytest.mark.parametrize("which,start,end", [("float", 2, 4), ("quantized", 4, 6)])
@on_both_loops
async def test_a_new_node_fetches_exactly_its_layers_and_they_compute_the_same(
        which: str, start: int, end: int, tiny_model_dir: Path,
        tiny_quantized_model_dir: Path, tmp_path: Path) -> None:
    full = tiny_model_dir if which == "float" else tiny_quantized_model_dir
    src = await holder_copy(full, tmp_path / "h1")
    book: dict = {}
    h1, n = await nodes(book, ("h1", {src.model_id: src}), ("n", {}))
    dest = tmp_path / "n-shard"
    try:
        holders = holding(("h1", src))
        model, sd = await new_shard_dir(n, src.model_id, holders, src.size(MANIFEST_KEY), dest)
        want = model.tensors_for(start, end)
        if which == "quantized":  # the last shard of a tied model: the norm and the embedding
            assert any(w.startswith("model.embed_tokens.") for w in want)
            assert "model.norm.weight" in want
        seen: list[TransferStats] = []
        st = await fetch_range(n, model, sd, start, end, holders, on_progress=seen.append)
        await asyncio.to_thread(sd.close)
        assert st.state == "done" and st.done_bytes == model.shard_bytes(start, end)
        assert st.wasted_bytes == 0 and st.rejected == () and seen[-1] == st
        assert n.fetcher.stats() is None  # no fetch running
        # the directory holds exactly those tensors, byte for byte the holder's
        on_disk = await asyncio.to_thread(tensors_on_disk, dest)
        assert sorted(on_disk) == want
        for name, data in on_disk.items():
            assert data == src.read(name, 0, src.size(name))
        assert h1.server.totals["bytes_sent"] >= model.shard_bytes(start, end)
        assert n.transport.stats()["udp"]["frames_received"] == 0  # all of it over TCP

        def compute() -> bool:
            a = ShardEngine.load(full, start, end, cpu_split=1)
            b = ShardEngine.load(dest, start, end, cpu_split=1)
            first = ShardEngine.load(full, 0, start, cpu_split=1)
            for e in (a, b, first):
                e.new_request("r")
            x = first.forward("r", mx.array([3, 14, 15, 92], dtype=mx.int32))
            return bool(mx.array_equal(a.forward("r", x), b.forward("r", x)))

        assert await asyncio.get_running_loop().run_in_executor(mlx_executor(), compute)
    finally:
        src.close()
        for node in (h1, n):
            await node.close()


@on_both_loops
async def test_two_holders_serve_in_parallel(tiny_model_dir: Path, tmp_path: Path) -> None:
    s1 = await holder_copy(tiny_model_dir, tmp_path / "h1")
    s2 = await holder_copy(tiny_model_dir, tmp_path / "h2")
    book: dict = {}
    h1, h2, n = await nodes(book, ("h1", {s1.model_id: s1}), ("h2", {s2.model_id: s2}),
                            ("n", {}))
    try:
        holders = holding(("h1", s1), ("h2", s2))
        model, sd = await new_shard_dir(n, s1.model_id, holders, s1.size(MANIFEST_KEY),
                                        tmp_path / "n")
        st = await fetch_range(n, model, sd, 0, 6, holders)  # the whole model
        await asyncio.to_thread(sd.close)
        assert st.state == "done" and st.done_bytes == model.total_bytes
        peers = {p.peer: p for p in st.peers}
        assert peers["h1"].items_done > 0 and peers["h2"].items_done > 0
        assert peers["h1"].bytes + peers["h2"].bytes == model.total_bytes
        assert h1.server.totals["ok"] > 0 and h2.server.totals["ok"] > 0
        assert await asyncio.to_thread(lambda: inspect_model(tmp_path / "n").holds(0, 6))
    finally:
        for s in (s1, s2):
            s.close()
        for node in (h1, h2, n):
            await node.close()


# ----------------------------------------------------------------------------- bad holders
@on_both_loops
async def test_a_holder_with_rotten_bytes_is_named_and_the_other_serves(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    model0 = load_manifest(tiny_model_dir).model
    want = model0.tensors_for(2, 4)
    bad = await holder_copy(tiny_model_dir, tmp_path / "h1", corrupt=want)
    good = await holder_copy(tiny_model_dir, tmp_path / "h2")
    assert bad.model_id == good.model_id  # the rot is silent: the same manifest
    book: dict = {}
    h1, h2, n = await nodes(book, ("h1", {bad.model_id: bad}), ("h2", {good.model_id: good}),
                            ("n", {}))
    try:
        holders = holding(("h1", bad), ("h2", good))
        model, sd = await new_shard_dir(n, good.model_id, holders, good.size(MANIFEST_KEY),
                                        tmp_path / "n")
        st = await fetch_range(n, model, sd, 2, 4, holders)
        await asyncio.to_thread(sd.close)
        assert st.state == "done" and st.done_bytes == model.shard_bytes(2, 4)
        assert st.rejected == ("h1",) and st.wasted_bytes > 0
        peers = {p.peer: p for p in st.peers}
        assert peers["h1"].state == "rejected" and peers["h1"].rejected_for in want
        assert peers["h1"].items_done == 0 and peers["h2"].items_done == len(want)
        on_disk = await asyncio.to_thread(tensors_on_disk, tmp_path / "n")
        assert all(on_disk[w] == good.read(w, 0, good.size(w)) for w in want)
    finally:
        for s in (bad, good):
            s.close()
        for node in (h1, h2, n):
            await node.close()


@on_both_loops
async def test_rotten_bytes_and_no_other_holder_fail_naming_both(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    model0 = load_manifest(tiny_model_dir).model
    want = model0.tensors_for(2, 4)
    bad = await holder_copy(tiny_model_dir, tmp_path / "h1", corrupt=want[:1])
    book: dict = {}
    h1, n = await nodes(book, ("h1", {bad.model_id: bad}), ("n", {}))
    try:
        holders = holding(("h1", bad))
        model, sd = await new_shard_dir(n, bad.model_id, holders, bad.size(MANIFEST_KEY),
                                        tmp_path / "n")
        with pytest.raises(ModelError) as e:
            await fetch_range(n, model, sd, 2, 4, holders)
        assert "h1" in e.value.message and want[0] in e.value.message
        assert "manifest" in e.value.message and e.value.hint
        assert want[0] not in sd.present()
        await asyncio.to_thread(sd.close)
        # nothing crashed: the holder still serves, the fetcher fetches again
        ms = manifest_sink(bad.model_id, bad.size(MANIFEST_KEY))
        st = await n.fetcher.fetch(bad.model_id, {MANIFEST_KEY: bad.size(MANIFEST_KEY)}, (),
                                   ms, holders)
        assert st.state == "done"
    finally:
        bad.close()
        for node in (h1, n):
            await node.close()


@on_both_loops
async def test_a_holder_that_goes_away_midway_is_replaced(tiny_model_dir: Path,
                                                          tmp_path: Path) -> None:
    s1 = await holder_copy(tiny_model_dir, tmp_path / "h1")
    s2 = await holder_copy(tiny_model_dir, tmp_path / "h2")
    book: dict = {}
    served = 0
    gone = asyncio.Event()

    def h1_serve(msg: FetchRequest, sender: str) -> bool:
        nonlocal served
        if msg.key == MANIFEST_KEY or msg.key.startswith("file:"):
            return True
        served += 1
        if served == 6:  # mid-fetch: h1's process dies (its transport closes)
            gone.set()
        return served < 6

    h1 = await Node("h1", book, {s1.model_id: s1}, serve=h1_serve).start()
    h2, n = await nodes(book, ("h2", {s2.model_id: s2}), ("n", {}))
    try:
        holders = holding(("h1", s1), ("h2", s2))  # gossip has not noticed: h1 still listed
        model, sd = await new_shard_dir(n, s1.model_id, holders, s1.size(MANIFEST_KEY),
                                        tmp_path / "n")
        task = asyncio.create_task(fetch_range(n, model, sd, 0, 6, holders))
        await gone.wait()
        await h1.close()
        st = await asyncio.wait_for(task, 30)
        await asyncio.to_thread(sd.close)
        assert st.state == "done" and st.done_bytes == model.total_bytes
        peers = {p.peer: p for p in st.peers}
        assert peers["h1"].timeouts > 0 and peers["h1"].state == "stalled"
        assert peers["h2"].items_done > 0
        assert await asyncio.to_thread(lambda: inspect_model(tmp_path / "n").holds(0, 6))
    finally:
        for s in (s1, s2):
            s.close()
        for node in (h1, h2, n):
            await node.close()


@on_both_loops
async def test_no_holder_at_all_is_a_clear_error_after_the_wait(tiny_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    src = await holder_copy(tiny_model_dir, tmp_path / "h1")
    book: dict = {}
    (n,) = await nodes(book, ("n", {}))
    try:
        ms = manifest_sink(src.model_id, src.size(MANIFEST_KEY))
        with pytest.raises(ModelError, match="no node holds manifest") as e:
            await n.fetcher.fetch(src.model_id, {MANIFEST_KEY: src.size(MANIFEST_KEY)}, (),
                                  ms, lambda: {}, wait_for_holders=0.1)
        assert "holders: none" in e.value.message and e.value.hint
        assert n.fetcher.stats() is None
    finally:
        src.close()
        await n.close()


@on_both_loops
async def test_a_holder_that_comes_later_is_used_once_the_fetcher_is_told(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    src = await holder_copy(tiny_model_dir, tmp_path / "h1")
    book: dict = {}
    h1, n = await nodes(book, ("h1", {src.model_id: src}), ("n", {}))
    n.fetcher.holders_every = 3600.0  # only holders_changed() makes it look again
    known: dict[str, set[str]] = {}
    waiting = asyncio.Event()

    def progress(st: TransferStats) -> None:
        if st.state == "waiting":
            waiting.set()

    try:
        size = src.size(MANIFEST_KEY)
        ms = manifest_sink(src.model_id, size)
        task = asyncio.create_task(n.fetcher.fetch(src.model_id, {MANIFEST_KEY: size}, (), ms,
                                                   lambda: known, on_progress=progress))
        await asyncio.wait_for(waiting.wait(), 10)
        assert n.fetcher.stats()["waiting"] == [MANIFEST_KEY]
        known["h1"] = src.keys()  # gossip: h1 holds the model
        n.fetcher.holders_changed()
        st = await asyncio.wait_for(task, 10)
        assert st.state == "done" and ms.data(MANIFEST_KEY) == src.read(MANIFEST_KEY, 0, size)
    finally:
        src.close()
        for node in (h1, n):
            await node.close()


class FullDisk:
    """A sink whose disk is full."""

    def write(self, key: str, offset: int, data: bytes) -> None:
        raise ModelError("no space left on the disk of /store/x (1.0 MiB still needed)",
                         hint="free space")

    def finish(self, key: str) -> bool:
        raise AssertionError("never reached")


@on_both_loops
async def test_a_sink_that_fails_ends_the_fetch_with_its_error(tiny_model_dir: Path,
                                                                tmp_path: Path) -> None:
    src = await holder_copy(tiny_model_dir, tmp_path / "h1")
    book: dict = {}
    h1, n = await nodes(book, ("h1", {src.model_id: src}), ("n", {}))
    try:
        size = src.size(MANIFEST_KEY)
        with pytest.raises(ModelError, match="no space left on the disk of /store/x"):
            await n.fetcher.fetch(src.model_id, {MANIFEST_KEY: size}, (), FullDisk(),
                                  holding(("h1", src)))
        assert n.fetcher.stats() is None
    finally:
        src.close()
        for node in (h1, n):
            await node.close()


# ----------------------------------------------------------------------------- resume
@on_both_loops
async def test_an_interrupted_fetch_resumes_without_fetching_again(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    src = await holder_copy(tiny_model_dir, tmp_path / "h1")
    book: dict = {}
    answered = 0
    stop_after = 40  # chunks: the holder goes quiet after these (a stalled, slow link)

    def h1_serve(msg: FetchRequest, sender: str) -> bool:
        nonlocal answered
        if msg.key == MANIFEST_KEY or msg.key.startswith("file:"):
            return True
        answered += 1
        return answered <= stop_after

    h1 = await Node("h1", book, {src.model_id: src}, serve=h1_serve).start()
    (n,) = await nodes(book, ("n", {}))
    dest = tmp_path / "n"
    try:
        holders = holding(("h1", src))
        model, sd = await new_shard_dir(n, src.model_id, holders, src.size(MANIFEST_KEY), dest)
        some_done = asyncio.Event()

        def progress(st: TransferStats) -> None:
            if st.items_done >= 2 and answered >= stop_after:  # and the holder went quiet
                some_done.set()

        task = asyncio.create_task(fetch_range(n, model, sd, 0, 6, holders,
                                               on_progress=progress))
        await asyncio.wait_for(some_done.wait(), 30)
        first = n.fetcher.stats()
        assert first is not None and first["items_done"] >= 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert n.fetcher.stats() is None

        def fetch_threads() -> list[threading.Thread]:
            for t in threading.enumerate():
                if t.name.startswith("ringd-fetch"):
                    t.join(5)
            return [t for t in threading.enumerate() if t.name.startswith("ringd-fetch")]

        assert await asyncio.to_thread(fetch_threads) == []  # its worker thread ended
        await asyncio.to_thread(sd.close)  # the node stops; partial items stay on disk
        # a new fetcher and the directory opened again: only what is missing is fetched
        answered = -10**9
        sd2 = await asyncio.to_thread(ShardDir.open, dest, model)
        present = sd2.present()
        assert len(present) >= first["items_done"]
        n2 = await Node("n2", book).start()
        try:
            st = await fetch_range(n2, model, sd2, 0, 6, holders)
        finally:
            await n2.close()
        await asyncio.to_thread(sd2.close)
        assert st.state == "done" and st.present_bytes > 0
        assert st.present_bytes == sum(model.tensors[k].size for k in present)
        assert st.received_bytes == st.done_bytes == model.total_bytes - st.present_bytes
        assert st.received_bytes < model.total_bytes
        on_disk = await asyncio.to_thread(tensors_on_disk, dest)
        assert sorted(on_disk) == sorted(model.tensors)
        assert all(d == src.read(k, 0, src.size(k)) for k, d in on_disk.items())
    finally:
        src.close()
        for node in (h1, n):
            await node.close()


# ----------------------------------------------------------------------------- hostile peers
class GatedSource:
    """A TensorSource whose reads wait for ``gate`` (on the server's read threads)."""

    def __init__(self, inner: TensorSource) -> None:
        self.inner = inner
        self.gate = threading.Event()

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def read(self, key: str, offset: int, length: int) -> bytes:
        self.gate.wait(10)
        return self.inner.read(key, offset, length)


@on_both_loops
async def test_hostile_requests_get_a_status_and_nothing_breaks(tiny_model_dir: Path,
                                                                tmp_path: Path) -> None:
    src = await holder_copy(tiny_model_dir, tmp_path / "h1")
    mid = src.model_id
    book: dict = {}
    h1, c = await nodes(book, ("h1", {mid: src}), ("c", {}))
    name = sorted(k for k in src.keys() if k.startswith("model.layers.2."))[0]
    size = src.size(name)
    try:
        asks = [
            FetchRequest(mid, "../../etc/passwd", 0, 1),  # not a key: looked up, never opened
            FetchRequest(mid, "file:../../etc/passwd", 0, 1),
            FetchRequest(mid, "file:config.json/..", 0, 1),
            FetchRequest(mid, name, size, 1),  # offset past the end
            FetchRequest(mid, name, 0, 16 << 20),  # far more than the item
            FetchRequest(mid, MANIFEST_KEY, 10**12, 4),
            FetchRequest("f" * 32, name, 0, 1),  # a model this node does not hold
            FetchRequest(mid, name, 8, 100),  # a good one
        ]
        for a in asks:
            c.send("h1", a)
        await c.inbox.wait(lambda xs: len(xs) == len(asks))
        got = {(r.key, r.offset, r.model_id): r for _, r in c.inbox.items}
        status = [got[(a.key, a.offset, a.model_id)].status for a in asks]
        assert status == ["bad_request"] * 6 + ["not_held", "ok"]
        assert bytes(got[(name, 8, mid)].data) == src.read(name, 8, 100)
        # a file changed since its hashes were checked: refused, not served
        t = inspect_model(src.path).tensor_index[name]
        os.utime(src.path / t.file, ns=(1, 1))
        c.send("h1", FetchRequest(mid, name, 0, 10))
        await c.inbox.wait(lambda xs: len(xs) == len(asks) + 1)
        assert c.inbox.items[-1][1].status == "not_held"
        assert h1.server.totals["read_errors"] == 1
        assert h1.server.stats()["queued"] == 0
    finally:
        src.close()
        for node in (h1, c):
            await node.close()


@on_both_loops
async def test_too_many_queued_requests_are_told_busy(tiny_model_dir: Path,
                                                      tmp_path: Path) -> None:
    inner = await holder_copy(tiny_model_dir, tmp_path / "h1")
    src = GatedSource(inner)
    mid = inner.model_id
    book: dict = {}
    h1, c = await nodes(book, ("h1", {mid: src}), ("c", {}), max_reads=1, max_queued=2)
    name = sorted(k for k in inner.keys() if k.startswith("model.layers.1."))[0]
    try:
        for off in range(4):
            c.send("h1", FetchRequest(mid, name, off, 4))
        await c.inbox.wait(lambda xs: len(xs) == 2)  # the two beyond the queue, at once
        assert sorted(r.offset for _, r in c.inbox.items) == [2, 3]
        assert {r.status for _, r in c.inbox.items} == {"busy"}
        assert h1.server.stats()["queued"] == 2
        src.gate.set()
        await c.inbox.wait(lambda xs: len(xs) == 4)
        assert [r.status for _, r in c.inbox.items[2:]] == ["ok", "ok"]
        assert h1.server.stats()["queued"] == 0
    finally:
        src.gate.set()
        inner.close()
        for node in (h1, c):
            await node.close()


@on_both_loops
async def test_a_peer_that_does_not_read_its_replies_is_told_busy(tiny_model_dir: Path,
                                                                  tmp_path: Path) -> None:
    src = await holder_copy(tiny_model_dir, tmp_path / "h1")
    mid = src.model_id
    sent = Inbox()
    waiting = {"slow": 0}  # bytes the transport holds for each peer
    server = WeightServer(lambda node, m: sent.put((node, m.offset, m.status)), {mid: src}.get,
                          max_peer_bytes=16 << 20, backlog=lambda node: waiting.get(node, 0))
    name = sorted(k for k in src.keys() if k.startswith("model.layers.0."))[0]
    try:
        server.receive(FetchRequest(mid, name, 0, 64), "slow")
        waiting["slow"] = 16 << 20  # its replies pile up unread
        server.receive(FetchRequest(mid, name, 64, 64), "slow")
        server.receive(FetchRequest(mid, name, 64, 64), "fast")  # others are served
        assert sent.items == [("slow", 64, "busy")]  # at once
        await sent.wait(lambda xs: len(xs) == 3)  # the reads finish on the server's threads
        assert sorted(sent.items[1:]) == [("fast", 64, "ok"), ("slow", 0, "ok")]
        assert server.stats()["queued"] == 0 and server.stats()["peers"] == 0
    finally:
        server.close()
        src.close()


@on_both_loops
async def test_a_busy_holder_is_asked_again_and_the_fetch_completes(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    inner = await holder_copy(tiny_model_dir, tmp_path / "h1")
    src = GatedSource(inner)
    mid = inner.model_id
    book: dict = {}
    h1, n = await nodes(book, ("h1", {mid: src}), ("n", {}), max_reads=1, max_queued=1)
    orig = h1.server.receive

    def receive(msg: FetchRequest, sender: str) -> None:  # reads wait until one was busy
        orig(msg, sender)
        if h1.server.totals["busy"]:
            src.gate.set()

    h1.server.receive = receive  # type: ignore[method-assign]
    try:
        holders = holding(("h1", inner))
        src.gate.set()
        model, sd = await new_shard_dir(n, mid, holders, inner.size(MANIFEST_KEY),
                                        tmp_path / "n")
        src.gate.clear()
        busy = h1.server.totals["busy"]
        st = await fetch_range(n, model, sd, 2, 4, holders)
        await asyncio.to_thread(sd.close)
        assert st.state == "done" and st.done_bytes == model.shard_bytes(2, 4)
        assert h1.server.totals["busy"] > busy and n.fetcher.asked_again > 0
    finally:
        src.gate.set()
        inner.close()
        for node in (h1, n):
            await node.close()


@on_both_loops
async def test_one_fetch_at_a_time_and_chunks_a_request_can_carry() -> None:
    f = Fetcher(lambda *a: None)
    with pytest.raises(LocalProtocolError):
        Fetcher(lambda *a: None, config=TransferConfig(chunk_size=32 << 20,
                                                       max_in_flight_per_peer=32 << 20,
                                                       max_in_flight=64 << 20))
    sink = manifest_sink("0" * 32, 10)
    task = asyncio.create_task(f.fetch("0" * 32, {MANIFEST_KEY: 10}, (), sink, lambda: {}))
    await asyncio.sleep(0)  # let it start
    with pytest.raises(LocalProtocolError, match="another fetch"):
        await f.fetch("0" * 32, {MANIFEST_KEY: 10}, (), sink, lambda: {})
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert f.stats() is None
