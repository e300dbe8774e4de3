"""One-shot probes of a peer port and of mDNS, for ``ringctl ping`` and ``ringctl doctor``.

:class:`Prober` holds a throw-away identity (node id ``ringctl-<random>``, a new session)
sealed with the local cluster key, and probes one address:

- **UDP**: the real membership ping, the bytes a node's SWIM probe sends: a sealed
  one-shot unit (:class:`ringd.core.reliable.Endpoint`) carrying ``Gossip(Ping)``, sent
  with ``asyncio-dgram`` from a connected socket (so the host's "port unreachable" comes
  back as an error). The prober's record says LEFT, so the node answers without making it
  a member (see :mod:`ringd.core.membership`). The answer is the node's Ack: its own
  record, metadata included.
- **TCP**: connect; the node sends its handshake first (authenticated: node id, cluster id,
  versions); the prober answers with its own (peer port 0: it has none) and closes.

An answer that does not authenticate still says something in its clear header: its wire
version and cluster tag (the first 4 bytes of the cluster id, never the key).

:func:`mdns_scan` checks that mDNS works here (a probe record published on the configured
interfaces is seen back by a second responder) and lists the ringd records (any cluster)
and the other DNS-SD service types it sees meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from typing import Callable

import asyncio_dgram

from ringd import PROTOCOL_VERSION, __version__
from ringd.core import wire
from ringd.core.packet import SEGMENT, SEGMENT_MAGIC
from ringd.core.reliable import Endpoint, FrameReceived
from ringd.core.seal import ReplayGuard, Sealer, new_session
from ringd.core.stream import TCP_HEADER, TCP_MAGIC, StreamDecoder, seal_tcp_frame
from ringd.core.swim_wire import Ack, Member, MemberState, Ping, decode_payload, to_payload
from ringd.doctor import MdnsScan, Record
from ringd.errors import RemoteProtocolError, UsageError
from ringd.ping import Channel, Outcome, PeerAnswer, PingReport, Probe, answer_of, judge

Addr = tuple[str, int]
PROBER_NAME = "ringctl ping"
#: How often a wait for an answer looks at errors the socket reported (asyncio-dgram raises
#: them only on the next call, not in the middle of a receive).
ERROR_POLL = 0.05
READ_SIZE = 65536


async def resolve(host: str, port: int) -> str:
    """``host`` as an IP address (IPv4 first). UsageError with a hint when it does not
    resolve."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise UsageError(f"cannot resolve {host!r}: {e.strerror or e}",
                         hint="check the name, or give the node's IP address") from None
    ipv4 = [i for i in infos if i[0] == socket.AF_INET]
    return str((ipv4 or infos)[0][4][0])


def prober_sealer(key: bytes, *, encrypt: bool = True) -> Sealer:
    """A sealer for a throw-away prober identity under the cluster ``key``."""
    node_id = "ringctl-" + os.urandom(8).hex()
    session = new_session(time.time_ns() // 1_000_000, int.from_bytes(os.urandom(2), "little"))
    return Sealer(key, node_id, session, encrypt=encrypt)


class Prober:
    """Sends probes to peer ports with one identity; each probe waits ``timeout`` seconds."""

    def __init__(self, sealer: Sealer, *, timeout: float = 1.0) -> None:
        self.sealer = sealer
        self.timeout = timeout
        self._tcp_seq = 0  # the node keeps one replay window per sender: never reuse one

    async def ping(self, addr: Addr, *, count: int = 3, interval: float = 0.2,
                   on_probe: Callable[[Probe], None] | None = None) -> list[Probe]:
        """``count`` UDP probes, then ``count`` TCP probes, ``interval`` seconds apart."""
        probes = await self.udp(addr, count=count, interval=interval, on_probe=on_probe)
        for seq in range(1, count + 1):
            if seq > 1:
                await asyncio.sleep(interval)  # pacing, as ping(8) does
            p = await self.tcp(addr, seq)
            probes.append(p)
            if on_probe is not None:
                on_probe(p)
        return probes

    # ------------------------------------------------------------------------ UDP
    async def udp(self, addr: Addr, *, count: int = 3, interval: float = 0.2,
                  on_probe: Callable[[Probe], None] | None = None) -> list[Probe]:
        out: list[Probe] = []
        try:
            stream = await asyncio_dgram.connect(addr)
        except OSError as e:
            for seq in range(1, count + 1):
                out.append(Probe(Channel.UDP, seq, Outcome.UNREACHABLE,
                                 detail=e.strerror or str(e)))
                if on_probe is not None:
                    on_probe(out[-1])
            return out
        try:
            local = stream.sockname
            me = Member(self.sealer.node_id, PROBER_NAME, (str(local[0]), int(local[1])), 0,
                        MemberState.LEFT)
            endpoint = Endpoint(self.sealer, ReplayGuard())
            for seq in range(1, count + 1):
                if seq > 1:
                    await asyncio.sleep(interval)  # pacing, as ping(8) does
                out.append(await self._udp_one(stream, endpoint, addr, me, seq))
                if on_probe is not None:
                    on_probe(out[-1])
        finally:
            stream.close()
        return out

    async def _udp_one(self, stream: asyncio_dgram.DatagramClient, endpoint: Endpoint,
                       addr: Addr, me: Member, seq: int) -> Probe:
        while _pending_error(stream) is not None:
            pass  # errors of earlier probes' datagrams are not this one's
        frame = wire.encode_bytes(wire.Gossip(to_payload(Ping(seq, me, None))))
        sent = time.monotonic()
        endpoint.send_frame(addr, frame, sent, reliable=False)
        try:
            await _flush(stream, endpoint, sent)
        except OSError as e:
            return _udp_error(seq, e)
        except asyncio_dgram.TransportClosed:
            return Probe(Channel.UDP, seq, Outcome.UNREACHABLE, detail="the socket closed")
        deadline = sent + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return Probe(Channel.UDP, seq, Outcome.SILENT)
            try:
                data, _src = await asyncio.wait_for(stream.recv(), min(left, ERROR_POLL))
            except asyncio.TimeoutError:
                err = _pending_error(stream)
                if err is not None:
                    return _udp_error(seq, err)
                continue
            except OSError as e:
                return _udp_error(seq, e)
            except asyncio_dgram.TransportClosed:
                return Probe(Channel.UDP, seq, Outcome.UNREACHABLE, detail="the socket closed")
            now = time.monotonic()
            before = dict(endpoint.counters)
            endpoint.receive_datagram(data, addr, now)
            with contextlib.suppress(OSError, asyncio_dgram.TransportClosed):
                await _flush(stream, endpoint, now)  # acks a reliable answer
            while (ev := endpoint.next_event()) is not None:
                if isinstance(ev, FrameReceived):
                    answer = _ack_answer(ev.data, seq)
                    if answer is not None:
                        return Probe(Channel.UDP, seq, Outcome.ANSWERED, rtt=now - sent,
                                     answer=answer)
            foreign = _foreign(data, before, endpoint.counters)
            if foreign is not None:
                outcome, tag, version = foreign
                return Probe(Channel.UDP, seq, outcome, rtt=now - sent, their_tag=tag,
                             their_wire_version=version)

    # ------------------------------------------------------------------------ TCP
    async def tcp(self, addr: Addr, seq: int = 1) -> Probe:
        """Connect, read the node's handshake, send ours, close."""
        start = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr),
                                                    self.timeout)
        except ConnectionRefusedError:
            return Probe(Channel.TCP, seq, Outcome.REFUSED)
        except asyncio.TimeoutError:
            return Probe(Channel.TCP, seq, Outcome.SILENT)
        except OSError as e:
            return Probe(Channel.TCP, seq, Outcome.UNREACHABLE, detail=e.strerror or str(e))
        try:
            return await self._handshake(reader, writer, seq, start)
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), self.timeout)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         seq: int, start: float) -> Probe:
        counters = wire.new_counters()
        decoder = StreamDecoder(self.sealer, ReplayGuard(), counters)
        head = b""
        deadline = start + self.timeout
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                chunk = await asyncio.wait_for(reader.read(READ_SIZE), left)
            except asyncio.TimeoutError:
                return Probe(Channel.TCP, seq, Outcome.NOT_RINGD,
                             detail=f"connected, but no ringd handshake within {self.timeout:g} s")
            except OSError as e:
                chunk, closed = b"", e.strerror or str(e)
            else:
                closed = "it closed the connection"
            now = time.monotonic()
            if not chunk:
                return Probe(Channel.TCP, seq, Outcome.NOT_RINGD,
                             detail=f"connected, but {closed} without a ringd handshake")
            head = (head + chunk)[:TCP_HEADER.size]
            frames = decoder.receive_data(chunk)
            for frame in frames:
                answer = _handshake_answer(frame.data, frame.sender)
                if answer is None:
                    return Probe(Channel.TCP, seq, Outcome.NOT_RINGD,
                                 detail="its first frame is not a handshake")
                await self._send_handshake(writer)
                return Probe(Channel.TCP, seq, Outcome.ANSWERED, rtt=now - start, answer=answer)
            failed = decoder.failed or ("bad_mac" if counters["bad_mac"] else None)
            if failed is not None:
                if failed in ("wrong_cluster", "bad_mac"):
                    # it closes the connection on ours and logs "another cluster's key?":
                    # its operator learns of this probe too
                    await self._send_handshake(writer)
                return _tcp_failure(seq, failed, head, now - start)

    async def _send_handshake(self, writer: asyncio.StreamWriter) -> None:
        self._tcp_seq += 1
        s = self.sealer
        hs = wire.Handshake(s.node_id, s.cluster_id, PROTOCOL_VERSION, __version__, 0)
        writer.write(bytes(seal_tcp_frame(s, self._tcp_seq, wire.encode_bytes(hs))))
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.drain(), self.timeout)


# ---------------------------------------------------------------------------- helpers
async def _flush(stream: asyncio_dgram.DatagramClient, endpoint: Endpoint, now: float) -> None:
    for t in endpoint.datagrams_to_send(now):
        for i in range(0, len(t.iov), 2):
            await stream.send(b"".join(t.iov[i:i + 2]))


def _pending_error(stream: asyncio_dgram.DatagramClient) -> OSError | None:
    """The first error the socket reported (e.g. ICMP port unreachable), if any."""
    try:
        stream.exception  # raises it
    except OSError as e:
        return e
    return None


def _udp_error(seq: int, e: OSError) -> Probe:
    if isinstance(e, ConnectionRefusedError):  # when it came is not known (see ERROR_POLL)
        return Probe(Channel.UDP, seq, Outcome.REFUSED)
    return Probe(Channel.UDP, seq, Outcome.UNREACHABLE, detail=e.strerror or str(e))


def _ack_answer(data: wire.Buffer, seq: int) -> PeerAnswer | None:
    """The node's record if ``data`` is the Ack of probe ``seq``."""
    try:
        sequenced = wire.split_sequenced(data)
        msg = wire.decode(sequenced[3] if sequenced is not None else data)
        if not isinstance(msg, wire.Gossip):
            return None
        ack = decode_payload(msg.payload)
    except RemoteProtocolError:
        return None
    if not isinstance(ack, Ack) or ack.seq != seq:
        return None
    return answer_of(ack.source)


def _foreign(data: bytes, before: dict[str, int],
             after: dict[str, int]) -> tuple[Outcome, str | None, int | None] | None:
    """What an answer that did not authenticate shows in its clear segment header."""
    grew = {k for k in ("wrong_cluster", "bad_mac", "bad_version") if after[k] > before[k]}
    if not grew or len(data) < SEGMENT.size or data[0] != SEGMENT_MAGIC:
        return None
    _magic, version, _i, _n, tag, _session, _pn = SEGMENT.unpack_from(data, 0)
    if "bad_version" in grew:
        return Outcome.OTHER_VERSION, None, version
    return Outcome.OTHER_CLUSTER, tag.hex(), None


def _handshake_answer(data: wire.Buffer, sender: str) -> PeerAnswer | None:
    try:
        hs = wire.decode(data)
    except RemoteProtocolError:
        return None
    if not isinstance(hs, wire.Handshake) or hs.node_id != sender:
        return None
    return PeerAnswer(node_id=hs.node_id, protocol_version=hs.protocol_version,
                      software_version=hs.software_version, cluster_id=hs.cluster_id)


def _tcp_failure(seq: int, reason: str, head: bytes, rtt: float) -> Probe:
    """A stream that did not authenticate: what its first record's clear header shows."""
    if len(head) == TCP_HEADER.size and head[4] == TCP_MAGIC:
        _len, _magic, version, tag, _session, _seq = TCP_HEADER.unpack(head)
        if reason == "bad_version":
            return Probe(Channel.TCP, seq, Outcome.OTHER_VERSION, rtt=rtt,
                         their_wire_version=version)
        if reason in ("wrong_cluster", "bad_mac"):
            return Probe(Channel.TCP, seq, Outcome.OTHER_CLUSTER, rtt=rtt, their_tag=tag.hex())
    return Probe(Channel.TCP, seq, Outcome.NOT_RINGD,
                 detail=f"what it sent is no ringd frame ({reason})")


# ---------------------------------------------------------------------------- mDNS
PROBE_TYPE = "_ringd-doctor._udp.local."
ALL_TYPES = "_services._dns-sd._udp.local."


async def mdns_scan(interfaces: list[str] | None, *, wait: float = 3.0) -> MdnsScan:
    """Publish a probe record with one responder, browse with another, on ``interfaces``
    (addresses; None: all); collect for ``wait`` seconds."""
    from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    from ringd.net.discovery import SERVICE_TYPE, RecordRejected, local_addresses, parse_record

    def responder() -> AsyncZeroconf:
        if interfaces is None:
            return AsyncZeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
        return AsyncZeroconf(interfaces=interfaces)

    where = ", ".join(interfaces) if interfaces is not None else "all interfaces"
    try:
        publisher = responder()
    except (OSError, ValueError) as e:
        return MdnsScan(False, f"cannot open mDNS on {where}: {e}")
    try:
        browser = responder()
    except (OSError, ValueError) as e:
        await publisher.async_close()
        return MdnsScan(False, f"cannot open mDNS on {where}: {e}")
    token = os.urandom(6).hex()
    probe_name = f"doctor-{token}.{PROBE_TYPE}"
    seen = asyncio.Event()
    ringd_names: set[str] = set()
    types: set[str] = set()

    # zeroconf calls handlers with these keyword arguments
    def on_probe(zeroconf: Zeroconf, service_type: str, name: str,
                 state_change: ServiceStateChange) -> None:
        if name == probe_name and state_change is not ServiceStateChange.Removed:
            seen.set()

    def on_ringd(zeroconf: Zeroconf, service_type: str, name: str,
                 state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed and len(ringd_names) < 256:
            ringd_names.add(name)

    def on_type(zeroconf: Zeroconf, service_type: str, name: str,
                state_change: ServiceStateChange) -> None:
        if name not in (PROBE_TYPE, SERVICE_TYPE) and len(types) < 256:
            types.add(name)

    zc = browser.zeroconf
    browsers = [AsyncServiceBrowser(zc, PROBE_TYPE, handlers=[on_probe]),
                AsyncServiceBrowser(zc, SERVICE_TYPE, handlers=[on_ringd]),
                AsyncServiceBrowser(zc, ALL_TYPES, handlers=[on_type])]
    addresses = list(interfaces) if interfaces is not None else local_addresses()
    info = AsyncServiceInfo(PROBE_TYPE, probe_name, port=9, server=f"doctor-{token}.local.",
                            parsed_addresses=addresses, properties={"probe": "1"})
    started = time.monotonic()
    announce: asyncio.Future[object] | None = None
    try:
        try:  # announcing goes on in a task (cancelled at the end); the record is up now
            announce = await publisher.async_register_service(info, cooperating_responders=True)
        except (OSError, ValueError) as e:
            return MdnsScan(False, f"cannot publish an mDNS record on {where}: {e}")
        try:
            await asyncio.wait_for(seen.wait(), wait)
            took: float | None = time.monotonic() - started
        except asyncio.TimeoutError:
            took = None
        rest = wait - (time.monotonic() - started)
        if rest > 0:
            await asyncio.sleep(rest)  # the collection window: answers come when they come
        peers: list[Record] = []
        malformed = 0
        for rname in sorted(ringd_names):
            rinfo = AsyncServiceInfo(SERVICE_TYPE, rname)
            if not await rinfo.async_request(zc, 1500):
                continue
            try:
                peer = parse_record(rname, len(rinfo.text or b""), rinfo.properties,
                                    rinfo.parsed_scoped_addresses())
            except RecordRejected:
                malformed += 1
                continue
            peers.append(Record(peer.node_id, peer.cluster_id, peer.addresses, peer.port))
        detail = (f"a record published on {where} was seen back in {took * 1000:.0f} ms"
                  if took is not None else
                  f"a record published on {where} was not seen back within {wait:g} s")
        return MdnsScan(took is not None, detail, tuple(peers), malformed, tuple(sorted(types)))
    finally:
        if announce is not None and not announce.done():
            announce.cancel()
            await asyncio.gather(announce, return_exceptions=True)
        for b in browsers:
            await b.async_cancel()
        with contextlib.suppress(Exception):
            await publisher.async_unregister_all_services()
        await publisher.async_close()
        await browser.async_close()


async def ping_report(prober: Prober, target: str, host: str, port: int, *, count: int = 3,
                      interval: float = 0.2,
                      on_probe: Callable[[Probe], None] | None = None) -> PingReport:
    """Probe ``host:port`` (an IP address; ``target`` is how the user named it) and judge."""
    probes = await prober.ping((host, port), count=count, interval=interval, on_probe=on_probe)
    return judge(target, host, port, prober.sealer.cluster_id, probes)
