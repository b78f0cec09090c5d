"""MCP over WebSocket (`connectors.ws_transport`): a browser's token travels as a second
subprotocol and is read back, a subprotocol that holds no token gives none, and a connection has
a bound on the requests it may have in flight."""

import json
import threading

import anyio
import mcp_types as types
import websockets
from mcp.shared.message import SessionMessage
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

from connectors.ws_transport import (
    BEARER_PREFIX,
    SUBPROTOCOL,
    bearer_subprotocol,
    token_from_subprotocols,
    websocket_server,
)
from tests.support import serve_app


def test_a_token_travels_as_a_subprotocol_and_is_read_back():
    for token in ("hs_abc", "hs_" + "x" * 43, "hs_-_"):
        proto = bearer_subprotocol(token)
        assert proto.startswith(BEARER_PREFIX) and "=" not in proto  # a valid subprotocol token: no padding
        assert token_from_subprotocols([SUBPROTOCOL, proto]) == token


def test_no_bearer_subprotocol_or_one_that_is_no_text_gives_no_token():
    assert token_from_subprotocols([]) is None
    assert token_from_subprotocols([SUBPROTOCOL]) is None
    assert token_from_subprotocols([SUBPROTOCOL, BEARER_PREFIX + "__4"]) is None  # bytes ff fe: not UTF-8


async def test_requests_beyond_the_in_flight_limit_are_answered_at_once_and_the_socket_stays_usable():
    """A real socket (Starlette on loopback) whose server holds every request until released: the
    third request in flight gets -32029 from the transport, a repeated id too, and once the held
    requests are answered new ones are accepted again."""

    release = threading.Event()  # set by the test, read by the server's loop in its own thread

    async def endpoint(websocket):
        await websocket.accept(subprotocol=SUBPROTOCOL)
        async with websocket_server(websocket, max_in_flight=2) as (read, write):
            async with anyio.create_task_group() as tg:
                async for message in read:
                    request = message.message

                    async def answer(request=request):
                        while request.params and request.params.get("hold") and not release.is_set():
                            await anyio.sleep(0.01)
                        await write.send(SessionMessage(types.JSONRPCResponse(jsonrpc="2.0", id=request.id, result={})))

                    tg.start_soon(answer)

    url, stop = serve_app(Starlette(routes=[WebSocketRoute("/ws", endpoint)]))
    try:
        async with websockets.connect(url.replace("http", "ws") + "/ws", subprotocols=[SUBPROTOCOL]) as ws:
            for rid in (1, 2):
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": rid, "method": "ping", "params": {"hold": True}}))
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": 3, "method": "ping"}))
            refused = json.loads(await ws.recv())
            assert (
                refused["id"] == 3
                and refused["error"]["code"] == -32029
                and "2 requests" in refused["error"]["message"]
            )
            release.set()
            assert {json.loads(await ws.recv())["id"] for _ in range(2)} == {1, 2}
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": 4, "method": "ping"}))
            assert json.loads(await ws.recv()) == {"jsonrpc": "2.0", "id": 4, "result": {}}
    finally:
        stop()
