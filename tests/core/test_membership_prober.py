"""A one-shot prober (``ringctl ping``) is answered and leaves no trace in the membership.

The prober sends the real Ping with a record that says LEFT: the node answers with an Ack
carrying its own record, adds nothing, emits nothing, and keeps its gossip for members.
"""

from __future__ import annotations

import random

from ringd.core.membership import Membership
from ringd.core.swim_wire import Ack, Member, MemberState, Ping, decode_payload, to_payload

NODE = ("10.0.0.1", 7411)
PEER = ("10.0.0.2", 7411)
PROBER = ("10.0.0.9", 40000)


def node_with_news() -> Membership:
    """A node that has just learned a peer: it has an update queued for gossip."""
    m = Membership("node-a", "a", NODE, b"meta-a", rng=random.Random(1))
    m.join([], 0.0)
    peer = Member("node-b", "b", PEER, 0, MemberState.ALIVE, b"meta-b")
    m.receive(to_payload(Ping(1, peer, "node-a")), PEER, 0.1)
    m.outbox()
    m.events()
    return m


def prober(state: MemberState) -> Member:
    return Member("ringctl-0123456789abcdef", "ringctl ping", PROBER, 0, state, b"")


def test_a_prober_that_says_left_gets_a_bare_ack_and_is_not_added() -> None:
    m = node_with_news()
    before = m.members()
    m.receive(to_payload(Ping(7, prober(MemberState.LEFT), None)), PROBER, 0.2)
    out = m.outbox()
    assert [addr for addr, _ in out] == [PROBER]
    ack = decode_payload(out[0][1])
    assert isinstance(ack, Ack)
    assert (ack.seq, ack.source, ack.updates) == (7, m.local, ())
    assert m.members() == before
    assert m.events() == []
    assert m.member("ringctl-0123456789abcdef") is None


def test_a_member_that_pings_gets_the_gossip_a_prober_does_not() -> None:
    """The same node's news rides on the ack to a member (so the test above can fail)."""
    m = node_with_news()
    m.receive(to_payload(Ping(8, m.member("node-b"), "node-a")), PEER, 0.2)  # type: ignore[arg-type]
    ack = decode_payload(m.outbox()[0][1])
    assert isinstance(ack, Ack) and ack.updates
    assert "node-b" in {u.member.node_id for u in ack.updates}


def test_a_prober_that_says_alive_would_join() -> None:
    """Why the prober says LEFT: an ALIVE record of an unknown node makes it a member."""
    m = node_with_news()
    m.receive(to_payload(Ping(9, prober(MemberState.ALIVE), None)), PROBER, 0.2)
    assert m.member("ringctl-0123456789abcdef") is not None
