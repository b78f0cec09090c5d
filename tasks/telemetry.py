"""The telemetry task: a request's fragment records go to the Parquet dataset."""

from __future__ import annotations

import asyncio

from prefect import task
from prefect.cache_policies import NO_CACHE

from connectors.telemetry import write_records
from homeskillet.schemas import TelemetryRecord
from tasks.runtime import Services


@task(name="record-telemetry", cache_policy=NO_CACHE, persist_result=False)
async def record_telemetry(services: Services, records: list[TelemetryRecord]) -> int:
    await asyncio.to_thread(write_records, services.settings.telemetry, records)
    return len(records)
