"""Telemetry: a Parquet dataset of fragment records (partitioned by date) and Prometheus metrics.

Writers never append to a shared file: each write is one new file with a unique name in its
date partition, so any number of flow runs and processes can write at once. Readers see every
complete file (a file is written under a temporary name and renamed into place).
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from homeskillet.schemas import TelemetryRecord

SCHEMA = pa.schema(
    [
        ("ts", pa.timestamp("us", tz="UTC")),
        ("request_id", pa.string()),
        ("tenant", pa.string()),
        ("fragment_id", pa.string()),
        ("task_type", pa.string()),
        ("strategy", pa.string()),
        ("model", pa.string()),
        ("backend", pa.string()),
        ("pool", pa.string()),
        ("tier", pa.string()),
        ("allocation_id", pa.string()),
        ("tflops", pa.float64()),
        ("vram_gb", pa.float64()),
        ("queue_s", pa.float64()),
        ("allocate_s", pa.float64()),
        ("first_token_s", pa.float64()),
        ("infer_s", pa.float64()),
        ("release_s", pa.float64()),
        ("tokens_in", pa.int64()),
        ("tokens_out", pa.int64()),
        ("cost_usd", pa.float64()),
        ("outcome", pa.string()),
        ("error_class", pa.string()),
    ]
)


def write_records(root: Path, records: list[TelemetryRecord]) -> list[Path]:
    """Write the records as one new Parquet file per date partition; return the files."""
    return write_partitioned(root, [r.model_dump() for r in records], SCHEMA)


def write_partitioned(root: Path, rows: list[dict], schema: pa.Schema) -> list[Path]:
    """Rows (each with a `ts`) as one new Parquet file per UTC date partition under root, each
    written under a temporary name and renamed into place; return the files."""
    written = []
    for day, group in _by_day(rows).items():
        folder = root / f"date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"part-{uuid.uuid4().hex}.parquet"
        partial = folder / f".{final.name}.tmp"
        pq.write_table(pa.Table.from_pylist(group, schema=schema), partial)
        os.replace(partial, final)
        written.append(final)
    return written


def _by_day(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows by their UTC date (a naive timestamp is UTC)."""
    days: dict[str, list[dict]] = {}
    for row in rows:
        ts = row["ts"] if row["ts"].tzinfo is not None else row["ts"].replace(tzinfo=UTC)
        row = {**row, "ts": ts.astimezone(UTC)}
        days.setdefault(row["ts"].strftime("%Y-%m-%d"), []).append(row)
    return days


def read_records(root: Path) -> pd.DataFrame:
    """Every record so far (empty frame with the columns when there is none)."""
    files = sorted(root.glob("date=*/part-*.parquet")) if root.exists() else []
    if not files:
        return SCHEMA.empty_table().to_pandas()
    table = ds.dataset([str(f) for f in files], format="parquet", schema=SCHEMA).to_table()
    return table.to_pandas()


# --- Prometheus ---------------------------------------------------------------------------

REQUESTS = Counter("homeskillet_requests_total", "Fused requests", ["outcome"])
FRAGMENTS = Counter("homeskillet_fragments_total", "Fragment attempts", ["backend", "model", "outcome"])
LATENCY = Histogram("homeskillet_fragment_seconds", "Fragment allocate+infer+release", ["backend", "model"])
HELD = Gauge("homeskillet_allocations_held", "Allocations this process holds now", ["backend"])
TENANT_HELD = Gauge("homeskillet_tenant_allocations_held", "Allocations this process holds now, per tenant", ["tenant"])
TENANT_SPEND = Counter("homeskillet_tenant_spend_usd", "US$ spent by this process's fragments, per tenant", ["tenant"])
BREAKER = Gauge("homeskillet_breaker_open", "1 while a hosted·ai circuit is open", ["url"])


def observe(record: TelemetryRecord) -> None:
    FRAGMENTS.labels(record.backend, record.model, record.outcome).inc()
    if record.outcome == "ok":
        total = (record.allocate_s or 0) + (record.infer_s or 0) + (record.release_s or 0)
        LATENCY.labels(record.backend, record.model).observe(total)
        TENANT_SPEND.labels(record.tenant).inc(record.cost_usd)


def serve_metrics(port: int) -> None:
    """Expose /metrics on 127.0.0.1:port from this (long-running) process."""
    start_http_server(port, addr="127.0.0.1")
