"""B against A through the OpenAI-compatible API (a real server on loopback, the real HTTP shape
every client sends): a made-up key, A's name in the body, a model B's covenant forbids, and A's
allocations in what B is answered."""

from __future__ import annotations

import json

import httpx

from apps.isolation.report import A, B, Report, Target, catalog_with


async def attacks(report: Report, target: Target) -> None:
    from apps.mcp_server import create_app
    from connectors.processes import serve_in_thread

    services = target.services
    local = [m.name for m in services.catalog.models if m.serving.kind == "llama_cpp"]
    allowed, other = local[0], local[-1]
    with (
        catalog_with(services, {"allowed_models": [allowed]}) as path,
        serve_in_thread(create_app(str(path)), "API server", log_level="error") as url,
    ):
        async with httpx.AsyncClient(base_url=f"{url}/v1", timeout=300) as http:

            async def ask(token: str, model: str, **extra) -> httpx.Response:
                body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
                return await http.post(
                    "/chat/completions", json=body | extra, headers={"Authorization": f"Bearer {token}"}
                )

            own = await ask(target.tokens[B], allowed, user=A)  # B's own request, naming A in the body
            mine = own.json().get("homeskillet", {}) if own.status_code == 200 else {}
            ids = [f["allocation_id"] for f in mine.get("fragments", [])]
            ledger = await services.ledger()
            spent_by = {r["tenant"] for rid in [mine.get("request_id")] if rid for r in await _spend(ledger, rid)}
            report.check(
                "run a request as A by naming A in the body",
                "POST /v1/chat/completions user=A with B's key",
                spent_by == {B},
                control=own.status_code == 200 and bool(ids),
                detail=f"billed to {sorted(spent_by)}",
            )
            report.check(
                "see A's allocations in B's answer",
                "POST /v1/chat/completions, the homeskillet object",
                target.allocation.allocation_id not in json.dumps(own.json()),
                control=bool(ids),
            )
            made_up = await ask("hs_" + "x" * 43, allowed)
            report.check(
                "call the API with a made-up key",
                "POST /v1/chat/completions",
                made_up.status_code == 401 and made_up.json()["error"]["type"] == "authentication_error",
                detail=f"HTTP {made_up.status_code}",
            )
            forbidden = await ask(target.tokens[B], other)
            report.check(
                "pin a model B's covenant forbids",
                f"POST /v1/chat/completions model={other}",
                forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "allowed_models",
                control=own.status_code == 200,
                detail=f"HTTP {forbidden.status_code}",
            )


async def _spend(ledger, request_id: str) -> list[dict]:
    """Every spend row of a request, whoever's it is (the operator's view: the report checks it)."""
    async with ledger._connect() as conn:
        return [dict(r) for r in await conn.fetch("SELECT tenant FROM spend WHERE request_id = $1", request_id)]
