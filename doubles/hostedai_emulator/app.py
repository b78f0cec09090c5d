"""`create_app`: the emulator as one FastAPI app, with its state, its fault injection and its routes.

The app's `State` is on `app.state.emulator` (tests and the load test read and change it there:
its faults, subscriptions and counters), the function that finds a model's server for a pod's
inference on `app.state.model_endpoint`. `inject_faults`, the app's middleware, does what the
real API does to any call before the handler sees it: it finishes due unsubscribes, counts API
calls (the `/gpuaas` and expose-service routes, not pods' inference or `/_emulator`), adds the
latency and draws the per-call faults (bare 500, 429, the first N reads' error in a 200 body, and
on reads the 500 envelope or the error inside a 200), in that order, from the one seeded random
sequence. The routes are registered
here in one list, so that `create_app` is the map of the API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse, Response

from doubles.hostedai_emulator import routes
from doubles.hostedai_emulator.accounts import EmulatorConfig, default_config
from doubles.hostedai_emulator.faults import BODY_ERROR, INTERNAL
from doubles.hostedai_emulator.state import State

# the OpenAPI document's description of the emulated API
DESCRIPTION = """A stateful local emulator of the hosted·ai GPUaaS API (what is known of it: docs/hostedai-integration.md).

It keeps teams with API keys, regions, pools of shared GPUs and subscriptions, and reproduces
the quirks the real API shows: subscribe answers slowly or with an empty body, a subscription
appears in lists only after a delay and goes `subscribing` → `active`, one subscription per team
per pool (409), "Insufficient resources" (code 10189007) as HTTP 500 or inside a 2xx body,
lists that carry other teams' items, lists in three shapes, an asynchronous unsubscribe that
answers non-JSON. Each subscription's pod serves an OpenAI-compatible endpoint, backed by the
local llama.cpp model servers. Faults (latency, 5xx, timeouts, preemption) are injected by
configuration. Run it with `homeskillet emulator --port P [--faults …]`.
"""

ModelEndpoint = Callable[[str], Awaitable[str]]


def create_app(config: EmulatorConfig | None = None, model_endpoint: ModelEndpoint | None = None) -> FastAPI:
    """The emulator app. `model_endpoint(model_name) -> base URL` serves pods' inference; by
    default the local catalog's llama.cpp servers."""
    app = FastAPI(title="hosted·ai emulator", version="2.4.1-emulated", description=DESCRIPTION)
    app.state.emulator = State(config or default_config())
    app.state.model_endpoint = local_models() if model_endpoint is None else model_endpoint
    app.middleware("http")(inject_faults)
    app.add_exception_handler(HTTPException, routes.http_error)
    get, post = ["GET"], ["POST"]
    app.add_api_route("/gpuaas/available-regions", routes.regions, methods=get)
    app.add_api_route("/gpuaas/available-pools", routes.pools, methods=get)
    app.add_api_route("/gpuaas/calculate-pool-subscription", routes.estimate, methods=post)
    app.add_api_route("/gpuaas/pool/subscribe", routes.subscribe, methods=post)
    app.add_api_route("/gpuaas/pool-subscription", routes.subscriptions, methods=get)
    app.add_api_route("/gpuaas/connection-info", routes.connection_info, methods=get)
    app.add_api_route("/pods/expose-service", routes.expose, methods=post)
    app.add_api_route("/gpuaas/pool/unsubscribe", routes.unsubscribe, methods=post)
    app.add_api_route("/gpuaas/{team_id}/metrics", routes.team_metrics, methods=get)
    app.add_api_route(
        "/pods/{pod_name}/{key}/v1/{path:path}", routes.pod_inference, methods=["GET", "POST"], include_in_schema=False
    )
    app.add_api_route("/_emulator/state", routes.emulator_state, methods=get, include_in_schema=False)
    return app


async def inject_faults(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """What happens to every call before its handler runs (see the module's docstring)."""
    state: State = request.app.state.emulator
    state.sweep()
    if request.url.path.startswith(("/gpuaas", "/pods/expose-service")):
        state.calls += 1
        state.calls_by_route[f"{request.method} {request.url.path}"] += 1
        f = state.faults
        if f.latency_s:
            await asyncio.sleep(f.latency_s)
        if f.fault_paths and not request.url.path.startswith(tuple(f.fault_paths)):
            return await call_next(request)
        if state.fires("error", f.error_rate):
            return PlainTextResponse("Internal Server Error", 500)
        if state.fires("rate_limit", f.rate_limit_rate):
            return PlainTextResponse("Too Many Requests", 429, headers={"Retry-After": f"{f.retry_after_s:g}"})
        if request.method == "GET" and state.body_errors_sent < f.body_error_reads:
            state.body_errors_sent += 1
            state.fired["body_error_read"] += 1
            return routes.error_response(200, f.body_error_message, BODY_ERROR)
        if request.method == "GET" or request.url.path == "/gpuaas/calculate-pool-subscription":  # reads
            if state.fires("read_error", f.read_error_rate):
                return routes.error_response(500, "internal error", INTERNAL)
            if state.fires("read_error_in_body", f.read_error_in_body_rate):
                return routes.error_response(200, "temporarily unable to list, try again", BODY_ERROR)
    return await call_next(request)


def local_models() -> ModelEndpoint:
    """Pods serve the local catalog's models through the machine's llama.cpp servers."""
    from connectors.model_server import ModelServers, slots_for, threads_for
    from homeskillet.catalog import load_catalog
    from homeskillet.schemas import LlamaCppServing
    from homeskillet.settings import get_settings

    settings = get_settings()
    catalog = load_catalog(settings.catalog)
    threads = settings.model_threads or threads_for(catalog.models)
    servers = ModelServers(settings.home, settings.model_idle_s, threads, settings.llama_server)
    local_pools = [p for p in catalog.pools if p.backend == "local"]

    async def endpoint(name: str) -> str:
        spec = next((m for m in catalog.models if m.name == name and isinstance(m.serving, LlamaCppServing)), None)
        if spec is None:
            raise LookupError(f"model {name!r} is not served in this pod")
        return await asyncio.to_thread(servers.endpoint, spec, slots_for(spec, local_pools))

    return endpoint
