"""Logging setup: node id on every line, JSON lines, repeat suppression, journal mode."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator

import pytest

from ringd.logs import _QUIET_LIBRARIES, configure_logging, set_node_id


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    libraries = {name: logging.getLogger(name).level for name in _QUIET_LIBRARIES}
    yield
    for name, lib_level in libraries.items():
        logging.getLogger(name).setLevel(lib_level)
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


def test_text_lines_carry_time_level_node_and_logger() -> None:
    out = io.StringIO()
    configure_logging("info", False, "0123456789abcdef", out)
    logging.getLogger("ringd.test").info("hello %s", "world")
    logging.getLogger("ringd.test").debug("not shown")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} "
                        r"info \[0123456789abcdef\] ringd.test: hello world", lines[0]), lines[0]


def test_node_id_set_later_appears_on_following_lines() -> None:
    out = io.StringIO()
    configure_logging("debug", False, None, out)
    log = logging.getLogger("ringd.x")
    log.debug("before")
    set_node_id("feedfacefeedface")
    log.debug("after")
    before, after = out.getvalue().splitlines()
    assert "[-] ringd.x: before" in before
    assert "[feedfacefeedface] ringd.x: after" in after


def test_json_lines() -> None:
    out = io.StringIO()
    configure_logging("warning", True, "00000000000000aa", out)
    log = logging.getLogger("ringd.j")
    log.info("dropped by level")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed on %d", 7)
    (line,) = out.getvalue().splitlines()
    rec = json.loads(line)
    assert rec["level"] == "error" and rec["node"] == "00000000000000aa"
    assert rec["logger"] == "ringd.j" and rec["msg"] == "failed on 7"
    assert "ValueError: boom" in rec["exc"] and rec["ts"].endswith("+00:00")


def test_repeated_warnings_are_suppressed_and_counted() -> None:
    out, clock = io.StringIO(), Clock()
    configure_logging("info", False, "1111111111111111", out, repeat_window=10.0, clock=clock)
    log = logging.getLogger("ringd.net")
    for i in range(18):
        clock.now = i * 0.1
        log.warning("bad frame from %s", f"peer{i}")
    log.warning("a different template")
    logging.getLogger("ringd.other").warning("bad frame from %s", "peer0")  # other logger
    for _ in range(3):
        log.info("info is never rate-limited")
    clock.now = 11.0
    log.warning("bad frame from %s", "peer99")
    lines = out.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "bad frame from peer0",
        "a different template",
        "bad frame from peer0",
        "info is never rate-limited", "info is never rate-limited", "info is never rate-limited",
        "bad frame from peer99 (repeated 17 times)",
    ]


def test_repeat_counts_in_json() -> None:
    out, clock = io.StringIO(), Clock()
    configure_logging("info", True, None, out, repeat_window=1.0, clock=clock)
    log = logging.getLogger("ringd.n")
    log.error("x")
    log.error("x")
    clock.now = 2.0
    log.error("x")
    recs = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [r.get("repeated") for r in recs] == [None, 1]


def test_under_systemd_journal_no_timestamps_and_priorities(tmp_path: Path) -> None:
    with open(tmp_path / "journal", "w+") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        configure_logging("info", False, "2222222222222222", stream, environ=env)
        logging.getLogger("ringd.j").warning("two\nlines")
        logging.getLogger("ringd.j").info("plain")
        stream.flush()
        stream.seek(0)
        lines = stream.read().splitlines()
    assert lines == ["<4>warning [2222222222222222] ringd.j: two", "<4>lines",
                     "<6>info [2222222222222222] ringd.j: plain"]


def test_journal_stream_of_another_file_keeps_timestamps(tmp_path: Path) -> None:
    with open(tmp_path / "other", "w+") as stream:
        configure_logging("info", False, None, stream, environ={"JOURNAL_STREAM": "1:2"})
        logging.getLogger("ringd.j").info("x")
        stream.flush()
        stream.seek(0)
        assert re.match(r"\d{4}-", stream.read())


def test_bad_level_is_refused() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("loud", False, None, io.StringIO())
