"""Small helpers shared by the nio interop tests.

Every network call made through these helpers is bounded by a timeout:
nio's own per-request timeout (see ``CLIENT_CONFIG``) and an outer
``asyncio.wait_for`` so that a hung server cannot hang the suite.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, Awaitable, TypeVar
from urllib.parse import quote, urlencode

from nio import AsyncClient, AsyncClientConfig, ErrorResponse, Response

# Seconds for one HTTP request (nio / aiohttp) and for one awaited helper call.
REQUEST_TIMEOUT = 15.0
CALL_TIMEOUT = 30.0

# nio retries forever on timeouts and 429s unless told otherwise; a test must
# see the first failure instead of looping.
CLIENT_CONFIG = AsyncClientConfig(
    request_timeout=REQUEST_TIMEOUT,
    max_timeouts=0,
    max_limit_exceeded=0,
)

R = TypeVar("R", bound=Response)


def unique_localpart(prefix: str) -> str:
    """A fresh, valid localpart such as ``alice_3f9c1a2b``."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def describe(resp: Any) -> str:
    """Human-readable account of a nio response, for assertion messages."""
    status = getattr(getattr(resp, "transport_response", None), "status", None)
    if isinstance(resp, ErrorResponse):
        return (
            f"{type(resp).__name__} (HTTP {status}): "
            f"errcode={resp.status_code!r} error={resp.message!r}"
        )
    return f"{type(resp).__name__} (HTTP {status}): {resp!r}"


def http_status(resp: Response) -> int | None:
    transport = getattr(resp, "transport_response", None)
    return getattr(transport, "status", None)


async def bounded(awaitable: Awaitable[Any], timeout: float = CALL_TIMEOUT) -> Any:
    return await asyncio.wait_for(awaitable, timeout)


async def expect_ok(awaitable: Awaitable[Any], expected: type[R]) -> R:
    """Await a nio call and insist on a successful response of type ``expected``.

    Some nio parsers (e.g. room_get_state_event) turn any JSON body into a
    "success" object, so the HTTP status is checked as well.
    """
    resp = await bounded(awaitable)
    assert not isinstance(resp, ErrorResponse), f"expected {expected.__name__}, got {describe(resp)}"
    assert isinstance(resp, expected), f"expected {expected.__name__}, got {describe(resp)}"
    status = http_status(resp)
    assert status is not None and 200 <= status < 300, f"non-2xx success: {describe(resp)}"
    return resp


async def expect_error(
    awaitable: Awaitable[Any], errcode: str | None = None, status: int | None = None
) -> ErrorResponse:
    """Await a nio call and insist that it failed (optionally with an errcode/HTTP status)."""
    resp = await bounded(awaitable)
    assert isinstance(resp, ErrorResponse), f"expected an error, got {describe(resp)}"
    if errcode is not None:
        assert resp.status_code == errcode, f"expected errcode {errcode}, got {describe(resp)}"
    if status is not None:
        assert http_status(resp) == status, f"expected HTTP {status}, got {describe(resp)}"
    return resp


def new_client(homeserver: str, user: str = "") -> AsyncClient:
    return AsyncClient(homeserver, user=user, config=CLIENT_CONFIG)


def room_path(room_id: str, *parts: str) -> str:
    """``/_matrix/client/v3/rooms/{roomId}/...`` with every segment escaped."""
    segments = [quote(room_id, safe="")] + [quote(p, safe="") for p in parts]
    return "/_matrix/client/v3/rooms/" + "/".join(segments)


async def raw_request(
    client: AsyncClient,
    method: str,
    path: str,
    params: dict[str, Any] | None = None,
    body: Any = None,
    access_token: str | None = None,
) -> tuple[int, Any]:
    """A raw client-server API call through nio's own aiohttp session.

    Used where nio has no suitable method. Returns (HTTP status, parsed JSON).
    """
    if params:
        path = f"{path}?{urlencode(params)}"
    token = access_token if access_token is not None else client.access_token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body)

    async def go() -> tuple[int, Any]:
        resp = await client.send(method, path, data=data, headers=headers, timeout=REQUEST_TIMEOUT)
        try:
            text = await resp.text()
        finally:
            resp.release()
        try:
            return resp.status, json.loads(text) if text else None
        except json.JSONDecodeError:
            return resp.status, text

    return await bounded(go())


async def raw_get_ok(client: AsyncClient, path: str, params: dict[str, Any] | None = None) -> Any:
    status, body = await raw_request(client, "GET", path, params)
    assert status == 200, f"GET {path} {params or ''} -> HTTP {status}: {body!r}"
    return body
