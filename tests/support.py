"""Helpers shared by the test modules (`from tests.support import ...`: pytest puts the checkout
on the path).

Importing this module starts nothing and imports no Prefect: conftest.py sets the environment
Prefect reads at import, before any test module is imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from connectors.hostedai import HostedAIClient, Policy
from connectors.processes import free_port, serve_in_thread
from homeskillet.schemas import HostedAICredentials

__all__ = [
    "HOMESKILLET",
    "emulator_client",
    "emulator_credentials",
    "free_port",
    "serve_app",
]

HOMESKILLET = str(Path(sys.executable).with_name("homeskillet"))
"""The `homeskillet` executable of this environment. Its commands reach the session's services: a
test that runs it asks for `local_services` (or `postgres`, for a command that only reads the
ledger)."""


def serve_app(app, name: str = "test app") -> tuple[str, Callable[[], None]]:
    """An ASGI app on a free loopback port (real HTTP), in a thread of this process: (url, stop)."""
    serving = serve_in_thread(app, name)
    url = serving.__enter__()
    return url, lambda: serving.__exit__(None, None, None)


def emulator_credentials(
    emulator,
    tenant: str = "acme",
    url: str | None = None,
    key: str | None = None,
    team: str | None = None,
    auth_header: str = "x-api-key",
) -> HostedAICredentials:
    """A tenant's credentials on the hosted·ai emulator (the `emulator` fixture); any part can be
    replaced: another base URL, a wrong key, another team, another auth header."""
    t = emulator.teams[tenant]
    return HostedAICredentials(
        url=url or emulator.url, api_key=key or t.api_key, team_id=team or t.id, auth_header=auth_header
    )


def emulator_client(emulator, tenant: str = "acme", **kwargs) -> HostedAIClient:
    """A hosted·ai client of a tenant on the emulator: keyword arguments that are `Policy` fields
    (attempts, breaker_threshold, ...) make its policy, the rest go to `emulator_credentials`."""
    policy = {k: kwargs.pop(k) for k in list(kwargs) if k in Policy.model_fields}
    return HostedAIClient(emulator_credentials(emulator, tenant, **kwargs), Policy(**policy) if policy else None)
