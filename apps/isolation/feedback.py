"""B rating A's answers: through the API (`POST /v1/feedback`), the MCP `feedback` tool over both
transports and the command line, B's score of A's finished request is refused, and the refusal
is word for word the one an unknown request id gets, so that it does not tell B which ids are A's.

A real server on loopback serves the attempts, with telemetry and feedback datasets of its own (a
temporary folder): A's request is finished there, as the flow records it (its fragments in the
telemetry dataset), and neither B's attempts nor A's controls touch the operator's datasets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx

from apps.isolation.report import OPERATOR, A, Attack, B, Report, Target
from connectors.feedback import read_feedback
from connectors.telemetry import write_records
from homeskillet.schemas import TelemetryRecord
from homeskillet.settings import Settings, get_settings


async def attacks(report: Report, target: Target) -> None:
    from apps.mcp_server import create_app
    from connectors.processes import serve_in_thread

    request_id, unknown = target.request_id, "iso-" + uuid.uuid4().hex[:12]
    with tempfile.TemporaryDirectory() as folder:
        settings = get_settings().model_copy(
            update={"telemetry_dir": Path(folder) / "telemetry", "feedback_dir": Path(folder) / "feedback"}
        )
        write_records(settings.telemetry, [_finished(request_id, fragment) for fragment in ("f1", "f2")])
        app = create_app(target.catalog_path, settings=settings)
        with serve_in_thread(app, "feedback server", log_level="error") as url:
            await _api(report, url, target.tokens, request_id, unknown, settings)
            for transport in ("Streamable HTTP", "WebSocket"):
                await _mcp(report, url, target.tokens, transport, request_id, unknown, settings)
        await _cli(report, request_id, unknown, settings)


def _finished(request_id: str, fragment_id: str) -> TelemetryRecord:
    """A's fragment record, as the flow writes it when the request has run."""
    return TelemetryRecord(
        ts=datetime.now(UTC),
        request_id=request_id,
        tenant=A,
        fragment_id=fragment_id,
        task_type="chat",
        strategy="single",
        model="isolation",
        backend="local",
        pool="local",
        tier="dedicated",
        allocation_id=None,
        tflops=1,
        vram_gb=0.5,
        outcome="ok",
    )


def _rated_by(settings: Settings, tenant: str, request_id: str) -> int:
    """How many scores of the request the tenant has on record."""
    frame = read_feedback(settings.feedback, tenant=tenant)
    return int((frame.request_id == request_id).sum())


def _same(theirs: str, theirs_id: str, unknown: str, unknown_id: str) -> bool:
    return theirs.replace(theirs_id, "ID") == unknown.replace(unknown_id, "ID")


async def _api(report: Report, url: str, tokens: dict, request_id: str, unknown: str, settings: Settings) -> None:
    async with httpx.AsyncClient(base_url=f"{url}/v1", timeout=60) as http:

        async def rate(tenant: str, rid: str) -> httpx.Response:
            body = {"request_id": rid, "score": 0.0, "fragment": "f1"}
            return await http.post("/feedback", json=body, headers={"Authorization": f"Bearer {tokens[tenant]}"})

        theirs, none = await rate(B, request_id), await rate(B, unknown)
        own = await rate(A, request_id)
    report.check(
        "rate A's answer as B",
        "POST /v1/feedback with B's key, A's request id",
        theirs.status_code == 404 and _rated_by(settings, B, request_id) == 0,
        control=own.status_code == 200 and _rated_by(settings, A, request_id) == 1,
        detail=f"HTTP {theirs.status_code}: {theirs.text[:160]}",
    )
    report.check(
        "tell A's request id from an unknown one by B's refusal",
        "POST /v1/feedback, A's id and an unknown one",
        theirs.status_code == none.status_code and _same(theirs.text, request_id, none.text, unknown),
        control=none.status_code == 404,
        detail="the same status and body for both",
    )


async def _mcp(
    report: Report, url: str, tokens: dict, transport: str, request_id: str, unknown: str, settings: Settings
) -> None:
    before = _rated_by(settings, A, request_id)
    async with _client(url, tokens[A], transport) as a, _client(url, tokens[B], transport) as b:
        theirs = await b.call_tool("feedback", {"request_id": request_id, "score": 0.0})
        none = await b.call_tool("feedback", {"request_id": unknown, "score": 0.0})
        own = await a.call_tool("feedback", {"request_id": request_id, "score": 1.0})
    said = {
        name: "".join(getattr(c, "text", "") for c in r.content) for name, r in (("theirs", theirs), ("none", none))
    }
    report.check(
        "rate A's answer as B",
        f"MCP feedback tool ({transport})",
        theirs.is_error and _rated_by(settings, B, request_id) == 0,
        control=not own.is_error and _rated_by(settings, A, request_id) == before + 1,
        detail=said["theirs"][:160],
    )
    report.check(
        "tell A's request id from an unknown one by B's refusal",
        f"MCP feedback tool ({transport}), A's id and an unknown one",
        theirs.is_error == none.is_error and _same(said["theirs"], request_id, said["none"], unknown),
        control=none.is_error,
        detail="the same error for both",
    )


def _client(url: str, token: str, transport: str):
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    from connectors.ws_transport import WebSocketTransport

    base = url.removeprefix("http://")
    if transport == "WebSocket":
        return Client(WebSocketTransport(f"ws://{base}/ws", token=token))
    headers = {"Authorization": f"Bearer {token}"}
    return Client(streamable_http_client(f"http://{base}/mcp", http_client=create_mcp_http_client(headers=headers)))


async def _cli(report: Report, request_id: str, unknown: str, settings: Settings) -> None:
    """`homeskillet feedback` as its own process, on the same datasets. Its tenant is its --tenant:
    the command line is the operator's (whoever may run it may name any tenant), so B's row proves
    that the ownership check holds there too, and naming A is an operator surface."""
    env = os.environ | {
        "HOMESKILLET_TELEMETRY_DIR": str(settings.telemetry),
        "HOMESKILLET_FEEDBACK_DIR": str(settings.feedback),
    }

    async def feedback(tenant: str, rid: str) -> tuple[int, str]:
        done = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "apps.cli",
            "feedback",
            rid,
            "--score",
            "0",
            "--tenant",
            tenant,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(done.communicate(), 120)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                done.kill()
            await done.wait()
            return -1, "timed out"
        return done.returncode, " ".join(err.decode(errors="replace").split())

    before = _rated_by(settings, A, request_id)
    (theirs, said), (none, unknown_said) = await feedback(B, request_id), await feedback(B, unknown)
    own, _ = await feedback(A, request_id)
    report.check(
        "rate A's answer as B",
        "homeskillet feedback A's-id --tenant globex",
        theirs == 2 and _rated_by(settings, B, request_id) == 0,
        control=own == 0 and _rated_by(settings, A, request_id) == before + 1,
        detail=f"exit {theirs}: {said[:160]}",
    )
    report.check(
        "tell A's request id from an unknown one by B's refusal",
        "homeskillet feedback --tenant globex, A's id and an unknown one",
        theirs == none and _same(said, request_id, unknown_said, unknown),
        control=none == 2,
        detail="the same exit code and message for both",
    )
    report.rows.append(
        Attack(
            "rate A's answer naming A",
            "homeskillet feedback A's-id --tenant acme",
            OPERATOR,
            "docs: the command line is the operator's; a tenant's ways in (API, MCP) take the tenant from its token",
        )
    )
