"""The shared HTTP client: one per event loop, and it keeps no cookies between calls."""

import asyncio
from http.server import BaseHTTPRequestHandler

import pytest

from connectors import http_client


class _SetsACookie(BaseHTTPRequestHandler):
    """Answers with a session cookie, and with the Cookie header it was sent (if any)."""

    def do_GET(self):  # noqa: N802
        body = (self.headers.get("Cookie") or "").encode()
        self.send_response(200)
        self.send_header("Set-Cookie", "session=tenant-a; Path=/")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def cookie_server(serve_http):
    host, port = serve_http(_SetsACookie)
    return f"http://{host}:{port}"


async def test_a_cookie_one_call_was_given_never_rides_on_the_next(cookie_server):
    """Every tenant's calls share the client: a cookie kept from tenant A's call would go out
    with tenant B's."""
    client = http_client.client()
    first = await client.get(cookie_server)
    assert first.headers["set-cookie"].startswith("session=")  # the server did set one
    second = await client.get(cookie_server)
    assert second.text == ""  # sent without it
    assert list(client.cookies.jar) == []


def test_one_client_per_event_loop():
    async def twice():
        return http_client.client(), http_client.client()

    a1, a2 = asyncio.run(twice())
    b1, _ = asyncio.run(twice())
    assert a1 is a2 and a1 is not b1
