"""The transfer core on a fake clock, with scripted holders: parallel, bounded, faulty peers."""

from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass, field
from typing import Callable

import pytest

from ringd.core.transfer import (ChunkRequest, HolderRejected, HolderStalled, ItemReceived,
                                 Transfer, TransferConfig, TransferDone, TransferFailed,
                                 WaitingForHolders)
from ringd.errors import LocalProtocolError

CFG = TransferConfig(chunk_size=1000, max_in_flight_per_peer=4000, max_in_flight=6000,
                     request_timeout=2.0, max_retries=3, holder_backoff=50.0, rate_window=5.0)


def make_items(n: int = 12, seed: int = 1) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"model.layers.{i}.w": rng.randbytes(rng.randrange(1500, 9000)) for i in range(n)}


@dataclass
class Holder:
    """A scripted peer: serves at ``bandwidth`` bytes/s after ``latency`` seconds."""

    name: str
    keys: set[str]
    latency: float = 0.01
    bandwidth: float = 100_000.0
    drop: Callable[[ChunkRequest, int], bool] = lambda req, nth: False  # nth: times asked
    corrupt: set[str] = field(default_factory=set)
    gone_at: float | None = None
    silent: bool = False  # never answers
    busy_until: float = 0.0
    asked: dict[tuple[str, int], int] = field(default_factory=dict)


class Net:
    """Drives one Transfer against holders on a fake clock and keeps the sink."""

    def __init__(self, data: dict[str, bytes], holders: list[Holder], present: set[str] = set(),
                 cfg: TransferConfig = CFG) -> None:
        self.data, self.now = data, 0.0
        self.t = Transfer({k: len(v) for k, v in data.items()}, present, now=0.0, config=cfg)
        self.holders = {h.name: h for h in holders}
        for h in holders:
            self.t.set_holder(h.name, h.keys, 0.0)
        self.sink = {k: bytearray(len(v)) for k, v in data.items()}
        self.queue: list[tuple[float, int, str, str, int, bytes]] = []
        self.seq = 0
        self.events: list[object] = []
        self.requests: list[ChunkRequest] = []
        self.outstanding: dict[str, int] = {}
        self.max_out: dict[str, int] = {}
        self.max_total = 0

    def _send(self) -> None:
        for req in self.t.requests_to_send(self.now):
            self.requests.append(req)
            assert 0 < req.length <= self.t.config.chunk_size
            self.outstanding[req.peer] = self.outstanding.get(req.peer, 0) + req.length
            self.max_out[req.peer] = max(self.max_out.get(req.peer, 0), self.outstanding[req.peer])
            self.max_total = max(self.max_total, sum(self.outstanding.values()))
            h = self.holders[req.peer]
            nth = h.asked[(req.key, req.offset)] = h.asked.get((req.key, req.offset), 0) + 1
            if h.silent or h.drop(req, nth) or (h.gone_at is not None and self.now >= h.gone_at):
                continue
            h.busy_until = max(self.now, h.busy_until) + req.length / h.bandwidth
            data = self.data[req.key][req.offset:req.offset + req.length]
            if req.key in h.corrupt:
                data = bytes([data[0] ^ 1]) + data[1:]
            self.seq += 1
            heapq.heappush(self.queue, (h.busy_until + h.latency, self.seq, req.peer, req.key,
                                        req.offset, data))

    def _events(self) -> None:
        while (ev := self.t.next_event()) is not None:
            self.events.append(ev)
            if isinstance(ev, ItemReceived):
                ok = (hashlib.blake2b(self.sink[ev.key]).digest()
                      == hashlib.blake2b(self.data[ev.key]).digest())
                self.t.item_checked(ev.key, ok, self.now)

    def run(self, until: float = 1000.0,
            at: dict[float, Callable[["Net"], None]] | None = None) -> "Net":
        actions = sorted((at or {}).items())
        self._events()
        while not self.t.finished and self.now <= until:
            self._send()
            self._events()
            times = [self.queue[0][0]] if self.queue else []
            timer = self.t.get_timer()
            if timer is not None:
                times.append(timer)
            if actions:
                times.append(actions[0][0])
            if not times:
                break
            self.now = max(self.now, min(times))
            while actions and actions[0][0] <= self.now:
                actions.pop(0)[1](self)
            while self.queue and self.queue[0][0] <= self.now:
                _, _, peer, key, off, data = heapq.heappop(self.queue)
                self.outstanding[peer] = self.outstanding.get(peer, 0) - len(data)
                if self.t.chunk_received(peer, key, off, len(data), self.now):
                    self.sink[key][off:off + len(data)] = data
                self._events()
            if timer is not None and timer <= self.now:
                for peer, h in self.holders.items():  # lost requests are no longer out
                    if h.silent or h.gone_at is not None:
                        self.outstanding[peer] = 0
                self.t.handle_timer(self.now)
                self._events()
        return self

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def peer(self, name: str):  # type: ignore[no-untyped-def]
        return next(p for p in self.t.stats(self.now).peers if p.peer == name)


def _complete(net: Net, present: set[str] = set()) -> None:
    assert net.t.done and net.of(TransferDone)
    for k, v in net.data.items():
        if k not in present:
            assert bytes(net.sink[k]) == v, k


def test_two_holders_in_parallel_within_the_in_flight_bounds() -> None:
    data = make_items()
    net = Net(data, [Holder("a", set(data)), Holder("b", set(data))]).run()
    _complete(net)
    st = net.t.stats(net.now)
    total = sum(map(len, data.values()))
    assert st.state == "done" and st.done_bytes == st.total_bytes == st.received_bytes == total
    assert st.items_done == len(data) and st.wasted_bytes == 0 and st.eta == 0.0
    a, b = net.peer("a"), net.peer("b")
    assert a.bytes > total // 4 and b.bytes > total // 4 and a.bytes + b.bytes == total
    assert max(net.max_out.values()) <= CFG.max_in_flight_per_peer
    assert net.max_total <= CFG.max_in_flight
    # every item came whole from one holder
    for k in data:
        assert len({r.peer for r in net.requests if r.key == k}) == 1
    # about twice one holder's rate (100 kB/s each) while both are busy
    assert net.t.stats(net.now).elapsed < total / 100_000 * 0.7


def test_progress_and_rate_on_the_way() -> None:
    data = make_items()
    net = Net(data, [Holder("a", set(data), bandwidth=10_000.0)])
    seen = []
    net.run(at={t: (lambda n: seen.append(n.t.stats(n.now))) for t in (1.0, 2.0, 3.0)})
    assert [s.state for s in seen] == ["fetching"] * 3
    assert seen[0].received_bytes < seen[1].received_bytes < seen[2].received_bytes
    assert all(9_000 <= s.rate <= 11_000 for s in seen[1:]), [s.rate for s in seen]
    assert seen[2].eta is not None and seen[2].eta > 0
    d = seen[2].as_dict()
    assert d["peers"][0]["peer"] == "a" and d["total_bytes"] == sum(map(len, data.values()))


def test_a_dropped_chunk_is_asked_again_after_the_timeout() -> None:
    data = make_items(3)
    key = next(iter(data))
    lost = Holder("a", set(data), drop=lambda r, nth: (r.key, r.offset, nth) == (key, 1000, 1))
    net = Net(data, [lost])
    net._send()
    assert net.t.get_timer() == pytest.approx(CFG.request_timeout)  # deadline of the first sends
    net.run()
    _complete(net)
    asks = [r for r in net.requests if (r.key, r.offset) == (key, 1000)]
    assert len(asks) == 2 and net.peer("a").timeouts == 1 and not net.of(HolderStalled)


def test_a_slow_holder_gets_less_work() -> None:
    data = make_items(16)
    net = Net(data, [Holder("fast", set(data)), Holder("slow", set(data), bandwidth=10_000.0)])
    net.run()
    _complete(net)
    assert net.peer("fast").bytes > 3 * net.peer("slow").bytes > 0


def test_a_silent_holder_is_set_aside_and_another_serves() -> None:
    data = make_items(6)
    net = Net(data, [Holder("dead", set(data), silent=True), Holder("b", set(data))]).run()
    _complete(net)
    stalled = net.of(HolderStalled)
    assert [s.peer for s in stalled] == ["dead"]
    # each chunk asked max_retries times, one timeout apart, before giving up
    assert stalled[0].until == pytest.approx(CFG.max_retries * CFG.request_timeout
                                             + CFG.holder_backoff, abs=0.1)
    assert net.peer("dead").bytes == 0 and net.peer("dead").state == "stalled"


def test_a_holder_serving_wrong_bytes_is_named_and_another_is_used() -> None:
    data = make_items(8)
    bad_key = list(data)[3]
    # the liar holds only that item, so it is the first thing it is asked for
    net = Net(data, [Holder("liar", {bad_key}, corrupt={bad_key}), Holder("b", set(data))])
    net.run()
    _complete(net)
    assert net.of(HolderRejected) == [HolderRejected("liar", bad_key)]
    st = net.t.stats(net.now)
    assert st.rejected == ("liar",) and net.peer("liar").state == "rejected"
    assert net.peer("liar").rejected_for == bad_key
    assert st.wasted_bytes == len(data[bad_key])
    assert st.received_bytes == sum(map(len, data.values())) + len(data[bad_key])
    assert bytes(net.sink[bad_key]) == data[bad_key]
    # the liar is asked for nothing once it is rejected, even what it claims to hold later
    n = len(net.requests)
    net.t.set_holder("liar", set(data), net.now)
    assert net.t.requests_to_send(net.now) == [] and len(net.requests) == n


def test_wrong_bytes_and_no_other_holder_fail_with_a_clear_reason() -> None:
    data = make_items(4)
    bad_key = list(data)[1]
    net = Net(data, [Holder("liar", set(data), corrupt={bad_key})]).run()
    assert not net.t.done and net.t.finished
    failed = net.of(TransferFailed)
    # the bad item first, then every other item only the rejected holder has
    assert len(failed) == 1 and failed[0].keys[0] == bad_key
    assert set(failed[0].keys) == {k for k in data if bytes(net.sink[k]) != data[k]}
    assert "liar" in failed[0].reason and bad_key in failed[0].reason
    assert "no other node holds it" in failed[0].reason
    st = net.t.stats(net.now)
    assert st.state == "failed" and st.reason == failed[0].reason
    assert net.t.requests_to_send(net.now) == [] and net.t.get_timer() is None


def test_a_holder_that_leaves_midway_is_replaced() -> None:
    data = make_items(10)
    a = Holder("a", set(data), gone_at=0.05)
    net = Net(data, [a, Holder("b", set(data), bandwidth=20_000.0)])
    net.run(at={0.05: lambda n: n.t.remove_holder("a", n.now)})
    _complete(net)
    assert "a" not in {p.peer for p in net.t.stats(net.now).peers}


def test_with_no_holder_left_it_waits_then_resumes_when_one_comes() -> None:
    data = make_items(6)
    net = Net(data, [Holder("a", set(data), gone_at=0.03)])
    waiting: list = []
    net.run(until=10.0, at={0.03: lambda n: n.t.remove_holder("a", n.now),
                            5.0: lambda n: waiting.append(n.t.stats(n.now))})
    assert not net.t.finished and waiting[0].state == "waiting"
    assert set(waiting[0].waiting) | {k for k in data if bytes(net.sink[k]) == data[k]} >= set(
        data) and net.of(WaitingForHolders)
    net.holders["c"] = Holder("c", set(data))
    net.t.set_holder("c", set(data), net.now)
    net.run()
    _complete(net)


def test_resume_fetches_only_what_is_missing() -> None:
    data = make_items(8)
    present = set(list(data)[:5])
    net = Net(data, [Holder("a", set(data))], present=present).run()
    _complete(net, present)
    assert not {r.key for r in net.requests} & present
    st = net.t.stats(net.now)
    assert st.total_bytes == sum(len(v) for k, v in data.items() if k not in present)
    assert st.present_bytes == sum(len(data[k]) for k in present)
    everything = Transfer({k: len(v) for k, v in data.items()}, set(data), now=0.0)
    assert everything.done and isinstance(everything.next_event(), TransferDone)


def test_rarest_items_first_so_partial_holders_stay_busy() -> None:
    data = make_items(12)
    shared = set(list(data)[:6])
    net = Net(data, [Holder("full", set(data)), Holder("part", shared)])
    net._send()
    first_full = {r.key for r in net.requests if r.peer == "full"}
    assert first_full and not first_full & shared  # the full holder starts on what only it has
    net.run()
    _complete(net)
    assert net.peer("part").bytes > 0


def test_a_stale_holding_is_refused_and_moves_elsewhere() -> None:
    data = make_items(3)
    key = list(data)[0]
    net = Net(data, [Holder("a", {key}, silent=True), Holder("b", set(data) - {key})])
    net._send()
    asked_a = [r for r in net.requests if r.peer == "a"]
    assert asked_a and {r.key for r in asked_a} == {key}
    net.t.chunk_refused("a", key, net.now)  # "I do not hold it"
    assert net.peer("a").in_flight == 0 and net.peer("a").refused == 1
    assert WaitingForHolders((key,)) in list(iter(net.t.next_event, None))
    net.t.set_holder("b", set(data), net.now)
    n = len(net.requests)
    net.run()
    _complete(net)
    assert {r.peer for r in net.requests[n:] if r.key == key} == {"b"}


def test_replies_that_do_not_fit_are_refused_and_counted() -> None:
    data = make_items(2)
    key = list(data)[0]
    t = Transfer({k: len(v) for k, v in data.items()}, now=0.0, config=CFG)
    t.set_holder("a", set(data), 0.0)
    t.set_holder("b", set(data), 0.0)
    reqs = t.requests_to_send(0.0)
    mine = next(r for r in reqs if r.key == key)
    other = "b" if mine.peer == "a" else "a"
    assert not t.chunk_received(other, key, 0, mine.length, 0.1)  # not asked of that peer
    assert not t.chunk_received(mine.peer, key, 1, 999, 0.1)  # off the grid
    assert not t.chunk_received(mine.peer, key, 0, 7, 0.1)  # wrong length
    assert not t.chunk_received(mine.peer, "nope", 0, 10, 0.1)
    assert not t.chunk_received("stranger", key, 0, mine.length, 0.1)
    assert t.chunk_received(mine.peer, key, 0, mine.length, 0.1)
    assert not t.chunk_received(mine.peer, key, 0, mine.length, 0.2)  # duplicate
    st = {p.peer: p for p in t.stats(0.2).peers}
    assert st[mine.peer].refused == 4 and st[other].refused == 1
    with pytest.raises(LocalProtocolError):
        t.item_checked(key, True, 0.3)  # not all received yet
    with pytest.raises(LocalProtocolError):
        TransferConfig(chunk_size=10, max_in_flight_per_peer=5)


def test_randomised_faults_always_end_in_the_right_bytes() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        data = make_items(rng.randrange(3, 10), seed=seed)
        keys = list(data)
        holders = [Holder("h0", set(keys))]
        for i in range(1, rng.randrange(2, 5)):
            held = {k for k in keys if rng.random() < 0.7}
            holders.append(Holder(f"h{i}", held, bandwidth=rng.choice([5e3, 5e4, 5e5]),
                                  drop=lambda r, nth, p=rng.random() * 0.3, s=seed: (
                                      random.Random(hash((r.key, r.offset, nth, s))).random()
                                      < p),
                                  corrupt={k for k in held if rng.random() < 0.1}))
        net = Net(data, holders).run(until=5000.0)
        _complete(net)
