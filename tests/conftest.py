"""Test session: real PostgreSQL, a real Prefect server and real model servers, all on loopback
under a temporary state folder, started on first use and stopped at the end.

Prefect reads its settings at import, so the environment is set here, before any test module
imports prefect.

Each test is marked by what it needs, from the fixtures it uses (see NEEDS): `services`
(PostgreSQL, the Prefect server, the ledger), `models` (real llama.cpp model servers), `docker`.
`make test-fast` runs the rest (`-m "not services and not models and not docker"`); when `-m`
leaves services out, a test that asks for one fails, and a server of this session still running at
its end fails the session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from connectors.processes import free_port  # imports neither Prefect nor the settings

STATE = Path(tempfile.mkdtemp(prefix="hs-test-"))
PORT = free_port()
os.environ.update(
    HOMESKILLET_HOME=str(STATE),
    HOMESKILLET_PREFECT_PORT=str(PORT),
    HOMESKILLET_CAPACITY_WAIT_S="10",
    PREFECT_API_URL=f"http://127.0.0.1:{PORT}/api",
    PREFECT_HOME=str(STATE / "prefect"),
    PREFECT_LOGGING_LEVEL="WARNING",
    PREFECT_LOGGING_EXTRA_LOGGERS="connectors",
    PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="ignore",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    # hosted·ai client bounds, shrunk so that fault tests take seconds
    HOMESKILLET_HOSTEDAI_TIMEOUT_S="3",
    HOMESKILLET_HOSTEDAI_SUBSCRIBE_TIMEOUT_S="1",
    HOMESKILLET_HOSTEDAI_ATTEMPTS="4",
    HOMESKILLET_HOSTEDAI_BACKOFF_INITIAL_S="0.02",
    HOMESKILLET_HOSTEDAI_BACKOFF_MAX_S="0.2",
    HOMESKILLET_HOSTEDAI_RECONCILE_S="5",
    HOMESKILLET_HOSTEDAI_READY_S="15",
    HOMESKILLET_HOSTEDAI_UNSUBSCRIBE_S="15",
    HOMESKILLET_HOSTEDAI_POLL_S="0.05",
    HOMESKILLET_HOSTEDAI_IDLE_S="0",
)
os.environ.pop("HOMESKILLET_CATALOG", None)

from connectors.prefect_server import ensure_prefect_server, stop_prefect_server
from homeskillet.settings import PACKAGED_CATALOG
from tests.support import NARROW, JSONHandler, Sweep, serve_app, write_catalog

# What a test needs, told by the fixtures it uses (item.fixturenames: the whole closure, so a
# test's own fixture that asks for one of these counts too). A test that runs a flow, a task, the
# `homeskillet` or `prefect` executable or the Prefect API asks for `local_services`; one that only
# uses the ledger's PostgreSQL asks for `postgres`; one that reaches a real model, `local_models`
# (the session's model servers) or `llama_server` (model servers of its own). A test that needs
# none of them but takes tens of seconds of CPU is marked `slow` by hand.
NEEDS = {
    "services": {"local_services", "postgres", "assert_no_leaks", "ended_as", "spend_writes_held", "hostedai_tenants"},
    "models": {"local_models", "llama_server"},
    "docker": {"docker"},
}
LEFT_OUT: set[str] = set()  # what `-m` leaves out of this session (set at configure)
REFUSED: list[str] = []  # what a test tried to start although `-m` left it out
RUNNING = {"test": "(no test)"}


def _left_out(markexpr: str) -> set[str]:
    """The needs that `-m` deselects: a test with that one mark would not run."""
    if not markexpr:
        return set()
    from _pytest.mark.expression import Expression

    expr = Expression.compile(markexpr)

    def selected(need: str) -> bool:
        return expr.evaluate(lambda name, /, **kwargs: name == need)

    return {need for need in NEEDS if not selected(need)}


def _server_in(words: list[str]) -> str | None:
    """The kind of local server a process's command line runs, if any."""
    if not words:
        return None
    program = Path(words[0]).name.rstrip(":")  # PostgreSQL's own processes: "postgres: checkpointer"
    if program == "llama-server" or "connectors.model_server_main" in words:
        return "models"
    if program in ("postgres", "postmaster", "pg_ctl", "initdb", "psql"):
        return "services"
    if "server" in words and any(Path(w).name == "prefect" for w in words[:4]):  # prefect server start
        return "services"
    return None


def _servers_left_out() -> list[str]:
    """This session's local servers of a kind `-m` leaves out that still run: started under its
    state folder or with its environment."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            argv = proc.info["cmdline"] or []
            if _server_in(argv) not in LEFT_OUT:
                continue
            line = " ".join(argv)
            if str(STATE) in line or proc.environ().get("HOMESKILLET_HOME") == str(STATE):
                found.append(f"pid {proc.pid}: {line[:200]}")
        except psutil.Error:
            continue
    return found


def pytest_configure(config):
    LEFT_OUT.update(_left_out(config.getoption("markexpr")))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Marks each test by its needs before `-m` selects (tryfirst: the mark plugin deselects after)."""
    for item in items:
        for need, fixtures in NEEDS.items():
            if fixtures.intersection(item.fixturenames):
                item.add_marker(need)


def pytest_runtest_logstart(nodeid, location):
    RUNNING["test"] = nodeid


def _refuse_when_left_out(need: str, request) -> None:
    if need in LEFT_OUT:
        what = f"{RUNNING['test']} asks for {request.fixturename!r}"
        REFUSED.append(what)
        pytest.fail(f"this session leaves {need!r} out (-m), but {what}")


@pytest.fixture(scope="session", autouse=True)
def _session_state():
    """Starts nothing. At the end of the session, stops whatever the tests started under the test
    state folder (model servers, the Prefect server, PostgreSQL) and removes the folder; a session
    that left services out (-m) fails if a test started one or tried to."""
    yield
    started = _servers_left_out() if "services" in LEFT_OUT else []
    try:
        from tasks import runtime

        runtime.backend(PACKAGED_CATALOG).servers.stop_all()  # the machine-wide ones of the test home
    finally:  # whatever failed above, leave no server behind
        stop_prefect_server(STATE)
        shutil.rmtree(STATE, ignore_errors=True)
    if started or REFUSED:
        pytest.fail(
            "tests of a session that leaves services out started (or tried to start) these; mark them by "
            "asking for the fixture they need (see NEEDS in tests/conftest.py):\n  " + "\n  ".join(started + REFUSED),
            pytrace=False,
        )


@pytest.fixture(scope="session")
def postgres(_session_state, request):
    """The session's PostgreSQL (the ledger's), started on first use: its data folder. For the
    tests that use the ledger without flows or the Prefect server."""
    _refuse_when_left_out("services", request)
    from connectors.postgres import ensure_postgres
    from homeskillet.settings import get_settings

    pgdata = get_settings().pgdata
    ensure_postgres(pgdata)
    return pgdata


@pytest.fixture(scope="session")
def local_services(_session_state, request):
    """PostgreSQL + Prefect server for the rest of the session, for the tests that ask for it (flows,
    tasks, Secret blocks, the `homeskillet` and `prefect` executables); `_session_state` stops them
    at the end. Pure tests and tests that only need PostgreSQL (`postgres`) do without."""
    _refuse_when_left_out("services", request)
    try:
        url = ensure_prefect_server(STATE, PORT)
    except BaseException:
        stop_prefect_server(STATE)  # PostgreSQL may already run
        raise
    yield url
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # deliver the run logs while the server still listens


@pytest.fixture(scope="session")
def local_models(_session_state, request):
    """The real llama.cpp model servers of the packaged catalog: its backend, which starts one per
    model on first use (`_session_state` stops them at the end)."""
    _refuse_when_left_out("models", request)
    from tasks import runtime

    return runtime.backend(PACKAGED_CATALOG)


@pytest.fixture(scope="session")
def llama_server(request) -> Path:
    """The llama.cpp server binary the set-up builds, for the tests that run model servers of their
    own."""
    _refuse_when_left_out("models", request)
    from connectors.model_server import llama_server_binary
    from homeskillet.settings import get_settings

    return llama_server_binary(get_settings().llama_server)


@pytest.fixture(scope="session")
def docker():
    """The Docker engine, for the staging round trip: only with HOMESKILLET_DOCKER_TESTS=1."""
    if os.environ.get("HOMESKILLET_DOCKER_TESTS") != "1":
        pytest.skip("the Docker round trip (make staging) runs with HOMESKILLET_DOCKER_TESTS=1")


class _EchoHandler(JSONHandler):
    """An OpenAI-compatible endpoint that echoes, and fails on prompts containing FAIL.

    A FAIL prompt with a tag like #abc3 fails once 3 prompts with that tag have arrived.
    A test double for a remote model: real HTTP on loopback, no model behind it.
    """

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        seen = {"path": self.path, "auth": self.headers.get("Authorization"), "model": body.get("model"), "text": text}
        seen |= {"temperature": body.get("temperature"), "stop": body.get("stop")}  # the sampling the call asked for
        self.server.seen.append(seen)
        if "FAIL" in text:
            # fail only once the request's other fragments (same #tag) are in flight too
            tag = re.search(r"#\w+", text)
            deadline = time.monotonic() + 5
            while tag and time.monotonic() < deadline:
                if sum(tag.group() in s["text"] for s in self.server.seen) >= int(tag.group()[-1]):
                    break
                time.sleep(0.05)
            self._send(500, {"error": {"message": "model crashed"}})
            return
        time.sleep(float(os.environ.get("ECHO_DELAY_S", "1.0")))
        reply = f"echo: {text}"
        choice = {"index": 0, "finish_reason": "stop"}
        choice.update({"message": {"role": "assistant", "content": reply}} if "messages" in body else {"text": reply})
        usage = {"prompt_tokens": len(text.split()), "completion_tokens": len(reply.split())}
        self._send(200, {"choices": [choice], "usage": usage})


class _EchoServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that hung up (a cancelled request) is expected here


@pytest.fixture(scope="session")
def echo_server():
    server = _EchoServer(("127.0.0.1", 0), _EchoHandler)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture
def serve_http():
    """Serve a request handler class on a loopback port for one test: `serve_http(Handler)` → the
    (host, port) it listens on; every server started is stopped afterwards."""
    servers: list[ThreadingHTTPServer] = []

    def serve(handler: type[BaseHTTPRequestHandler]) -> tuple[str, int]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[:2]

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def test_catalog(echo_server, tmp_path_factory) -> str:
    """The packaged catalog's SmolLM2, an echo model behind a loopback endpoint, and small pools."""
    packaged = yaml.safe_load(PACKAGED_CATALOG.read_text())
    smollm2 = next(m for m in packaged["models"] if m["name"] == "smollm2-135m")
    echo = {
        "name": "echo",
        "family": "loopback echo endpoint",
        "parameters_m": 1,
        "context_length": 4096,
        "prompt_style": "chat",
        "tflops": 1.0,
        "vram_gb": 0.5,
        "tokens_per_second": 100,
        "task_types": {"chat": 0.1, "factual_qa": 0.1, "math": 0.1, "summarize": 0.1, "reduce": 0.1},
        "serving": {
            "kind": "openai",
            "base_url": f"http://127.0.0.1:{echo_server.server_address[1]}/v1",
            "model": "echo-1",
            "api_key_env": "ECHO_API_KEY",
        },
    }
    echo_lite = {
        **echo,
        "name": "echo-lite",
        "tflops": 0.1,
        "vram_gb": 0.05,
        "task_types": {"chat": 0.05, "factual_qa": 0.05, "math": 0.2, "summarize": 0.05, "reduce": 0.05},
    }
    hosted = [p for p in packaged["pools"] if p.get("backend") == "hostedai"]
    catalog = {
        "models": [smollm2, echo, echo_lite],
        "pools": [
            {"id": "tiny", "tier": "dedicated", "tflops": 1.0, "vram_gb": 0.5, "price_per_hour": 0.5},
            {"id": "roomy", "tier": "preemptible", "tflops": 8.0, "vram_gb": 4.0, "price_per_hour": 0.4},
            {"id": "micro", "tier": "preemptible", "tflops": 0.05, "vram_gb": 0.02, "price_per_hour": 0.01},
            *hosted,
        ],
        "tenants": [{"id": "acme"}, {"id": "globex"}],
        "cards": packaged["cards"],
    }
    path = tmp_path_factory.mktemp("catalog") / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog))
    return str(path)


@pytest.fixture
async def assert_no_leaks(test_catalog):
    """After the test: the ledger holds nothing, whatever happened. A leak is reported and then
    released, so that it fails this test only, not every later one."""
    from tasks import runtime

    yield
    held = {}
    for path in (test_catalog, str(PACKAGED_CATALOG)):
        held.update({a.allocation_id: (path, a) for a in await runtime.services(path).held()})
    for path, allocation in held.values():
        try:
            await runtime.services(path).backend_of(allocation).release(allocation.allocation_id, allocation.tenant)
        except Exception:  # noqa: BLE001 (a pool of the other catalog, or a backend that fails: end the row itself)
            ledger = await runtime.backend(path).ledger()
            await ledger.release(allocation.allocation_id, allocation.tenant)
    assert not held, f"allocations leaked: {[(a.allocation_id, a.pool, a.model) for _, a in held.values()]}"


@pytest.fixture(scope="session")
def ended_as():
    """`await ended_as(ids)`: how those allocations ended, as a set of ledger states: 'released' by
    their process (a release or a rollback hook), 'expired' by the ledger (lease over, holder gone),
    'active' while held. A test of a cancellation asks for {'released'}: the ledger's dead-holder
    check must not pass for hooks that never ran."""
    import asyncpg

    from connectors import postgres
    from homeskillet.settings import get_settings

    async def states(allocation_ids: list[str]) -> set[str]:
        conn = await asyncpg.connect(postgres.dsn(get_settings().pgdata, "homeskillet"))
        try:
            query = "SELECT state FROM allocations WHERE allocation_id = ANY($1::text[])"
            return {r["state"] for r in await conn.fetch(query, allocation_ids)}
        finally:
            await conn.close()

    return states


class SpendWritesHeld:
    """A table lock on the ledger's `spend` that holds every spend write up (reads go on) until
    `let_go`; `writer_waiting(run)` waits until a write is stuck on it (or `run` ended)."""

    async def hold(self) -> None:
        import asyncpg

        from connectors import postgres
        from homeskillet.settings import get_settings

        self._conn = await asyncpg.connect(postgres.dsn(get_settings().pgdata, "homeskillet"))
        self._hold = self._conn.transaction()
        await self._hold.start()
        await self._conn.execute("LOCK TABLE spend IN EXCLUSIVE MODE")

    async def writer_waiting(self, run: asyncio.Task, timeout_s: float = 30) -> bool:
        query = "SELECT count(*) FROM pg_locks WHERE relation = 'spend'::regclass AND NOT granted"
        deadline = time.monotonic() + timeout_s
        while not await self._conn.fetchval(query):
            if run.done() or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def let_go(self) -> None:
        if self._hold is not None:
            await self._hold.rollback()
            self._hold = None

    async def close(self) -> None:
        await self._conn.close()


@pytest.fixture
async def spend_writes_held(local_services):
    """Spend writes held up until the test calls `let_go` (or ends)."""
    from tasks import runtime

    await runtime.backend(PACKAGED_CATALOG).ledger()  # its tables exist
    held = SpendWritesHeld()
    await held.hold()
    try:
        yield held
    finally:
        await held.close()


@pytest.fixture
def routing_measurements_restored():
    """The session's benchmarks/latest.json as it was before the test: a benchmark run through a
    worker (another process, same state folder) writes it, and its figures change how every later
    test routes."""
    latest = STATE / "benchmarks" / "latest.json"
    before = latest.read_bytes() if latest.exists() else None
    yield latest
    if before is None:
        latest.unlink(missing_ok=True)
    else:
        latest.write_bytes(before)


@pytest.fixture
def covenant_catalog(tmp_path, test_catalog, local_services):
    """A catalog file whose tenants have covenants; `write(**covenants)` rewrites them."""
    path = tmp_path / "covenants.yaml"

    def write(**covenants):
        return write_catalog(path, test_catalog, {"acme": {}, **{t.replace("_", "-"): c for t, c in covenants.items()}})

    write.path = write(cov_narrow=NARROW)
    return write


@pytest.fixture(scope="module")
def reference():
    """The request classifier's Python reference, with the committed weights."""
    from tasks.classifier import Classifier

    return Classifier.load()


@pytest.fixture(scope="module")
def wasm():
    """The request classifier through edge/classifier.wasm (wasmtime)."""
    from tasks.edge_classifier import WasmClassifier

    return WasmClassifier()


@pytest.fixture
def sweep():
    """What the test's fault paths leave behind for a person or a log shipper to read (a `Sweep`):
    every logger at DEBUG and every warning while the test runs; `sweep.check(secret)` looks in them."""
    s = Sweep()
    loggers = [logging.getLogger(name) for name in Sweep.LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(s.handler)
        lg.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            yield s
            s.warned = list(warned)
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(s.handler)
            lg.setLevel(level)


@pytest.fixture(scope="session")
def asgi_server():
    """serve_app, for tests: `url, stop = asgi_server(app)`."""
    return serve_app


@pytest.fixture(scope="session")
def emulator(echo_server):
    """The hosted·ai emulator on a loopback port (real HTTP), in a thread of this process so that
    tests can change its faults. Pods serve the real SmolLM2 and the echo double."""
    import asyncio
    from types import SimpleNamespace

    from doubles.hostedai_emulator import create_app, default_config
    from homeskillet import catalog as cat
    from tasks import runtime

    echo = f"http://127.0.0.1:{echo_server.server_address[1]}/v1"

    async def endpoint(name: str) -> str:
        if name == "echo-1":
            return echo
        spec = cat.model(runtime.catalog(PACKAGED_CATALOG), name)
        return await asyncio.to_thread(runtime.backend(PACKAGED_CATALOG).model_endpoint, spec)

    config = default_config()
    app = create_app(config, model_endpoint=endpoint)
    url, stop = serve_app(app)
    teams = {t.name: t for t in config.teams}
    yield SimpleNamespace(url=url, state=app.state.emulator, teams=teams, app=app, endpoint=endpoint)
    stop()


@pytest.fixture
def faults(emulator):
    """Set the emulator's faults for one test; they are cleared afterwards, and so are the failures
    they caused: the circuit breakers (one per base URL, process-wide) start closed and counting
    from zero in every test that uses faults, whatever ran before it."""
    from connectors.hostedai import BREAKERS
    from doubles.hostedai_emulator import Faults

    def set_faults(**values):
        emulator.state.set_faults(Faults(**values))

    BREAKERS.uow.contexts.breakers.clear()
    yield set_faults
    emulator.state.set_faults(Faults())
    BREAKERS.uow.contexts.breakers.clear()


@pytest.fixture(scope="session")
async def hostedai_tenants(emulator, local_services):
    """Each test tenant gets its own team and key, stored as Prefect Secret blocks."""
    from homeskillet.schemas import HostedAICredentials
    from tasks.credentials import save_hostedai_credentials

    for name in ("acme", "globex", "demo"):
        team = emulator.teams[name]
        await save_hostedai_credentials(
            name, HostedAICredentials(url=emulator.url, api_key=team.api_key, team_id=team.id)
        )
    return emulator


@pytest.fixture
async def no_subscriptions_left(emulator, test_catalog):
    """After the test: the flow and the backends gave back every subscription themselves (the last
    release retires a share at once: HOMESKILLET_HOSTEDAI_IDLE_S=0), so neither this process's
    backends nor the emulator hold any, once the emulator's asynchronous unsubscribes are done.
    Anything left is reported, then cleaned up, so it fails this test only."""
    from tasks import runtime

    yield
    emulator.state.set_faults(type(emulator.state.faults)())
    paths = (test_catalog, str(PACKAGED_CATALOG))

    def held() -> dict:
        return {key: sub for path in paths for key, sub in runtime.backend(path, "hostedai").subscriptions().items()}

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # un_subscribing → gone, as on hosted·ai; retires due run
        emulator.state.sweep()
        if not emulator.state.subs and not held():
            break
        await asyncio.sleep(0.1)
    held = held()
    left = sorted(emulator.state.subs)
    if held or left:
        for path in paths:
            await runtime.backend(path, "hostedai").shutdown()
        for sub in list(emulator.state.subs.values()):
            emulator.state._end(sub, "cleaned up by the test")
    assert not held, f"the backends still hold subscriptions: {held}"
    assert not left, f"subscriptions left on hosted·ai: {left}"
