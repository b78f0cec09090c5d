"""Secret blocks and secrets. B's flow runs load B's Secret block only: B cannot name A's tenant or
block in a request, a tenant id cannot alias A's block, and B without a block gets no one else's.
Keys and tokens are looked for where they must not be: reprs and dumps, the token table,
Prometheus, and everything B was answered on the way."""

from __future__ import annotations

import json
import uuid

from apps.isolation import mcp
from apps.isolation.report import A, B, Report, Target, attempt, catalog_with
from connectors.hostedai import HostedAIClient
from homeskillet.errors import InvalidRequest, MissingCredentials
from homeskillet.schemas import HostedAICredentials
from homeskillet.settings import Settings
from tasks import credentials


async def secret_block_attacks(report: Report, target: Target) -> None:
    from homeskillet.catalog import load_catalog

    hosted = target.hosted
    if hosted is None:
        return
    fields = {"prompt": "Say hi.", "constraints": {"backend": "hostedai", "max_tokens": 2}}
    async with mcp.serve(target.catalog_path) as client, client(target.tokens[B]) as b:
        ran = await b.call_tool("fuse", {**fields, "tenant": A})
        named = await b.call_tool(
            "fuse", {**fields, "constraints": {**fields["constraints"], "credentials": credentials.block_name(A)}}
        )
    data = ran.structured_content or {}
    said = [" ".join(getattr(c, "text", "") for c in answer.content) for answer in (ran, named)]
    hosted.said_to_b += said
    report.check(
        "run B's request as tenant A (A's Secret block)",
        "MCP fuse(tenant=A) with B's token, backend hostedai",
        data.get("tenant") == B,
        control=not ran.is_error,
        detail=f"ran as {data.get('tenant')!r}",
    )
    report.check(
        "name A's Secret block in B's request",
        "MCP fuse constraints.credentials",
        named.is_error,
        detail=said[1],
    )
    with catalog_with(target.services, extra_tenants=(A.upper(),)) as path:
        try:
            load_catalog(path)
            refused, detail = False, "loaded: both tenants would load the same block"
        except InvalidRequest as exc:
            refused, detail = True, str(exc)
    report.check(
        "alias A's Secret block by a tenant id in another case",
        f"catalog tenant {A.upper()!r} → Secret block {credentials.block_name(A.upper())!r}",
        refused,
        detail=detail,
    )
    await credentials.delete_hostedai_credentials(B)
    try:
        refused, detail, got = await attempt(credentials.hostedai_credentials(B), MissingCredentials)
    finally:
        await credentials.save_hostedai_credentials(B, hosted.credentials[B])
    hosted.said_to_b.append(detail)
    report.check(
        "use A's Secret block when B has none",
        "tasks.credentials.hostedai_credentials(B)",
        refused and credentials.block_name(B) in detail,
        detail=detail if refused else f"got team {got.team_id}",
    )


async def secret_checks(report: Report, target: Target) -> None:
    from prefect.blocks.system import Secret
    from prometheus_client import generate_latest

    store, tokens, hosted = target.store, target.tokens, target.hosted
    key = "hai-" + uuid.uuid4().hex
    made_up = HostedAICredentials(url="https://panel.example/api", api_key=key, team_id="t")
    settings = Settings(hostedai_url=made_up.url, hostedai_api_key=key, hostedai_team_id="t")
    for path, text in (
        ("HostedAICredentials", repr(made_up) + str(made_up) + made_up.model_dump_json()),
        ("Settings (HOMESKILLET_HOSTEDAI_API_KEY)", repr(settings) + str(settings) + settings.model_dump_json()),
        ("HostedAIClient", repr(HostedAIClient(made_up))),
    ):
        report.check("see a hosted·ai key in a repr or dump", path, key not in text)
    keys = [key, *(hosted.keys() if hosted else [])]
    if hosted is not None:
        secret = await Secret.aload(credentials.block_name(A))
        backend = hosted.backend
        report.check(
            "see A's hosted·ai key in a repr",
            f"HostedAIBackend and its shares, Secret block {credentials.block_name(A)!r}",
            not any(k in repr(backend) + repr(vars(backend)) + repr(secret) + str(secret) for k in hosted.keys()),
        )
        report.check(
            "find A's hosted·ai key in what B was answered",
            "B's hosted·ai refusals, listings, MCP answers and errors",
            not any(k in text for k in hosted.keys() for text in hosted.said_to_b),
            control=bool(hosted.said_to_b),
            detail=f"{len(hosted.said_to_b)} answers searched",
        )
    async with store._connect() as conn:
        rows = json.dumps([dict(r) for r in await conn.fetch("SELECT * FROM api_tokens")], default=str)
    report.check(
        "read MCP tokens from the database",
        "api_tokens table",
        not any(t in rows for t in tokens.values()),
        detail="only SHA-256 digests are stored",
    )
    metrics = generate_latest().decode()
    report.check(
        "see a token or key in the metrics",
        "Prometheus /metrics (names, labels, values)",
        not any(t in metrics for t in [*tokens.values(), *keys]),
        detail=f"{len(keys)} hosted·ai keys and {len(tokens)} tokens looked for",
    )
