"""Sealing: sealed units open only with the right key, channel, session and number; cluster
ids; replay windows and the per-node replay guard."""

from __future__ import annotations

import pytest

from ringd.core import seal
from ringd.core.seal import PN_RANGE_BITS, ReplayGuard, ReplayWindow, Sealer
from ringd.core.wire import Dropped
from ringd.errors import LocalProtocolError

KEY = bytes(range(32))


@pytest.mark.parametrize("encrypt", [True, False])
def test_seal_and_open(encrypt: bool) -> None:
    a = Sealer(KEY, "node-a", 11, encrypt=encrypt)
    b = Sealer(KEY, "node-b", 22)
    plain = b"secret activations " * 20
    unit = bytes(a.seal(seal.CHANNEL_UDP, 5, plain))
    assert len(unit) == len(plain) + a.overhead
    assert (plain in unit) is not encrypt
    sender, got, owned = b.open(seal.CHANNEL_UDP, 11, 5, unit)
    assert (sender, bytes(got), owned) == ("node-a", plain, encrypt)
    for tamper in (0, 3, len(unit) // 2, len(unit) - 1):
        bad = bytearray(unit)
        bad[tamper] ^= 0x40
        with pytest.raises(Dropped) as e:
            b.open(seal.CHANNEL_UDP, 11, 5, bytes(bad))
        assert e.value.reason in ("bad_mac", "malformed")
    for channel, session, pn in ((seal.CHANNEL_TCP, 11, 5), (seal.CHANNEL_UDP, 12, 5),
                                 (seal.CHANNEL_UDP, 11, 6)):
        with pytest.raises(Dropped, match="bad_mac"):
            b.open(channel, session, pn, unit)  # the nonce and key bind channel, session and number
    with pytest.raises(Dropped, match="bad_mac"):
        Sealer(bytes(32), "x", 1).open(seal.CHANNEL_UDP, 11, 5, unit)
    with pytest.raises(Dropped, match="truncated"):
        b.open(seal.CHANNEL_UDP, 11, 5, unit[:10])


def test_sealer_misuse_and_cluster_id() -> None:
    with pytest.raises(LocalProtocolError):
        Sealer(b"short", "n", 1)
    with pytest.raises(LocalProtocolError):
        Sealer(KEY, "", 1)
    assert Sealer(KEY, "n", 1).cluster_id == seal.cluster_id(KEY) != seal.cluster_id(bytes(32))
    assert len(seal.cluster_id(KEY)) == 16 and KEY.hex() not in seal.cluster_id(KEY)
    assert seal.new_session(2000, 0) > seal.new_session(1999, 0xFFFF)


def test_replay_window() -> None:
    w = ReplayWindow(size=64)
    for pn in (5, 3, 70, 69, 7):
        assert w.fresh(pn)
        w.mark(pn)
        assert not w.fresh(pn)
    assert not w.fresh(6)  # more than 64 behind the newest (70)
    assert w.fresh(68)
    w.mark(10**18)  # a huge jump doesn't allocate a huge bitmap
    assert w.bits == 1 and not w.fresh(70)


def test_replay_guard_sessions() -> None:
    g = ReplayGuard(session_timeout=30.0)
    assert g.accept(1, "a", 100, 1, now=0.0)
    assert not g.accept(1, "a", 100, 1, now=0.0)
    assert g.accept(2, "a", 100, 1, now=0.0)  # channels have their own windows
    assert not g.fresh(1, "a", 100, 1) and g.fresh(1, "a", 100, 2)
    assert g.accept(1, "a", 200, 1, now=1.0)  # restarted: a newer session
    assert not g.accept(1, "a", 100, 2, now=2.0)  # the old session is a replay now
    assert g.accept(1, "a", 50, 1, now=40.0)  # silent for longer than the timeout: clock moved back
    assert g.accept(1, "b", 100, 1, now=40.0)  # other nodes are independent


def test_replay_guard_nodes_sharing_a_session() -> None:
    """Two nodes that drew the same session number keep separate windows, and the pre-check
    (before authentication) asks the window of the node a unit claims to come from."""
    g = ReplayGuard()
    for pn in range(1, 101):
        assert g.accept(1, "a", 7, pn, now=0.0)
    assert g.fresh(1, "b", 7, 1)  # b's first packet: a saw a pn 1, b never spoke
    for pn in range(1, 151):
        assert g.accept(1, "b", 7, pn, now=0.0)
    assert g.fresh(1, "a", 7, 101)  # a's next packet: b saw a pn 101, a did not
    assert not g.fresh(1, "a", 7, 100) and not g.fresh(1, "b", 7, 100)
    assert not g.accept(1, "b", 7, 100, now=0.0)


def test_replay_guard_one_window_per_packet_number_range() -> None:
    """A sender numbers its UDP packets to each of our addresses in a range of its own
    (``Sealer.udp_pn_range``): frames by two paths interleave, each range is guarded, and a
    range whose window was forgotten cannot be replayed."""
    g = ReplayGuard()
    one, two = 1 << PN_RANGE_BITS, 2 << PN_RANGE_BITS
    for i in range(100):  # two paths at once: neither pushes the other's numbers out
        assert g.accept(1, "a", 7, two + i, now=0.0)
        assert g.accept(1, "a", 7, one + i, now=0.0)
    assert not g.fresh(1, "a", 7, one + 5) and not g.accept(1, "a", 7, two + 5, now=0.0)
    assert g.fresh(1, "a", 7, one + 100)
    # the sender drops idle peer states and opens new ranges; ours are forgotten in turn
    for r in range(3, 3 + seal.MAX_RANGES):
        assert g.accept(1, "a", 7, r << PN_RANGE_BITS, now=0.0)
    assert not g.fresh(1, "a", 7, one + 100)  # range 1's window is gone: not reopened
    assert not g.accept(1, "a", 7, one + 100, now=0.0)
    # a range newer than all, or one never heard before just below the newest, opens
    newest = 2 + seal.MAX_RANGES
    assert g.accept(1, "a", 7, (newest + 2) << PN_RANGE_BITS, now=0.0)
    assert g.accept(1, "a", 7, (newest + 1) << PN_RANGE_BITS, now=0.0)  # overtaken
    far = newest + 2 + seal.RANGE_LOOKBACK
    assert g.accept(1, "a", 7, far << PN_RANGE_BITS, now=0.0)
    assert not g.fresh(1, "a", 7, (far - seal.RANGE_LOOKBACK) << PN_RANGE_BITS)  # too old
    # TCP sequence numbers stay in range 0: one window, as before
    assert g.accept(2, "a", 7, 1, now=0.0) and not g.accept(2, "a", 7, 1, now=0.0)
