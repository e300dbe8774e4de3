"""One list of request error codes, each mapped once to an HTTP status and an exit code."""

import json

import pytest

from ringd.errors import (ConfigError, DaemonNotRunning, ErrorCode, ExitCode, ModelError,
                          RequestError, exit_code)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_has_an_http_status_and_an_exit_code(code: ErrorCode) -> None:
    assert 400 <= code.http_status < 600
    assert code.exit_code in ExitCode and code.exit_code not in (ExitCode.OK,
                                                                  ExitCode.INTERRUPTED)


def test_a_code_is_its_string_on_the_wire_and_in_json() -> None:
    e = RequestError("busy", "two requests run already", hint="retry later")
    assert e.code is ErrorCode.BUSY and e.code == "busy"
    assert json.dumps({"code": e.code}) == '{"code": "busy"}' and f"{e.code}" == "busy"
    assert type(e.code.value) is str


def test_an_unknown_code_is_our_bug_but_a_peers_is_internal() -> None:
    with pytest.raises(ValueError):
        RequestError("bussy", "typo")
    assert ErrorCode.parse("from_a_newer_version") is ErrorCode.INTERNAL
    assert ErrorCode.parse(None) is ErrorCode.INTERNAL
    assert ErrorCode.parse("timeout") is ErrorCode.TIMEOUT


def test_exit_codes_by_code_then_by_blame() -> None:
    assert exit_code(RequestError("busy", "x")) == ExitCode.UNAVAILABLE == 4
    assert exit_code(RequestError("not_ready", "x")) == ExitCode.UNAVAILABLE
    assert exit_code(RequestError("bad_request", "x")) == ExitCode.USAGE == 2
    assert exit_code(RequestError("peer_lost", "x")) == ExitCode.FAILURE == 1
    assert exit_code(DaemonNotRunning("x")) == ExitCode.NOT_RUNNING == 3
    assert exit_code(ConfigError("x")) == ExitCode.USAGE
    assert exit_code(ModelError("x")) == ExitCode.FAILURE
