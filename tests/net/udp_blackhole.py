"""A port where UDP is filtered and TCP gets through, in userspace (this kernel has no netem
and no firewall tool): what a peer behind a firewall that drops UDP looks like.

``UdpFilteredFront(target)`` binds one port number on 127.0.0.1 for both: a UDP socket that
reads every datagram and drops it (counted; bound, so the host sends no "port unreachable"
either: silence, as a dropping firewall gives), and a TCP listener that relays each
connection to ``target``. Threads, not an event loop: the code under test may run its own.
"""

from __future__ import annotations

import socket
import threading

from ringd.localring import free_port


class UdpFilteredFront:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.addr = ("127.0.0.1", self.port)
        self.dropped = 0
        self.relayed = 0
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind(self.addr)
        self._udp.settimeout(0.1)
        self._tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._tcp.bind(self.addr)
        self._tcp.listen(16)
        self._tcp.settimeout(0.1)
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._drop, daemon=True),
                         threading.Thread(target=self._accept, daemon=True)]
        for t in self._threads:
            t.start()

    def _drop(self) -> None:
        while not self._closed.is_set():
            try:
                self._udp.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            self.dropped += 1

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._tcp.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=2.0)
            except OSError:
                client.close()
                continue
            self.relayed += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(None)
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()  # each socket is the source of one pipe

    def close(self) -> None:
        self._closed.set()
        for t in self._threads:
            t.join()
        self._udp.close()
        self._tcp.close()
