"""Node identity and boot epoch in the state directory: real files, real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ringd.state import EPOCH_FILE, NODE_ID_FILE, NODE_ID_RE, NodeState, StateError, atomic_write


def test_node_id_is_stable_and_epoch_strictly_increases(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    ids, epochs = set(), []
    for _ in range(20):
        with NodeState.open(state_dir) as st:
            ids.add(st.node_id)
            epochs.append(st.epoch)
    assert len(ids) == 1 and NODE_ID_RE.fullmatch(ids.pop())
    assert epochs == list(range(1, 21))
    assert (state_dir.stat().st_mode & 0o777) == 0o700
    assert ((state_dir / NODE_ID_FILE).stat().st_mode & 0o777) == 0o600
    assert not [p for p in state_dir.iterdir() if p.name.endswith(".tmp")]


def test_identity_survives_process_restarts(tmp_path: Path) -> None:
    code = ("import sys; from ringd.state import NodeState; s = NodeState.open(sys.argv[1]); "
            "print(s.node_id, s.epoch)")
    outs = [subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True,
                           capture_output=True, text=True).stdout.split() for _ in range(3)]
    assert len({o[0] for o in outs}) == 1
    assert [int(o[1]) for o in outs] == [1, 2, 3]


def test_two_holders_of_one_state_dir_are_refused(tmp_path: Path) -> None:
    with NodeState.open(tmp_path) as first:
        with pytest.raises(StateError) as e:
            NodeState.open(tmp_path)
        assert f"pid {os.getpid()}" in str(e.value) and str(tmp_path) in str(e.value)
        assert first.epoch == 1
    with NodeState.open(tmp_path) as again:  # released on close
        assert again.epoch == 2


@pytest.mark.parametrize("name, content", [
    (NODE_ID_FILE, b"not-an-id\n"),
    (NODE_ID_FILE, b"\xff\xfe\x00garbage"),
    (EPOCH_FILE, b"-3\n"),
    (EPOCH_FILE, b"1" * 200),
])
def test_corrupt_file_is_named_in_a_clear_error(tmp_path: Path, name: str, content: bytes) -> None:
    NodeState.open(tmp_path).close()
    (tmp_path / name).write_bytes(content)
    with pytest.raises(StateError) as e:
        NodeState.open(tmp_path)
    assert str(tmp_path / name) in str(e.value) and "corrupt" in str(e.value)
    assert e.value.hint


def test_temp_location_is_flagged_with_a_warning(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    with NodeState.open(tmp_path / "s") as st:
        assert st.in_temp_dir
    assert any("temporary location" in r.getMessage() for r in caplog.records)


def test_concurrent_writers_never_leave_a_torn_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    payloads = [bytes([65 + i]) * 200_000 for i in range(4)]
    atomic_write(target, payloads[0])
    stop = threading.Event()
    seen: set[bytes] = set()
    bad: list[int] = []

    def writer(p: bytes) -> None:
        for _ in range(15):
            atomic_write(target, p)

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            if data not in payloads:
                bad.append(len(data))
            seen.add(data[:1])

    r = threading.Thread(target=reader)
    r.start()
    writers = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    r.join()
    assert not bad, f"torn reads of lengths {bad[:5]}"
    assert len(seen) >= 2  # the reader really saw the file change under it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
