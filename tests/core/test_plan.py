"""The layer plan: properties with hypothesis, exact messages for the failures."""

from __future__ import annotations

import itertools
import random
import time
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ringd.core.plan import ModelShape, Plan, make_plan, proportional_counts, render_bar
from ringd.errors import LocalProtocolError, PlanError

GiB = 1024**3


@st.composite
def shapes(draw, max_layers: int = 40) -> ModelShape:
    n = draw(st.integers(1, max_layers))
    if draw(st.booleans()):
        layers = (draw(st.integers(1, 1000)),) * n  # transformer blocks are usually all alike
    else:
        layers = tuple(draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n)))
    return ModelShape(
        "m",
        layers,
        draw(st.integers(0, 3000)),
        draw(st.integers(0, 3000)),
        draw(st.integers(0, 200)),
    )


@st.composite
def rings(draw, max_nodes: int = 8) -> list[tuple[str, int]]:
    names = draw(
        st.lists(
            st.text("abcdefghij", min_size=1, max_size=3),
            min_size=1,
            max_size=max_nodes,
            unique=True,
        )
    )
    return [(n, draw(st.integers(0, 40_000))) for n in names]


def effective(plan: Plan, shape: ModelShape) -> list[int]:
    n = len(plan.order)
    return [
        a.usable - (shape.embed_bytes if i == 0 else 0) - (shape.head_bytes if i == n - 1 else 0)
        for i, a in enumerate(plan.order)
    ]


def check_plan(plan: Plan, members: list[tuple[str, int]], shape: ModelShape) -> None:
    usable = dict(members)
    # full coverage, no overlap, in the stable order, every node at least one layer
    assert plan.order[0].start == 0 and plan.order[-1].end == shape.num_layers == plan.num_layers
    for a, b in itertools.pairwise(plan.order):
        assert a.end == b.start and a.node_id < b.node_id
    assert all(a.num_layers >= 1 for a in plan.order)
    # never silently dropped: every member is either assigned or excluded with a reason
    assigned = {a.node_id for a in plan.order}
    excluded = {e.node_id for e in plan.excluded}
    assert assigned | excluded == set(usable) and not assigned & excluded
    assert all(e.reason for e in plan.excluded)
    # every node fits, and the bytes are counted right
    n = len(plan.order)
    for i, a in enumerate(plan.order):
        need = sum(shape.layer_cost(j) for j in range(a.start, a.end))
        need += (shape.embed_bytes if i == 0 else 0) + (shape.head_bytes if i == n - 1 else 0)
        assert a.bytes_needed == need <= a.usable == usable[a.node_id]
    for layer in range(shape.num_layers):
        assert plan.owner_of(layer).start <= layer < plan.owner_of(layer).end


@settings(max_examples=400, deadline=None)
@given(rings(), shapes(), st.integers(0, 100), st.randoms(use_true_random=False))
def test_plan_properties(members, shape, epoch, rnd) -> None:
    try:
        plan = make_plan(members, shape, epoch=epoch)
    except PlanError as e:
        shuffled = members[:]
        rnd.shuffle(shuffled)
        with pytest.raises(PlanError) as again:
            make_plan(shuffled, shape, epoch=epoch)
        assert str(again.value) == str(e)
        return
    check_plan(plan, members, shape)
    assert plan.epoch == epoch
    # the same plan for any input order
    shuffled = members[:]
    rnd.shuffle(shuffled)
    assert make_plan(shuffled, shape, epoch=epoch) == plan
    # proportional within one layer of each node's exact share of the effective memory
    w = effective(plan, shape)
    counts = proportional_counts(w, shape.num_layers)
    if not plan.packed:
        assert [a.num_layers for a in plan.order] == counts
        for a, wi in zip(plan.order, w):
            share = Fraction(shape.num_layers * wi, sum(w))
            if share < 1:
                assert a.num_layers == 1
            elif all(Fraction(shape.num_layers * x, sum(w)) >= 1 for x in w):
                assert abs(a.num_layers - share) < 1
    else:  # packed only because the proportional split would overfill a node
        bounds = list(itertools.accumulate(counts, initial=0))
        over = [
            sum(shape.layer_cost(j) for j in range(bounds[i], bounds[i + 1]))
            + (shape.embed_bytes if i == 0 else 0)
            + (shape.head_bytes if i == len(w) - 1 else 0)
            > plan.order[i].usable
            for i in range(len(w))
        ]
        assert any(over)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.data())
def test_fit_errors_are_honest(n_nodes, n_layers, data) -> None:
    """With no node excluded, PlanError happens exactly when no contiguous split fits."""
    layers = tuple(data.draw(st.lists(st.integers(1, 50), min_size=n_layers, max_size=n_layers)))
    shape = ModelShape(
        "m",
        layers,
        data.draw(st.integers(0, 40)),
        data.draw(st.integers(0, 40)),
        data.draw(st.integers(0, 5)),
    )
    floor = max(shape.layer_cost(i) for i in range(n_layers)) + shape.embed_bytes + shape.head_bytes
    assume(n_nodes <= n_layers)
    usable = data.draw(
        st.lists(st.integers(floor, floor + 300), min_size=n_nodes, max_size=n_nodes)
    )
    members = [(f"n{i}", u) for i, u in enumerate(usable)]
    extras = [
        (shape.embed_bytes if i == 0 else 0) + (shape.head_bytes if i == n_nodes - 1 else 0)
        for i in range(n_nodes)
    ]

    def brute() -> bool:
        for cuts in itertools.combinations(range(1, n_layers), n_nodes - 1):
            b = (0, *cuts, n_layers)
            if all(
                sum(shape.layer_cost(j) for j in range(b[i], b[i + 1])) + extras[i] <= usable[i]
                for i in range(n_nodes)
            ):
                return True
        return False

    try:
        plan = make_plan(members, shape)
    except PlanError as e:
        assert not brute()
        assert "needs" in e.message or "no contiguous split" in e.message
        return
    assert brute() and not plan.excluded
    check_plan(plan, members, shape)


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 4), st.integers(4, 10), st.data())
def test_nearly_full_rings_are_packed_optimally(n_nodes, n_layers, data) -> None:
    """Rings with little slack: whenever some contiguous split fits, the plan fits, and a
    packed plan's fullest node is as empty as the best split's (to the 2**-20 search step)."""
    layers = tuple(data.draw(st.lists(st.integers(10, 60), min_size=n_layers, max_size=n_layers)))
    shape = ModelShape("m", layers, data.draw(st.integers(0, 15)), data.draw(st.integers(0, 15)))
    weights = data.draw(st.lists(st.integers(2, 5), min_size=n_nodes, max_size=n_nodes))
    slack = data.draw(st.integers(2, 40))  # percent
    total = shape.total_bytes * (100 + slack) // 100
    usable = [max(1, total * w // sum(weights)) for w in weights]
    members = [(f"n{i}", u) for i, u in enumerate(usable)]
    extras = [
        (shape.embed_bytes if i == 0 else 0) + (shape.head_bytes if i == n_nodes - 1 else 0)
        for i in range(n_nodes)
    ]
    splits = [
        (0, *cuts, n_layers) for cuts in itertools.combinations(range(1, n_layers), n_nodes - 1)
    ]

    def fills(b):
        return [
            Fraction(sum(shape.layer_cost(j) for j in range(b[i], b[i + 1])) + extras[i], usable[i])
            for i in range(n_nodes)
        ]

    fitting = [max(fills(b)) for b in splits if max(fills(b)) <= 1]
    try:
        plan = make_plan(members, shape)
    except PlanError:
        assert not fitting or any(u < max(layers) + e for u, e in zip(usable, extras))
        return
    if plan.excluded:
        return
    check_plan(plan, members, shape)
    assert fitting
    if plan.packed:
        assert max(Fraction(a.bytes_needed, a.usable) for a in plan.order) <= min(
            fitting
        ) + Fraction(1, 2**19)


def test_uniform_layers_split_in_proportion_to_memory() -> None:
    shape = ModelShape("m", (100,) * 60, 0, 0)
    plan = make_plan([("c", 3000), ("a", 1000), ("b", 2000)], shape, epoch=7)
    assert [(a.node_id, a.start, a.end) for a in plan.order] == [
        ("a", 0, 10),
        ("b", 10, 30),
        ("c", 30, 60),
    ]
    assert not plan.packed and not plan.excluded
    assert (plan.first.node_id, plan.last.node_id) == ("a", "c")
    assert plan.next_after("a") == "b" and plan.next_after("c") == "a"
    assert plan.owner_of(0).node_id == "a" and plan.owner_of(59).node_id == "c"
    with pytest.raises(LocalProtocolError):
        plan.owner_of(60)
    with pytest.raises(LocalProtocolError):
        plan.next_after("zz")
    # the epoch is in the hash, not in the layout hash
    again = make_plan([("a", 1000), ("b", 2000), ("c", 3000)], shape, epoch=8)
    assert again.layout_hash == plan.layout_hash and again.hash != plan.hash
    assert plan.as_dict()["order"][1] == {
        "node_id": "b",
        "start": 10,
        "end": 30,
        "bytes_needed": 2000,
        "usable": 2000,
    }


def test_extras_shrink_the_share_of_the_first_and_last_node() -> None:
    shape = ModelShape("m", (10,) * 30, embed_bytes=100, head_bytes=100)
    plan = make_plan([("a", 200), ("b", 200), ("c", 200)], shape)
    # effective memory 100 : 200 : 100 -> 7.5 : 15 : 7.5 layers
    assert [a.num_layers for a in plan.order] == [8, 15, 7]


def test_largest_remainder_and_minimum_one() -> None:
    assert proportional_counts([1, 1, 1], 10) == [4, 3, 3]
    assert proportional_counts([100, 100, 1], 4) == [2, 1, 1]
    assert proportional_counts([5], 3) == [3]
    with pytest.raises(LocalProtocolError):
        proportional_counts([1, 1, 1], 2)


def test_a_nearly_full_ring_is_packed_instead_of_failing() -> None:
    shape = ModelShape("m", (5,) * 6 + (20,) * 4, embed_bytes=0, head_bytes=0)
    # proportional (75:30:30 -> 6,2,2) puts two 20-byte layers on b (40 > 30); packing fits
    plan = make_plan([("a", 75), ("b", 30), ("c", 30)], shape)
    assert plan.packed
    assert [(a.start, a.end, a.bytes_needed) for a in plan.order] == [
        (0, 8, 70),
        (8, 9, 20),
        (9, 10, 20),
    ]
    # 34:33:33 fits 100 bytes in total, but no node can take a fourth 10-byte layer
    with pytest.raises(PlanError) as e:
        make_plan([("a", 34), ("b", 33), ("c", 33)], ModelShape("m", (10,) * 10, 0, 0))
    assert e.value.message == (
        "model m (10 layers, 100 B) fits the ring's 100 B in total, but no contiguous split does: "
        "largest layer 10 B, embedding 0 B on a, head 0 B on c"
    )


def test_the_ring_too_small_says_how_much_to_add() -> None:
    shape = ModelShape(
        "big", (20 * GiB,) * 10, embed_bytes=2 * GiB, head_bytes=2 * GiB, kv_bytes_per_layer=GiB
    )
    with pytest.raises(PlanError) as e:
        make_plan([("a", 90 * GiB), ("b", 90 * GiB)], shape)
    assert e.value.message == (
        "model big needs 214.0 GiB (weights 204.0 GiB + KV cache 10.0 GiB), the ring has 180.0 GiB "
        "usable on 2 nodes; add >= 34.0 GiB"
    )
    assert "iogpu.wired_limit_mb" in e.value.hint and "--memory-budget" in e.value.hint


def test_shortfall_is_rounded_up() -> None:
    shape = ModelShape("m", (GiB,) * 4, 0, 0)
    for have, add in [(4 * GiB - 1, "1 B"), (3 * GiB - 1, "1.1 GiB"), (4 * GiB - 1025, "1.1 KiB")]:
        with pytest.raises(PlanError) as e:
            make_plan([("a", have)], shape)
        assert e.value.message.endswith(f"add >= {add}")


def test_a_node_too_small_for_one_layer_is_excluded_with_the_reason() -> None:
    shape = ModelShape("m", (GiB,) * 8, embed_bytes=GiB // 2, head_bytes=GiB // 2)
    plan = make_plan([("a", 8 * GiB), ("b", GiB // 2), ("c", 8 * GiB)], shape)
    assert [a.node_id for a in plan.order] == ["a", "c"]
    (ex,) = plan.excluded
    assert ex.node_id == "b"
    assert ex.reason == "usable 512.0 MiB < 1.0 GiB needed for one layer (1.0 GiB)"
    # the first node also needs the embedding: excluded as first, the next node becomes first
    plan = make_plan([("a", GiB + 1), ("b", 9 * GiB), ("c", 9 * GiB)], shape)
    assert [a.node_id for a in plan.order] == ["b", "c"]
    assert plan.excluded[0].reason == (
        "usable 1.0 GiB < 1.5 GiB needed for one layer (1.0 GiB) + embedding 512.0 MiB"
    )


def test_nothing_fits_even_one_layer() -> None:
    shape = ModelShape("m", (GiB,) * 2, 0, 0)
    with pytest.raises(PlanError) as e:
        make_plan([("a", 100), ("b", 200)], shape)
    assert e.value.message.startswith(
        "model m: no node can hold even one layer (1.0 GiB with its KV cache)"
    )
    assert "a: usable 100 B < 1.0 GiB needed for one layer" in e.value.message
    with pytest.raises(PlanError, match="no nodes"):
        make_plan([], shape)


def test_more_nodes_than_layers() -> None:
    shape = ModelShape("m", (10,) * 2, 0, 0)
    plan = make_plan([("a", 100), ("b", 50), ("c", 100)], shape)
    assert [a.node_id for a in plan.order] == ["a", "c"]
    assert plan.excluded[0].node_id == "b" and "only 2 layers" in plan.excluded[0].reason


def test_misuse_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        make_plan([("a", 1), ("a", 2)], ModelShape("m", (1,), 0, 0))
    with pytest.raises(LocalProtocolError):
        ModelShape("m", (), 0, 0)
    with pytest.raises(LocalProtocolError):
        ModelShape("m", (0, 1), 0, 0)


def test_render_bar() -> None:
    assert render_bar(0, 10, 30, width=30) == "[" + "#" * 10 + "." * 20 + "]"
    assert render_bar(10, 20, 30, width=3) == "[.#.]"
    assert render_bar(29, 30, 30, width=10) == "[.........#]"
    assert render_bar(0, 1, 126, width=10) == "[#.........]"  # a non-empty range always shows
    with pytest.raises(LocalProtocolError):
        render_bar(5, 4, 30)


def test_plans_are_quick_for_a_405b_sized_model() -> None:
    shape = ModelShape(
        "llama-405b", (1_780_000_000,) * 126, 1_100_000_000, 1_100_000_000, 20_000_000
    )
    rng = random.Random(0)
    members = [(f"node-{i:02d}", rng.randint(40, 180) * 10**9) for i in range(12)]
    start = time.perf_counter()
    plan = make_plan(members, shape, epoch=3)
    elapsed = time.perf_counter() - start
    check_plan(plan, members, shape)
    assert elapsed < 1.0, elapsed  # ~5 ms here: every node plans on every view change
