"""`homeskillet feedback`, run as a user runs it (a separate process), on real Parquet under the
session's state folder: the tenant rates its own finished request, another tenant's is refused
exactly like an unknown one (exit 2), bad input is refused naming it."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

from tests.apps.test_feedback_api import finished, stored
from tests.support import HOMESKILLET


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HOMESKILLET, "feedback", *args], capture_output=True, text=True, timeout=120, env=os.environ.copy()
    )


def test_the_tenant_rates_its_request_and_another_tenant_is_refused_like_an_unknown_one():
    request_id, unknown = finished("acme"), "fb-" + uuid.uuid4().hex[:12]
    theirs = cli(request_id, "--score", "1", "--tenant", "globex")
    none = cli(unknown, "--score", "1", "--tenant", "globex")
    assert theirs.returncode == none.returncode == 2
    assert "there is no finished request" in theirs.stderr
    assert theirs.stderr.replace(request_id, "ID") == none.stderr.replace(unknown, "ID")
    assert stored(request_id) == []

    done = cli(request_id, "--score", "0.5", "--tenant", "acme")
    assert done.returncode == 0, done.stderr
    assert f"recorded score 0.5 for the whole request of request {request_id} · tenant acme" in done.stdout
    as_json = cli(request_id, "--score", "1", "--fragment", "f2", "--tenant", "acme", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert {k: v for k, v in json.loads(as_json.stdout).items() if k != "ts"} == {
        "request_id": request_id,
        "tenant": "acme",
        "fragment_id": "f2",
        "score": 1.0,
    }
    assert sorted(stored(request_id), key=str) == sorted(
        [{"tenant": "acme", "fragment_id": None, "score": 0.5}, {"tenant": "acme", "fragment_id": "f2", "score": 1.0}],
        key=str,
    )


def test_bad_input_is_refused_naming_it():
    request_id = finished("acme")
    for args, named in (
        (["--score", "1.5"], "score must be a number from 0 to 1, not 1.5"),
        (["--score", "nan"], "not nan"),
        (["--score", "1", "--fragment", "f9"], "has no fragment 'f9'; its fragments: f1, f2"),
    ):
        done = cli(request_id, "--tenant", "acme", *args)
        assert done.returncode == 2 and named in done.stderr, done.stderr
    assert cli("a/b", "--score", "1").returncode == 2
    assert stored(request_id) == []
