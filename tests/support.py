"""Helpers shared by the test modules (`from tests.support import ...`: pytest puts the checkout
on the path).

Importing this module starts nothing and imports no Prefect: conftest.py sets the environment
Prefect reads at import, before any test module is imported.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pandas as pd
import yaml

from connectors.hostedai import HostedAIClient, Policy
from connectors.processes import free_port, serve_in_thread
from homeskillet.schemas import Fragment, FragmentResult, HostedAICredentials, Plan, TelemetryRecord, Timings

__all__ = [
    "HOMESKILLET",
    "NARROW",
    "Sweep",
    "emulator_client",
    "emulator_credentials",
    "frag",
    "free_port",
    "one_echo_call_on_tiny",
    "plan",
    "serve_app",
    "write_bench",
    "write_catalog",
]

HOMESKILLET = str(Path(sys.executable).with_name("homeskillet"))
"""The `homeskillet` executable of this environment. Its commands reach the session's services: a
test that runs it asks for `local_services` (or `postgres`, for a command that only reads the
ledger)."""


def serve_app(app, name: str = "test app") -> tuple[str, Callable[[], None]]:
    """An ASGI app on a free loopback port (real HTTP), in a thread of this process: (url, stop)."""
    serving = serve_in_thread(app, name)
    url = serving.__enter__()
    return url, lambda: serving.__exit__(None, None, None)


def emulator_credentials(
    emulator,
    tenant: str = "acme",
    url: str | None = None,
    key: str | None = None,
    team: str | None = None,
    auth_header: str = "x-api-key",
) -> HostedAICredentials:
    """A tenant's credentials on the hosted·ai emulator (the `emulator` fixture); any part can be
    replaced: another base URL, a wrong key, another team, another auth header."""
    t = emulator.teams[tenant]
    return HostedAICredentials(
        url=url or emulator.url, api_key=key or t.api_key, team_id=team or t.id, auth_header=auth_header
    )


def emulator_client(emulator, tenant: str = "acme", **kwargs) -> HostedAIClient:
    """A hosted·ai client of a tenant on the emulator: keyword arguments that are `Policy` fields
    (attempts, breaker_threshold, ...) make its policy, the rest go to `emulator_credentials`."""
    policy = {k: kwargs.pop(k) for k in list(kwargs) if k in Policy.model_fields}
    return HostedAIClient(emulator_credentials(emulator, tenant, **kwargs), Policy(**policy) if policy else None)


def frag(fid, text, deps=()):
    """A chat fragment, depending on the fragments named in deps."""
    return Fragment(id=fid, text=text, task_type="chat", depends_on=list(deps), est_prompt_tokens=3)


def fragment_result(fid: str, text: str = "", cost: float = 0.5, infer_s: float = 0.0, tokens=(1, 2)):
    """A fragment's result on model m, pool p, with this text, cost, inference time and tokens (in, out)."""
    return FragmentResult(
        fragment_id=fid,
        task_type="chat",
        text=text,
        model="m",
        pool="p",
        tier="dedicated",
        allocation_id=f"alloc-{fid}",
        tokens_in=tokens[0],
        tokens_out=tokens[1],
        timings=Timings(infer_s=infer_s),
        cost_usd=cost,
        reason="r",
    )


class JSONHandler(BaseHTTPRequestHandler):
    """A test HTTP server's handler that answers in JSON (`_send`) and logs nothing."""

    def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


def telemetry_record(request_id: str, tenant: str, fragment_id: str, **changes) -> TelemetryRecord:
    """A finished fragment's telemetry record, as the flow writes it; `changes` set other fields."""
    fields = dict(
        ts=datetime.now(UTC),
        request_id=request_id,
        tenant=tenant,
        fragment_id=fragment_id,
        task_type="chat",
        strategy="single",
        model="m",
        backend="local",
        pool="p",
        tier="dedicated",
        allocation_id=None,
        tflops=1,
        vram_gb=0.5,
        outcome="ok",
    )
    return TelemetryRecord(**(fields | changes))


def plan(*pairs):
    """A plan of fragments f0, f1, … from (text, task type) pairs, in order."""
    return Plan(
        request_id="r",
        fusion="ordered",
        fragments=[Fragment(id=f"f{i}", text=t, task_type=k, est_prompt_tokens=10) for i, (t, k) in enumerate(pairs)],
    )


def write_bench(path: Path, rows: list[dict], eval_name: str = "arc-challenge") -> Path:
    """A RouterBench-format file: models cheap-a, cheap-b (cost 1) and big (cost 10)."""
    table = []
    for i, r in enumerate(rows):
        row = {"sample_id": f"s{i}", "prompt": str([f"Q{i}?\nA) x\nB) y\nAnswer:"]), "eval_name": eval_name}
        for model, cost in (("cheap-a", 1.0), ("cheap-b", 1.0), ("big", 10.0)):
            answer = r[model]
            row[model] = 1.0 if answer == r["gold"] else 0.0
            row[f"{model}|model_response"] = str([answer])
            row[f"{model}|total_cost"] = cost
        table.append(row)
    pd.DataFrame(table).to_csv(path)
    return path


# the covenant of tenant cov-narrow in the `covenant_catalog` fixture
NARROW = {"allowed_models": ["echo", "echo-lite"], "allowed_tiers": ["preemptible"], "allowed_regions": ["local"]}


def write_catalog(path: Path, base: str, covenants: dict[str, dict]) -> str:
    """The test catalog with these tenants and covenants; a rewrite gets a later mtime."""
    raw = yaml.safe_load(Path(base).read_text())
    raw["tenants"] = [{"id": t, "covenant": c} for t, c in covenants.items()]
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(yaml.safe_dump(raw))
    os.utime(path, ns=(before + 10**9, before + 10**9))  # a changed file, whatever the clock's resolution
    return str(path)


def one_echo_call_on_tiny(catalog_path) -> float:
    """The estimated cost of one short echo call on the one-slice pool `tiny`."""
    from tasks import runtime  # Prefect, imported once the test session has set its environment
    from tasks.routing import estimate_cost

    catalog = runtime.catalog(catalog_path)
    echo = next(m for m in catalog.models if m.name == "echo")
    tiny = next(p for p in catalog.pools if p.id == "tiny")
    return estimate_cost(echo, tiny, 5, 128)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record):
        self.records.append(record)


class Sweep:
    """Everything a fault path left behind that a person or a log shipper could read: the errors
    handed to it, every log record of every logger at DEBUG (on the loggers themselves: Prefect's
    logging set-up stops `connectors` from propagating to the root), every warning."""

    LOGGERS = ("", "connectors", "httpx", "httpcore", "prefect", "tasks", "flows")

    def __init__(self):
        self.handler = _Records()
        self.texts: list[str] = []
        self.warned: list[warnings.WarningMessage] = []

    @property
    def records(self) -> list[logging.LogRecord]:
        return self.handler.records

    def error(self, exc: BaseException) -> BaseException:
        self.texts += [str(exc), repr(exc), "".join(traceback.format_exception(exc)), repr(vars(exc))]
        return exc

    def seen(self, level: int, words: str) -> bool:
        return any(r.levelno >= level and words in r.getMessage() for r in self.records)

    def check(self, secret: str) -> None:
        logged = [f"{self.handler.format(r)} {r.args!r}" for r in self.records]
        warned = [f"{w.message} {w.category}" for w in self.warned]
        assert secret not in "\n".join(self.texts + logged + warned)
