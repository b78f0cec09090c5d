"""The telemetry task: a request's fragment records go to the Parquet dataset, and its learned
routing decisions to the routes dataset (what feedback on their answers teaches the router)."""

from __future__ import annotations

import asyncio

from prefect import task
from prefect.cache_policies import NO_CACHE

from connectors.feedback import write_routes
from connectors.telemetry import write_records
from homeskillet.schemas import RouteRecord, TelemetryRecord
from tasks.runtime import Services


@task(name="record-telemetry", cache_policy=NO_CACHE, persist_result=False)
async def record_telemetry(services: Services, records: list[TelemetryRecord], routes: list[RouteRecord] = ()) -> int:
    await asyncio.to_thread(write_records, services.settings.telemetry, records)
    if routes:
        await asyncio.to_thread(write_routes, services.settings.routes, list(routes))
    return len(records)
