"""A userspace UDP proxy that drops, duplicates, reorders and delays datagrams (seeded).

The kernel here has no netem, so loss is made in userspace. ``LossyProxy(target)`` listens
on ``front`` (give that address to the sender as the peer); datagrams are forwarded to
``target`` from a second socket, and replies to that socket go back to the last sender.
Each direction has its own fate: drop with ``loss``, send twice with ``dup``, hold back by
up to ``max_delay`` seconds with ``reorder`` (so later datagrams overtake it).
"""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import dataclass, field


@dataclass
class LinkStats:
    forwarded: int = 0
    dropped: int = 0
    duplicated: int = 0
    delayed: int = 0


@dataclass
class LossyProxy:
    target: tuple[str, int]
    seed: int = 0
    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    max_delay: float = 0.002
    forward: LinkStats = field(default_factory=LinkStats)
    backward: LinkStats = field(default_factory=LinkStats)

    async def start(self) -> tuple[str, int]:
        self._loop = asyncio.get_running_loop()
        self._rng = random.Random(self.seed)
        self._front = self._socket()
        self._back = self._socket()
        self._client: tuple[str, int] | None = None
        self._loop.add_reader(self._front.fileno(), self._pump, self._front, True)
        self._loop.add_reader(self._back.fileno(), self._pump, self._back, False)
        return self._front.getsockname()

    @property
    def back_addr(self) -> tuple[str, int]:
        """The address the target sees the traffic coming from."""
        return self._back.getsockname()

    def close(self) -> None:
        for s in (self._front, self._back):
            self._loop.remove_reader(s.fileno())
            s.close()  # datagrams still held back fail to send: more losses

    @staticmethod
    def _socket() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        return s

    def _pump(self, sock: socket.socket, forward: bool) -> None:
        for _ in range(256):
            try:
                data, addr = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            if forward:
                self._client = addr
                self._fate(data, self._back, self.target, self.forward)
            elif self._client is not None:
                self._fate(data, self._front, self._client, self.backward)

    def _fate(self, data: bytes, out: socket.socket, dest: tuple[str, int], st: LinkStats) -> None:
        rng = self._rng
        if rng.random() < self.loss:
            st.dropped += 1
            return
        copies = 2 if rng.random() < self.dup else 1
        st.duplicated += copies - 1
        for _ in range(copies):
            if rng.random() < self.reorder:
                st.delayed += 1
                self._loop.call_later(rng.random() * self.max_delay, self._send, out, data, dest)
            else:
                self._send(out, data, dest)

    def _send(self, out: socket.socket, data: bytes, dest: tuple[str, int]) -> None:
        try:
            out.sendto(data, dest)
        except (BlockingIOError, OSError):
            return  # a full socket buffer is one more loss
        if out is self._back:
            self.forward.forwarded += 1
        else:
            self.backward.forwarded += 1
