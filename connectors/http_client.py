"""The process's HTTP client: one long-lived `httpx.AsyncClient` per event loop, shared by every
connector that calls out (model servers, OpenAI-compatible providers, hosted·ai).

Its connection pool keeps connections open between calls and its TLS context is made once (a new
client per call spent ~8 % of a request's CPU building one). A client belongs to the loop that
opened its connections, so there is one per loop, and it goes with its loop.

It keeps no cookies: every call carries its own credentials in its headers, and a cookie one
tenant's call was given must never ride along on another tenant's call through the shared client.
"""

from __future__ import annotations

import asyncio
import weakref
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()
LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=64)


def client() -> httpx.AsyncClient:
    """This event loop's client (made on first use)."""
    loop = asyncio.get_running_loop()
    found = _clients.get(loop)
    if found is None:
        for closed in [other for other in _clients if other.is_closed()]:
            del _clients[closed]  # its loop is gone, and its connections with it
        no_cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        found = _clients[loop] = httpx.AsyncClient(limits=LIMITS, cookies=no_cookies)
    return found
