"""B after A's figures where a tenant can ask: MCP offers no telemetry, cost or spend, and B's
budget refusal names B's spend only. The cost report, the telemetry dataset, Prometheus and
`covenant show` are the operator's (docs/operating.md): rows of their own, "operator surface"."""

from __future__ import annotations

from apps.isolation import mcp
from apps.isolation.report import OPERATOR, A, Attack, B, Report, Target, attempt, catalog_with
from homeskillet.errors import CovenantViolation


async def attacks(report: Report, target: Target) -> None:
    from flows.fusion import fuse_request

    services, allocation = target.services, target.allocation
    words = ("telemetry", "cost", "spend", "usage", "metric", "report", "budget")
    async with mcp.serve(target.catalog_path) as client, client(target.tokens[B]) as b:
        names = [t.name for t in (await b.list_tools()).tools]
        names += [str(r.uri) for r in (await b.list_resources()).resources]
        names += [t.uri_template for t in (await b.list_resource_templates()).resource_templates]
    exposing = [n for n in names if any(w in n.lower() for w in words)]
    report.check(
        "read A's telemetry or cost figures as B",
        "MCP tools and resources (WebSocket)",
        not exposing,
        control=bool(names),
        detail=f"B sees {', '.join(names)}",
    )
    ledger = await services.ledger()
    spent = [(await ledger.spend(A))[0]]
    with catalog_with(services, {"budget_usd_per_day": 1e-12}) as path:

        async def refusal() -> str:
            request = fuse_request(prompt="Say hi.", tenant=B, constraints={"max_tokens": 2}, catalog_path=str(path))
            refused, detail, _ = await attempt(request, CovenantViolation)
            return detail if refused else "ran"

        before = await refusal()
        await ledger.record_spend(allocation.allocation_id, A, allocation.request_id, 5e-7)
        spent.append((await ledger.spend(A))[0])
        after = await refusal()
    report.check(
        "learn A's spend from B's budget refusal",
        "CovenantViolation budget_usd_per_day, before and after A spends",
        before == after != "ran",
        control=spent[1] > spent[0],
        detail=after,
    )
    for attack, path, documented in (
        ("read A's cost figures", "homeskillet cost-report (flow cost-report)", "cost per tenant, for the operator"),
        (
            "read A's telemetry",
            "Parquet dataset HOMESKILLET_HOME/telemetry, Prometheus on 127.0.0.1",
            "records and series per tenant, for the operator",
        ),
        ("read A's usage and spend", "homeskillet covenant show acme", "usage per tenant, for the operator"),
    ):
        report.rows.append(Attack(attack, path, OPERATOR, f"docs: {documented}; no tenant (MCP) path to it"))
