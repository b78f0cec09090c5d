"""`cost_report`: the scheduled cost optimisation analysis over the telemetry dataset."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from prefect import flow
from prefect.artifacts import acreate_markdown_artifact

from connectors.telemetry import read_records
from tasks import runtime
from tasks.cost_analysis import analyse_costs, budgets


@flow(name="cost-report", persist_result=True, result_serializer="json")
async def cost_report(since_days: int = 7, catalog_path: str | None = None) -> str:
    """Cost per tenant, model, pool and tier; idle and over-provisioned cost; dedicated vs
    preemptible; recommendations. Returns the report file's path.

    Args:
        since_days: Telemetry of the last N days.
        catalog_path: Another catalog file.
    """
    services = runtime.services(catalog_path)
    settings = services.settings
    frame = await asyncio.to_thread(read_records, settings.telemetry)
    if not frame.empty:
        cutoff = datetime.now(UTC) - timedelta(days=since_days)
        frame = frame[frame.ts >= cutoff]
    covenants = services.covenants()
    ledger = await services.ledger()
    spend = {tenant: await ledger.spend(tenant) for tenant in covenants}
    report = await analyse_costs(frame, services.catalog, budgets(covenants, spend))
    folder = settings.home / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"cost-report-{datetime.now(UTC):%Y%m%dT%H%M%S}.md"
    path.write_text(report.markdown)
    await acreate_markdown_artifact(key="cost-report", markdown=report.markdown, description=f"Written to {path}")
    return str(path)
