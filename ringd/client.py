"""A small synchronous client for the local daemon's control API, used by ``ringctl``.

Plain ``http.client``: one connection per call, no event loop. Every failure becomes a
:class:`ringd.errors.RingdError` with a hint; closing the iterator returned by
:meth:`Client.stream_generate` closes the connection, which cancels the request on the ring.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any, Iterator

from ringd.errors import DaemonNotRunning, ErrorCode, RequestError, RingdError, UsageError

__all__ = ["Client", "DaemonNotRunning", "connect_host"]

MAX_LINE = 1 << 20
#: Most bytes of one JSON answer (a ``/ringd/verify`` trace of 32 steps is ~9 MB).
MAX_ANSWER = 64 << 20


def connect_host(host: str) -> str:
    """The address to dial for a daemon bound to ``host`` (a wildcard means this machine)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


class Client:
    """Talks to one ringd's HTTP API at ``host:port``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 7412,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        stream_timeout: float | None = 600.0,
    ) -> None:
        self.host = connect_host(host)
        self.port = port
        self.api_key = api_key
        self.timeout = timeout
        self.stream_timeout = stream_timeout

    @property
    def where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    # ------------------------------------------------------------------------- calls
    def status(self) -> dict[str, Any]:
        """The daemon's status as JSON (``GET /ringd/status``); ``Status.from_json`` reads it."""
        return self._call("GET", "/ringd/status", None, self.timeout, MAX_LINE)

    def post_json(
        self, path: str, body: dict[str, Any], timeout: float | None = None,
        *, max_bytes: int = MAX_ANSWER,
    ) -> dict[str, Any]:
        """POST ``body`` as JSON to ``path``; the JSON object the daemon answers.

        ``timeout`` defaults to the client's; an error answer raises its :class:`RingdError`
        (a :class:`RequestError` with the daemon's code), as :meth:`status` does.
        """
        return self._call("POST", path, json.dumps(body).encode(),
                          self.timeout if timeout is None else timeout, max_bytes)

    def stream_generate(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Events of ``POST /ringd/generate``: token dicts, then one finish dict.

        An error event, or an error status, raises :class:`RequestError`. Closing the
        generator early (or Ctrl-C while reading) closes the connection: the daemon cancels.
        """
        conn, resp = self._request(
            "POST", "/ringd/generate", json.dumps(body).encode(), self.stream_timeout
        )
        try:
            if resp.status != 200:
                raise self._error(resp.status, self._read_json(resp))
            while True:
                try:
                    line = resp.readline(MAX_LINE)
                except (OSError, http.client.HTTPException) as e:
                    raise RequestError(
                        ErrorCode.PEER_LOST,
                        f"lost the connection to ringd at {self.where}: {e}",
                        hint="see `ringctl status` and the daemon's log",
                    ) from None
                if not line:
                    raise RequestError(
                        ErrorCode.INTERNAL,
                        f"ringd at {self.where} ended the stream without a finish event",
                        hint="see the daemon's log",
                    )
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    raise RingdError(
                        f"ringd at {self.where} sent a line that is not JSON: {line[:80]!r}"
                    ) from None
                if not isinstance(event, dict):
                    raise RingdError(
                        f"ringd at {self.where} sent an event that is not a JSON object"
                    )
                if event.get("type") == "error":
                    raise _request_error(event)
                yield event
                if event.get("type") == "finish":
                    return
        finally:
            conn.close()

    # ---------------------------------------------------------------------- plumbing
    def _request(
        self, method: str, path: str, body: bytes | None, timeout: float | None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            conn.request(method, path, body=body, headers=headers)
            return conn, conn.getresponse()
        except (ConnectionRefusedError, socket.gaierror, FileNotFoundError) as e:
            conn.close()
            raise DaemonNotRunning(
                f"no ringd running on {self.where} ({e.strerror or e})",
                hint="start it with `ringd run` or `ringctl service install`",
            ) from None
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            if isinstance(e, TimeoutError):
                raise RingdError(
                    f"ringd at {self.where} did not answer within {timeout} s",
                    hint="the daemon may be stuck; see its log",
                ) from None
            raise DaemonNotRunning(
                f"cannot talk to ringd on {self.where}: {e}",
                hint="start it with `ringd run` or `ringctl service install`",
            ) from None
        except BaseException:
            conn.close()
            raise

    def _call(
        self, method: str, path: str, body: bytes | None, timeout: float | None, max_bytes: int
    ) -> dict[str, Any]:
        """One request whose answer is a JSON object; errors as :meth:`_error` makes them."""
        conn, resp = self._request(method, path, body, timeout)
        try:
            try:
                answer = self._read_json(resp, max_bytes)
            except RingdError:
                if resp.status == 200:
                    raise
                answer = None  # an error status says enough
            if resp.status != 200:
                raise self._error(resp.status, answer)
            if not isinstance(answer, dict):
                raise RingdError(f"ringd at {self.where} sent an answer to {path} "
                                 "that is not a JSON object")
            return answer
        finally:
            conn.close()

    def _read_json(self, resp: http.client.HTTPResponse, max_bytes: int = MAX_LINE) -> Any:
        try:
            raw = resp.read(max_bytes + 1)
            if len(raw) > max_bytes:
                raise ValueError(f"larger than {max_bytes} bytes")
            return json.loads(raw)
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise RingdError(
                f"ringd at {self.where} sent an unreadable answer (HTTP {resp.status}): {e}"
            ) from None

    def _error(self, status: int, body: Any) -> RingdError:
        if status == 401:
            return UsageError(
                f"ringd at {self.where} refused the API key",
                hint="set the same api_key as the daemon (config file or RINGD_API_KEY)",
            )
        if isinstance(body, dict) and body.get("type") == "error":
            return _request_error(body)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return RequestError(
                ErrorCode.parse(body["error"].get("code")), str(body["error"].get("message"))
            )
        return RingdError(f"ringd at {self.where} answered HTTP {status}")


def _request_error(event: dict[str, Any]) -> RequestError:
    hint = event.get("hint")
    return RequestError(
        ErrorCode.parse(event.get("code")),
        str(event.get("message") or "request failed"),
        hint=str(hint) if hint else None,
    )
