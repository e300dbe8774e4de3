"""Per-hop round trips of activation frames: our channels against a raw floor and exo-style gRPC.

    .venv/bin/python bench/transport.py            # full run (~2-3 minutes)
    .venv/bin/python bench/transport.py --quick    # fewer round trips

Every case runs an echo server pinned to CPU 1 and a client pinned to CPU 0 (``taskset``),
on loopback, side by side in one run. Figures are p50/p99 round-trip microseconds and the
ratio of the p50 to the floor (the faster of raw blocking UDP and raw blocking TCP carrying
the same bytes). Cases:

- ``floor-udp`` / ``floor-tcp``: blocking sockets, one datagram / one length-prefixed send.
- ``ours``: :class:`ringd.net.transport.Transport` with default settings (AES-GCM on,
  1400-byte datagrams, UDP up to ``tcp_threshold``, TCP above) carrying an ``Activation``.
- ``ours-tcp``: the same forced onto TCP; ``ours-clear``: authentication only (GMAC).
- ``grpc-exo``: a grpc.aio unary call with a protobuf tensor message (bytes + shape +
  dtype) on a gzip channel, the way exo's ``GRPCPeerHandle.send_tensor`` does it.
- datagram table: ``ours`` at 32 KiB with 1400/8192/32768/65000-byte datagrams, with and
  without UDP GSO/GRO; adapter table: echo of 32 KiB as 1400-byte datagrams, no crypto,
  through asyncio-dgram, a uvloop ``DatagramProtocol`` and a readiness callback with GSO/GRO.

Also printed: in-process costs of frame protection (AES-GCM, ChaCha20-Poly1305, GMAC-only,
per packet vs per 1400-byte datagram) and of the MLX tensor conversion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KiB = 1024
SIZES = [1 * KiB, 8 * KiB, 16 * KiB, 32 * KiB, 4 * 1024 * KiB]
KEY = bytes(range(32))


def iters_for(size: int, case: str, quick: bool) -> int:
    if size >= 1 << 20:
        n = 8 if case == "grpc-exo" else 40
    else:
        n = 200 if case == "grpc-exo" else 1000
    return max(5, n // 4) if quick else n


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def report(case: str, size: int, times: list[float], faults: float, **extra: object) -> None:
    print(json.dumps({"case": case, "size": size, "n": len(times), "p50": pct(times, 0.5) * 1e6,
                      "p99": pct(times, 0.99) * 1e6, "minflt": faults, **extra}), flush=True)


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ============================================================ floors (blocking sockets)
def floor_server(kind: str) -> None:
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1], flush=True)
        buf = bytearray(65536)
        while True:
            n, a = s.recvfrom_into(buf)
            if n == 1:
                return
            s.sendto(memoryview(buf)[:n], a)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    print(ls.getsockname()[1], flush=True)
    c, _ = ls.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(8 << 20)
    mv = memoryview(buf)
    while True:
        if not _recv_exact(c, mv[:4]):
            return
        n = int.from_bytes(mv[:4], "little")
        _recv_exact(c, mv[4:4 + n])
        c.sendall(mv[:4 + n])


def _recv_exact(c: socket.socket, mv: memoryview) -> bool:
    got = 0
    while got < len(mv):
        k = c.recv_into(mv[got:])
        if not k:
            return False
        got += k
    return True


def floor_client(kind: str, port: int, quick: bool) -> None:
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.connect(("127.0.0.1", port))
        buf = bytearray(65536)
        for size in [x for x in SIZES if x <= 32 * KiB]:
            data = os.urandom(size)
            n = iters_for(size, "floor", quick)
            ts = []
            for i in range(n + n // 10):
                t0 = time.perf_counter()
                s.send(data)
                s.recv_into(buf)
                ts.append(time.perf_counter() - t0)
            report("floor-udp", size, ts[n // 10:], 0)
        s.send(b"x")
        return
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(8 << 20)
    mv = memoryview(buf)
    for size in SIZES:
        data = size.to_bytes(4, "little") + os.urandom(size)
        n = iters_for(size, "floor", quick)
        ts = []
        f0 = 0
        for i in range(n + n // 10):
            if i == n // 10:
                f0 = faults()
            t0 = time.perf_counter()
            c.sendall(data)
            _recv_exact(c, mv[:4 + size])
            ts.append(time.perf_counter() - t0)
        report("floor-tcp", size, ts[n // 10:], (faults() - f0) / n)
    c.close()


# ============================================================ ours
def _settings(variant: dict):
    from ringd.config import Settings

    return Settings(bind_host="127.0.0.1", port=0, encrypt=variant.get("encrypt", True),
                    datagram_size=variant.get("datagram", 1400),
                    tcp_threshold=0 if variant.get("tcp") else Settings().tcp_threshold)


def _activation(size: int, i: int = 0):
    from ringd.core.wire import Activation, Sampling, Tensor

    return Activation("bench-request", i, i, 1, 0, 10, "client", Sampling(), True,
                      Tensor("float16", (1, size // 2), os.urandom(size)))


async def ours_server(variant: dict) -> None:
    from ringd.net.transport import Transport

    done = asyncio.get_running_loop().create_future()
    t: Transport

    def on_message(sender, addr, msg):
        if getattr(msg, "request_id", "") == "stop":
            done.set_result(None)
            return
        t.send(addr, msg)

    t = Transport(_settings(variant), node_id="server", key=KEY, on_message=on_message,
                  udp_offload=variant.get("gso", True))
    addr = await t.start()
    print(addr[1], flush=True)
    await done
    await t.close()


async def ours_client(variant: dict, port: int, quick: bool, case: str, sizes: list[int]) -> None:
    from ringd.core.wire import Cancel
    from ringd.net.transport import Transport

    loop = asyncio.get_running_loop()
    waiter: list[asyncio.Future] = []

    def on_message(sender, addr, msg):
        if waiter and not waiter[0].done():
            waiter[0].set_result(msg)

    t = Transport(_settings(variant), node_id="client", key=KEY, on_message=on_message,
                  udp_offload=variant.get("gso", True))
    await t.start()
    server = ("127.0.0.1", port)
    for size in sizes:
        msg = _activation(size)
        n = iters_for(size, case, quick)
        ts = []
        f0 = 0
        for i in range(n + n // 10):
            if i == n // 10:
                f0 = faults()
            fut = loop.create_future()
            waiter[:] = [fut]
            t0 = time.perf_counter()
            t.send(server, msg)
            await fut
            ts.append(time.perf_counter() - t0)
        st = t.stats()
        report(case, size, ts[n // 10:], (faults() - f0) / n,
               lost=st["udp"].get("packets_lost", 0), gso=st["udp"].get("gso"))
    t.send(server, Cancel("stop", ""))
    await asyncio.sleep(0.05)  # let the stop message leave before closing
    await t.close()


# ============================================================ exo-style gRPC
def _proto():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FileDescriptorProto(name="bench_node_service.proto", package="node_service",
                                           syntax="proto3")
    L, T = descriptor_pb2.FieldDescriptorProto, descriptor_pb2.FieldDescriptorProto

    def msg(name, fields):
        m = f.message_type.add(name=name)
        for num, (fname, ftype, label, tname) in enumerate(fields, 1):
            fd = m.field.add(name=fname, number=num, type=ftype, label=label)
            if tname:
                fd.type_name = tname

    opt, rep = L.LABEL_OPTIONAL, L.LABEL_REPEATED
    msg("Shard", [("model_id", T.TYPE_STRING, opt, None), ("start_layer", T.TYPE_INT32, opt, None),
                  ("end_layer", T.TYPE_INT32, opt, None), ("n_layers", T.TYPE_INT32, opt, None)])
    msg("Tensor", [("tensor_data", T.TYPE_BYTES, opt, None), ("shape", T.TYPE_INT32, rep, None),
                   ("dtype", T.TYPE_STRING, opt, None)])
    msg("TensorRequest", [("shard", T.TYPE_MESSAGE, opt, ".node_service.Shard"),
                          ("tensor", T.TYPE_MESSAGE, opt, ".node_service.Tensor"),
                          ("request_id", T.TYPE_STRING, opt, None)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    get = message_factory.GetMessageClass
    return (get(pool.FindMessageTypeByName("node_service.Shard")),
            get(pool.FindMessageTypeByName("node_service.Tensor")),
            get(pool.FindMessageTypeByName("node_service.TensorRequest")))


GRPC_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20),
                ("grpc.tcp_nodelay", 1)]


async def grpc_server() -> None:
    import grpc
    import numpy as np

    Shard, Tensor, TensorRequest = _proto()

    async def send_tensor(req, ctx):
        arr = np.frombuffer(req.tensor.tensor_data, dtype=np.dtype(req.tensor.dtype)).reshape(req.tensor.shape)
        return Tensor(tensor_data=arr.tobytes(), shape=list(arr.shape), dtype=str(arr.dtype))

    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("node_service.NodeService", {
        "SendTensor": grpc.unary_unary_rpc_method_handler(
            send_tensor, request_deserializer=TensorRequest.FromString,
            response_serializer=Tensor.SerializeToString)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(None)


async def grpc_client(port: int, quick: bool) -> None:
    import grpc
    import numpy as np

    Shard, Tensor, TensorRequest = _proto()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS,
                                        compression=grpc.Compression.Gzip)
    call = channel.unary_unary("/node_service.NodeService/SendTensor",
                               request_serializer=TensorRequest.SerializeToString,
                               response_deserializer=Tensor.FromString)
    await channel.channel_ready()
    for size in SIZES:
        arr = np.frombuffer(os.urandom(size), dtype=np.float16).reshape(1, size // 2)
        n = iters_for(size, "grpc-exo", quick)
        ts = []
        for i in range(n + n // 10):
            t0 = time.perf_counter()
            req = TensorRequest(shard=Shard(model_id="m", start_layer=0, end_layer=10, n_layers=30),
                                tensor=Tensor(tensor_data=arr.tobytes(), shape=list(arr.shape),
                                              dtype=str(arr.dtype)), request_id="bench-request")
            resp = await call(req)
            np.frombuffer(resp.tensor_data, dtype=np.dtype(resp.dtype)).reshape(resp.shape)
            ts.append(time.perf_counter() - t0)
        report("grpc-exo", size, ts[n // 10:], 0)
    await channel.close()


# ============================================================ adapter choice (no crypto)
ADAPTER_TOTAL = 32 * KiB
ADAPTER_SEG = 1400


async def adapter_server(mode: str) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    nseg = -(-ADAPTER_TOTAL // ADAPTER_SEG)
    if mode == "dgram":
        import asyncio_dgram

        stream = await asyncio_dgram.bind(("127.0.0.1", 0))
        print(stream.sockname[1], flush=True)
        count = 0
        while True:
            data, addr = await stream.recv()
            if len(data) == 1:
                return
            count += 1
            if count == nseg:
                count = 0
                for _ in range(nseg):
                    await stream.send(data, addr)
    if mode == "protocol":
        class Echo(asyncio.DatagramProtocol):
            def connection_made(self, tr):
                self.tr, self.count = tr, 0

            def datagram_received(self, data, addr):
                if len(data) == 1:
                    done.set_result(None)
                    return
                self.count += 1
                if self.count == nseg:
                    self.count = 0
                    for i in range(nseg):
                        self.tr.sendto(data, addr)

        tr, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        print(tr.get_extra_info("sockname")[1], flush=True)
        await done
        return
    from ringd.net.udp import SOL_UDP, UDP_GRO, UDP_SEGMENT

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setsockopt(SOL_UDP, UDP_GRO, 1)
    s.setblocking(False)
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1], flush=True)
    buf = bytearray(65536)
    got = [0]
    payload = bytes(ADAPTER_TOTAL)

    def readable():
        while True:
            try:
                n, anc, _, addr = s.recvmsg_into([buf], 64)
            except BlockingIOError:
                return
            if n == 1:
                done.set_result(None)
                return
            got[0] += n
            if got[0] >= ADAPTER_TOTAL:
                got[0] = 0
                s.sendmsg([payload], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", ADAPTER_SEG))], 0, addr)

    loop.add_reader(s, readable)
    await done


def adapter_client(mode: str, port: int, quick: bool) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.connect(("127.0.0.1", port))
    nseg = -(-ADAPTER_TOTAL // ADAPTER_SEG)
    seg = os.urandom(ADAPTER_SEG)
    buf = bytearray(65536)
    n = iters_for(ADAPTER_TOTAL, "adapter", quick)
    ts = []
    for i in range(n + n // 10):
        t0 = time.perf_counter()
        for _ in range(nseg):
            s.send(seg)
        got = 0
        while got < (ADAPTER_TOTAL if mode == "gso" else nseg * ADAPTER_SEG):
            got += s.recv_into(buf)
        ts.append(time.perf_counter() - t0)
    report(f"adapter-{mode}", ADAPTER_TOTAL, ts[n // 10:], 0)
    s.send(b"x")


# ============================================================ in-process micro-benchmarks
def micro() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    def timeit(f, k):
        f()
        t0 = time.perf_counter()
        for _ in range(k):
            f()
        return (time.perf_counter() - t0) / k * 1e6

    key = os.urandom(32)
    aes, chacha = AESGCM(key), ChaCha20Poly1305(key)
    nonce, aad = os.urandom(12), os.urandom(40)
    data = os.urandom(32 * KiB)
    ct_a, ct_c = aes.encrypt(nonce, data, aad), chacha.encrypt(nonce, data, aad)
    tag = aes.encrypt(nonce, b"", data)
    pieces = [data[i:i + 1350] for i in range(0, len(data), 1350)]
    enc_pieces = [aes.encrypt(nonce, p, aad) for p in pieces]
    k = 3000
    rows = {
        "AES-GCM seal": timeit(lambda: aes.encrypt(nonce, data, aad), k),
        "AES-GCM open": timeit(lambda: aes.decrypt(nonce, ct_a, aad), k),
        "ChaCha20-Poly1305 seal": timeit(lambda: chacha.encrypt(nonce, data, aad), k),
        "ChaCha20-Poly1305 open": timeit(lambda: chacha.decrypt(nonce, ct_c, aad), k),
        "GMAC only (auth, no encryption) seal": timeit(lambda: aes.encrypt(nonce, b"", data), k),
        "GMAC only open": timeit(lambda: aes.decrypt(nonce, tag, data), k),
        "AES-GCM per 1400-B datagram, seal x%d" % len(pieces):
            timeit(lambda: [aes.encrypt(nonce, p, aad) for p in pieces], k // 5),
        "AES-GCM per 1400-B datagram, open x%d" % len(pieces):
            timeit(lambda: [aes.decrypt(nonce, c, aad) for c in enc_pieces], k // 5),
    }
    print(json.dumps({"micro": "crypto-32KiB", "rows": rows}), flush=True)

    import mlx.core as mx

    from ringd.compute.tensors import from_wire, to_wire
    from ringd.core.wire import Tensor, decode, encode

    rows = {}
    for dt in (mx.float16, mx.bfloat16):
        for n in (16 * KiB, 2 * 1024 * KiB):
            a = mx.random.normal((1, n)).astype(dt)
            mx.eval(a)
            w = to_wire(a)
            w2 = Tensor(w.dtype, w.shape, bytes(w.data))
            kk = 2000 if n < 100000 else 50
            name = f"{str(dt).split('.')[-1]} {a.nbytes // KiB} KiB"
            rows[f"to_wire {name}"] = timeit(lambda: to_wire(a), kk)
            rows[f"from_wire {name}"] = timeit(lambda: mx.eval(from_wire(w2)), kk)
    msg = _activation(32 * KiB)
    head, body = encode(msg)
    whole = head + bytes(body)
    rows["encode Activation 32 KiB"] = timeit(lambda: encode(msg), 5000)
    rows["decode Activation 32 KiB"] = timeit(lambda: decode(whole), 5000)
    print(json.dumps({"micro": "codec", "rows": rows}), flush=True)


# ============================================================ orchestration
def spawn(cpu: int, args: list[str], **kw) -> subprocess.Popen:
    cmd = [sys.executable, __file__, *args]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, **kw)


def run_case(server_args: list[str], client_args: list[str], *, stdin: bool = False) -> list[dict]:
    srv = spawn(1, ["--role", "server", *server_args], stdin=subprocess.PIPE if stdin else None)
    port = srv.stdout.readline().strip()  # type: ignore[union-attr]
    cli = spawn(0, ["--role", "client", "--port", port, *client_args])
    out, _ = cli.communicate(timeout=900)
    if stdin:
        srv.stdin.close()  # type: ignore[union-attr]
    try:
        srv.wait(timeout=10)
    except subprocess.TimeoutExpired:
        srv.kill()
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer round trips, one pass")
    ap.add_argument("--repeat", type=int, default=3,
                    help="passes over all cases, interleaved; each figure is the pass with the best p50 "
                         "(robust to other load on the machine)")
    ap.add_argument("--role", choices=["server", "client"], help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role:
        role_main(a)
        return
    q = ["--quick"] if a.quick else []
    passes = 1 if a.quick else max(1, a.repeat)
    print(f"# loopback, server on CPU 1, client on CPU 0, python {sys.version.split()[0]}, "
          f"{passes} pass(es), load average {os.getloadavg()[0]:.1f}", flush=True)
    best: dict[tuple[str, int], dict] = {}

    def keep(rows: list[dict]) -> None:
        for r in rows:
            k = (r["case"], r["size"])
            if k not in best or r["p50"] < best[k]["p50"]:
                best[k] = r

    ours = [("ours", {}), ("ours-tcp", {"tcp": True}), ("ours-clear", {"encrypt": False})]
    for _ in range(passes):
        keep(run_case(["--case", "floor-udp"], ["--case", "floor-udp", *q]))
        keep(run_case(["--case", "floor-tcp"], ["--case", "floor-tcp", *q]))
        for name, v in ours:
            vj = json.dumps(v)
            keep(run_case(["--case", "ours", "--variant", vj], ["--case", name, "--variant", vj, *q]))
        keep(run_case(["--case", "grpc-exo"], ["--case", "grpc-exo", *q], stdin=True))
        for gso in (True, False):
            for size in (1400, 8192, 32768, 65000):
                v = json.dumps({"datagram": size, "gso": gso})
                keep(run_case(["--case", "ours", "--variant", v],
                              ["--case", f"dgram-{size}-{'gso' if gso else 'nogso'}", "--variant", v,
                               "--sizes", str(32 * KiB), *q]))
        for mode in ("dgram", "protocol", "gso"):
            keep(run_case(["--case", f"adapter-{mode}"], ["--case", f"adapter-{mode}", *q]))
    micro_out = subprocess.run([sys.executable, __file__, "--role", "client", "--case", "micro"],
                               capture_output=True, text=True, cwd=ROOT).stdout
    rows = list(best.values())
    print_tables([r for r in rows if not r["case"].startswith(("dgram-", "adapter-"))],
                 [r for r in rows if r["case"].startswith("dgram-")],
                 [r for r in rows if r["case"].startswith("adapter-")],
                 [json.loads(x) for x in micro_out.splitlines() if x.startswith("{")])
    print(f"\n# load average at the end {os.getloadavg()[0]:.1f}")


def role_main(a: argparse.Namespace) -> None:
    from ringd.net.loop import run

    variant = json.loads(a.variant)
    sizes = [int(x) for x in a.sizes.split(",")] if a.sizes else SIZES
    case = a.case
    if a.role == "server":
        if case.startswith("floor-"):
            floor_server(case.split("-")[1])
        elif case == "ours":
            run(ours_server(variant))
        elif case == "grpc-exo":
            run(grpc_server())
        elif case.startswith("adapter-"):
            run(adapter_server(case.split("-")[1]))
        return
    if case.startswith("floor-"):
        floor_client(case.split("-")[1], a.port, a.quick)
    elif case == "grpc-exo":
        run(grpc_client(a.port, a.quick))
    elif case.startswith("adapter-"):
        adapter_client(case.split("-")[1], a.port, a.quick)
    elif case == "micro":
        micro()
    else:
        run(ours_client(variant, a.port, a.quick, case, sizes))


def fmt_size(n: int) -> str:
    return f"{n // (1024 * KiB)} MiB" if n >= 1024 * KiB else f"{n // KiB} KiB"


def print_tables(results: list[dict], dg: list[dict], adapters: list[dict], micro_rows: list[dict]) -> None:
    by = {(r["case"], r["size"]): r for r in results}

    def floor(size: int) -> float:
        fs = [by[(c, size)]["p50"] for c in ("floor-udp", "floor-tcp") if (c, size) in by]
        return min(fs)

    cases = ["floor-udp", "floor-tcp", "ours", "ours-tcp", "ours-clear", "grpc-exo"]
    print("\n## Round trip per hop, p50 / p99 in µs (x = p50 / floor p50)\n")
    print("| case | " + " | ".join(fmt_size(s) for s in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for c in cases:
        cells = []
        for s in SIZES:
            r = by.get((c, s))
            cells.append("—" if r is None else f"{r['p50']:.0f} / {r['p99']:.0f} ({r['p50'] / floor(s):.2f}x)")
        print(f"| {c} | " + " | ".join(cells) + " |")
    big = 4 * 1024 * KiB
    print("\n4 MiB effective throughput (one way = p50 / 2), minor page faults per round trip (client):")
    for c in ("floor-tcp", "ours", "ours-tcp", "ours-clear", "grpc-exo"):
        r = by.get((c, big))
        if r:
            print(f"  {c:11s} {big / (r['p50'] / 2 / 1e6) / 1e9:6.2f} GB/s   {r['minflt']:8.0f} faults")
    g, o = by.get(("grpc-exo", 32 * KiB)), by.get(("ours", 32 * KiB))
    if g and o:
        print(f"\nours vs exo-style gRPC at 32 KiB: {g['p50'] / o['p50']:.1f}x faster (p50)")
    print("\n## 32 KiB frame, datagram size (ours, AES-GCM on), p50 / p99 µs\n")
    print("| datagram | GSO/GRO on | GSO/GRO off |")
    print("|---|---|---|")
    dby = {r["case"]: r for r in dg}
    for size in (1400, 8192, 32768, 65000):
        cells = []
        for g2 in ("gso", "nogso"):
            r = dby.get(f"dgram-{size}-{g2}")
            cells.append("—" if r is None else f"{r['p50']:.0f} / {r['p99']:.0f} ({r['p50'] / floor(32 * KiB):.2f}x)")
        print(f"| {size} B | " + " | ".join(cells) + " |")
    if adapters:
        print("\n## UDP adapter, 32 KiB as 1400-byte datagrams echoed, no crypto, p50 / p99 µs\n")
        for r in adapters:
            print(f"  {r['case']:18s} {r['p50']:7.0f} / {r['p99']:.0f}")
    for m in micro_rows:
        print(f"\n## {m['micro']} (in process, µs per call)\n")
        for k, v in m["rows"].items():
            print(f"  {k:48s} {v:9.1f}")


if __name__ == "__main__":
    main()
