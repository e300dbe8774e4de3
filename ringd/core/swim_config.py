"""SWIM's knobs: one frozen config of timing and sizes for
:class:`ringd.core.membership.Membership` (memberlist's ``Config``), with LAN defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ringd.core.swim_wire import MAX_META, MAX_PAYLOAD
from ringd.errors import LocalProtocolError


@dataclass(frozen=True)
class MembershipConfig:
    """Timing and size knobs; LAN defaults after memberlist's DefaultLANConfig."""

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    #: Base (minimum) suspicion timeout for rings of up to 10 nodes.
    suspicion_timeout: float = 4.0
    #: Without confirmations the timeout is this multiple of the base.
    suspicion_max_mult: float = 3.0
    #: Independent confirmations that shrink the timeout to the base (needs n - 2 >= this).
    suspicion_confirmations: int = 2
    indirect_probes: int = 3
    gossip_interval: float = 0.2
    gossip_fanout: int = 3
    #: Each update is sent retransmit_mult x ceil(log10(n + 1)) times.
    retransmit_mult: int = 4
    #: Budget for piggy-backed updates on pings, acks and gossip (fits one datagram).
    max_payload_bytes: int = 1200
    #: Push-pull full state with one random member this often.
    sync_interval: float = 10.0
    #: Retry known addresses without a live member, and dead members, this often.
    reconnect_interval: float = 2.0
    #: Forget dead and left members after this long.
    reap_after: float = 300.0
    max_members: int = 256
    #: Longest metadata a member may carry, in bytes: the local node's is refused above it,
    #: a peer's payload holding a longer one is junk, so every node of a ring needs the same
    #: value. memberlist allows 512 bytes; the ring's metadata (:mod:`ringd.core.ringmeta`)
    #: takes ~350 bytes serving one model, but its bounds (three plan hashes, a fingerprint,
    #: a 240-character refusal, four held models with their layer ranges) reach ~2.5 KB with
    #: a multi-byte refusal: 4 KiB holds them with room for fields to come. A record too big to
    #: ride next to a probe within ``max_payload_bytes`` (metadata over ~700 bytes) spreads
    #: only by push-pull and its owner's own messages.
    max_meta_bytes: int = MAX_META

    def __post_init__(self) -> None:
        if not 0 < self.probe_timeout < self.probe_interval:
            raise LocalProtocolError(
                f"membership: need 0 < probe_timeout ({self.probe_timeout}) "
                f"< probe_interval ({self.probe_interval})"
            )
        if min(self.suspicion_timeout, self.gossip_interval, self.reconnect_interval) <= 0:
            raise LocalProtocolError("membership: timeouts and intervals must be positive")
        if not 0 <= self.max_meta_bytes <= MAX_PAYLOAD // 16:
            raise LocalProtocolError(
                f"membership: max_meta_bytes ({self.max_meta_bytes}) must be in "
                f"0..{MAX_PAYLOAD // 16}"
            )

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> MembershipConfig:
        """Take the timing fields a :class:`ringd.config.Settings` carries."""
        values = {
            k: getattr(settings, k)
            for k in ("probe_interval", "probe_timeout", "suspicion_timeout", "indirect_probes")
        }
        # datagram_size 0 is the path MTU: gossip keeps to 1400-byte datagrams
        if getattr(settings, "datagram_size", 0):
            values["max_payload_bytes"] = max(512, min(1400, settings.datagram_size) - 200)
        values.update(overrides)
        return cls(**values)
