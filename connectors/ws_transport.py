"""MCP over WebSocket, on the SDK's public stream API (mcp 2.x has no WebSocket transport).

One JSON-RPC message per text frame, subprotocol `mcp`. Both sides bridge the socket to the
`(read_stream, write_stream)` pair that `Server.run(read, write, init_options)` and
`mcp.Client(transport)` take, and parse with the SDK's JSON-RPC message adapter. A socket that
closes mid-call ends the pumps quietly and cancels the server's run on that socket, and with
it every call in flight.

Server side (Starlette/ASGI): `websocket_server(websocket)`; the websocket is handed to
handlers as the request context (`ctx.request_context.request`), like the HTTP transports hand
the Starlette Request. A malformed frame gets a JSON-RPC error (-32700 / -32600) from the
transport, a frame above `max_message_bytes` a -32600 and a request beyond `max_in_flight`
unanswered ones a -32029, the connection staying usable.

Client side: `WebSocketTransport(url, token=…)` (the `websockets` library), usable as
`mcp.Client(WebSocketTransport(...))`.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import mcp_types as types
from mcp.shared._context_streams import create_context_streams
from mcp.shared.message import ServerMessageMetadata, SessionMessage

log = logging.getLogger(__name__)

SUBPROTOCOL = "mcp"
BEARER_PREFIX = "base64url.bearer."  # browsers: the token as a second subprotocol (Kubernetes' style)
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
TOO_MANY_IN_FLIGHT = -32029  # implementation-defined server error, as the server's rate limits
DEFAULT_MAX_IN_FLIGHT = 8


def bearer_subprotocol(token: str) -> str:
    return BEARER_PREFIX + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


def token_from_subprotocols(subprotocols: list[str]) -> str | None:
    for proto in subprotocols:
        if proto.startswith(BEARER_PREFIX):
            data = proto[len(BEARER_PREFIX) :]
            try:
                return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)).decode()
            except (ValueError, UnicodeDecodeError):
                return None
    return None


def _error_frame(code: int, message: str, request_id: Any = None) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}})


def _id_of(text: str | bytes) -> Any:
    """The id of a frame that is JSON but no valid JSON-RPC message, to answer it (else null)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    rid = value.get("id") if isinstance(value, dict) else None
    return rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None


def _forget(in_flight: set[Any], message: Any):
    """The hook the SDK calls for a request it settles without an answer (one the client
    cancelled): its place in flight is free again."""

    async def forget() -> None:
        if isinstance(message, types.JSONRPCRequest):
            in_flight.discard(message.id)

    return forget


@asynccontextmanager
async def websocket_server(
    websocket: Any, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
) -> AsyncIterator[tuple[Any, Any]]:
    """Bridge an accepted Starlette WebSocket to the server's (read_stream, write_stream).

    At most `max_in_flight` requests of the connection are answered at once: a request beyond it
    gets a -32029 error at once from the transport (the server never sees it), the connection
    staying usable."""
    from starlette.websockets import WebSocketDisconnect

    read_writer, read_stream = create_context_streams[SessionMessage | Exception](0)
    write_stream, write_reader = create_context_streams[SessionMessage](0)
    send_lock = anyio.Lock()
    in_flight: set[Any] = set()  # ids of the requests sent to the server and not answered yet

    async def send_text(text: str) -> None:
        async with send_lock:
            await websocket.send_text(text)

    async def ws_reader() -> None:
        try:
            async with read_writer:
                while True:
                    frame = await websocket.receive()
                    if frame["type"] == "websocket.disconnect":
                        break
                    data = frame.get("text")
                    if data is None:
                        data = frame.get("bytes") or b""
                    size = len(data.encode() if isinstance(data, str) else data)
                    if size > max_message_bytes:
                        await send_text(
                            _error_frame(
                                INVALID_REQUEST,
                                f"message of {size} bytes exceeds the limit of {max_message_bytes} bytes",
                                _id_of(data),
                            )
                        )
                        continue
                    try:
                        message = types.jsonrpc_message_adapter.validate_json(data, by_name=False)
                    except Exception:
                        try:
                            json.loads(data)
                        except ValueError:
                            await send_text(_error_frame(PARSE_ERROR, "parse error: not JSON"))
                            continue
                        await send_text(_error_frame(INVALID_REQUEST, "invalid JSON-RPC message", _id_of(data)))
                        continue
                    if isinstance(message, types.JSONRPCRequest):
                        if len(in_flight) >= max_in_flight or message.id in in_flight:
                            why = f"{max_in_flight} requests are in flight on this connection, its limit"
                            if message.id in in_flight:
                                why = f"request id {message.id!r} is already in flight on this connection"
                            await send_text(_error_frame(TOO_MANY_IN_FLIGHT, why, message.id))
                            continue
                        in_flight.add(message.id)
                    metadata = ServerMessageMetadata(
                        request_context=websocket, on_request_unanswered=_forget(in_flight, message)
                    )
                    await read_writer.send(SessionMessage(message, metadata=metadata))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, WebSocketDisconnect, RuntimeError, OSError):
            await anyio.lowlevel.checkpoint()  # the socket or the session went away: end quietly
        # The socket is gone (or the session ended): cancel the server too, so that the calls in
        # flight are cancelled now rather than run on for a client that cannot hear them.
        tg.cancel_scope.cancel()

    async def ws_writer() -> None:
        try:
            async with write_reader:
                async for session_message in write_reader:
                    message = session_message.message
                    if isinstance(message, types.JSONRPCResponse | types.JSONRPCError):
                        in_flight.discard(message.id)
                    await send_text(message.model_dump_json(by_alias=True, exclude_unset=True))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, WebSocketDisconnect, RuntimeError, OSError):
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ws_reader)
        tg.start_soon(ws_writer)
        yield read_stream, write_stream
        tg.cancel_scope.cancel()


class WebSocketTransport:
    """Client side: `async with Client(WebSocketTransport("ws://127.0.0.1:8765/ws", token=…))`.

    The token goes as `Authorization: Bearer` (or, with `token_in_subprotocol=True`, as a
    `base64url.bearer.…` subprotocol, as a browser must send it)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        token_in_subprotocol: bool = False,
        max_message_bytes: int = 16 * DEFAULT_MAX_MESSAGE_BYTES,
    ):
        self.url = url
        self.token = token
        self.token_in_subprotocol = token_in_subprotocol
        self.max_message_bytes = max_message_bytes
        self._cm = None
        self.websocket = None  # the live socket (tests close it mid-call)

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[tuple[Any, Any]]:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        subprotocols = [SUBPROTOCOL]
        headers = {}
        if self.token is not None:
            if self.token_in_subprotocol:
                subprotocols.append(bearer_subprotocol(self.token))
            else:
                headers["Authorization"] = f"Bearer {self.token}"
        read_writer, read_stream = create_context_streams[SessionMessage | Exception](0)
        write_stream, write_reader = create_context_streams[SessionMessage](0)

        async with connect(
            self.url,
            subprotocols=subprotocols,
            additional_headers=headers,
            max_size=self.max_message_bytes,
            open_timeout=30,
        ) as ws:
            self.websocket = ws

            async def ws_reader() -> None:
                try:
                    async with read_writer:
                        async for raw in ws:
                            try:
                                message = types.jsonrpc_message_adapter.validate_json(raw, by_name=False)
                            except Exception as exc:
                                await read_writer.send(exc)
                                continue
                            await read_writer.send(SessionMessage(message))
                except (ConnectionClosed, anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                    await anyio.lowlevel.checkpoint()

            async def ws_writer() -> None:
                try:
                    async with write_reader:
                        async for session_message in write_reader:
                            await ws.send(session_message.message.model_dump_json(by_alias=True, exclude_unset=True))
                except (ConnectionClosed, anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                    await anyio.lowlevel.checkpoint()

            async with anyio.create_task_group() as tg:
                tg.start_soon(ws_reader)
                tg.start_soon(ws_writer)
                try:
                    yield read_stream, write_stream
                finally:
                    tg.cancel_scope.cancel()

    async def __aenter__(self) -> tuple[Any, Any]:
        self._cm = self._connect()
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc: Any) -> bool | None:
        cm, self._cm = self._cm, None
        return await cm.__aexit__(*exc)
