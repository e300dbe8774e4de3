"""The local HTTP API: OpenAI-compatible routes and the control API ``ringctl`` uses.

Routes (every one needs ``Authorization: Bearer KEY`` when an API key is set):

- ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` --
  OpenAI-compatible, streaming (SSE) and not; errors as ``{"error": {message, type, param, code}}``.
- ``GET /ringd/status`` -- the backend's :class:`ringd.status.Status` as JSON.
- ``POST /ringd/generate`` -- NDJSON events: ``{"type": "token", ...}`` lines, then one
  ``{"type": "finish", ...}`` or ``{"type": "error", "code", "message", "hint"}``.
- ``POST /ringd/shutdown`` -- asks the daemon to stop (only when ``on_shutdown`` is given).
- ``POST /ringd/verify`` -- ``{"prompt", "steps"}``: the ring's greedy tokens for a raw prompt
  with the float32 logits of every step (base64) and the route taken, for ``ringctl verify``
  (only when the backend has ``trace``, i.e. a ring).
- ``GET /healthz``.
- ``GET /metrics`` -- Prometheus metrics in the text exposition format (:mod:`ringd.net.metrics`).
- ``GET /`` and ``GET /dashboard/{file}`` -- the dashboard: static files shipped in the package
  (``ringd/net/dashboard/``), the only routes served without the API key (they hold no data;
  the page asks for the key and sends it with every request it makes).

Requests: ``model`` may be left out (the served one is used); ``temperature`` defaults to 1 on
the OpenAI routes (as OpenAI's does) and to 0 (greedy) on ``/ringd/generate``; ``max_tokens``
(or ``max_completion_tokens``) defaults to ``default_max_tokens``; ``top_k`` is an extension;
``n`` must be 1. A body that is not a JSON object, or a field of the wrong type or range, is a
400 naming the field; a body over ``max_body`` bytes is a 413.

A generation's first event is awaited before the response starts, so errors found before the
first token (busy, not ready, context too long) get their own HTTP status; later ones end the
stream with an error event. When the client goes away mid-request the handler is cancelled and
the backend's iterator closed, which frees the request on the ring.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
import uuid
from importlib import resources
from urllib.parse import urlsplit
from typing import Any, AsyncIterator, Callable, Protocol

from aiohttp import web

from ringd.core.requests import FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from ringd.errors import ErrorCode, RequestError, UsageError
from ringd.net.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ringd.net.metrics import Metrics
from ringd.status import Status

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What the HTTP API and the control API need from whatever runs requests: a ring
    node (:class:`ringd.daemon.NodeBackend`) or one process (:class:`ringd.solo.SoloBackend`).
    ``trace`` (for ``POST /ringd/verify``) is optional."""

    def served_models(self) -> list[str]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]: ...

    def status(self) -> Status: ...

DEFAULT_MAX_BODY = 2 * 1024 * 1024
MAX_VERIFY_STEPS = 32
DEFAULT_MAX_TOKENS = 1024
CHAT_ROLES = ("system", "user", "assistant", "developer")
#: The dashboard's files (in ``ringd/net/dashboard/``) and their content types.
DASHBOARD_FILES = {"index.html": "text/html", "app.js": "text/javascript",
                   "style.css": "text/css"}
#: The page loads only its own files and talks only to this node.
DASHBOARD_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                 "connect-src 'self'; base-uri 'none'; form-action 'self'; "
                 "frame-ancestors 'none'")


def dashboard_file(name: str) -> bytes:
    """One of the dashboard's files, from the installed package."""
    if name not in DASHBOARD_FILES:
        raise KeyError(name)
    return resources.files("ringd.net").joinpath("dashboard", name).read_bytes()


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiError(Exception):
    """A request the API refuses: HTTP status plus an OpenAI-style error body."""

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        *,
        param: str | None = None,
        hint: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.param = param
        self.hint = hint
        self.status = status if status is not None else self.code.http_status

    @classmethod
    def from_request_error(cls, e: RequestError) -> "ApiError":
        return cls(e.code, e.message, hint=e.hint, param=_guess_param(e.message))

    def openai_body(self) -> dict[str, Any]:
        message = f"{self.message} (hint: {self.hint})" if self.hint else self.message
        return {
            "error": {
                "message": message,
                "type": _error_type(self.status),
                "param": self.param,
                "code": self.code,
            }
        }

    def event(self) -> dict[str, Any]:
        return {"type": "error", "code": self.code, "message": self.message, "hint": self.hint}


def _public(request: web.Request) -> bool:
    """The dashboard's static files: served without the API key (they hold no data)."""
    return request.method in ("GET", "HEAD") and (
        request.path == "/" or request.path.startswith("/dashboard/"))


def _route(request: web.Request) -> str:
    """The route a request matched (``/dashboard/{name}``), for the metrics' label."""
    info = request.match_info
    resource = info.route.resource if info is not None and info.route is not None else None
    return resource.canonical if resource is not None else "unmatched"


def _guess_param(message: str) -> str | None:
    """``"top_p must be ..."`` -> ``"top_p"``: SamplingParams messages start with the field."""
    first = message.split(" ", 1)[0].rstrip(":")
    return (
        first if first in {"temperature", "top_p", "top_k", "seed", "max_tokens", "stop"} else None
    )


# ------------------------------------------------------------------------- body parsing
def _type_name(v: Any) -> str:
    return "null" if v is None else "a boolean" if isinstance(v, bool) else type(v).__name__


def _get(body: dict[str, Any], name: str, kind: str, default: Any = None) -> Any:
    """Field ``name`` of ``body`` as ``kind`` (int, number, bool, str, list, dict); null: absent."""
    v = body.get(name)
    if v is None:
        return default
    ok = {
        "int": isinstance(v, int) and not isinstance(v, bool),
        "number": isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
        "str": isinstance(v, str),
        "list": isinstance(v, list),
        "dict": isinstance(v, dict),
    }[kind]
    if not ok:
        want = {
            "int": "an integer",
            "number": "a number",
            "bool": "true or false",
            "str": "a string",
            "list": "an array",
            "dict": "an object",
        }[kind]
        raise ApiError("bad_request", f"{name} must be {want}, got {_type_name(v)}", param=name)
    return float(v) if kind == "number" else v


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return tuple(v)
    raise ApiError("bad_request", "stop must be a string or an array of strings", param="stop")


def _refuse(body: dict[str, Any], name: str, allowed: Callable[[Any], bool], why: str) -> None:
    v = body.get(name)
    if v is not None and not allowed(v):
        raise ApiError("bad_request", f"{name}: {why}", param=name)


def sampling_from(
    body: dict[str, Any], default_max_tokens: int, default_temperature: float
) -> SamplingParams:
    """SamplingParams from OpenAI-style fields (``top_k`` is an extension)."""
    _refuse(body, "n", lambda v: v == 1, "only n=1 is supported; send several requests instead")
    max_tokens = _get(body, "max_completion_tokens", "int")
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", "int", default_max_tokens)
    seed = _get(body, "seed", "int")
    try:
        return SamplingParams(
            temperature=_get(body, "temperature", "number", default_temperature),
            top_p=_get(body, "top_p", "number", 1.0),
            top_k=_get(body, "top_k", "int", 0),
            seed=seed,
            max_tokens=max_tokens,
            stop=_stop(body),
        )
    except RequestError as e:
        raise ApiError.from_request_error(e) from None


def _content(i: int, v: Any) -> str:
    """A message's content: a string, or an array of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        parts = []
        for part in v:
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise ApiError(
                    "bad_request",
                    f"messages[{i}].content: only text parts are supported",
                    param=f"messages[{i}].content",
                )
            parts.append(part["text"])
        return "".join(parts)
    if v is None:
        return ""
    raise ApiError(
        "bad_request",
        f"messages[{i}].content must be a string or an array of text parts, got {_type_name(v)}",
        param=f"messages[{i}].content",
    )


def messages_from(body: dict[str, Any]) -> tuple[dict[str, str], ...]:
    raw = _get(body, "messages", "list")
    if not raw:
        raise ApiError("bad_request", "messages must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ApiError(
                "bad_request", f"messages[{i}] must be an object", param=f"messages[{i}]"
            )
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise ApiError(
                "bad_request",
                f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                param=f"messages[{i}].role",
            )
        out.append(
            {
                "role": "system" if role == "developer" else role,
                "content": _content(i, m.get("content")),
            }
        )
    return tuple(out)


def prompt_from(body: dict[str, Any]) -> str:
    v = body.get("prompt")
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        v = v[0]
    if not isinstance(v, str):
        raise ApiError(
            "bad_request", "prompt must be a string (one prompt per request)", param="prompt"
        )
    return v


def chat_request(body: dict[str, Any], default_max_tokens: int) -> GenerationRequest:
    _refuse(body, "logprobs", lambda v: v is False, "log probabilities are not supported")
    _refuse(body, "tools", lambda v: v == [], "tools are not supported")
    model = _get(body, "model", "str")
    return GenerationRequest(
        params=sampling_from(body, default_max_tokens, 1.0),
        messages=messages_from(body),
        model=model,
    )


def completion_request(body: dict[str, Any], default_max_tokens: int) -> GenerationRequest:
    _refuse(body, "logprobs", lambda v: v in (0, False), "log probabilities are not supported")
    _refuse(body, "echo", lambda v: v is False, "echo is not supported")
    _refuse(body, "best_of", lambda v: v == 1, "only best_of=1 is supported")
    _refuse(body, "suffix", lambda v: v == "", "suffix is not supported")
    model = _get(body, "model", "str")
    return GenerationRequest(
        params=sampling_from(body, default_max_tokens, 1.0), prompt=prompt_from(body), model=model
    )


def control_request(body: dict[str, Any], default_max_tokens: int) -> GenerationRequest:
    """``/ringd/generate`` body: ``messages`` or ``prompt`` plus the sampling fields."""
    model = _get(body, "model", "str")
    params = sampling_from(body, default_max_tokens, 0.0)
    if ("messages" in body) == ("prompt" in body):
        raise ApiError("bad_request", "give either messages or prompt", param="messages")
    if "messages" in body:
        return GenerationRequest(params=params, messages=messages_from(body), model=model)
    return GenerationRequest(params=params, prompt=prompt_from(body), model=model)


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _get(body, "stream", "bool", False)
    opts = _get(body, "stream_options", "dict", {})
    include_usage = opts.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(
            "bad_request",
            "stream_options.include_usage must be true or false",
            param="stream_options.include_usage",
        )
    return stream, include_usage


def _usage(f: FinishEvent) -> dict[str, int]:
    return {
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
    }


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _aclose(it: Any) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()


# ------------------------------------------------------------------------------ server
class ApiServer:
    """aiohttp server for the OpenAI-compatible API and ringctl's control API."""

    def __init__(
        self,
        backend: Backend,
        *,
        host: str = "127.0.0.1",
        port: int = 7412,
        api_key: str | None = None,
        on_shutdown: Callable[[], None] | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        shutdown_timeout: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        if not is_loopback(host) and not api_key:
            raise UsageError(
                f"the HTTP API would listen on {host}:{port}, beyond this machine, "
                "without an API key",
                hint="set api_key in the config (or RINGD_API_KEY), or keep http_host = 127.0.0.1",
            )
        self.backend = backend
        self.host = host
        self.port = port
        self._api_key = api_key
        self._on_shutdown = on_shutdown
        self._max_body = max_body
        self._default_max_tokens = default_max_tokens
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None
        self.metrics = metrics if metrics is not None else Metrics(backend.status)
        self._dashboard = {name: dashboard_file(name) for name in DASHBOARD_FILES}

    # -------------------------------------------------------------------- lifecycle
    async def start(self) -> int:
        """Listen; returns the actual port (useful with ``port=0``)."""
        app = web.Application(middlewares=[self._middleware], client_max_size=self._max_body)
        app.add_routes(
            [
                web.get("/v1/models", self._models),
                web.post("/v1/chat/completions", self._chat),
                web.post("/v1/completions", self._completions),
                web.get("/ringd/status", self._status),
                web.post("/ringd/generate", self._generate),
                web.post("/ringd/shutdown", self._shutdown),
                web.post("/ringd/verify", self._verify),
                web.post("/ringd/model/use", self._use_model),
                web.get("/healthz", self._health),
                web.get("/metrics", self._metrics),
                web.get("/", self._dashboard_index),
                web.get("/dashboard/{name}", self._dashboard_file),
            ]
        )
        runner = web.AppRunner(
            app,
            handler_cancellation=True,
            shutdown_timeout=self._shutdown_timeout,
            access_log=logging.getLogger(__name__ + ".access"),
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise UsageError(
                f"cannot listen on {self.host}:{self.port} for the HTTP API: {e.strerror or e}",
                hint="is another ringd running? pick another http_port",
            ) from None
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info("HTTP API on http://%s:%d", self.host, self.port)
        return self.port

    async def close(self) -> None:
        """Stop listening; open streams get ``shutdown_timeout`` seconds, then are cancelled."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # ------------------------------------------------------------------- plumbing
    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[..., Any]
    ) -> web.StreamResponse:
        try:
            self._check_site(request)
            if self._api_key is not None and not _public(request):
                self._check_key(request)
            resp = await handler(request)
            self.metrics.api_request(_route(request), resp.status)
            return resp
        except ApiError as e:
            return self._error_response(request, e)
        except web.HTTPRequestEntityTooLarge:
            return self._error_response(
                request,
                ApiError("request_too_large", f"request body larger than {self._max_body} bytes"),
            )
        except web.HTTPException as e:
            if e.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed"}.get(e.status, "bad_request")
            return self._error_response(
                request,
                ApiError(code, f"{request.method} {request.path}: {e.reason}", status=e.status),
            )

    def _check_site(self, request: web.Request) -> None:
        """Refuse what a web page in the user's browser could send: without an API key, a
        request by a name that is not loopback (another site's name re-pointed at 127.0.0.1:
        DNS rebinding); and any request that changes something from a page of another origin
        (a form or ``fetch`` POST, which a browser sends without asking)."""
        host = request.headers.get("Host")
        if self._api_key is None and host is not None:
            name = urlsplit("//" + host).hostname or ""
            if not is_loopback(name):
                raise ApiError("forbidden", f"request for host {host!r}: without an api_key "
                               "this API answers only to loopback names",
                               hint="use http://127.0.0.1:PORT or http://localhost:PORT, or "
                                    "set api_key")
        origin = request.headers.get("Origin")
        if (origin is not None and request.method not in ("GET", "HEAD", "OPTIONS")
                and urlsplit(origin).netloc != host):
            raise ApiError("forbidden", f"a page of {origin[:100]!r} may not use this API",
                           hint="call it from the dashboard on this port, or from a program "
                                "(no Origin header)")

    def _check_key(self, request: web.Request) -> None:
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key.strip().encode(), self._api_key.encode()
        ):  # type: ignore[union-attr]
            raise ApiError(
                "invalid_api_key",
                "missing API key" if not auth else "wrong API key",
                hint="send the node's api_key as 'Authorization: Bearer KEY'",
            )

    def _error_response(self, request: web.Request, e: ApiError) -> web.Response:
        self.metrics.api_error(e.code.value)
        self.metrics.api_request(_route(request), e.status)
        body = e.event() if request.path.startswith("/ringd/") else e.openai_body()
        return web.json_response(body, status=e.status)

    def _stream_error(self, e: Exception) -> ApiError:
        """An error that ends a stream already started (counted like any answered error)."""
        err = self._as_api_error(e)
        self.metrics.api_error(err.code.value)
        return err

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        if request.content_length is not None and request.content_length > self._max_body:
            raise ApiError("request_too_large", f"request body larger than {self._max_body} bytes")
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError("bad_request", f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(
                "bad_request", f"request body must be a JSON object, got {_type_name(body)}"
            )
        return body

    def _resolve_model(self, request: GenerationRequest) -> GenerationRequest:
        served = self.backend.served_models()
        if request.model is None or request.model == "":
            if not served:
                raise ApiError(
                    "not_ready",
                    "no model is being served yet",
                    hint="run `ringctl status` to see why the ring is not ready",
                )
            return GenerationRequest(
                params=request.params,
                messages=request.messages,
                prompt=request.prompt,
                model=served[0],
            )
        if request.model not in served:
            listed = ", ".join(served) if served else "none yet"
            raise ApiError(
                "model_not_served",
                f"model {request.model!r} is not served here (served: {listed})",
                param="model",
                hint="leave out model, or name a served one",
            )
        return request

    async def _open(
        self, request: GenerationRequest
    ) -> tuple[AsyncIterator[TokenEvent | FinishEvent], TokenEvent | FinishEvent]:
        """Start a generation and wait for its first event (so early errors keep their status)."""
        it = self.backend.generate(request)
        try:
            first = await anext(it)
        except Exception as e:
            await _aclose(it)
            raise self._as_api_error(e) from None
        except BaseException:
            await _aclose(it)
            raise
        return it, first

    @staticmethod
    def _as_api_error(e: Exception) -> ApiError:
        if isinstance(e, ApiError):
            return e
        if isinstance(e, RequestError):
            return ApiError.from_request_error(e)
        if isinstance(e, StopAsyncIteration):
            return ApiError("internal", "the generation ended without a finish event")
        log.error("generation failed", exc_info=e)
        return ApiError(
            "internal", f"internal error: {type(e).__name__}: {e}", hint="see the ringd log"
        )

    @staticmethod
    async def _events(
        it: AsyncIterator[TokenEvent | FinishEvent], first: TokenEvent | FinishEvent
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        """The first event, then the rest; stops after the finish event."""
        yield first
        if isinstance(first, FinishEvent):
            return
        async for ev in it:
            yield ev
            if isinstance(ev, FinishEvent):
                return
        raise ApiError("internal", "the generation ended without a finish event")

    # -------------------------------------------------------------------- routes
    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def _dashboard_index(self, request: web.Request) -> web.Response:
        return self._static("index.html")

    async def _dashboard_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._dashboard:
            raise ApiError("not_found", f"no dashboard file {name!r}", status=404)
        return self._static(name)

    def _static(self, name: str) -> web.Response:
        return web.Response(body=self._dashboard[name], headers={
            "Content-Type": DASHBOARD_FILES[name] + "; charset=utf-8",
            "Cache-Control": "no-cache", "Content-Security-Policy": DASHBOARD_CSP,
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.backend.status().to_json())

    async def _shutdown(self, request: web.Request) -> web.Response:
        if self._on_shutdown is None:
            raise ApiError("not_found", "this server cannot be stopped through the API", status=404)
        self._on_shutdown()
        return web.json_response({"stopping": True}, status=202)

    async def _verify(self, request: web.Request) -> web.Response:
        trace = getattr(self.backend, "trace", None)
        if trace is None:
            raise ApiError("not_found", "verify compares a ring with a local reference; "
                           "this node runs the whole model itself", status=404)
        body = await self._json_body(request)
        prompt = _get(body, "prompt", "str")
        if not prompt:
            raise ApiError("bad_request", "prompt must be a non-empty string", param="prompt")
        steps = _get(body, "steps", "int", 8)
        if not 1 <= steps <= MAX_VERIFY_STEPS:
            raise ApiError("bad_request", f"steps must be 1..{MAX_VERIFY_STEPS}, got {steps}",
                           param="steps")
        try:
            result = await trace(prompt, steps)
        except RequestError as e:
            raise ApiError.from_request_error(e) from None
        return web.json_response(result)

    async def _use_model(self, request: web.Request) -> web.Response:
        use = getattr(self.backend, "use_model", None)
        if use is None:
            raise ApiError("not_found", "this node is not part of a ring", status=404)
        body = await self._json_body(request)
        name = _get(body, "model", "str")
        if not name:
            raise ApiError("bad_request", "model must be a non-empty string", param="model")
        try:
            return web.json_response(use(name))
        except UsageError as e:
            raise ApiError("bad_request", e.message, hint=e.hint, param="model") from None

    async def _models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": created, "owned_by": "ringd"}
                    for m in self.backend.served_models()
                ],
            }
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        stream, include_usage = _stream_options(body)
        gen = self._resolve_model(chat_request(body, self._default_max_tokens))
        return await self._openai(request, gen, stream, include_usage, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        stream, include_usage = _stream_options(body)
        gen = self._resolve_model(completion_request(body, self._default_max_tokens))
        return await self._openai(request, gen, stream, include_usage, chat=False)

    async def _openai(
        self,
        request: web.Request,
        gen: GenerationRequest,
        stream: bool,
        include_usage: bool,
        *,
        chat: bool,
    ) -> web.StreamResponse:
        it, first = await self._open(gen)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        base = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": gen.model,
        }
        try:
            if not stream:
                return await self._openai_whole(it, first, base, chat)
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await resp.prepare(request)
            if chat:
                await resp.write(
                    _sse(
                        {
                            **base,
                            "choices": [
                                {
                                    "index": 0,
                                    "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None,
                                }
                            ],
                        }
                    )
                )
            try:
                async for ev in self._events(it, first):
                    if isinstance(ev, TokenEvent):
                        if ev.text:
                            choice = (
                                {"index": 0, "delta": {"content": ev.text}, "finish_reason": None}
                                if chat
                                else {"index": 0, "text": ev.text, "finish_reason": None}
                            )
                            await resp.write(_sse({**base, "choices": [choice]}))
                        continue
                    choice = (
                        {"index": 0, "delta": {}, "finish_reason": ev.reason}
                        if chat
                        else {"index": 0, "text": "", "finish_reason": ev.reason}
                    )
                    await resp.write(_sse({**base, "choices": [choice]}))
                    if include_usage:
                        await resp.write(_sse({**base, "choices": [], "usage": _usage(ev)}))
                await resp.write(b"data: [DONE]\n\n")
            except ConnectionError:
                raise
            except Exception as e:
                await resp.write(_sse(self._stream_error(e).openai_body()))
            return resp
        finally:
            await _aclose(it)

    async def _openai_whole(
        self,
        it: AsyncIterator[TokenEvent | FinishEvent],
        first: TokenEvent | FinishEvent,
        base: dict[str, Any],
        chat: bool,
    ) -> web.Response:
        parts: list[str] = []
        finish: FinishEvent | None = None
        try:
            async for ev in self._events(it, first):
                if isinstance(ev, TokenEvent):
                    parts.append(ev.text)
                else:
                    finish = ev
        except Exception as e:
            raise self._as_api_error(e) from None
        assert finish is not None
        text = "".join(parts)
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish.reason,
                "logprobs": None,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish.reason, "logprobs": None}
            obj = "text_completion"
        return web.json_response(
            {**base, "object": obj, "choices": [choice], "usage": _usage(finish)}
        )

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        gen = self._resolve_model(control_request(body, self._default_max_tokens))
        it, first = await self._open(gen)
        try:
            resp = web.StreamResponse(
                headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"}
            )
            await resp.prepare(request)
            try:
                async for ev in self._events(it, first):
                    if isinstance(ev, TokenEvent):
                        line = {
                            "type": "token",
                            "index": ev.index,
                            "token_id": ev.token_id,
                            "text": ev.text,
                        }
                    else:
                        line = {
                            "type": "finish",
                            "reason": ev.reason,
                            "prompt_tokens": ev.prompt_tokens,
                            "completion_tokens": ev.completion_tokens,
                            "time_to_first_token": ev.time_to_first_token,
                            "tokens_per_second": ev.tokens_per_second,
                            "model": gen.model,
                        }
                    await resp.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
            except ConnectionError:
                raise
            except Exception as e:
                await resp.write(json.dumps(self._stream_error(e).event()).encode() + b"\n")
            return resp
        finally:
            await _aclose(it)
