"""Weight transfer: fetching a node's shard from peers against a raw TCP copy of the same bytes.

    .venv/bin/python bench/transfer.py                      # ~1-2 minutes
    .venv/bin/python bench/transfer.py --reps 7 --shards 0-10,10-20,all

The default model (``ringd.compute.store.ensure_default_model``, fetched if missing) is
served by holder processes pinned to CPU 1 and fetched by one process pinned to CPU 0
(``taskset``), on loopback, side by side in one run: ``--reps`` passes, the order of the
cases rotated every pass, each case's best and median kept. Per shard (``--shards``: layer
ranges ``A-B`` of the 30 layers, ``all`` = the whole model; the default ``0-10`` and
``10-20`` are the first and middle node's share of a three-node ring) the cases are:

- ``ours-1``: :class:`ringd.weights.Fetcher` over a :class:`ringd.net.transport.Transport`
  (encryption on, as the daemon runs: AES-128-OCB3) from one holder
  (:class:`ringd.weights.WeightServer` over a ``TensorSource`` of the store's directory),
  into a fresh :class:`ringd.compute.shard_dir.ShardDir` (every tensor hashed against the
  manifest, group files synced and published): timed from the first request to the
  directory holding the shard;
- ``ours-2``: the same from two holder processes (both on CPU 1: this machine has two);
- ``ours-1-file``: ``ours-1`` into one preallocated file instead of a shard directory (each
  tensor hashed back from the disk as ``ShardDir.finish`` does, one ``fsync`` at the end):
  the network path and the verification without the directory's bookkeeping (one file and
  its sync per layer, the index);
- ``raw-copy``: the same bytes (each tensor ``pread`` from the model file by the same
  holder-side process kind) over a plain TCP socket into one file on the same disk (plain
  ``pwrite``, one ``fsync`` at the end): no encryption, no hashing, no protocol: the floor
  any copy pays;
- ``raw-net``: the same plain TCP stream, received and dropped (the network alone).

Printed: MB/s per case (best and median of the passes), ``ours / raw-copy`` (the goal:
>= 0.8x), CPU-ms per MiB of the fetching process, and its peak RSS growth during a fetch
(``VmHWM`` after the fetch minus ``VmRSS`` before it, the peak reset with
``/proc/self/clear_refs``) against the shard's size and the transfer's in-flight bounds
(the goal: bounded by those buffers, not by the shard).

Then :func:`ring_spawn_to_ready`: a three-node ring from spawn to ready where only node 1
holds the model (the others fetch their layers), against the same ring with the model on
every node (``--ring-rounds``; 0 skips it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEY = bytes(range(32))
MiB = 1 << 20
RAW_CHUNK = 1 << 20


# ============================================================ shared
def model_dir() -> Path:
    from ringd.compute.store import ensure_default_model
    from ringd.config import Settings

    return ensure_default_model(Settings.load(env=os.environ).model_store)


def shard_names(model: Any, shard: str) -> list[str]:
    if shard == "all":
        return list(model.tensors)
    a, b = (int(x) for x in shard.split("-"))
    return model.tensors_for(a, b)


def rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def stdin_closed(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    """A future done when stdin reaches EOF (the orchestrator's signal to stop)."""
    done = loop.create_future()

    def readable() -> None:
        if not os.read(sys.stdin.fileno(), 4096) and not done.done():
            loop.remove_reader(sys.stdin.fileno())
            done.set_result(None)

    loop.add_reader(sys.stdin.fileno(), readable)
    return done


# ============================================================ holder (CPU 1)
async def holder(name: str) -> None:
    from ringd.compute.tensor_source import TensorSource
    from ringd.config import Settings
    from ringd.core import wire
    from ringd.net.transport import Transport
    from ringd.weights import WeightServer

    src = await asyncio.to_thread(TensorSource, model_dir())
    book: dict[str, tuple[str, int]] = {}
    transport: Transport

    def send(node_id: str, msg: wire.Message) -> None:
        transport.send(book[node_id], msg, bulk=True)

    server = WeightServer(send, {src.model_id: src}.get)

    def on_message(sender: str, addr: tuple[str, int], msg: wire.Message) -> None:
        book[sender] = addr
        if isinstance(msg, wire.FetchRequest):
            server.receive(msg, sender)

    transport = Transport(Settings(bind_host="127.0.0.1", port=0, mdns=False), node_id=name,
                          key=KEY, on_message=on_message)
    addr = await transport.start()
    print(addr[1], flush=True)
    await stdin_closed(asyncio.get_running_loop())
    server.close()
    await transport.close()
    src.close()
    print(json.dumps({"holder": name, "cpu": cpu_seconds(), **server.stats()}), flush=True)


def raw_server() -> None:
    """Plain TCP: per connection, a JSON line naming the tensors, then their bytes in order
    (each ``pread`` from the model file, sent in 1 MiB pieces)."""
    import selectors

    from ringd.compute.model_info import inspect_model

    info = inspect_model(model_dir())
    fds: dict[str, int] = {}
    srv = socket.create_server(("127.0.0.1", 0))
    print(srv.getsockname()[1], flush=True)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ, "accept")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    while True:
        for key, _ in sel.select():
            if key.data == "stdin":
                if not os.read(sys.stdin.fileno(), 4096):
                    print(json.dumps({"holder": "raw", "cpu": cpu_seconds()}), flush=True)
                    return
                continue
            conn, _ = srv.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with conn, conn.makefile("rb") as rf:
                names = json.loads(rf.readline())
                for name in names:
                    t = info.tensor_index[name]
                    fd = fds.get(t.file) or fds.setdefault(
                        t.file, os.open(info.path / t.file, os.O_RDONLY))
                    pos, left = t.offset, t.nbytes
                    while left:
                        data = os.pread(fd, min(RAW_CHUNK, left), pos)
                        conn.sendall(data)
                        pos += len(data)
                        left -= len(data)


# ============================================================ fetcher (CPU 0)
class FileSink:
    """``ours-1-file``: every tensor at its place in one preallocated file; ``finish``
    hashes it back from the disk and compares with the manifest (as ``ShardDir`` does)."""

    def __init__(self, path: Path, model: Any, names: list[str]) -> None:
        self.model = model
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.at: dict[str, int] = {}
        pos = 0
        for n in names:
            self.at[n] = pos
            pos += model.tensors[n].size
        os.posix_fallocate(self.fd, 0, pos)

    def write(self, key: str, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, self.at[key] + offset)

    def finish(self, key: str) -> bool:
        from ringd.compute.shard_dir import _hash_region

        return _hash_region(self.fd, self.at[key], self.model.tensors[key].size) == \
            self.model.tensors[key].hash

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


def hash_rate() -> float:
    """MB/s of the manifest's hash (BLAKE2b-16) on this CPU: what verifying a byte costs."""
    import hashlib

    data = os.urandom(8 * MiB)
    t0 = time.process_time()  # CPU time: other jobs on the machine do not change it much
    for _ in range(8):
        hashlib.blake2b(data, digest_size=16).digest()
    return 8 * len(data) / (time.process_time() - t0) / 1e6


def raw_fetch(port: int, names: list[str], total: int, out: Path | None) -> None:
    buf = bytearray(RAW_CHUNK)
    mv = memoryview(buf)
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644) if out else -1
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(json.dumps(names).encode() + b"\n")
            got = 0
            while got < total:
                n = s.recv_into(mv[:min(RAW_CHUNK, total - got)])
                if not n:
                    raise RuntimeError(f"raw server closed after {got} of {total} bytes")
                if fd >= 0:
                    os.pwrite(fd, mv[:n], got)
                got += n
        if fd >= 0:
            os.fsync(fd)
    finally:
        if fd >= 0:
            os.close(fd)


async def fetcher() -> None:
    from ringd.compute.manifest import load_manifest
    from ringd.compute.shard_dir import ShardDir
    from ringd.config import Settings
    from ringd.core import wire
    from ringd.core.transfer import TransferConfig
    from ringd.net.transport import Transport
    from ringd.weights import Fetcher

    src_dir = model_dir()
    model = (await asyncio.to_thread(load_manifest, src_dir)).model
    files = {n: (src_dir / n).read_bytes() for n in model.files}
    config = TransferConfig()
    book: dict[str, tuple[str, int]] = {}
    transport: Transport

    def send(node_id: str, msg: wire.Message) -> None:
        transport.send(book[node_id], msg, bulk=True)

    fetch = Fetcher(send, config=config)

    def on_message(sender: str, addr: tuple[str, int], msg: wire.Message) -> None:
        if isinstance(msg, wire.FetchReply):
            fetch.receive(msg, sender)

    transport = Transport(Settings(bind_host="127.0.0.1", port=0, mdns=False), node_id="f",
                          key=KEY, on_message=on_message)
    await transport.start()
    work = Path(tempfile.mkdtemp(prefix="ringd-bench-transfer-"))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True, "hash": await asyncio.to_thread(hash_rate),
                      "rss_kib": rss_kib(), "bounds": {
        "chunk": config.chunk_size, "in_flight_per_peer": config.max_in_flight_per_peer,
        "in_flight": config.max_in_flight, "backlog": fetch.max_backlog}}), flush=True)
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            names = shard_names(model, cmd["shard"])
            total = sum(model.tensors[n].size for n in names)
            dest = work / f"run-{cmd['run']}"
            rss0 = rss_kib()
            peak_ok = reset_peak()
            cpu0 = cpu_seconds()
            extra: dict[str, Any] = {}
            if cmd["case"].startswith("raw"):
                out = dest.with_suffix(".bin") if cmd["case"] == "raw-copy" else None
                t0 = time.perf_counter()
                await asyncio.to_thread(raw_fetch, cmd["port"], names, total, out)
                seconds = time.perf_counter() - t0
                if out:
                    out.unlink()
            else:
                if cmd["case"] == "ours-1-file":
                    sd = await asyncio.to_thread(FileSink, dest.with_suffix(".bin"), model,
                                                 names)
                else:
                    sd = await asyncio.to_thread(ShardDir.create, dest, model, files)
                    await asyncio.to_thread(sd.plan, names)
                book.update({h: ("127.0.0.1", p) for h, p in cmd["holders"].items()})
                keys = set(model.holdings([(0, model.num_layers)])) | set(model.tensors)
                held = {h: keys for h in cmd["holders"]}
                t0 = time.perf_counter()
                st = await fetch.fetch(model.model_id, model.item_sizes(names), (), sd,
                                       lambda: held)
                await asyncio.to_thread(sd.close)
                seconds = time.perf_counter() - t0
                assert st.done_bytes == total, st
                extra = {"peers": {p.peer: p.bytes for p in st.peers},
                         "wasted": st.wasted_bytes}
                if isinstance(sd, FileSink):
                    dest.with_suffix(".bin").unlink()
                else:
                    await asyncio.to_thread(shutil.rmtree, dest)
            print(json.dumps({
                "case": cmd["case"], "shard": cmd["shard"], "bytes": total, "seconds": seconds,
                "cpu": cpu_seconds() - cpu0, "rss0_kib": rss0, "hwm_kib": rss_kib("VmHWM"),
                "peak_growth_kib": (rss_kib("VmHWM") - rss0) if peak_ok else None,
                **extra}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        await transport.close()


# ============================================================ orchestration
def spawn(cpu: int, args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, __file__, *args]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)


def first_line(p: subprocess.Popen) -> str:
    line = p.stdout.readline().strip()  # type: ignore[union-attr]
    if not line:
        raise SystemExit(f"a bench process exited ({p.wait()}) before it was ready")
    return line


def ring_spawn_to_ready(rounds: int = 2) -> None:
    """Spawn -> ready of a three-node ring on the default model where only node 1 holds it
    (nodes 2 and 3 start with empty stores and fetch their layers), against the same ring
    with the model already on every node, side by side (alternating, ``rounds`` each)."""
    from ringd.compute.manifest import load_manifest
    from ringd.config import Settings
    from ringd.core.plan import model_shape
    from ringd.localring import DEMO_CONCURRENCY, DEMO_CONTEXT, LocalRing, demo_budgets
    from ringd.compute.model_info import inspect_model

    src = model_dir()
    info = inspect_model(src)
    shape = model_shape(info, Settings(max_context=DEMO_CONTEXT, max_concurrent=DEMO_CONCURRENCY))
    budgets = demo_budgets(shape.total_bytes, 3)
    args = (f"--max-context={DEMO_CONTEXT}", f"--max-concurrent={DEMO_CONCURRENCY}")
    total = load_manifest(src).model.total_bytes
    results: dict[str, list[float]] = {"copied": [], "fetched": []}
    fetched_bytes: list[int] = []
    for rep in range(rounds):
        for case in ("fetched", "copied") if rep % 2 else ("copied", "fetched"):
            with tempfile.TemporaryDirectory(prefix="ringd-bench-") as tmp:
                base = Path(tmp)
                stores = ([src.parent] * 3 if case == "copied"
                          else [src.parent, base / "store2", base / "store3"])
                ring = LocalRing(base / "ring", budgets, src.name, src.parent, stores=stores,
                                 extra_args=args)
                t0 = time.monotonic()
                ring.start()
                try:
                    sts = ring.wait_ready(300)
                    results[case].append(time.monotonic() - t0)
                    if case == "fetched":
                        fetched_bytes = [((s["stats"].get("fetch") or {}).get("done_bytes") or 0)
                                         for s in sts]
                finally:
                    ring.stop()
    print("\n## three-node ring, spawn -> ready (default model; node 1 holds it)")
    print("| case | best s | median s |\n|---|---|---|")
    for case, times in results.items():
        what = ("model on every node" if case == "copied"
                else "nodes 2 and 3 fetch their layers from node 1")
        print(f"| {what} | {min(times):.2f} | {statistics.median(times):.2f} |")
    print(f"bytes fetched per node: {', '.join(f'{b / MiB:.1f} MiB' for b in fetched_bytes)} "
          f"(the model: {total / MiB:.1f} MiB); fetching adds "
          f"{min(results['fetched']) - min(results['copied']):+.2f} s (best rounds)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="passes over all cases (default 5)")
    ap.add_argument("--shards", default="0-10,10-20,all",
                    help="layer ranges A-B, or all (default 0-10,10-20,all)")
    ap.add_argument("--ring-rounds", type=int, default=2,
                    help="rounds of the three-node spawn -> ready comparison (default 2)")
    ap.add_argument("--role", choices=("holder", "raw", "fetcher"), help=argparse.SUPPRESS)
    ap.add_argument("--name", default="h1", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role == "holder":
        from ringd.net.loop import run

        run(holder(a.name))
        return
    if a.role == "raw":
        raw_server()
        return
    if a.role == "fetcher":
        from ringd.net.loop import run

        run(fetcher())
        return

    from ringd.compute.manifest import load_manifest

    src = model_dir()
    model = load_manifest(src).model
    shards = a.shards.split(",")
    print(f"# model {src.name} ({model.total_bytes / MiB:.1f} MiB, {model.num_layers} layers), "
          f"{a.reps} passes, load average {os.getloadavg()[0]:.1f}")
    holders = {name: spawn(1, ["--role", "holder", "--name", name]) for name in ("h1", "h2")}
    raw = spawn(1, ["--role", "raw"])
    fetch = spawn(0, ["--role", "fetcher"])
    procs = [*holders.values(), raw, fetch]
    try:
        ports = {name: int(first_line(p)) for name, p in holders.items()}
        raw_port = int(first_line(raw))
        ready = json.loads(first_line(fetch))
        bounds = {**ready["bounds"], "hash": ready["hash"], "rss_kib": ready["rss_kib"]}
        cases = ["raw-copy", "ours-1", "ours-2", "ours-1-file", "raw-net"]
        rows: list[dict[str, Any]] = []
        run = 0
        for rep in range(a.reps + 1):  # pass 0 warms the page cache and the connections
            order = cases[rep % len(cases):] + cases[:rep % len(cases)]
            for shard in shards:
                for case in order:
                    run += 1
                    cmd = {"run": run, "case": case, "shard": shard, "port": raw_port,
                           "holders": ports if case == "ours-2" else {"h1": ports["h1"]}}
                    fetch.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
                    fetch.stdin.flush()  # type: ignore[union-attr]
                    rows.append({**json.loads(first_line(fetch)), "warm": rep == 0})
        fetch.stdin.close()  # type: ignore[union-attr]
        fetch.wait(30)
        ends = []
        for p in (*holders.values(), raw):
            p.stdin.close()  # type: ignore[union-attr]
            ends.append(json.loads(first_line(p)))
            p.wait(30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    report(rows, shards, cases, bounds, ends, model)
    if a.ring_rounds > 0:
        ring_spawn_to_ready(a.ring_rounds)
    print(f"\n# load average at the end {os.getloadavg()[0]:.1f}")


def report(rows: list[dict[str, Any]], shards: list[str], cases: list[str],
           bounds: dict[str, int], ends: list[dict[str, Any]], model: Any) -> None:
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if not r["warm"]:
            by.setdefault((r["shard"], r["case"]), []).append(r)
    first: dict[tuple[str, str], dict[str, Any]] = {
        (r["shard"], r["case"]): r for r in reversed(rows) if r["warm"]}

    def rate(r: dict[str, Any]) -> float:
        return r["bytes"] / r["seconds"] / 1e6

    def best(shard: str, case: str) -> float | None:
        rs = by.get((shard, case))
        return max(rate(r) for r in rs) if rs else None

    def median(shard: str, case: str) -> float | None:
        rs = by.get((shard, case))
        return statistics.median(rate(r) for r in rs) if rs else None

    print("\n## Fetch throughput, MB/s: best / median of the passes "
          "(fetcher on CPU 0, holders on CPU 1, loopback)\n")
    print("| shard | MiB | " + " | ".join(cases)
          + " | ours-1 / raw-copy | ours-2 / raw-copy | ours-1-file / raw-copy |")
    print("|---|---|" + "---|" * (len(cases) + 3))
    for s in shards:
        size = by[(s, cases[0])][0]["bytes"] / MiB

        def x(case: str, f: Any = best) -> str:
            a, b = f(s, case), f(s, "raw-copy")
            return f"{a / b:.2f}x" if a and b else "—"

        cells = [f"{best(s, c):.0f} / {median(s, c):.0f}" for c in cases]
        print(f"| {s} | {size:.1f} | " + " | ".join(cells)
              + f" | {x('ours-1')} (median {x('ours-1', median)})"
              + f" | {x('ours-2')} (median {x('ours-2', median)})"
              + f" | {x('ours-1-file')} (median {x('ours-1-file', median)}) |")
    print("\n## The fetching process: CPU-ms per MiB (median of the passes); peak RSS growth "
          "during a fetch (VmHWM - RSS before it): the first of its kind in the process "
          "(pass 0), and the largest of the later passes\n")
    print("| shard | case | CPU-ms/MiB | peak RSS growth, first | later (max) | "
          "first / shard size |")
    print("|---|---|---|---|---|---|")

    def mib(kib: int | None) -> float:
        return float("nan") if kib is None else kib / 1024

    for s in shards:
        for c in cases:
            rs = by[(s, c)]
            cpu = statistics.median(r["cpu"] / (r["bytes"] / MiB) * 1e3 for r in rs)
            later = max((mib(r["peak_growth_kib"]) for r in rs), default=float("nan"))
            g0 = mib(first[(s, c)]["peak_growth_kib"]) if (s, c) in first else float("nan")
            print(f"| {s} | {c} | {cpu:.2f} | {g0:.1f} MiB | {later:.1f} MiB | "
                  f"{g0 / (rs[0]['bytes'] / MiB):.2f} |")
    print(f"\nBLAKE2b-16 (the manifest's hash, every fetched byte) in the fetching process: "
          f"{bounds['hash']:.0f} MB per CPU-second ({1e3 / bounds['hash'] * MiB / 1e6:.1f} "
          "CPU-ms/MiB); raw-copy verifies nothing.")
    print(f"In-flight bounds of a fetch: chunk {bounds['chunk'] / MiB:.0f} MiB, "
          f"{bounds['in_flight_per_peer'] / MiB:.0f} MiB per holder, "
          f"{bounds['in_flight'] / MiB:.0f} MiB in all, write backlog "
          f"{bounds['backlog'] / MiB:.0f} MiB.")
    ours = [r for r in rows if r["case"].startswith("ours")]
    if ours:
        top = max(r["hwm_kib"] for r in ours)
        print(f"The fetching process over all its fetches: RSS {bounds['rss_kib'] / 1024:.0f} "
              f"MiB before the first, {top / 1024:.0f} MiB at the highest: "
              f"{(top - bounds['rss_kib']) / 1024:.0f} MiB for shards of up to "
              f"{max(r['bytes'] for r in ours) / MiB:.0f} MiB.")
    two = [r for r in rows if r["case"] == "ours-2"]
    if two:
        share = [min(r["peers"].values()) / max(1, sum(r["peers"].values())) for r in two]
        print(f"Two holders: the smaller holder's share of the bytes, median "
              f"{statistics.median(share):.0%} (one holder per tensor: the "
              f"{max(t.size for t in model.tensors.values()) / MiB:.0f} MiB embedding "
              "comes from one).")
    for e in ends:
        print(f"holder {e.get('holder')}: {e.get('cpu', 0):.1f} CPU-s"
              + (f", {e['ok']} chunks served, {e['busy']} busy" if "ok" in e else ""))
    print("\n## Summary\n")
    raw_cpu = statistics.median(r["cpu"] / (r["bytes"] / MiB) * 1e3 for r in rows
                                if r["case"] == "raw-copy" and not r["warm"])
    hash_cpu = 1e3 / bounds["hash"] * MiB / 1e6
    print(f"  A copy that also hashes every byte, on the fetcher's one CPU, costs at least "
          f"{raw_cpu:.1f} (raw-copy) + {hash_cpu:.1f} (BLAKE2b) CPU-ms/MiB: at most "
          f"{MiB / (raw_cpu + hash_cpu) / 1e3:.0f} MB/s where the CPU is the limit.")
    for s in shards:
        for c in ("ours-1", "ours-2", "ours-1-file"):
            b, r = best(s, c), best(s, "raw-copy")
            if b and r:
                verdict = "meets" if b / r >= 0.8 else "misses"
                print(f"  {s:6s} {c}: {b:6.0f} MB/s = {b / r:.2f}x the raw copy "
                      f"({r:.0f} MB/s): {verdict} the goal of 0.8x")


if __name__ == "__main__":
    main()
