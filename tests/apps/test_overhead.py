"""`homeskillet bench-overhead`'s figures: the statistics it reports, and its JSON line."""

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from apps.overhead import median_gap_ms, median_ratio, per_fragment_ms, routed, server_cpu_s, summary_line


def test_the_overhead_is_the_median_of_each_request_less_its_direct_twin():
    # the medians differ by 300 ms, but no request was more than 250 ms slower than its twin
    assert median_gap_ms([1.25, 2.5, 4.1], [1.0, 2.3, 3.85]) == 250.0
    assert median_gap_ms([0.9], [1.0]) == -100.0  # faster than direct reads as faster, not hidden
    with pytest.raises(ValueError, match="2 requests paired with 3 direct ones"):
        median_gap_ms([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="0 requests"):
        median_gap_ms([], [])


def test_the_ratio_is_of_medians_and_cpu_is_spread_over_fragments():
    assert median_ratio([2.0, 4.0, 60.0], [1.0, 2.0, 3.0]) == 2.0  # one slow outlier does not move it
    assert per_fragment_ms(1.5, 12) == 125.0
    assert per_fragment_ms(None, 12) is None  # a server whose CPU could not be read


def test_the_route_names_each_fragments_model():
    assert routed("f1=smollm2-135m,f2=gemma3-270m") == {"f1": "smollm2-135m", "f2": "gemma3-270m"}
    assert routed("") == {}


def test_cpu_of_a_process_counts_its_children_and_a_gone_one_reads_none():
    child = subprocess.Popen(
        [sys.executable, "-c", "sum(i * i for i in range(3_000_000)); input()"], stdin=subprocess.PIPE
    )
    try:
        while (server_cpu_s(child.pid) or 0) < 0.05:  # the child has spent some CPU of its own
            time.sleep(0.01)
        own = sum(psutil.Process().cpu_times()[:2])
        assert server_cpu_s(os.getpid()) >= own + 0.05  # this process's reading includes its child's
    finally:
        child.communicate(b"\n", timeout=30)
    assert server_cpu_s(child.pid) is None and server_cpu_s(None) is None


def test_the_json_line_keeps_its_fields_and_adds_the_apis():
    figures = {
        "overhead_ratio": 1.2,
        "overhead_ms_p50": 60.0,
        "concurrent": {"concurrency": 8, "tokens_per_s_ratio": 0.8, "flow_tokens_per_s": 10.0},
    }
    line = json.loads(summary_line(figures))
    assert line == {
        "overhead_ratio": 1.2,
        "overhead_ms_p50": 60.0,
        "concurrent": {"concurrency": 8, "tokens_per_s_ratio": 0.8},
    }
    api = {"overhead_ms_p50": 90.0, "ratio": 1.05, "ttft_overhead_ms_p50": 120.0}
    assert json.loads(summary_line({**figures, "api": api})) == {**line, "api": api}
