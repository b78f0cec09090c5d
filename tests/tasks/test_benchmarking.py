"""Benchmark figures from samples (`tasks.benchmarking`): latency percentiles and price per token."""

import pandas as pd
import pytest

from tasks.benchmarking import summarise


def test_benchmark_summary_percentiles():
    samples = pd.DataFrame(
        [
            {
                "model": "m",
                "parameters_m": 1,
                "concurrency": 1,
                "ttft_s": 0.1,
                "latency_s": float(i),
                "alloc_overhead_s": 0.01,
                "tokens_out": 10,
                "tokens_per_s": 50.0,
                "cost_usd": 0.001,
            }
            for i in range(1, 21)
        ]
    )
    row = summarise(samples).iloc[0]
    assert row.latency_p50_s == pytest.approx(10.5) and row.latency_p95_s == pytest.approx(19.05)
    assert row.usd_per_1k_tokens == pytest.approx(0.1)
