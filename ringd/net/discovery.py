"""Finding peers with mDNS/zeroconf (python-zeroconf's asyncio API).

Each node registers ``ringd-<node id>._ringd._udp.local.`` with TXT keys ``id`` (node id),
``cluster`` (derived from the cluster key by the caller, never the key), ``proto``
(protocol version), ``port`` (peer port) and ``http`` (HTTP API port), and browses the
same type. A resolved record becomes :class:`PeerInfo` handed to ``on_peer``; records of
ourselves are skipped; records of another cluster, another protocol version, or with
malformed TXT are counted and ignored. Everything here runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import ifaddr
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ringd import PROTOCOL_VERSION
from ringd.errors import ConfigError, UsageError

log = logging.getLogger(__name__)

SERVICE_TYPE = "_ringd._udp.local."
INSTANCE_PREFIX = "ringd-"
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,48}")
MAX_TXT_BYTES = 400          # whole TXT record; ours is ~80 bytes
MAX_ADDRESSES = 8            # per peer record
MAX_PEERS = 1024             # accepted records kept
MAX_REJECTED = 1024          # names remembered as ignored (so each is counted once)
MAX_RESOLVING = 32           # concurrent resolutions; more Added events are dropped and counted
RESOLVE_TIMEOUT_MS = 3000


@dataclass(frozen=True)
class PeerInfo:
    """A peer as its mDNS record describes it."""

    node_id: str
    cluster_id: str
    protocol: int
    addresses: tuple[str, ...]
    port: int
    http_port: int
    service_name: str


@dataclass(frozen=True)
class DiscoveryStats:
    found: int                   # accepted records (new or changed) handed to on_peer
    ignored_other_cluster: int   # distinct records of another cluster
    ignored_other_protocol: int  # distinct records of our cluster with another protocol version
    malformed: int               # distinct records whose name or TXT does not parse
    removed: int                 # peers withdrawn (goodbye or expiry)
    resolve_failed: int          # records that did not resolve in time
    dropped_busy: int            # events dropped because the resolve queue or peer table was full
    peers: int                   # peers currently known


class RecordRejected(Exception):
    """A record that is not taken: ``kind`` is the counter it goes to, ``reason`` says why."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def instance_name(node_id: str) -> str:
    return f"{INSTANCE_PREFIX}{node_id}.{SERVICE_TYPE}"


def parse_record(name: str, text_len: int, properties: dict[bytes, bytes | None],
                 addresses: Sequence[str]) -> PeerInfo:
    """Turn a resolved record into a PeerInfo; raises RecordRejected('malformed', ...) if it
    does not parse."""
    if text_len > MAX_TXT_BYTES:
        raise RecordRejected("malformed", f"TXT record of {text_len} bytes")

    def field(key: bytes) -> str:
        raw = properties.get(key)
        if raw is None or len(raw) > 64:
            raise RecordRejected("malformed", f"TXT key {key.decode()} missing or too long")
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise RecordRejected("malformed", f"TXT key {key.decode()} is not ASCII") from None

    def number(key: bytes, lo: int, hi: int) -> int:
        text = field(key)
        if not (text.isdigit() and len(text) <= 5 and lo <= int(text) <= hi):
            raise RecordRejected("malformed",
                            f"TXT key {key.decode()}={text!r} is not a number in {lo}..{hi}")
        return int(text)

    node_id, cluster_id = field(b"id"), field(b"cluster")
    if not ID_RE.fullmatch(node_id) or not ID_RE.fullmatch(cluster_id):
        raise RecordRejected("malformed", "bad node or cluster id")
    if name.lower() != instance_name(node_id).lower():
        raise RecordRejected("malformed", f"instance name does not match node id {node_id}")
    addrs = tuple(addresses[:MAX_ADDRESSES])  # built by zeroconf from A/AAAA records: well-formed
    if not addrs:
        raise RecordRejected("malformed", "no address")
    return PeerInfo(node_id=node_id, cluster_id=cluster_id, protocol=number(b"proto", 0, 65535),
                    addresses=addrs, port=number(b"port", 1, 65535),
                    http_port=number(b"http", 0, 65535), service_name=name)


def local_addresses(include_loopback: bool = False) -> list[str]:
    """This host's IPv4 addresses (loopback only when asked or when there is nothing else)."""
    found = sorted({str(ip.ip) for adapter in ifaddr.get_adapters() for ip in adapter.ips
                    if ip.is_IPv4})
    outside = [a for a in found if not ipaddress.ip_address(a).is_loopback]
    return found if include_loopback or not outside else outside


class Discovery:
    """Advertise this node and report peers of the same cluster and protocol.

    ``interfaces``: addresses whose interfaces mDNS uses (None: all). ``advertise``:
    addresses put in our record (default: the given interface addresses, or this host's
    IPv4 addresses). Callbacks run on the event loop and must not block.
    """

    def __init__(self, node_id: str, cluster_id: str, port: int, http_port: int,
                 interfaces: list[str] | None, on_peer: Callable[[PeerInfo], None],
                 on_peer_removed: Callable[[PeerInfo], None] | None = None, *,
                 advertise: Sequence[str] | None = None, protocol: int = PROTOCOL_VERSION) -> None:
        if not ID_RE.fullmatch(node_id) or not ID_RE.fullmatch(cluster_id):
            raise UsageError(f"node id {node_id!r} / cluster id {cluster_id!r}: "
                             "1-48 characters of letters, digits, '-' or '_' expected")
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.port = port
        self.http_port = http_port
        self.interfaces = list(interfaces) if interfaces is not None else None
        self.protocol = protocol
        self._advertise = list(advertise) if advertise else None
        self._on_peer = on_peer
        self._on_peer_removed = on_peer_removed
        self._name = instance_name(node_id)
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._announce: asyncio.Future[object] | None = None
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._peers: dict[str, PeerInfo] = {}
        self._rejected: OrderedDict[str, str] = OrderedDict()
        self._counts = dict.fromkeys(
            ("found", "ignored_other_cluster", "ignored_other_protocol", "malformed", "removed",
             "resolve_failed", "dropped_busy"), 0)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Open the mDNS sockets, start browsing, and register our record (a few ms)."""
        addresses = self._advertise or (
            [a for a in self.interfaces if isinstance(a, str)] if self.interfaces is not None
            else local_addresses())
        try:
            if self.interfaces is None:
                self._aiozc = AsyncZeroconf(interfaces=InterfaceChoice.All,
                                            ip_version=IPVersion.V4Only)
            else:
                self._aiozc = AsyncZeroconf(interfaces=self.interfaces)
        except (OSError, ValueError) as e:
            raise ConfigError(f"mDNS cannot use interfaces {self.interfaces or 'all'}: {e}",
                              hint="set mdns_interfaces to addresses of this host, or mdns = false "
                                   "and list static peers") from None
        info = AsyncServiceInfo(
            SERVICE_TYPE, self._name, port=self.port,
            server=f"{INSTANCE_PREFIX}{self.node_id}.local.", parsed_addresses=addresses,
            properties={"id": self.node_id, "cluster": self.cluster_id, "proto": str(self.protocol),
                        "port": str(self.port), "http": str(self.http_port)})
        self._browser = AsyncServiceBrowser(self._aiozc.zeroconf, SERVICE_TYPE,
                                            handlers=[self._on_change])
        # No RFC 6762 probing (it delays visibility by ~1.2 s): the name carries a random
        # 64-bit node id, so it is unique unless a state directory was copied, which the
        # membership layer sees as two addresses for one id.
        self._announce = await self._aiozc.async_register_service(  # type: ignore[assignment]
            info, cooperating_responders=True)
        log.info("mDNS: advertising %s on %s (addresses %s), browsing %s", self._name,
                 ", ".join(self.interfaces) if self.interfaces is not None else "all interfaces",
                 ", ".join(addresses), SERVICE_TYPE)

    async def close(self) -> None:
        """Withdraw our record (goodbye packets) and stop browsing. Safe to call twice."""
        tasks = list(self._resolving.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._announce is not None and not self._announce.done():
            self._announce.cancel()
            await asyncio.gather(self._announce, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._aiozc is not None:
            await self._aiozc.async_close()
            self._aiozc = None

    def stats(self) -> DiscoveryStats:
        return DiscoveryStats(**self._counts, peers=len(self._peers))

    def peers(self) -> list[PeerInfo]:
        return list(self._peers.values())

    def ignored(self) -> dict[str, str]:
        """Records currently ignored: instance name -> reason (a key of :class:`DiscoveryStats`)."""
        return dict(self._rejected)

    # ------------------------------------------------------------------ loop thread only
    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            self._rejected.pop(name, None)
            peer = self._peers.pop(name, None)
            if peer is not None:
                self._counts["removed"] += 1
                log.info("mDNS: peer %s withdrew its record", peer.node_id)
                if self._on_peer_removed is not None:
                    self._call(self._on_peer_removed, peer)
            return
        if name == self._name:
            return
        if name in self._resolving:
            self._again.add(name)
            return
        if len(self._resolving) >= MAX_RESOLVING:
            self._counts["dropped_busy"] += 1
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._resolving[name] = task
        task.add_done_callback(functools.partial(self._resolved, name))

    def _resolved(self, name: str, _task: asyncio.Task[None]) -> None:
        self._resolving.pop(name, None)
        if name in self._again and self._aiozc is not None:
            self._again.discard(name)
            self._on_change(self._aiozc.zeroconf, SERVICE_TYPE, name, ServiceStateChange.Updated)

    async def _resolve(self, name: str) -> None:
        assert self._aiozc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._aiozc.zeroconf, RESOLVE_TIMEOUT_MS):
            self._counts["resolve_failed"] += 1
            log.debug("mDNS: %s did not resolve in %d ms", name, RESOLVE_TIMEOUT_MS)
            return
        try:
            peer = parse_record(name, len(info.text or b""), info.properties,
                                info.parsed_scoped_addresses())
            if peer.node_id == self.node_id:
                raise RecordRejected("malformed",
                                     f"another record claims our node id {self.node_id}")
            if peer.cluster_id != self.cluster_id:
                raise RecordRejected("ignored_other_cluster", f"cluster {peer.cluster_id}")
            if peer.protocol != self.protocol:
                raise RecordRejected("ignored_other_protocol",
                                f"protocol version {peer.protocol}, we speak {self.protocol}")
        except RecordRejected as r:
            self._reject(name, r)
            return
        self._rejected.pop(name, None)
        if self._peers.get(name) == peer:
            return
        if name not in self._peers and len(self._peers) >= MAX_PEERS:
            self._counts["dropped_busy"] += 1
            log.warning("mDNS: peer table full (%d); ignoring %s", MAX_PEERS, name)
            return
        self._peers[name] = peer
        self._counts["found"] += 1
        log.info("mDNS: found peer %s at %s port %d", peer.node_id, ", ".join(peer.addresses),
                 peer.port)
        self._call(self._on_peer, peer)

    def _reject(self, name: str, r: RecordRejected) -> None:
        previous = self._peers.pop(name, None)
        if previous is not None and self._on_peer_removed is not None:
            self._call(self._on_peer_removed, previous)
        if self._rejected.get(name) == r.kind:
            return
        self._rejected[name] = r.kind
        self._rejected.move_to_end(name)
        while len(self._rejected) > MAX_REJECTED:
            self._rejected.popitem(last=False)
        self._counts[r.kind] += 1
        if r.kind == "ignored_other_protocol":
            log.warning("mDNS: ignoring %s: it speaks %s", name[:80], r.reason)
        else:
            log.debug("mDNS: ignoring %s: %s", name[:80], r.reason)

    def _call(self, fn: Callable[[PeerInfo], None], peer: PeerInfo) -> None:
        try:
            fn(peer)
        except Exception:
            log.exception("discovery callback %r failed for peer %s", fn, peer.node_id)
