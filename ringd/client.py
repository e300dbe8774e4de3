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

from ringd.errors import RequestError, RingdError, UsageError

MAX_LINE = 1 << 20


class DaemonNotRunning(RingdError):
    """Nothing answers on the control API's address."""


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
        """The daemon's status dict (``GET /ringd/status``)."""
        conn, resp = self._request("GET", "/ringd/status", None, self.timeout)
        try:
            body = self._read_json(resp)
            if resp.status != 200:
                raise self._error(resp.status, body)
            if not isinstance(body, dict):
                raise RingdError(f"ringd at {self.where} sent a status that is not a JSON object")
            return body
        finally:
            conn.close()

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
                        "peer_lost",
                        f"lost the connection to ringd at {self.where}: {e}",
                        hint="see `ringctl status` and the daemon's log",
                    ) from None
                if not line:
                    raise RequestError(
                        "internal",
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

    def _read_json(self, resp: http.client.HTTPResponse) -> Any:
        try:
            raw = resp.read(MAX_LINE)
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
                str(body["error"].get("code") or "internal"), str(body["error"].get("message"))
            )
        return RingdError(f"ringd at {self.where} answered HTTP {status}")


def _request_error(event: dict[str, Any]) -> RequestError:
    hint = event.get("hint")
    return RequestError(
        str(event.get("code") or "internal"),
        str(event.get("message") or "request failed"),
        hint=str(hint) if hint else None,
    )
