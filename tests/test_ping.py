"""``ringctl ping``'s verdict (ringd.ping, pure) from what probes saw, its target syntax and
its lines; the probes themselves run on real sockets in tests/net/test_probe.py and against
real daemons in tests/integration/test_ping_doctor.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ringd import PROTOCOL_VERSION
from ringd.cli import main
from ringd.cli.ping import parse_target, probe_line, summary_lines
from ringd.core.ringmeta import NodeMeta, NodePhase
from ringd.core.swim_wire import Member, MemberState
from ringd.errors import UsageError
from ringd.keys import generate_key_file
from ringd.ping import Channel, Outcome, PeerAnswer, Probe, Verdict, answer_of, judge

OURS = "0123456789abcdef"
UDP, TCP = Channel.UDP, Channel.TCP
PEER = PeerAnswer(node_id="fedcba9876543210", protocol_version=PROTOCOL_VERSION, name="mac2",
                  addr="10.0.0.2:7411", software_version="0.1.0", phase="serving",
                  model="tiny", epoch=3)
HANDSHAKE = PeerAnswer(node_id="fedcba9876543210", protocol_version=PROTOCOL_VERSION,
                       software_version="0.1.0", cluster_id=OURS)


def probes(udp: list[Outcome], tcp: list[Outcome], **kw: object) -> list[Probe]:
    out = []
    for ch, outcomes, answer in ((UDP, udp, PEER), (TCP, tcp, HANDSHAKE)):
        for i, o in enumerate(outcomes, 1):
            ok = o is Outcome.ANSWERED
            out.append(Probe(ch, i, o, rtt=0.001 if ok else None,
                             answer=answer if ok else None, **kw))  # type: ignore[arg-type]
    return out


def verdict_of(udp: list[Outcome], tcp: list[Outcome], **kw: object):
    return judge("mac2.local", "10.0.0.2", 7411, OURS, probes(udp, tcp, **kw))


A, S, R = Outcome.ANSWERED, Outcome.SILENT, Outcome.REFUSED


def test_healthy_names_the_node_model_phase_and_epoch() -> None:
    rep = verdict_of([A, A, A], [A, A, A])
    assert rep.verdict is Verdict.HEALTHY and rep.healthy and rep.hint is None
    assert rep.summary == ("healthy: mac2 (id fedcba98), model tiny, phase serving, "
                           "plan epoch 3, ringd 0.1.0")
    assert rep.peer is not None and rep.peer.cluster_id == OURS  # the handshake's, merged


def test_healthy_with_loss_says_how_many_went_unanswered() -> None:
    rep = verdict_of([A, S, A], [A])
    assert rep.verdict is Verdict.HEALTHY
    assert "(1 of 3 UDP probes unanswered)" in rep.summary


@pytest.mark.parametrize("udp,tcp,expected", [
    ([R, R], [R, R], "nothing listens on 10.0.0.2:7411"),
    ([S, S], [S, S], "nothing came back over UDP or TCP"),
    ([S], [R], "nothing came back over UDP or TCP"),
])
def test_no_answer(udp: list[Outcome], tcp: list[Outcome], expected: str) -> None:
    rep = verdict_of(udp, tcp)
    assert rep.verdict is Verdict.NO_ANSWER and not rep.healthy
    assert expected in rep.summary and rep.hint


def test_unreachable_says_why() -> None:
    rep = judge("x", "10.9.9.9", 7411, OURS,
                [Probe(UDP, 1, Outcome.UNREACHABLE, detail="Network is unreachable"),
                 Probe(TCP, 1, Outcome.UNREACHABLE, detail="Network is unreachable")])
    assert rep.verdict is Verdict.NO_ANSWER
    assert "cannot reach 10.9.9.9:7411 (Network is unreachable)" in rep.summary


def test_udp_filtered_and_tcp_filtered() -> None:
    rep = verdict_of([S, S], [A, A])
    assert rep.verdict is Verdict.UDP_FILTERED
    assert "UDP filtered" in rep.summary and "UDP port 7411" in (rep.hint or "")
    rep = verdict_of([A, A], [R, R])
    assert rep.verdict is Verdict.TCP_FILTERED
    assert "TCP filtered" in rep.summary and "(refused)" in rep.summary


def test_another_cluster_names_both_ids_never_a_key() -> None:
    rep = judge("x", "10.0.0.2", 7411, OURS,
                [Probe(UDP, 1, S), Probe(TCP, 1, Outcome.OTHER_CLUSTER, rtt=0.001,
                                         their_tag="a1b2c3d4")])
    assert rep.verdict is Verdict.OTHER_CLUSTER
    assert f"our cluster id {OURS}" in rep.summary and "theirs a1b2c3d4..." in rep.summary
    assert rep.to_json()["their_cluster_tag"] == "a1b2c3d4"


def test_the_same_tag_with_a_bad_seal_is_still_another_key() -> None:
    rep = judge("x", "10.0.0.2", 7411, OURS,
                [Probe(TCP, 1, Outcome.OTHER_CLUSTER, their_tag=OURS[:8])])
    assert rep.verdict is Verdict.OTHER_CLUSTER
    assert "fail authentication with our key" in rep.summary


def test_another_version_by_protocol_or_by_wire_format() -> None:
    old = PeerAnswer(node_id="fedcba9876543210", protocol_version=PROTOCOL_VERSION + 1)
    rep = judge("x", "10.0.0.2", 7411, OURS,
                [Probe(UDP, 1, A, rtt=0.001, answer=old), Probe(TCP, 1, A, rtt=0.001,
                                                                 answer=old)])
    assert rep.verdict is Verdict.OTHER_VERSION
    assert f"peer protocol {PROTOCOL_VERSION + 1}" in rep.summary
    rep = judge("x", "10.0.0.2", 7411, OURS,
                [Probe(UDP, 1, S), Probe(TCP, 1, Outcome.OTHER_VERSION, their_wire_version=9)])
    assert rep.verdict is Verdict.OTHER_VERSION and "wire format 9" in rep.summary


def test_not_ringd() -> None:
    rep = judge("x", "10.0.0.2", 7412, OURS,
                [Probe(UDP, 1, R), Probe(TCP, 1, Outcome.NOT_RINGD, detail="it closed")])
    assert rep.verdict is Verdict.NOT_RINGD and "(it closed)" in rep.summary


def test_answer_of_reads_the_ring_metadata_and_says_when_it_cannot() -> None:
    meta = NodeMeta(phase=NodePhase.LOADING, model="m", epoch=5, software_version="9.9")
    m = Member("n1", "mac1", ("10.0.0.1", 7411), 2, MemberState.ALIVE, meta.encode())
    a = answer_of(m)
    assert (a.name, a.addr, a.phase, a.model, a.epoch, a.software_version) == (
        "mac1", "10.0.0.1:7411", "loading", "m", 5, "9.9")
    bad = answer_of(Member("n1", "mac1", ("10.0.0.1", 7411), 2, MemberState.ALIVE, b"\xc1"))
    assert bad.meta_problem and bad.phase is None


@pytest.mark.parametrize("text,expected", [
    ("10.0.0.2", ("10.0.0.2", 7411)), ("mac2.local:7500", ("mac2.local", 7500)),
    ("[fe80::1]", ("fe80::1", 7411)), ("[::1]:7500", ("::1", 7500)), ("::1", ("::1", 7411)),
])
def test_targets(text: str, expected: tuple[str, int]) -> None:
    assert parse_target(text, 7411) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:port", "host:70000", "[::1", "[]:7411",
                                  "[::1]x"])
def test_bad_targets_are_usage_errors_with_a_hint(text: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_target(text, 7411)
    assert e.value.hint


def test_lines() -> None:
    rep = verdict_of([A, S], [A, A])
    lines = [probe_line(p, 1.0, {PEER.node_id: "mac2"}) for p in rep.probes]
    assert lines == ["udp 1: ack from mac2 in 1.000 ms", "udp 2: no answer within 1 s",
                     "tcp 1: handshake from mac2 in 1.000 ms",
                     "tcp 2: handshake from mac2 in 1.000 ms"]
    summary = summary_lines(rep)
    assert summary[0] == "--- 10.0.0.2:7411 (mac2.local)"
    assert summary[1] == "udp: 1/2 answered, round trip min/avg/max 1.000/1.000/1.000 ms"
    assert summary[-1].startswith("verdict: healthy: mac2")


# ------------------------------------------------------------------- the command's errors
def ringctl(tmp_path: Path, config: str, *args: str) -> Result:
    path = tmp_path / "ringctl.toml"
    path.write_text(config)
    result = CliRunner().invoke(main, ["--config", str(path), *args])
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def test_a_missing_key_is_an_error_with_a_hint(tmp_path: Path) -> None:
    key = tmp_path / "none.key"
    res = ringctl(tmp_path, f'cluster_key_file = "{key}"\n', "ping", "127.0.0.1:7411")
    assert res.exit_code == 2
    assert res.output.splitlines() == [
        f"error: probes are sealed with this node's cluster key: cluster key file {key} does "
        "not exist",
        "  hint: create one with `ringctl keygen`, or copy the same key file (mode 0600) to "
        "every node of the ring"]


def test_a_key_others_can_read_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    generate_key_file(key)
    key.chmod(0o644)
    res = ringctl(tmp_path, f'cluster_key_file = "{key}"\n', "ping", "127.0.0.1:7411")
    assert res.exit_code == 2 and f"hint: run `chmod 600 {key}`" in res.output


@pytest.mark.parametrize("target,message", [
    ("host:port", "is not HOST or HOST:PORT"),
    ("no-such-host.invalid", "cannot resolve 'no-such-host.invalid'"),
])
def test_bad_or_unknown_hosts_are_errors_with_a_hint(tmp_path: Path, target: str,
                                                      message: str) -> None:
    key = tmp_path / "k.key"
    generate_key_file(key)
    res = ringctl(tmp_path, f'cluster_key_file = "{key}"\n', "ping", target)
    assert res.exit_code == 2
    assert message in res.output.splitlines()[0] and "hint:" in res.output.splitlines()[-1]
