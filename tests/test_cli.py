"""The `homeskillet` command, run as a user runs it (a separate process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("assert_no_leaks")
HOMESKILLET = str(Path(sys.executable).with_name("homeskillet"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HOMESKILLET, *args], capture_output=True, text=True, timeout=300, env=os.environ.copy())


def test_run_prints_the_fusion_result_as_json():
    done = cli("run", "What is the capital of France? Write a haiku about the sea.", "--json", "--max-tokens", "32")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert len(result["fragments"]) == 2
    assert {f["model"] for f in result["fragments"]} == {"gemma3-270m", "smollm2-135m"}
    assert all(f["allocation_id"].startswith("alloc-") for f in result["fragments"])
    assert result["answer"]


def test_run_prints_answer_and_fragment_table():
    done = cli("run", "1. Who wrote Hamlet?\n2. Name a planet.", "--tenant", "acme", "--max-tokens", "24")
    assert done.returncode == 0, done.stderr
    assert "1. Who wrote Hamlet?" in done.stdout
    for column in ("model", "pool", "allocation_id", "latency_s", "cost_usd"):
        assert column in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("run", ""), "prompt is empty"),
        (("run", "hi?", "--tenant", "nobody"), "unknown tenant 'nobody'"),
        (("run", "hi?", "--model", "gpt-9"), "unknown model 'gpt-9'"),
        (("run", "hi?", "--tier", "spot"), "constraints.tier"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(args, message):
    done = cli(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_allocations_lists_what_is_held():
    done = cli("allocations", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_server_status_reports_the_running_server():
    done = cli("server", "status")
    assert done.returncode == 0
    assert "prefect: running" in done.stdout and "postgres: running" in done.stdout
