"""MCP over WebSocket (`connectors.ws_transport`), the parts without a socket: a browser's token
travels as a second subprotocol and is read back; a subprotocol that holds no token gives none."""

from connectors.ws_transport import BEARER_PREFIX, SUBPROTOCOL, bearer_subprotocol, token_from_subprotocols


def test_a_token_travels_as_a_subprotocol_and_is_read_back():
    for token in ("hs_abc", "hs_" + "x" * 43, "hs_-_"):
        proto = bearer_subprotocol(token)
        assert proto.startswith(BEARER_PREFIX) and "=" not in proto  # a valid subprotocol token: no padding
        assert token_from_subprotocols([SUBPROTOCOL, proto]) == token


def test_no_bearer_subprotocol_or_one_that_is_no_text_gives_no_token():
    assert token_from_subprotocols([]) is None
    assert token_from_subprotocols([SUBPROTOCOL]) is None
    assert token_from_subprotocols([SUBPROTOCOL, BEARER_PREFIX + "__4"]) is None  # bytes ff fe: not UTF-8
