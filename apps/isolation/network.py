"""The local services from elsewhere: the Prefect API from off the host (and without its auth
string, where it has one), and A's local model server without its key or through `/slots`.

Loopback is not a boundary between the users and processes of one machine, so a model server
is reached here the way any of them could: a plain HTTP call to its address."""

from __future__ import annotations

import socket

import httpx
import psutil

from apps.isolation.report import Attack, Report, Target
from connectors import openai_client
from connectors.model_server import auth_headers
from connectors.prefect_server import basic_auth
from homeskillet.errors import InferenceError
from homeskillet.settings import get_settings


async def attacks(report: Report, target: Target) -> None:
    off_host(report)
    await prefect_auth(report)
    await model_server(report, target)


def off_host(report: Report) -> None:
    port = get_settings().prefect_port
    addresses = [
        a.address
        for nic in psutil.net_if_addrs().values()
        for a in nic
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]
    if not addresses:
        report.rows.append(Attack("reach the Prefect API from off the host", "no non-loopback address", "n/a"))
        return
    with socket.socket() as sock:
        sock.settimeout(2)
        reached = sock.connect_ex((addresses[0], port)) == 0
    with socket.socket() as sock:
        sock.settimeout(2)
        control = sock.connect_ex(("127.0.0.1", port)) == 0
    report.check(
        "reach the Prefect API from off the host",
        f"{addresses[0]}:{port}",
        not reached,
        control=control,
        detail="the embedded server listens on 127.0.0.1 only",
    )


async def prefect_auth(report: Report) -> None:
    """Where the API has an auth string (this process sends one), a call without it."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    attack = "call the Prefect API without the auth string"
    api, auth = PREFECT_API_URL.value(), PREFECT_API_AUTH_STRING.value()
    if not api or not auth:
        detail = "this API has no auth string: it listens on 127.0.0.1 only (the row above)"
        report.rows.append(Attack(attack, f"{api}/flows/filter" if api else "no PREFECT_API_URL", "n/a", detail))
        return
    async with httpx.AsyncClient(timeout=10) as http:
        bare = await http.post(f"{api}/flows/filter", json={})
        control = await http.post(f"{api}/flows/filter", json={}, headers=basic_auth(auth))
    report.check(
        attack,
        f"POST {api}/flows/filter",
        bare.status_code == 401,
        control=control.status_code == 200,
        detail=f"HTTP {bare.status_code} without it; {control.status_code} with it",
    )


async def model_server(report: Report, target: Target) -> None:
    """A's slice on the local backend: its model server's address, as any local process sees it."""
    endpoint = target.allocation.endpoint
    model = target.allocation.model
    base = endpoint.removesuffix("/v1")
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 1}
    async with httpx.AsyncClient(timeout=60) as http:
        bare = await http.post(f"{endpoint}/chat/completions", json=body)
        try:  # the backend's own call, which sends the key
            await openai_client.complete(endpoint, model, messages=body["messages"], max_tokens=1)
            answered = True
        except InferenceError:
            answered = False
        report.check(
            "reach a local model server without its key",
            f"POST {endpoint}/chat/completions",
            bare.status_code == 401,
            control=answered,
            detail=f"HTTP {bare.status_code} without the key; the backend's call with it answered: {answered}",
        )
        slots = await http.get(f"{base}/slots", headers=auth_headers(endpoint))  # even with the key
        models = await http.get(f"{endpoint}/models", headers=auth_headers(endpoint))
    report.check(
        "read a local model server's /slots",
        f"GET {base}/slots",
        slots.status_code in (404, 501),
        control=models.status_code == 200,
        detail=f"HTTP {slots.status_code} with the key (started with --no-slots); /v1/models {models.status_code}",
    )
