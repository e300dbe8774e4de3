"""Per-hop round trips of activation frames: our channels against raw and asyncio floors and
exo-style gRPC.

    .venv/bin/python bench/transport.py            # full run, 5 passes
                                                   # (~8-10 minutes with the veth cases)
    .venv/bin/python bench/transport.py --quick    # fewer round trips, one pass (~15-30 s)

Every case carries the same float16 activation bytes (:func:`activation_bytes`) and runs an
echo server pinned to CPU 1 and a client pinned to CPU 0 (``taskset``),
on loopback, side by side in one run. The run makes ``--repeat`` (5) passes over all cases
(each pass short: 400 round trips per size up to 32 KiB, 20 at 4 MiB; the order of the cases
reversed every other pass) and keeps, per case and size, the pass with the best p50: on a
machine whose wake-up latency drifts from minute to minute only side-by-side ratios mean
anything, and short interleaved passes give every case the same chances. Figures are p50/p99
round-trip microseconds and the ratio of the p50 to the raw floor (the faster of raw blocking
UDP and raw blocking TCP carrying the same bytes); a second table gives p50 ratios to the
asyncio floor (the fastest of the three ``asyncio-*`` cases). Cases:

- ``floor-udp`` / ``floor-tcp``: blocking sockets, one datagram / one length-prefixed send.
- ``floor-aead`` / ``floor-sealed``: lower bounds, blocking UDP as ``floor-udp`` plus only the
  work an encrypted ringd frame cannot do without, up to 32 KiB: ``floor-aead`` opens and
  seals each datagram with AES-128-OCB3 straight from ``cryptography`` into buffers made once
  (no codec: what any implementation, in any language, that encrypts with the fastest AEAD
  this CPU has must spend); ``floor-sealed`` adds ours' codec and ``Sealer`` (the
  ``bare-sealed`` work without an event loop). Not counted in "the raw floor".
- ``asyncio-aead``: ``floor-aead``'s work on the ``asyncio-udp`` echo: the least any
  encrypting data plane on an event loop (a compiled one included) could cost.
- ``asyncio-udp`` / ``asyncio-tcp`` / ``asyncio-tcp-buf``: the same bytes through two uvloop
  event loops doing no protocol work: the server a ``DatagramProtocol`` echo
  (``transport.sendto(data, addr)``) / a ``Protocol`` echo with 4-byte length framing
  (``TCP_NODELAY``) / the same as a ``BufferedProtocol`` reading into one reused buffer (as
  ``ours`` reads TCP; a ``Protocol`` gets a new ``bytes`` per read, joined per frame, which at
  4 MiB costs more than all of ``ours``' work); the client, per round trip, creates a future,
  sends, and awaits the future resolved from ``datagram_received`` / ``data_received`` /
  ``buffer_updated`` (the client shape of ``ours``). UDP up to 32 KiB as one datagram, TCP at
  every size. The best any asyncio-based data plane could do.
- ``bare-codec`` / ``bare-sealed``: ours' message codec (``wire.encode``/``decode`` of the
  ``Activation``) / codec and frame protection (``Sealer.seal``/``open``, AES-128-OCB3), one
  datagram per message on a readiness callback, with no reliability at all (no acks,
  retransmission, ordering, fragmentation); up to 32 KiB. Between the asyncio floor and
  ``ours`` they price each layer: the codec, the AEAD, then the reliability layer.
- ``ours``: :class:`ringd.net.transport.Transport` with default settings (AES-128-OCB3 on,
  datagrams sized from the path MTU: 65000 B on loopback, UDP up to ``tcp_threshold``, TCP
  above) carrying an ``Activation``.
- ``ours-tcp``: the same forced onto TCP; ``ours-clear``: authentication only (GMAC).
- ``prefill-ours`` / ``prefill-ours-tcp``: ``ours`` / ``ours-tcp`` at 32 KiB while the same
  client keeps one 4 MiB activation (and the server's echo of it) in flight at all times: a
  request's prefill crossing the link while another request decodes.
- ``grpc-exo``: a grpc.aio unary call with a protobuf tensor message (bytes + shape +
  dtype) on a gzip channel, the way exo's ``GRPCPeerHandle.send_tensor`` does it.
- datagram table: ``ours`` at 32 KiB with 1400/8192/32768/65000-byte datagrams, with and
  without UDP GSO/GRO; adapter table: echo of 32 KiB as 1400-byte datagrams, no crypto,
  through asyncio-dgram, a uvloop ``DatagramProtocol`` and a readiness callback with GSO/GRO.
- veth table (root only, needs ``ip`` and network namespaces; skipped with a one-line reason
  otherwise): two namespaces ``rbench-a`` (client, 10.213.0.1) and ``rbench-b`` (server,
  10.213.0.2) joined by a veth pair, at veth MTU 1500 and 9000: ``floor-udp`` (one 32 KiB
  datagram, IP-fragmented at MTU 1500), ``floor-tcp`` and ``ours`` at 32 KiB with
  ``datagram_size`` 1400, MTU - 28 (the largest unfragmented IPv4 UDP payload) and 0 (the
  default: follow the path MTU). The namespaces are deleted at the end, and leftovers named
  ``rbench*`` at the start.

Also printed: in-process costs of frame protection at 32 KiB (AES-GCM, AES-128/256-OCB3,
ChaCha20-Poly1305, GMAC-only, per packet vs per 1400-byte datagram) and at 4 MiB (with GB/s),
and of the MLX tensor conversion; then a summary: at 32 KiB ours / raw floor, ours / asyncio
floor, asyncio floor / raw floor and gRPC / ours (of the best p50s, and the range and median
of each ratio within a pass), and GB/s at 4 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import resource
import shutil
import socket
import statistics
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


def activation_bytes(size: int) -> bytes:
    """``size`` bytes of a float16 activation: values drawn from N(0, 1), seeded by the size.

    Every case carries these bytes. What they hold matters only to gRPC's gzip: random bytes
    don't compress and cost zlib far less work (at 32 KiB, 0.6 ms to deflate and 14 µs to
    inflate, against 0.9 ms and 0.14 ms for these, measured here), while float16 hidden states
    shrink to ~92% (the figure issue 3 quotes), as these do.
    """
    import random

    rng = random.Random(size)
    n = min(size, 64 * KiB) // 2  # larger sizes repeat it: a period beyond deflate's 32 KiB window
    block = struct.pack(f"<{n}e", *[rng.gauss(0.0, 1.0) for _ in range(n)])
    return (block * -(-size // len(block)))[:size]


def iters_for(size: int, case: str, quick: bool) -> int:
    """Measured round trips of one pass (each pass is short; the full run makes 5)."""
    if "-idle-" in case:
        n = IDLE_ROUND_TRIPS
    elif size >= 1 << 20:
        n = 4 if case == "grpc-exo" else 20
    else:
        n = 100 if case == "grpc-exo" else 400
    return max(3, n // 2) if quick else n


IDLE_GAP = 0.3  # s between round trips in the LAN idle cases: a token of a 405B ring (~3.5/s)
IDLE_ROUND_TRIPS = 40


def warmup(n: int) -> int:
    """Unmeasured round trips before the ``n`` measured ones."""
    return max(1, n // 10)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def report(case: str, size: int, times: list[float], faults: float, **extra: object) -> None:
    print(json.dumps({"case": case, "size": size, "n": len(times), "p50": pct(times, 0.5) * 1e6,
                      "p99": pct(times, 0.99) * 1e6, "minflt": faults, **extra}), flush=True)


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ============================================================ floors (blocking sockets)
def floor_server(kind: str, host: str) -> None:
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((host, 0))
        print(s.getsockname()[1], flush=True)
        buf = bytearray(65536)
        while True:
            n, a = s.recvfrom_into(buf)
            if n == 1:
                return
            s.sendto(memoryview(buf)[:n], a)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, 0))
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


# ----- lower bounds: blocking UDP plus the work any encrypted ringd frame needs, nothing else
AEAD_NONCE = 12


def _floor_aead():
    """AES-128-OCB3 (ours' cipher) with buffers made once: ``(aead, plain, out)``."""
    from cryptography.hazmat.primitives.ciphers.aead import AESOCB3

    return AESOCB3(KEY[:16]), bytearray(65536), bytearray(65536)


def _aead_open(aead, plain: bytearray, data: memoryview) -> memoryview:
    """Open ``nonce | ciphertext | tag`` into ``plain``; the plaintext's view."""
    mv = memoryview(plain)[:len(data) - AEAD_NONCE - 16]
    aead.decrypt_into(bytes(data[:AEAD_NONCE]), data[AEAD_NONCE:], None, mv)
    return mv


def _aead_reply(aead, plain: bytearray, out: bytearray, data: memoryview,
                nonce: bytes) -> memoryview:
    """Open ``nonce | ciphertext`` into ``plain`` and seal that again under ``nonce`` into
    ``out``."""
    return _aead_seal(aead, _aead_open(aead, plain, data), out, nonce)


def _aead_seal(aead, data, out: bytearray, nonce: bytes) -> memoryview:
    n = len(data) + AEAD_NONCE + 16
    mv = memoryview(out)[:n]
    mv[:AEAD_NONCE] = nonce
    aead.encrypt_into(nonce, data, None, mv[AEAD_NONCE:])
    return mv


def floor_bound_server(kind: str, host: str) -> None:
    """``floor-aead``: open and seal each datagram again (AES-128-OCB3 straight from
    ``cryptography``, into buffers made once); ``floor-sealed``: ours' ``Sealer.open`` and
    ``wire.decode``, then ``wire.encode`` and ``Sealer.seal`` (a :class:`BareChannel` on a
    blocking socket)."""
    s = _udp_socket(host)
    print(s.getsockname()[1], flush=True)
    if kind == "sealed":
        stop: list[bool] = []
        ch = BareChannel(s, True, None)
        ch.on_message = ch.echo_until(lambda: stop.append(True))
        while not stop:
            ch.readable()
        return
    aead, plain, out = _floor_aead()
    buf = bytearray(65536)
    pn = 1 << 63  # the server's nonces, apart from the client's
    while True:
        n, a = s.recvfrom_into(buf)
        if n == 1:
            return
        pn += 1
        s.sendto(_aead_reply(aead, plain, out, memoryview(buf)[:n],
                             pn.to_bytes(AEAD_NONCE, "little")), a)


def floor_bound_client(kind: str, host: str, port: int, quick: bool, case: str,
                       sizes: list[int]) -> None:
    s = _udp_socket(host)
    server = (host, port)
    got: list[object] = []
    ch = BareChannel(s, True, lambda addr, msg: got.append(msg))
    aead, plain, out = _floor_aead()
    buf = bytearray(65536)
    pn = 0
    for size in [x for x in sizes if x <= 32 * KiB]:
        data, msg = activation_bytes(size), _activation(size)
        n = iters_for(size, case, quick)
        w = warmup(n)
        ts = []
        for i in range(w + n):
            t0 = time.perf_counter()
            if kind == "sealed":
                ch.send(server, msg)
                ch.readable()
            else:
                pn += 1
                s.sendto(_aead_seal(aead, data, out, pn.to_bytes(AEAD_NONCE, "little")), server)
                _aead_open(aead, plain, memoryview(buf)[:s.recv_into(buf)])
            ts.append(time.perf_counter() - t0)
        report(case, size, ts[w:], 0)
    if kind == "sealed":
        from ringd.core.wire import Cancel

        ch.send(server, Cancel("stop", ""))
    else:
        s.sendto(b"x", server)


def _recv_exact(c: socket.socket, mv: memoryview) -> bool:
    got = 0
    while got < len(mv):
        k = c.recv_into(mv[got:])
        if not k:
            return False
        got += k
    return True


def floor_client(kind: str, host: str, port: int, quick: bool, case: str, sizes: list[int],
                 gap: float = 0.0) -> None:
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.connect((host, port))  # default PMTU mode: a datagram above the MTU is IP-fragmented
        buf = bytearray(65536)
        for size in [x for x in sizes if x <= 32 * KiB]:
            data = activation_bytes(size)
            n = iters_for(size, case, quick)
            w = warmup(n)
            ts = []
            for i in range(w + n):
                t0 = time.perf_counter()
                s.send(data)
                s.recv_into(buf)
                ts.append(time.perf_counter() - t0)
            report(case, size, ts[w:], 0)
        s.send(b"x")
        return
    c = socket.create_connection((host, port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(8 << 20)
    mv = memoryview(buf)
    for size in sizes:
        data = size.to_bytes(4, "little") + activation_bytes(size)
        n = iters_for(size, case, quick)
        w = warmup(n)
        ts = []
        f0 = 0
        for i in range(w + n):
            if i == w:
                f0 = faults()
            if gap:
                time.sleep(gap)  # the link idles as between two tokens of a ring
            t0 = time.perf_counter()
            c.sendall(data)
            _recv_exact(c, mv[:4 + size])
            ts.append(time.perf_counter() - t0)
        report(case, size, ts[w:], (faults() - f0) / n)
    c.close()


# ========================================================= asyncio floor (uvloop, no protocol work)
def _udp_socket(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):  # as ours sets them
        s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    s.bind((host, 0))
    return s


def _nodelay(tr: asyncio.BaseTransport) -> None:
    sock = tr.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def asyncio_server(kind: str, host: str) -> None:
    """Echo on the running (uvloop) loop: a ``DatagramProtocol``, or a length-framed ``Protocol``
    (kind ``tcp``) or ``BufferedProtocol`` (kind ``tcp-buf``)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    if kind in ("udp", "aead"):
        aead = _floor_aead() if kind == "aead" else None
        nonces = itertools.count(1 << 63)  # the server's, apart from the client's

        class DgramEcho(asyncio.DatagramProtocol):
            def connection_made(self, tr):
                self.tr = tr

            def datagram_received(self, data, addr):
                if len(data) == 1:
                    done.set_result(None)
                    return
                if aead is not None:  # asyncio-aead: open it, seal it again
                    data = _aead_reply(*aead, memoryview(data),
                                       next(nonces).to_bytes(AEAD_NONCE, "little"))
                self.tr.sendto(data, addr)

        tr, _ = await loop.create_datagram_endpoint(DgramEcho, sock=_udp_socket(host))
        print(tr.get_extra_info("sockname")[1], flush=True)
        await done
        tr.close()
        return

    class StreamEcho(asyncio.Protocol):
        """Echoes each frame (4-byte little-endian length + payload) once it is complete."""

        def connection_made(self, tr):
            _nodelay(tr)
            self.tr, self.parts, self.have, self.need = tr, [], 0, 0

        def data_received(self, data):
            self.parts.append(data)
            self.have += len(data)
            while True:
                if not self.need:
                    if self.have < 4:
                        return
                    head = self.parts[0] if len(self.parts[0]) >= 4 else b"".join(self.parts)
                    self.need = 4 + int.from_bytes(head[:4], "little")
                if self.have < self.need:
                    return
                buf = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
                need, self.need = self.need, 0
                if len(buf) == need:  # the usual case: one frame in flight
                    self.tr.write(buf)
                    self.parts, self.have = [], 0
                    return
                self.tr.write(memoryview(buf)[:need])
                self.parts, self.have = [buf[need:]], len(buf) - need

        def connection_lost(self, exc):
            if not done.done():
                done.set_result(None)

    class BufferedEcho(asyncio.BufferedProtocol):
        """The same echo reading straight into one reused buffer (as ``ours`` reads TCP)."""

        def connection_made(self, tr):
            _nodelay(tr)
            self.tr, self.have, self.need = tr, 0, 0
            self.mv = memoryview(bytearray(8 << 20))

        def get_buffer(self, sizehint):
            return self.mv[self.have:]

        def buffer_updated(self, nbytes):
            self.have += nbytes
            if not self.need and self.have >= 4:
                self.need = 4 + int.from_bytes(self.mv[:4], "little")
            if self.need and self.have >= self.need:
                # one frame in flight: the next one cannot arrive before this echo has left,
                # so the buffer may be reused while the transport still holds the view
                self.tr.write(self.mv[:self.need])
                self.have = self.need = 0

        def connection_lost(self, exc):
            if not done.done():
                done.set_result(None)

    server = await loop.create_server(BufferedEcho if kind == "tcp-buf" else StreamEcho, host, 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await done
    server.close()


async def asyncio_client(kind: str, host: str, port: int, quick: bool, case: str,
                         sizes: list[int]) -> None:
    """Round trips through the running (uvloop) loop, shaped as ``ours_client``'s."""
    from ringd.net.loop import loop_name

    loop = asyncio.get_running_loop()
    waiter: list[asyncio.Future] = []

    aead = _floor_aead() if kind == "aead" else None
    if kind in ("udp", "aead"):
        class DgramClient(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                if aead is not None:
                    _aead_open(aead[0], aead[1], memoryview(data))
                if waiter and not waiter[0].done():
                    waiter[0].set_result(data)

        s = _udp_socket(host)
        s.connect((host, port))  # as floor-udp: a datagram above the MTU is IP-fragmented
        tr, _ = await loop.create_datagram_endpoint(DgramClient, sock=s)
        sizes = [x for x in sizes if x <= 32 * KiB]
    else:
        class StreamClient(asyncio.Protocol):
            """Resolves the waiter with the echoed frame once ``need`` bytes have arrived."""

            def connection_made(self, tr):
                _nodelay(tr)
                self.parts, self.have, self.need = [], 0, 0

            def data_received(self, data):
                self.parts.append(data)
                self.have += len(data)
                if self.have >= self.need and waiter and not waiter[0].done():
                    frame = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
                    self.parts, self.have = [], 0
                    waiter[0].set_result(frame)

        class BufferedClient(asyncio.BufferedProtocol):
            """Reads into one reused buffer; resolves the waiter with a view of the echoed frame."""

            def connection_made(self, tr):
                _nodelay(tr)
                self.have, self.need = 0, 0
                self.mv = memoryview(bytearray(8 << 20))

            def get_buffer(self, sizehint):
                return self.mv[self.have:]

            def buffer_updated(self, nbytes):
                self.have += nbytes
                if self.have >= self.need and waiter and not waiter[0].done():
                    self.have = 0
                    waiter[0].set_result(self.mv[:self.need])

        tr, proto = await loop.create_connection(
            BufferedClient if kind == "tcp-buf" else StreamClient, host, port)
    nonces = itertools.count(1)
    for size in sizes:
        data = (activation_bytes(size) if kind in ("udp", "aead")
                else size.to_bytes(4, "little") + activation_bytes(size))
        n = iters_for(size, case, quick)
        w = warmup(n)
        if kind in ("tcp", "tcp-buf"):
            proto.need = len(data)
        send = tr.write if kind in ("tcp", "tcp-buf") else tr.sendto
        if aead is not None:  # seal each datagram (into the buffer made once) as it is sent
            def send(data, a=aead[0], out=aead[2]):
                tr.sendto(_aead_seal(a, data, out, next(nonces).to_bytes(AEAD_NONCE, "little")))
        ts, flt = await timed_round_trips(loop, waiter, lambda send=send, data=data: send(data),
                                          w, n)
        report(case, size, ts, flt, loop=loop_name(loop))
    if kind in ("udp", "aead"):
        tr.sendto(b"x")
        await asyncio.sleep(0.01)
    tr.close()


async def timed_round_trips(loop, waiter: list, send, warm: int, n: int,
                            gap: float = 0.0) -> tuple[list[float], float]:
    """``warm`` + ``n`` round trips, each: a future in ``waiter[0]``, ``send()``, await it.
    The one client loop of every asyncio case (ours and the asyncio floor): same shape,
    same costs. ``gap``: seconds of idle before each (untimed). Returns the last ``n`` times
    and minor page faults per round trip."""
    ts: list[float] = []
    f0 = 0
    for i in range(warm + n):
        if i == warm:
            f0 = faults()
        if gap:
            await asyncio.sleep(gap)
        fut = loop.create_future()
        waiter[:] = [fut]
        t0 = time.perf_counter()
        send()
        await fut
        ts.append(time.perf_counter() - t0)
    return ts[warm:], (faults() - f0) / n


# ==================================================== bare: ours' codec and sealing, no reliability
class BareChannel:
    """One datagram per message, on a readiness callback as ``ours``' UDP adapter reads:
    ``wire.encode`` (then ``Sealer.seal`` when ``sealed``) out, ``Sealer.open`` and
    ``wire.decode`` in. No acks, retransmission, ordering or fragmentation: what a data plane
    with ours' message codec and frame protection costs before it is made reliable."""

    def __init__(self, sock: socket.socket, sealed: bool, on_message) -> None:
        from ringd.core import seal, wire

        self.wire, self.sock, self.on_message = wire, sock, on_message
        self.channel = seal.CHANNEL_UDP
        self.sealer = seal.Sealer(KEY, "bare", seal.new_session(1, 1)) if sealed else None
        self.pn = 0
        self.buf = bytearray(65536)
        self.view = memoryview(self.buf)

    def echo_until(self, stop):
        """An ``on_message`` for echo servers: send each message back, until the client's
        ``Cancel("stop")``, which calls ``stop()``."""
        def on_message(addr, msg):
            if getattr(msg, "request_id", "") == "stop":
                stop()
            else:
                self.send(addr, msg)
        return on_message

    def send(self, addr: tuple[str, int], msg) -> None:
        head, body = self.wire.encode(msg)
        data = b"".join((head, body))
        if self.sealer is None:
            self.sock.sendto(data, addr)
            return
        self.pn += 1
        unit = self.sealer.seal(self.channel, self.pn, data)
        self.sock.sendmsg([self.pn.to_bytes(8, "little"), unit], (), 0, addr)

    def readable(self) -> None:
        try:
            n, addr = self.sock.recvfrom_into(self.buf)
        except (BlockingIOError, InterruptedError):
            return
        data = self.view[:n]
        if self.sealer is not None:
            pn = int.from_bytes(data[:8], "little")
            _sender, data, _owned = self.sealer.open(self.channel, self.sealer.session, pn,
                                                     data[8:])
        self.on_message(addr, self.wire.decode(data))


def _bare(host: str, sealed: bool, on_message) -> BareChannel:
    sock = _udp_socket(host)
    sock.setblocking(False)
    ch = BareChannel(sock, sealed, on_message)
    asyncio.get_running_loop().add_reader(sock.fileno(), ch.readable)
    return ch


async def bare_server(sealed: bool, host: str) -> None:
    done = asyncio.get_running_loop().create_future()
    ch = _bare(host, sealed, None)
    ch.on_message = ch.echo_until(lambda: done.set_result(None))
    print(ch.sock.getsockname()[1], flush=True)
    await done


async def bare_client(sealed: bool, host: str, port: int, quick: bool, case: str,
                      sizes: list[int]) -> None:
    from ringd.core.wire import Cancel

    loop = asyncio.get_running_loop()
    waiter: list[asyncio.Future] = []

    def on_message(addr, msg):
        if waiter and not waiter[0].done():
            waiter[0].set_result(msg)

    ch = _bare(host, sealed, on_message)
    server = (host, port)
    for size in [x for x in sizes if x <= 32 * KiB]:  # one datagram each
        msg = _activation(size)
        n = iters_for(size, case, quick)
        ts, flt = await timed_round_trips(loop, waiter, lambda msg=msg: ch.send(server, msg),
                                          warmup(n), n)
        report(case, size, ts, flt)
    ch.send(server, Cancel("stop", ""))
    await asyncio.sleep(0.01)


# ============================================================ ours
def _settings(variant: dict):
    """Variant keys: ``host`` (bind address, 127.0.0.1), ``encrypt`` (True), ``datagram``
    (``datagram_size``, the default 0 = follow the path MTU), ``tcp`` (everything over TCP),
    ``gso``."""
    from ringd.config import Settings

    return Settings(bind_host=variant.get("host", "127.0.0.1"), port=0,
                    encrypt=variant.get("encrypt", True),
                    datagram_size=variant.get("datagram", Settings().datagram_size),
                    tcp_threshold=0 if variant.get("tcp") else Settings().tcp_threshold)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _activation(size: int, i: int = 0):
    from ringd.core.requests import SamplingParams
    from ringd.core.wire import Activation, Tensor

    return Activation("bench-request", i, i, 1, 0, 10, "client", SamplingParams(), True,
                      Tensor("float16", (1, size // 2), activation_bytes(size)))


async def ours_server(variant: dict) -> None:
    from ringd.net.transport import Transport

    done = asyncio.get_running_loop().create_future()
    t: Transport

    def on_message(sender, addr, msg):
        if getattr(msg, "request_id", "") == "stop":
            done.set_result(None)
            return
        t.send(addr, msg)

    try:
        t = Transport(_settings(variant), node_id="server", key=KEY, on_message=on_message,
                      udp_offload=variant.get("gso", True))
        addr = await t.start()
    except Exception as e:  # noqa: BLE001 - e.g. a datagram_size this version of Settings rejects
        print(json.dumps({"error": _error(e)}), flush=True)
        return
    print(addr[1], flush=True)
    await done
    await t.close()


async def ours_client(variant: dict, host: str, port: int, quick: bool, case: str, sizes: list[int],
                      gap: float = 0.0) -> None:
    from ringd.core.wire import Cancel
    from ringd.net.transport import Transport

    loop = asyncio.get_running_loop()
    waiter: list[asyncio.Future] = []
    prefill: list[asyncio.Future] = []  # variant "prefill": the echo of the 4 MiB frame in flight

    def on_message(sender, addr, msg):
        w = prefill if getattr(msg, "request_id", "") == "prefill" else waiter
        if w and not w[0].done():
            w[0].set_result(msg)

    async def prefills(count: list[int], stop: list[bool]) -> None:
        """One 4 MiB prefill frame (and its echo) in flight to the server at all times, as
        when a request's prefill crosses the link while another request decodes."""
        big = dataclasses.replace(_activation(4 * 1024 * KiB), request_id="prefill")
        while not stop[0]:
            prefill[:] = [loop.create_future()]
            t.send(server, big)
            await prefill[0]
            count[0] += 1

    t = Transport(_settings(variant), node_id="client", key=KEY, on_message=on_message,
                  udp_offload=variant.get("gso", True))
    await t.start()
    server = (host, port)
    for size in sizes:
        msg = _activation(size)
        n = iters_for(size, case, quick)
        w = warmup(n)
        count, stop = [0], [False]
        bg = loop.create_task(prefills(count, stop)) if variant.get("prefill") else None
        while bg is not None and not prefill:
            await asyncio.sleep(0)  # the first prefill frame is on its way
        ts, flt = await timed_round_trips(loop, waiter, lambda msg=msg: t.send(server, msg),
                                          w, n, gap)
        extra = {}
        if bg is not None:
            stop[0] = True
            await bg  # the last prefill's echo, so the next size starts unloaded
            extra["prefills"] = count[0]
        st = t.stats()
        report(case, size, ts, flt,
               lost=st["udp"].get("packets_lost", 0), gso=st["udp"].get("gso"), **extra)
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


GRPC_OPTIONS = [("grpc.max_receive_message_length", 256 << 20),
                ("grpc.max_send_message_length", 256 << 20), ("grpc.tcp_nodelay", 1)]


async def grpc_server() -> None:
    import grpc
    import numpy as np

    _, Tensor, TensorRequest = _proto()

    async def send_tensor(req, ctx):
        arr = np.frombuffer(req.tensor.tensor_data,
                            dtype=np.dtype(req.tensor.dtype)).reshape(req.tensor.shape)
        return Tensor(tensor_data=arr.tobytes(), shape=list(arr.shape), dtype=str(arr.dtype))

    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "node_service.NodeService", {
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
        arr = np.frombuffer(activation_bytes(size), dtype=np.float16).reshape(1, size // 2)
        n = iters_for(size, "grpc-exo", quick)
        w = warmup(n)
        ts = []
        for i in range(w + n):
            t0 = time.perf_counter()
            req = TensorRequest(shard=Shard(model_id="m", start_layer=0, end_layer=10, n_layers=30),
                                tensor=Tensor(tensor_data=arr.tobytes(), shape=list(arr.shape),
                                              dtype=str(arr.dtype)), request_id="bench-request")
            resp = await call(req)
            np.frombuffer(resp.tensor_data, dtype=np.dtype(resp.dtype)).reshape(resp.shape)
            ts.append(time.perf_counter() - t0)
        report("grpc-exo", size, ts[w:], 0)
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
                n, _anc, _, addr = s.recvmsg_into([buf], 64)
            except BlockingIOError:
                return
            if n == 1:
                done.set_result(None)
                return
            got[0] += n
            if got[0] >= ADAPTER_TOTAL:
                got[0] = 0
                s.sendmsg([payload],
                          [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", ADAPTER_SEG))], 0, addr)

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
    w = warmup(n)
    ts = []
    for i in range(w + n):
        t0 = time.perf_counter()
        for _ in range(nseg):
            s.send(seg)
        got = 0
        while got < (ADAPTER_TOTAL if mode == "gso" else nseg * ADAPTER_SEG):
            got += s.recv_into(buf)
        ts.append(time.perf_counter() - t0)
    report(f"adapter-{mode}", ADAPTER_TOTAL, ts[w:], 0)
    s.send(b"x")


# ============================================================ in-process micro-benchmarks
def micro() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESOCB3, ChaCha20Poly1305

    def timeit(f, k):
        f()
        t0 = time.perf_counter()
        for _ in range(k):
            f()
        return (time.perf_counter() - t0) / k * 1e6

    key = os.urandom(32)
    aes, chacha = AESGCM(key), ChaCha20Poly1305(key)
    ocb128, ocb256 = AESOCB3(key[:16]), AESOCB3(key)
    nonce, aad = os.urandom(12), os.urandom(40)
    data = os.urandom(32 * KiB)
    ct_a, ct_c = aes.encrypt(nonce, data, aad), chacha.encrypt(nonce, data, aad)
    ct_o128, ct_o256 = ocb128.encrypt(nonce, data, aad), ocb256.encrypt(nonce, data, aad)
    tag = aes.encrypt(nonce, b"", data)
    pieces = [data[i:i + 1350] for i in range(0, len(data), 1350)]
    enc_pieces = [aes.encrypt(nonce, p, aad) for p in pieces]
    k = 3000
    rows = {
        "AES-GCM seal": timeit(lambda: aes.encrypt(nonce, data, aad), k),
        "AES-GCM open": timeit(lambda: aes.decrypt(nonce, ct_a, aad), k),
        "AES-128-OCB3 seal": timeit(lambda: ocb128.encrypt(nonce, data, aad), k),
        "AES-128-OCB3 open": timeit(lambda: ocb128.decrypt(nonce, ct_o128, aad), k),
        "AES-256-OCB3 seal": timeit(lambda: ocb256.encrypt(nonce, data, aad), k),
        "AES-256-OCB3 open": timeit(lambda: ocb256.decrypt(nonce, ct_o256, aad), k),
        "ChaCha20-Poly1305 seal": timeit(lambda: chacha.encrypt(nonce, data, aad), k),
        "ChaCha20-Poly1305 open": timeit(lambda: chacha.decrypt(nonce, ct_c, aad), k),
        "GMAC only (auth, no encryption) seal": timeit(lambda: aes.encrypt(nonce, b"", data), k),
        "GMAC only open": timeit(lambda: aes.decrypt(nonce, tag, data), k),
        f"AES-GCM per 1400-B datagram, seal x{len(pieces)}":
            timeit(lambda: [aes.encrypt(nonce, p, aad) for p in pieces], k // 5),
        f"AES-GCM per 1400-B datagram, open x{len(pieces)}":
            timeit(lambda: [aes.decrypt(nonce, c, aad) for c in enc_pieces], k // 5),
    }
    print(json.dumps({"micro": "crypto-32KiB (AES-GCM: 256-bit key)", "rows": rows}), flush=True)

    big = os.urandom(4 * 1024 * KiB)
    ct_a, ct_c, ct_o = (aes.encrypt(nonce, big, aad), chacha.encrypt(nonce, big, aad),
                        ocb128.encrypt(nonce, big, aad))
    tag = aes.encrypt(nonce, b"", big)
    k = 40
    rows = {
        "AES-256-GCM seal": timeit(lambda: aes.encrypt(nonce, big, aad), k),
        "AES-256-GCM open": timeit(lambda: aes.decrypt(nonce, ct_a, aad), k),
        "GMAC only (AES-256) seal": timeit(lambda: aes.encrypt(nonce, b"", big), k),
        "GMAC only (AES-256) open": timeit(lambda: aes.decrypt(nonce, tag, big), k),
        "AES-128-OCB3 seal": timeit(lambda: ocb128.encrypt(nonce, big, aad), k),
        "AES-128-OCB3 open": timeit(lambda: ocb128.decrypt(nonce, ct_o, aad), k),
        "ChaCha20-Poly1305 seal": timeit(lambda: chacha.encrypt(nonce, big, aad), k),
        "ChaCha20-Poly1305 open": timeit(lambda: chacha.decrypt(nonce, ct_c, aad), k),
    }
    print(json.dumps({"micro": "crypto-4MiB", "bytes": len(big), "rows": rows}), flush=True)

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
            rows[f"to_wire {name}"] = timeit(lambda a=a: to_wire(a), kk)
            rows[f"from_wire + eval {name}"] = timeit(lambda w2=w2: mx.eval(from_wire(w2)), kk)
    msg = _activation(32 * KiB)
    head, body = encode(msg)
    whole = head + bytes(body)
    rows["encode Activation 32 KiB"] = timeit(lambda: encode(msg), 5000)
    rows["decode Activation 32 KiB"] = timeit(lambda: decode(whole), 5000)
    print(json.dumps({"micro": "codec", "rows": rows}), flush=True)


# ============================================================ orchestration
def spawn(cpu: int, args: list[str], ns: str | None = None, **kw) -> subprocess.Popen:
    cmd = [sys.executable, __file__, *args]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]  # ip and taskset exec: the pid stays the python's
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, **kw)


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def run_case(server_args: list[str], client_args: list[str], *, stdin: bool = False,
             ns: tuple[str, str] | None = None, timeout: float = 900) -> list[dict]:
    """One server/client pair; ``ns`` = (client namespace, server namespace). A case that cannot
    run comes back as error rows (``case``, ``size``, ``error``) instead of raising."""
    case = _flag(client_args, "--case") or "?"
    sizes = [int(x) for x in (_flag(client_args, "--sizes") or "0").split(",")]

    def errors(msg: str) -> list[dict]:
        return [{"case": case, "size": s, "error": msg} for s in sizes]

    srv = spawn(1, ["--role", "server", *server_args], ns and ns[1],
                stdin=subprocess.PIPE if stdin else None)
    # the client starts (and imports what it needs) while the server does, then reads the port
    cli = spawn(0, ["--role", "client", *client_args], ns and ns[0], stdin=subprocess.PIPE)
    first = srv.stdout.readline().strip()  # type: ignore[union-attr]
    if not first.isdigit():
        for proc in (cli, srv):
            proc.kill()
            proc.wait()
        try:
            return errors(json.loads(first)["error"])
        except (ValueError, KeyError, TypeError):
            return errors(f"server exited ({srv.returncode}) {first[:200]}")
    try:
        out, _ = cli.communicate(first + "\n", timeout=timeout)
    except subprocess.TimeoutExpired:
        cli.kill()
        out, _ = cli.communicate()
        srv.kill()
    if stdin:
        srv.stdin.close()  # type: ignore[union-attr]
    try:
        srv.wait(timeout=10)
    except subprocess.TimeoutExpired:
        srv.kill()
        srv.wait()
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows or errors(f"client exited ({cli.returncode}) with no result"
                          + (f" after {timeout:.0f} s" if cli.returncode and cli.returncode < 0
                             else ""))


# ------------------------------------------------------------ veth pair between two namespaces
VETH_NS = ("rbench-a", "rbench-b")  # client side, server side
VETH_DEV = ("rbench-a0", "rbench-b0")
VETH_ADDR = ("10.213.0.1", "10.213.0.2")
VETH_MTUS = (1500, 9000)


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True, timeout=30)


def _failed(e: BaseException) -> str:
    """Why a setup command failed: the command and the last line it printed."""
    err = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
    return f"`{' '.join(map(str, getattr(e, 'cmd', [])))}` failed: {err[-1] if err else e}"


def veth_cleanup() -> None:
    """Delete every namespace and root-namespace link named rbench* (ours, or left by a killed
    run)."""
    for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                               check=False).stdout.splitlines():
        name = line.split(" ")[0]
        if name.startswith("rbench"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    for line in subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                               check=False).stdout.splitlines():
        parts = line.split(": ")
        name = parts[1].split("@")[0] if len(parts) > 1 else ""
        if name.startswith("rbench"):
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


def veth_setup() -> str | None:
    """Create the namespaces and the veth pair; return why not, or None when ready."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not running as root"
    if not shutil.which("ip"):
        return "no `ip` command"
    veth_cleanup()
    try:
        for ns in VETH_NS:
            _ip("netns", "add", ns)
        _ip("link", "add", VETH_DEV[0], "netns", VETH_NS[0], "type", "veth",
            "peer", "name", VETH_DEV[1], "netns", VETH_NS[1])
        for ns, dev, addr in zip(VETH_NS, VETH_DEV, VETH_ADDR):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("netns", "exec", VETH_NS[0], sys.executable, "-c", "")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        veth_cleanup()
        return _failed(e)
    return None


def veth_set_mtu(mtu: int) -> None:
    for ns, dev in zip(VETH_NS, VETH_DEV):
        _ip("-n", ns, "link", "set", dev, "mtu", str(mtu))



def veth_cases(mtu: int) -> list[tuple[str, list[str], list[str]]]:
    """(case, server args, client args) at one MTU; every case at 32 KiB."""
    host = VETH_ADDR[1]
    common = ["--host", host, "--sizes", str(32 * KiB)]
    out = [(f"veth-{mtu}-floor-{k}", ["--case", f"floor-{k}", "--host", host],
            ["--case", f"veth-{mtu}-floor-{k}", *common]) for k in ("udp", "tcp")]
    for label, extra in (("1400", {"datagram": 1400}), ("mtu", {"datagram": mtu - 28}),
                         ("auto", {}), ("tcp", {"tcp": True})):
        srv, cli = (json.dumps({"host": VETH_ADDR[1], **extra}),
                    json.dumps({"host": VETH_ADDR[0], **extra}))
        out.append((f"veth-{mtu}-ours-{label}", ["--case", "ours", "--variant", srv],
                    ["--case", f"veth-{mtu}-ours-{label}", "--variant", cli, *common]))
    return out


# ------------------------------------------------------------ the veth link with loss, after idle
LAN_MTU = 1500
LAN_LOSS = 1  # percent of packets dropped on arrival, each way
LAN_CONDITIONS = ("clean", "loss", "idle")
LAN_KINDS = ("floor-tcp", "ours-auto", "ours-tcp")


def lan_loss(loss: int) -> str | None:
    """Drop ``loss`` % of the packets arriving at each end of the veth link (nftables
    ``numgen random``; ``tc netem`` is not in this kernel). Returns why not, or None.

    Segmenting in software before the link instead (``gso_max_segs 1``), so that single wire
    packets are dropped, was tried: raw TCP then took ~1.5 ms per 32 KiB round trip even
    without loss, so that setup measures the veth, not the protocols."""
    try:
        for ns in VETH_NS:
            subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "rbench"],
                           capture_output=True, check=False, timeout=30)
            if loss:
                _ip("netns", "exec", ns, "nft", "add", "table", "inet", "rbench")
                _ip("netns", "exec", ns, "nft", "add", "chain", "inet", "rbench", "in",
                    "{ type filter hook input priority 0; }")
                _ip("netns", "exec", ns, "nft", "add", "rule", "inet", "rbench", "in",
                    "numgen", "random", "mod", "100", "<", str(loss), "drop")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        return _failed(e)
    return None


def lan_cases(cond: str) -> list[tuple[list[str], list[str]]]:
    """(server args, client args) of :data:`LAN_KINDS`: the veth cases at ``LAN_MTU`` renamed
    ``lan-<cond>-<kind>``; ``idle``: ``IDLE_GAP`` of silence before each round trip (an idle
    TCP connection restarts slow start, so a 32 KiB frame no longer fits its first flight;
    the UDP channel sends all its segments at once)."""
    out = []
    for case, srv_args, cli_args in veth_cases(LAN_MTU):
        kind = case.split("-", 2)[2]
        if kind in LAN_KINDS:
            cli = [*cli_args, *(["--gap", str(IDLE_GAP)] if cond == "idle" else [])]
            cli[cli.index("--case") + 1] = f"lan-{cond}-{kind}"
            out.append((srv_args, cli))
    return out


def run_lan(q: list[str], keep, p: int) -> str | None:
    """Every LAN case once (not per pass: the idle ones take IDLE_ROUND_TRIPS x IDLE_GAP each).
    Returns why they could not run, or None."""
    if not shutil.which("nft"):
        return "no `nft` command (Debian package nftables)"
    veth_set_mtu(LAN_MTU)
    try:
        for cond in LAN_CONDITIONS:
            why = lan_loss(LAN_LOSS if cond == "loss" else 0)
            if why:
                return why
            for srv_args, cli_args in lan_cases(cond):
                keep(run_case(srv_args, [*cli_args, *q], ns=VETH_NS, timeout=300), p)
    finally:
        lan_loss(0)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--quick", action="store_true", help="fewer round trips, one pass")
    ap.add_argument("--repeat", type=int, default=5,
                    help="short passes over all cases, interleaved; each figure is the pass with "
                         "the best p50 (robust to other load on the machine); --quick makes one")
    ap.add_argument("--role", choices=["server", "client"], help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)  # else read from stdin
    ap.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="", help=argparse.SUPPRESS)
    ap.add_argument("--gap", type=float, default=0.0,
                    help=argparse.SUPPRESS)  # idle s before each round trip
    a = ap.parse_args()
    if a.role:
        role_main(a)
        return
    q = ["--quick"] if a.quick else []
    passes = 1 if a.quick else max(1, a.repeat)
    print(f"# loopback, server on CPU 1, client on CPU 0, python {sys.version.split()[0]}, "
          f"{passes} pass(es), load average {os.getloadavg()[0]:.1f}", flush=True)
    best: dict[tuple[str, int], dict] = {}
    every: list[dict] = []  # all rows of all passes, with "pass"

    def keep(rows: list[dict], p: int) -> None:
        for r in rows:
            r["pass"] = p
            every.append(r)
            k = (r["case"], r["size"])
            old = best.get(k)
            if old is None or ("error" not in r and ("error" in old or r["p50"] < old["p50"])):
                best[k] = r

    # one pass: (veth MTU or None, server args, client args, run_case keywords)
    plan: list[tuple[int | None, list[str], list[str], dict]] = []
    for k in ("udp", "tcp"):
        plan.append((None, ["--case", f"floor-{k}"], ["--case", f"floor-{k}"], {}))
    for c in (*BOUND_FLOORS, *ASYNCIO_FLOORS, *ASYNCIO_BOUNDS, *BARE_CASES):
        plan.append((None, ["--case", c], ["--case", c], {}))
    for name, v in [("ours", {}), ("ours-tcp", {"tcp": True}), ("ours-clear", {"encrypt": False})]:
        vj = json.dumps(v)
        plan.append((None, ["--case", "ours", "--variant", vj],
                     ["--case", name, "--variant", vj], {}))
    plan.append((None, ["--case", "grpc-exo"], ["--case", "grpc-exo"], {"stdin": True}))
    for name, v in PREFILL_CASES:
        vj = json.dumps(v)
        plan.append((None, ["--case", "ours", "--variant", vj],
                     ["--case", name, "--variant", vj, "--sizes", str(32 * KiB)], {}))
    for gso in (True, False):
        for size in (1400, 8192, 32768, 65000):
            v = json.dumps({"datagram": size, "gso": gso})
            plan.append((None, ["--case", "ours", "--variant", v],
                         ["--case", f"dgram-{size}-{'gso' if gso else 'nogso'}", "--variant", v,
                          "--sizes", str(32 * KiB)], {}))
    for mode in ("dgram", "protocol", "gso"):
        plan.append((None, ["--case", f"adapter-{mode}"], ["--case", f"adapter-{mode}"], {}))
    veth_skip = veth_setup()
    if veth_skip is None:
        for mtu in VETH_MTUS:
            for _case, srv_args, cli_args in veth_cases(mtu):
                plan.append((mtu, srv_args, cli_args, {"ns": VETH_NS, "timeout": 30}))
    try:
        mtu_now = None
        for p in range(passes):
            # every other pass in reverse, so no case always runs right after the same neighbour
            for mtu, srv_args, cli_args, kw in (plan if p % 2 == 0 else plan[::-1]):
                if mtu is not None and mtu != mtu_now:
                    veth_set_mtu(mtu)
                    mtu_now = mtu
                keep(run_case(srv_args, [*cli_args, *q], **kw), p)
        lan_skip = veth_skip if veth_skip is not None else run_lan(q, keep, passes)
    finally:
        if veth_skip is None:
            veth_cleanup()
    micro_out = subprocess.run([sys.executable, __file__, "--role", "client", "--case", "micro"],
                               capture_output=True, text=True, cwd=ROOT, check=False).stdout
    rows = list(best.values())
    lan_rows = [r for r in rows if r["case"].startswith("lan-")]
    print_tables([r for r in rows if not r["case"].startswith(("dgram-", "adapter-", "veth-",
                                                               "lan-", "prefill-"))],
                 [r for r in rows if r["case"].startswith("dgram-")],
                 [r for r in rows if r["case"].startswith("adapter-")],
                 [json.loads(x) for x in micro_out.splitlines() if x.startswith("{")],
                 [r for r in rows if r["case"].startswith("veth-")], veth_skip)
    print_prefill(rows)
    print_lan(lan_rows, lan_skip)
    print_summary(rows, every, passes)
    print(f"\n# load average at the end {os.getloadavg()[0]:.1f}")


def _preimport(case: str) -> None:
    """Import what a client case needs before it waits for the server's port."""
    if case == "grpc-exo":
        import grpc  # noqa: F401
        import numpy  # noqa: F401

        _proto()
    elif not case.startswith(("asyncio-", "adapter-")) and "floor-" not in case:
        import ringd.core.wire
        import ringd.net.transport  # noqa: F401


def role_main(a: argparse.Namespace) -> None:
    from ringd.net.loop import run

    variant = json.loads(a.variant)
    sizes = [int(x) for x in a.sizes.split(",")] if a.sizes else SIZES
    case = a.case
    if a.role == "server":
        if case in BOUND_FLOORS:
            floor_bound_server(case.split("-")[1], a.host)
        elif case.startswith("floor-"):
            floor_server(case.split("-")[1], a.host)
        elif case.startswith("asyncio-"):
            run(asyncio_server(case.split("-", 1)[1], a.host))
        elif case == "ours":
            run(ours_server(variant))
        elif case in BARE_CASES:
            run(bare_server(case == "bare-sealed", a.host))
        elif case == "grpc-exo":
            run(grpc_server())
        elif case.startswith("adapter-"):
            run(adapter_server(case.split("-")[1]))
        return
    if case == "micro":
        micro()
        return
    if a.port is None:
        _preimport(case)
        line = sys.stdin.readline().strip()  # the server's port, once it listens
        if not line.isdigit():
            return
        a.port = int(line)
    if case.startswith("asyncio-"):
        run(asyncio_client(case.split("-", 1)[1], a.host, a.port, a.quick, case, sizes))
    elif case in BOUND_FLOORS:
        floor_bound_client(case.split("-")[1], a.host, a.port, a.quick, case, sizes)
    elif "floor-" in case:  # floor-udp, veth-1500-floor-tcp, ...
        floor_client(case.rsplit("-", 1)[-1], a.host, a.port, a.quick, case, sizes, a.gap)
    elif case == "grpc-exo":
        run(grpc_client(a.port, a.quick))
    elif case.startswith("adapter-"):
        adapter_client(case.split("-")[1], a.port, a.quick)
    elif case in BARE_CASES:
        run(bare_client(case == "bare-sealed", a.host, a.port, a.quick, case, sizes))
    else:
        run(ours_client(variant, a.host, a.port, a.quick, case, sizes, a.gap))


def fmt_size(n: int) -> str:
    return f"{n // (1024 * KiB)} MiB" if n >= 1024 * KiB else f"{n // KiB} KiB"


RAW_FLOORS = ("floor-udp", "floor-tcp")
BOUND_FLOORS = ("floor-aead", "floor-sealed")
PREFILL_CASES = [("prefill-ours", {"prefill": True}),
                 ("prefill-ours-tcp", {"prefill": True, "tcp": True})]
ASYNCIO_FLOORS = ("asyncio-udp", "asyncio-tcp", "asyncio-tcp-buf")
ASYNCIO_BOUNDS = ("asyncio-aead",)  # the asyncio UDP floor + floor-aead's work: not a floor
BARE_CASES = ("bare-codec", "bare-sealed")
MAIN_CASES = [*RAW_FLOORS, *BOUND_FLOORS, *ASYNCIO_FLOORS, *ASYNCIO_BOUNDS, *BARE_CASES,
              "ours", "ours-tcp", "ours-clear", "grpc-exo"]


def _floor(by: dict, size: int, cases: tuple[str, ...] = RAW_FLOORS) -> float | None:
    """The fastest p50 of ``cases`` at ``size`` (the raw floor, or with ASYNCIO_FLOORS the
    asyncio one)."""
    fs = [by[(c, size)]["p50"] for c in cases if (c, size) in by and "error" not in by[(c, size)]]
    return min(fs) if fs else None


def _ratio(num: dict | None, den: float | None) -> float | None:
    return num["p50"] / den if num and "error" not in num and den else None


def _p50(r: dict | None) -> float | None:
    return r["p50"] if r and "error" not in r else None


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def print_tables(results: list[dict], dg: list[dict], adapters: list[dict], micro_rows: list[dict],
                 veth: list[dict], veth_skip: str | None) -> None:
    by = {(r["case"], r["size"]): r for r in results}

    def floor(size: int) -> float:
        return _floor(by, size) or float("nan")

    print("\n## Round trip per hop, p50 / p99 in µs (x = p50 / raw floor p50)\n")
    print("| case | " + " | ".join(fmt_size(s) for s in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for c in MAIN_CASES:
        cells = []
        for s in SIZES:
            r = by.get((c, s))
            cells.append("—" if r is None else f"error: {r['error']}" if "error" in r
                         else f"{r['p50']:.0f} / {r['p99']:.0f} ({r['p50'] / floor(s):.2f}x)")
        print(f"| {c} | " + " | ".join(cells) + " |")
    loops = {r.get("loop") for r in results
             if r["case"].startswith("asyncio-") and "error" not in r}
    if loops - {"uvloop"}:
        print(f"\n(asyncio floor ran on: {', '.join(sorted(map(str, loops)))} -- not uvloop)")
    print("\np50 ratios to the asyncio floor (the fastest of asyncio-udp, asyncio-tcp and "
          "asyncio-tcp-buf at each size):\n")
    print("| ratio | " + " | ".join(fmt_size(s) for s in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for c in (*BARE_CASES, "ours", "ours-tcp", "ours-clear", "grpc-exo"):
        print(f"| {c} / asyncio floor | "
              + " | ".join(_x(_ratio(by.get((c, s)), _floor(by, s, ASYNCIO_FLOORS)))
                           for s in SIZES) + " |")
    print("| asyncio floor / raw floor | " + " | ".join(
        _x(a / f if (a := _floor(by, s, ASYNCIO_FLOORS)) and (f := _floor(by, s)) else None)
        for s in SIZES) + " |")
    print("\n## 32 KiB frame, datagram size (ours, AES-128-OCB3 on; default on loopback: 65000 B), "
          "p50 / p99 µs (x raw floor)\n")
    print("| datagram | GSO/GRO on | GSO/GRO off |")
    print("|---|---|---|")
    dby = {r["case"]: r for r in dg}
    for size in (1400, 8192, 32768, 65000):
        cells = []
        for g2 in ("gso", "nogso"):
            r = dby.get(f"dgram-{size}-{g2}")
            cells.append("—" if r is None else f"{r['p50']:.0f} / {r['p99']:.0f} "
                                               f"({r['p50'] / floor(32 * KiB):.2f}x)")
        print(f"| {size} B | " + " | ".join(cells) + " |")
    if adapters:
        print("\n## UDP adapter, 32 KiB as 1400-byte datagrams echoed, no crypto, p50 / p99 µs\n")
        for r in adapters:
            print(f"  {r['case']:18s} {r['p50']:7.0f} / {r['p99']:.0f}")
    print_veth(veth, veth_skip)
    for m in micro_rows:
        nbytes = m.get("bytes")
        print(f"\n## {m['micro']} (in process, µs per call{', GB/s' if nbytes else ''})\n")
        for k, v in m["rows"].items():
            print(f"  {k:48s} {v:9.1f}" + (f"  {nbytes / v / 1e3:6.2f} GB/s" if nbytes else ""))


def print_summary(rows: list[dict], every: list[dict], passes: int) -> None:
    """32 KiB ratios (best p50s, and their spread within passes) and 4 MiB throughput."""
    by = {(r["case"], r["size"]): r for r in rows}
    per_pass: dict[int, dict] = {}
    for r in every:
        per_pass.setdefault(r["pass"], {})[(r["case"], r["size"])] = r
    mid, big = 32 * KiB, 4 * 1024 * KiB

    def asyncio_over_raw(b: dict) -> float | None:
        a, f = _floor(b, mid, ASYNCIO_FLOORS), _floor(b, mid)
        return a / f if a and f else None

    def grpc_over_ours(b: dict) -> float | None:
        return _ratio(b.get(("grpc-exo", mid)), _p50(b.get(("ours", mid))))

    lines = [("ours / raw floor", lambda b: _ratio(b.get(("ours", mid)), _floor(b, mid))),
             ("ours / asyncio floor",
              lambda b: _ratio(b.get(("ours", mid)), _floor(b, mid, ASYNCIO_FLOORS))),
             ("asyncio floor / raw floor", asyncio_over_raw),
             ("floor-aead / raw floor",
              lambda b: _ratio(b.get(("floor-aead", mid)), _floor(b, mid))),
             ("floor-sealed / raw floor",
              lambda b: _ratio(b.get(("floor-sealed", mid)), _floor(b, mid))),
             ("asyncio-aead / raw floor",
              lambda b: _ratio(b.get(("asyncio-aead", mid)), _floor(b, mid))),
             ("gRPC / floor-aead",
              lambda b: _ratio(b.get(("grpc-exo", mid)), _p50(b.get(("floor-aead", mid))))),
             ("gRPC / asyncio-aead",
              lambda b: _ratio(b.get(("grpc-exo", mid)), _p50(b.get(("asyncio-aead", mid))))),
             ("bare-sealed / raw floor",
              lambda b: _ratio(b.get(("bare-sealed", mid)), _floor(b, mid))),
             ("ours / floor-aead",
              lambda b: _ratio(b.get(("ours", mid)), _p50(b.get(("floor-aead", mid))))),
             ("ours / bare-sealed",
              lambda b: _ratio(b.get(("ours", mid)), _p50(b.get(("bare-sealed", mid))))),
             ("gRPC (exo-style) / ours", grpc_over_ours)]
    print("\n## Summary\n")
    print("32 KiB round trip, p50 ratios: of the best p50s"
          + (f" of {passes} passes; then the range and the median of the same ratio within "
             "each pass:" if passes > 1 else ":"))
    for name, f in lines:
        line = f"  {name:26s} {_x(f(by)):>7s}"
        vals = sorted(v for v in (f(b) for b in per_pass.values()) if v is not None)
        if passes > 1 and vals:
            line += (f"   per pass {vals[0]:.2f}-{vals[-1]:.2f}x, "
                     f"median {statistics.median(vals):.2f}x")
        print(line)
    print("\n4 MiB effective throughput (one way = p50 / 2), minor page faults per round trip "
          "(client):")
    for c in ("floor-tcp", "asyncio-tcp", "asyncio-tcp-buf", "ours", "ours-tcp", "ours-clear",
              "grpc-exo"):
        r = by.get((c, big))
        if r and "error" not in r:
            print(f"  {c:15s} {big / (r['p50'] / 2 / 1e6) / 1e9:6.2f} GB/s   "
                  f"{r['minflt']:8.0f} faults")


def print_prefill(rows: list[dict]) -> None:
    """32 KiB round trips with a 4 MiB prefill always in flight on the same link."""
    by = {(r["case"], r["size"]): r for r in rows}
    mid = 32 * KiB
    print("\n## 32 KiB round trip while 4 MiB prefill frames cross the same link, p50 / p99 µs\n")
    print("One 4 MiB activation and its echo in flight at all times (a request's prefill), "
          "while another\n"
          "request's decode steps are timed. UDP (default): decode steps go by UDP, "
          "prefills by TCP;\n"
          "TCP: both share the one connection, and a decode step waits behind the "
          "prefill's records.\n")
    print("| channel | idle link | under prefill (x idle) | prefills during the run |")
    print("|---|---|---|---|")
    def cell(r: dict | None) -> str:
        return ("—" if r is None else f"error: {r['error']}" if "error" in r
                else f"{r['p50']:.0f} / {r['p99']:.0f}")

    for label, idle, loaded in (("UDP (default)", "ours", "prefill-ours"),
                                ("TCP", "ours-tcp", "prefill-ours-tcp")):
        a, b = by.get((idle, mid)), by.get((loaded, mid))
        x = (f" ({b['p50'] / a['p50']:.1f}x)" if a and b and "error" not in a and "error" not in b
             else "")
        print(f"| {label} | {cell(a)} | {cell(b)}{x} | {b.get('prefills', '—') if b else '—'} |")


def print_veth(rows: list[dict], skip: str | None) -> None:
    if skip is not None:
        print(f"\n(veth path-MTU cases skipped: {skip})")
        return
    vby = {r["case"]: r for r in rows}
    print("\n## 32 KiB frame over veth, MTU 1500 / 9000, p50 / p99 µs (x floor)\n")
    print("Two network namespaces joined by a veth pair. floor = the faster of floor-udp and "
          "floor-tcp at that MTU;\nfloor-udp sends one 32 KiB datagram, which the kernel "
          "IP-fragments (23 fragments at MTU 1500, 4 at 9000).\n")
    print("| case | " + " | ".join(f"MTU {m}" for m in VETH_MTUS) + " |")
    print("|---|" + "---|" * len(VETH_MTUS))
    labels = [("floor-udp", "floor-udp"), ("floor-tcp", "floor-tcp"),
              ("ours-1400", "ours, 1400-B datagrams"),
              ("ours-mtu",
               "ours, MTU-28 datagrams (" + " / ".join(str(m - 28) for m in VETH_MTUS) + " B)"),
              ("ours-auto", "ours, datagram_size=0 (auto)"), ("ours-tcp", "ours over TCP")]
    errors: dict[str, list[str]] = {}
    for key, label in labels:
        cells = []
        for mtu in VETH_MTUS:
            r = vby.get(f"veth-{mtu}-{key}")
            floors = [vby[c]["p50"] for c in (f"veth-{mtu}-floor-udp", f"veth-{mtu}-floor-tcp")
                      if c in vby and "error" not in vby[c]]
            if r is None:
                cells.append("—")
            elif "error" in r:
                mark = (list(errors).index(r["error"]) + 1 if r["error"] in errors
                        else len(errors) + 1)
                errors.setdefault(r["error"], []).append(r["case"])
                cells.append(f"error [{mark}]")
            else:
                x = f" ({r['p50'] / min(floors):.2f}x)" if floors else ""
                lost = f", {r['lost']} lost" if r.get("lost") else ""
                cells.append(f"{r['p50']:.0f} / {r['p99']:.0f}{x}{lost}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    for i, (msg, cases) in enumerate(errors.items(), 1):
        print(f"\n[{i}] {', '.join(cases)}: {msg}")


def print_lan(rows: list[dict], skip: str | None) -> None:
    if skip is not None:
        print(f"\n(loss and idle cases skipped: {skip})")
        return
    by = {r["case"]: r for r in rows}
    print(f"\n## 32 KiB over veth (MTU {LAN_MTU}) with loss and after idle, p50 / p99 µs\n")
    print(f"loss: {LAN_LOSS}% of packets dropped on arrival, each way (nftables); "
          f"idle: {IDLE_ROUND_TRIPS} round trips, each after {IDLE_GAP * 1e3:.0f} ms of silence\n"
          "(a token's time in a 405B ring). Run once, not per pass. A UDP GSO or TCP TSO burst "
          "crosses the veth as one buffer, so a drop\ntakes a whole burst (up to a 32 KiB frame): "
          "burst loss. The link has no wire time: an extra round trip costs microseconds.\n")
    print("| case | " + " | ".join(LAN_CONDITIONS) + " |")
    print("|---|" + "---|" * len(LAN_CONDITIONS))
    for kind, label in (("floor-tcp", "floor-tcp"), ("ours-auto", "ours (UDP, default)"),
                        ("ours-tcp", "ours over TCP")):
        cells = []
        for c in LAN_CONDITIONS:
            r = by.get(f"lan-{c}-{kind}")
            if r is None:
                cells.append("—")
            elif "error" in r:
                cells.append(f"error: {r['error']}")
            else:
                lost = f", {r['lost']} lost" if r.get("lost") else ""
                cells.append(f"{r['p50']:.0f} / {r['p99']:.0f}{lost}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
