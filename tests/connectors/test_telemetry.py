"""Telemetry (`connectors.telemetry`): the dataset, one record per fragment attempt, safe under
concurrent writers; the Prometheus metrics, fragments counted and spend per tenant."""

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from connectors.telemetry import read_records
from flows.fusion import fuse_request
from homeskillet.errors import InferenceError
from homeskillet.schemas import TelemetryRecord
from homeskillet.settings import get_settings
from tests.support import free_port, telemetry_record


def record(i: int, day: datetime) -> TelemetryRecord:
    return telemetry_record(
        f"r{i}",
        "acme",
        "f1",
        ts=day,
        allocation_id=f"alloc-{i}",
        infer_s=0.1,
        tokens_in=3,
        tokens_out=4,
        cost_usd=0.001,
    )


# Each writer is a process of its own, as each flow run's process is: it writes its records in
# pairs (today and yesterday), 20 times, into the same dataset as the others.
WRITER = """
import json, sys
from pathlib import Path
from connectors.telemetry import write_records
from homeskillet.schemas import TelemetryRecord
for pair in json.load(sys.stdin):
    write_records(Path(sys.argv[1]), [TelemetryRecord.model_validate(r) for r in pair])
"""


def test_concurrent_writers_lose_nothing_and_partition_by_date(tmp_path):
    now = datetime.now(UTC)
    writers = []
    for k in range(4):
        pairs = [
            [record(i, day).model_dump(mode="json") for day in (now, now - timedelta(days=1))]
            for i in range(k * 100, k * 100 + 20)
        ]
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)], stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        writers.append((proc, json.dumps(pairs)))
    for proc, pairs in writers:
        _, err = proc.communicate(pairs, timeout=120)
        assert proc.returncode == 0, err
    frame = read_records(tmp_path)
    assert len(frame) == 4 * 20 * 2
    assert len({d.name for d in tmp_path.iterdir()}) == 2  # two date partitions
    assert not list(tmp_path.glob("**/.*.tmp"))


def test_an_empty_dataset_reads_as_an_empty_frame(tmp_path):
    frame = read_records(tmp_path / "none")
    assert frame.empty and "allocation_id" in frame.columns


@pytest.mark.usefixtures("local_services", "assert_no_leaks")
async def test_every_fragment_attempt_is_recorded_success_or_failure(test_catalog, echo_server, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_S", "0.05")
    ok = await fuse_request(
        prompt="1. Say one.\n2. Say two.",
        tenant="acme",
        constraints={"allowed_models": ["echo"], "pool": "roomy"},
        catalog_path=test_catalog,
    )
    with pytest.raises(InferenceError):
        await fuse_request(
            prompt="1. Say one #tele2.\n2. FAIL #tele2.",
            tenant="acme",
            request_id="telemetry-fail",
            constraints={"allowed_models": ["echo"], "pool": "roomy"},
            catalog_path=test_catalog,
        )
    frame = read_records(get_settings().telemetry)
    mine = frame[frame.request_id == ok.request_id]
    assert sorted(mine.allocation_id) == sorted(f.allocation_id for f in ok.fragments)
    assert set(mine.outcome) == {"ok"} and (mine.tokens_out > 0).all() and (mine.cost_usd > 0).all()
    failed = frame[frame.request_id == "telemetry-fail"].set_index("fragment_id")
    assert len(failed) == 2  # both attempts recorded; f1 may finish before f2 fails, or be cancelled
    assert failed.loc["f2", "outcome"] == "error" and failed.loc["f2", "error_class"] == "InferenceError"
    assert failed.loc["f1", "outcome"] == "ok" or failed.loc["f1", "error_class"] == "CancelledError"


@pytest.mark.usefixtures("local_services", "assert_no_leaks")
async def test_prometheus_metrics_count_fragments(test_catalog, monkeypatch):
    import httpx

    from connectors.telemetry import serve_metrics

    monkeypatch.setenv("ECHO_DELAY_S", "0.05")
    port = free_port()
    serve_metrics(port)

    def fragments_ok() -> float:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        lines = [
            line
            for line in text.splitlines()
            if line.startswith("homeskillet_fragments_total") and 'model="echo"' in line and 'outcome="ok"' in line
        ]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    before = fragments_ok()
    await fuse_request(
        prompt="1. Say one.\n2. Say two.",
        tenant="acme",
        constraints={"allowed_models": ["echo"], "pool": "roomy"},
        catalog_path=test_catalog,
    )
    assert fragments_ok() == before + 2
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'homeskillet_allocations_held{backend="local"} 0.0' in text


@pytest.mark.usefixtures("assert_no_leaks")
async def test_prometheus_counts_spend_per_tenant(covenant_catalog):
    from prometheus_client import REGISTRY

    def spent() -> float:
        return REGISTRY.get_sample_value("homeskillet_tenant_spend_usd_total", {"tenant": "cov-metrics"}) or 0.0

    before = spent()
    result = await fuse_request(
        prompt="Say hi.",
        tenant="cov-metrics",
        constraints={"max_tokens": 8},
        catalog_path=covenant_catalog(cov_metrics={}),
    )
    assert spent() - before == pytest.approx(result.cost_usd)
    assert REGISTRY.get_sample_value("homeskillet_tenant_allocations_held", {"tenant": "cov-metrics"}) == 0
