"""The MCP server: Streamable HTTP at /mcp and WebSocket at /ws, one tenant per bearer token.

Tools: fuse (a real fuse_request flow run, progress per fragment), plan, classify, allocations,
feedback (a score of one of the tenant's finished answers).
Resources: homeskillet://catalog, homeskillet://requests/{request_id} (the caller's own only).
Every call is the token's tenant: the auth middleware resolves the token before any work and
puts the tenant in the connection's ASGI state; no tool takes a tenant argument.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import anyio
import mcp_types as types
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from apps.api import routes as api_routes
from apps.guards import SESSION_IDLE_S, Guards
from connectors.tokens import TokenStore, token_hash, well_formed
from connectors.ws_transport import DEFAULT_MAX_MESSAGE_BYTES, SUBPROTOCOL, token_from_subprotocols, websocket_server
from homeskillet.errors import CovenantViolation, HomeskilletError, InvalidRequest, TooManyRequests, public_message
from homeskillet.schemas import MAX_PROMPT_CHARS, Constraints
from homeskillet.settings import Settings, get_settings

if TYPE_CHECKING:
    from homeskillet.schemas import FusionResult

log = logging.getLogger(__name__)

TOO_MANY_REQUESTS = -32029  # implementation-defined server error: the tenant's rate or concurrency cap
TENANT_KEY = "homeskillet_tenant"
CALLER: ContextVar[str | None] = ContextVar("homeskillet_caller", default=None)  # the tenant reading a resource


class _Server(MCPServer):
    """MCPServer whose unknown tools are a JSON-RPC error (the SDK answers them as a tool result),
    and whose every tool call and resource read counts against its tenant's rate."""

    guards: Guards | None = None

    def _count(self, context: Any) -> None:
        if self.guards is not None and context is not None:
            try:
                self.guards.call(tenant_of(context))
            except TooManyRequests as exc:
                raise MCPError(
                    code=TOO_MANY_REQUESTS, message=str(exc), data={"retry_after_s": exc.retry_after_s}
                ) from None

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None):
        if self._tool_manager.get_tool(name) is None:
            raise MCPError(code=types.METHOD_NOT_FOUND, message=f"unknown tool {name!r}", data={"tool": name})
        self._count(context)
        return await super().call_tool(name, arguments, context)

    async def read_resource(self, uri: Any, context: Any = None):
        self._count(context)
        # a static resource's handler gets no context from the SDK: the caller travels in CALLER
        caller = CALLER.set(tenant_of(context) if context is not None else None)
        try:
            return await super().read_resource(uri, context)
        finally:
            CALLER.reset(caller)


def tenant_of(ctx: Context) -> str:
    """The tenant bound to this connection by the auth middleware (HTTP request or WebSocket)."""
    scope = getattr(ctx.request_context.request, "scope", None) or {}  # a Starlette Request or WebSocket
    tenant = (scope.get("state") or {}).get(TENANT_KEY)
    if not tenant:
        raise MCPError(code=types.INVALID_REQUEST, message="no tenant bound to this connection")
    return tenant


def _structured(data: dict) -> types.CallToolResult:
    """A tool result as structured content, with the same JSON as text for older clients."""
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=json.dumps(data))], structured_content=data
    )


def _progress_message(event: dict) -> str:
    return (
        f"{event['fragment_id']} {event['event']}: model {event['model']}, pool {event['pool']}, "
        f"allocation_id {event['allocation_id']}"
    )


async def _with_shared_clients(flow_run):
    """The flow run on this server's shared Prefect clients (one per event loop, not one per run)."""
    from flows.clients import lend_clients

    await lend_clients()
    return await flow_run


class Tools:
    """The MCP tools and resources, as methods over what they share: the catalog file, the token
    store (`store`, opened on the first request when not given). Each is a plain method: it can
    be imported, read and called on its own."""

    def __init__(self, catalog_path: str | None, store: TokenStore | None = None, settings: Settings | None = None):
        self.catalog_path = catalog_path
        self.store = store
        # the server's limits (`tenant_max_requests`) and the datasets feedback reads and writes
        self.settings = settings or get_settings()

    @property
    def services(self):
        """The run services of this server's catalog (imported on use: Prefect, beneath them, reads
        its settings at import, which the command line sets first)."""
        from tasks import runtime

        return runtime.services(self.catalog_path)

    async def fuse(
        self, prompt: str, ctx: Context, strategy: str = "single", constraints: dict[str, Any] | None = None
    ) -> types.CallToolResult:
        """Run one request through the fuse_request flow (decompose, allocate a GPU share per
        fragment, infer, release, fuse). Progress: one notification per fragment allocated and
        completed. constraints: max_tokens, max_cost_usd, allowed_models, tier, pool, split, task_type."""
        from tasks.preparation import make_request

        tenant = tenant_of(ctx)
        request_id = "mcp-" + uuid.uuid4().hex[:16]
        try:  # bad input is refused here, before a flow run is created for it
            make_request(prompt, tenant, strategy, constraints_of(constraints), request_id)
        except InvalidRequest as exc:
            raise ToolError(public_message(exc, request_id)) from None
        count = 0

        async def progressed(event: dict | None) -> None:
            nonlocal count
            if event is None:
                await ctx.report_progress(0, None, f"request {request_id} started")
                return
            if event["event"] not in ("allocated", "completed"):
                return  # a fragment's slices are what MCP reports
            count += 1
            await ctx.report_progress(count, None, _progress_message(event))

        try:
            result = await self.run_request(
                tenant, request_id, "mcp", progressed, prompt=prompt, strategy=strategy, constraints=constraints
            )
        except CovenantViolation as exc:
            if exc.term != "max_concurrent_requests":
                raise ToolError(public_message(exc, request_id)) from None
            raise MCPError(  # a protocol error, at once: the client retries later, as after a rate limit
                code=TOO_MANY_REQUESTS, message=public_message(exc, request_id), data={"retry_after_s": 1}
            ) from None
        except Exception as exc:
            raise ToolError(public_message(exc, request_id)) from None
        data = result.model_dump(mode="json")
        await self.store.save_result(tenant, result.request_id, data)
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=result.answer)], structured_content=data
        )

    async def run_request(
        self,
        tenant: str,
        request_id: str,
        surface: str,
        on_event: Callable[[dict | None], Awaitable[None]] | None = None,
        **arguments: Any,
    ) -> FusionResult:
        """One real fuse_request flow run for the tenant, tagged with it and the surface it came
        through; `on_event(None)` once it started, then `on_event(event)` per fragment allocated and
        completed. Cancelled (the caller went away), the run is cancelled and everything it held
        released before the cancellation goes on; failed, its leftovers are released and the error
        raised (logged here in full: surfaces show tenants `public_message`).

        The request is admitted first (`Ledger.admit`: the covenant's max_concurrent_requests, or
        the server's `tenant_max_requests` where the covenant sets none, counted in PostgreSQL
        over every server process): beyond the cap, CovenantViolation at once, and no flow run is
        made for it. It counts as running until its flow run has ended."""
        from connectors.ledger import new_request_key

        services = self.services
        ledger = await services.ledger()
        admitted = new_request_key()
        try:
            # shielded: cancelled while its commit is under way, the row could land unended
            await asyncio.shield(
                ledger.admit(tenant, request_id, services.covenant(tenant), self.settings.tenant_max_requests, admitted)
            )
        except asyncio.CancelledError:
            with anyio.CancelScope(shield=True):
                await ledger.end_request(admitted)
            raise
        try:
            return await self._run(tenant, request_id, surface, on_event, admitted=admitted, **arguments)
        finally:
            with anyio.CancelScope(shield=True):
                await ledger.end_request(admitted)

    async def _run(
        self,
        tenant: str,
        request_id: str,
        surface: str,
        on_event: Callable[[dict | None], Awaitable[None]] | None,
        **arguments: Any,
    ) -> FusionResult:
        import prefect

        from flows.fusion import fuse_request
        from tasks import progress

        events: asyncio.Queue[dict] = asyncio.Queue()
        with prefect.tags(f"tenant:{tenant}", surface):
            # its own asyncio task, out of the caller's cancel scope: on cancellation the flow's
            # rollback hooks must still be able to await the release of each allocation
            run = asyncio.create_task(
                _with_shared_clients(
                    fuse_request(tenant=tenant, request_id=request_id, catalog_path=self.catalog_path, **arguments)
                )
            )
        getter = None
        with progress.listening(request_id, events.put_nowait):
            try:
                if on_event is not None:
                    await on_event(None)
                while True:
                    getter = asyncio.ensure_future(events.get())
                    done, _ = await asyncio.wait({run, getter}, return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done:
                        getter.cancel()
                        break
                    if on_event is not None:
                        await on_event(getter.result())
                while on_event is not None and not events.empty():
                    await on_event(events.get_nowait())
            except BaseException:
                if getter is not None:
                    getter.cancel()
                run.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait({run})
                    await self._release_leftovers(tenant, request_id)
                raise
        try:
            return run.result()
        except BaseException as exc:
            await self._release_leftovers(tenant, request_id)
            if isinstance(exc, Exception):
                log.warning("request %s of tenant %s failed: %s: %s", request_id, tenant, type(exc).__name__, exc)
            raise

    async def _release_leftovers(self, tenant: str, request_id: str) -> None:
        """Backstop after a failed or cancelled run: release what the request still holds (its
        rollback hooks normally have; a cancellation racing a reservation must not leak one)."""
        services = self.services
        try:
            for allocation in await services.held(tenant):
                if allocation.request_id == request_id:
                    log.warning("releasing %s left by request %s", allocation.allocation_id, request_id)
                    await services.backend_of(allocation).release(allocation.allocation_id, tenant)
        except Exception:
            log.exception("could not check request %s for leftover allocations", request_id)

    async def plan(
        self, prompt: str, ctx: Context, strategy: str = "single", constraints: dict[str, Any] | None = None
    ) -> types.CallToolResult:
        """The fragments, their task types, chosen models and pools, and the cost estimate, as
        `fuse` would run them under your covenant; nothing is allocated."""
        from tasks.preparation import make_request, prepare

        tenant = tenant_of(ctx)
        request_id = "plan-" + uuid.uuid4().hex[:8]
        try:
            request = make_request(prompt, tenant, strategy, constraints_of(constraints), request_id)
            prepared = await prepare(request, self.services, log)  # the split runs off the event loop
        except HomeskilletError as exc:
            raise ToolError(public_message(exc, request_id)) from None
        choices = prepared.choices
        fragments = [
            {
                "id": f.id,
                "text": f.text,
                "task_type": f.task_type,
                "depends_on": f.depends_on,
                "model": choices[f.id].model,
                "pool": choices[f.id].pool,
                "tier": choices[f.id].tier,
                "est_cost_usd": choices[f.id].est_cost_usd,
                "reason": choices[f.id].reason,
            }
            for f in prepared.plan.fragments
        ]
        return _structured(
            {
                "strategy": strategy,
                "fusion": prepared.plan.fusion,
                "fragments": fragments,
                "est_cost_usd": prepared.est_cost_usd,
                "covenant_terms": prepared.ctx.covenant_terms,
            }
        )

    async def classify(self, prompt: str) -> types.CallToolResult:
        """The request classifier's task type for a text, and every label's probability."""
        from tasks.decompose import DECOMPOSE_TIMEOUT_S, request_classifier

        if len(prompt) > MAX_PROMPT_CHARS:
            raise ToolError(f"InvalidRequest: prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
        # off the event loop: a long text must not stall every other tenant's calls
        try:
            probs = await asyncio.wait_for(
                asyncio.to_thread(request_classifier().probabilities, prompt.encode()), DECOMPOSE_TIMEOUT_S
            )
        except TimeoutError:
            raise ToolError(f"InvalidRequest: the text took over {DECOMPOSE_TIMEOUT_S:g}s to classify") from None
        return _structured({"label": max(probs, key=probs.get), "probabilities": probs})

    async def allocations(self, ctx: Context) -> types.CallToolResult:
        """The GPU shares your tenant holds now (read without locking anything)."""
        tenant = tenant_of(ctx)
        held = await self.services.held(tenant)
        # where a slice is served is the orchestrator's business: internal addresses stay inside
        shown = [a.model_dump(mode="json", exclude={"endpoint"}) for a in held]
        return _structured({"tenant": tenant, "allocations": shown})

    async def feedback(
        self, request_id: str, score: float, ctx: Context, fragment: str | None = None
    ) -> types.CallToolResult:
        """Rate the answer of one of your finished requests from 0 (wrong) to 1 (right): the whole
        request's, or one fragment's (fragment: f1, f2, …). The router learns from it."""
        from connectors.feedback import record_feedback

        tenant = tenant_of(ctx)  # the token's: another tenant's request reads like an unknown one
        settings = self.settings  # the server's datasets: by default the ones the flow writes to
        try:
            record = await asyncio.to_thread(
                record_feedback, settings.feedback, settings.telemetry, tenant, request_id, score, fragment
            )
        except Exception as exc:
            if not isinstance(exc, HomeskilletError):
                log.warning("feedback of tenant %s failed: %s: %s", tenant, type(exc).__name__, exc)
            raise ToolError(public_message(exc, request_id)) from None
        return _structured(record.model_dump(mode="json"))

    def catalog(self) -> str:
        """The models and pools (tier, capacity, price per hour) your covenant allows, and its terms."""
        tenant = CALLER.get()
        if tenant is None:
            raise MCPError(code=types.INVALID_REQUEST, message="no tenant bound to this connection")
        return self.catalog_for(tenant)

    def catalog_for(self, tenant: str) -> str:
        """The catalog as `tenant` may use it; no other tenant is named."""
        from tasks.covenant import restrict

        services = self.services
        covenant = services.covenant(tenant)
        allowed, _ = restrict(services.catalog, covenant)
        return json.dumps(
            {
                "models": [m.model_dump(mode="json") for m in allowed.models],
                "pools": [p.model_dump(mode="json") for p in allowed.pools],
                "tenant": tenant,
                "covenant": covenant.terms(),
            }
        )

    async def request(self, request_id: str, ctx: Context) -> str:
        """A finished request's fusion result (your tenant's only)."""
        data = await self.store.result(tenant_of(ctx), request_id)
        if data is None:
            raise ResourceNotFoundError(f"no request {request_id!r}")
        return json.dumps(data)


def constraints_of(constraints: dict | None) -> Constraints:
    """A tool's constraints argument, validated, or a ToolError naming the first problem."""
    try:
        return Constraints.model_validate(constraints or {})
    except ValidationError as exc:
        raise ToolError(f"invalid constraints: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None


def build_mcp(tools: Tools) -> _Server:
    """The MCP server: the five tools and two resources of `tools`."""
    mcp = _Server(
        name="homeskillet",
        instructions="Homeskillet: decompose a request, run each part on its own GPU share, fuse the answers.",
        log_level="WARNING",
    )
    for tool in (tools.fuse, tools.plan, tools.classify, tools.allocations, tools.feedback):
        mcp.tool()(tool)
    mcp.resource("homeskillet://catalog", mime_type="application/json")(tools.catalog)
    mcp.resource("homeskillet://requests/{request_id}", mime_type="application/json")(tools.request)
    return mcp


class BearerAuth:
    """ASGI middleware: the server's fair shares, then the bearer token resolved to its tenant,
    before anything else runs (see apps/guards.py for each limit).

    Junk costs nothing: a token not of the token's form is refused without a database lookup, and
    an address past its failed-authentication rate gets 429 unless its token is one this server
    knows live. A connection runs in a cancel scope that the token's revocation (heard through the
    store's NOTIFY) or the connection's maximum lifetime ends: a WebSocket is then closed with
    1008 and the reason."""

    def __init__(self, app, tools: Tools, guards: Guards):
        self.app = app
        self.tools = tools  # its token store resolves the token
        self.guards = guards

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope.get("path") == "/healthz":
            return await self.app(scope, receive, send)
        try:
            with self.guards.server():
                return await self._authenticated(scope, receive, send)
        except TooManyRequests as exc:
            return await _refuse(scope, receive, send, 429, "too_many_requests", str(exc), exc.retry_after_s)

    async def _authenticated(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        token = None
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        if token is None and scope["type"] == "websocket":
            protocols = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
            token = token_from_subprotocols(protocols)
        store = self.tools.store
        address = (scope.get("client") or ("unknown",))[0]
        tenant = store.cached(token)
        if tenant is None and well_formed(token):
            wait = self.guards.address_limited(address)
            if wait is not None:
                raise TooManyRequests(f"too many failed authentications from {address}; retry later", wait)
            tenant = await store.tenant_of(token)
        if tenant is None:
            self.guards.auth_failed(address)
            why = "missing bearer token" if not token else "invalid or revoked token"
            return await _refuse(scope, receive, send, 401, "unauthorized", why)
        scope.setdefault("state", {})[TENANT_KEY] = tenant
        with self.guards.tenant(tenant), self.guards.watched(token_hash(token)) as watch:
            if scope["type"] == "websocket":
                await self.app(scope, receive, send)
            else:
                await self._http(scope, receive, send, tenant, headers)
        if watch.why is not None and scope["type"] == "websocket":
            with contextlib.suppress(Exception):  # the app may have closed it already
                await send({"type": "websocket.close", "code": 1008, "reason": watch.why})

    async def _http(self, scope, receive, send, tenant: str, headers: dict[str, str]) -> None:
        # an HTTP session belongs to the tenant that opened it: another token cannot ride on its id
        session = headers.get("mcp-session-id")
        if session is not None:
            # a session is its opener's: another tenant's, or one not opened here, is not found
            if self.guards.session_tenant(session) != tenant:
                return await _refuse(scope, receive, send, 404, "not_found", "session not found")
            if scope["method"] == "DELETE":
                self.guards.end_session(session)
                return await self.app(scope, receive, send)
            with self.guards.in_session(session):  # not over while a request (or stream) of it runs
                return await self.app(scope, receive, send)
        elif scope["method"] == "POST" and scope.get("path") == "/mcp":
            self.guards.session_opening(tenant)  # a POST to MCP without a session opens one

        async def send_and_bind(message):
            if message["type"] == "http.response.start":
                for key, value in message.get("headers", []):
                    if key.lower() == b"mcp-session-id":
                        self.guards.bind_session(value.decode("latin-1"), tenant)
            await send(message)

        await self.app(scope, receive, send_and_bind)


async def _refuse(scope, receive, send, status: int, error: str, why: str, retry_after_s: float | None = None):
    """An HTTP error answer (in OpenAI's shape under /v1), or a WebSocket refused at its handshake
    (1008; 1013 for "try later")."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        code = 1013 if status == 429 else 1008
        await send({"type": "websocket.close", "code": code, "reason": why[:120]})  # refused: HTTP 403
        return
    headers = {"WWW-Authenticate": 'Bearer realm="homeskillet"'} if status == 401 else {}
    if retry_after_s is not None:
        headers["Retry-After"] = str(math.ceil(retry_after_s))
    body: dict = {"error": error, "error_description": why}
    if scope.get("path", "").startswith("/v1/"):
        kind = {401: "authentication_error", 429: "rate_limit_error", 404: "invalid_request_error"}[status]
        body = {"error": {"message": why, "type": kind, "param": None, "code": error}}
    await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


async def _healthz(request) -> JSONResponse:
    """Alive and serving (no token needed: load balancers ask)."""
    return JSONResponse({"status": "ok"})


def create_app(
    catalog_path: str | None = None,
    store: TokenStore | None = None,
    host: str = "127.0.0.1",
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    settings: Settings | None = None,
):
    """The ASGI app. `store`: an opened TokenStore (default: opened on first request); `settings`:
    its limits and the telemetry and feedback datasets (default: the process's settings)."""
    settings = settings or get_settings()
    tools = Tools(catalog_path, store, settings)
    guards = Guards(settings)
    mcp = build_mcp(tools)
    mcp.guards = guards
    app = mcp.streamable_http_app(
        streamable_http_path="/mcp",
        host=host,
        max_request_body_size=max_message_bytes,
        session_idle_timeout=SESSION_IDLE_S,
    )
    lowlevel = mcp._lowlevel_server

    async def ws_endpoint(websocket: WebSocket) -> None:
        await websocket.accept(subprotocol=SUBPROTOCOL)
        async with websocket_server(websocket, max_message_bytes, settings.connection_max_in_flight) as (read, write):
            await lowlevel.run(read, write, lowlevel.create_initialization_options())

    app.router.routes.append(WebSocketRoute("/ws", ws_endpoint))
    app.router.routes.extend(api_routes(tools, guards))  # the OpenAI-compatible front door, beside MCP
    app.router.routes.append(Route("/healthz", _healthz, methods=["GET"]))
    auth = BearerAuth(app, tools, guards)
    subscribed: list[TokenStore] = []
    listening: list[asyncio.Task] = []  # the task (re)starting the revocation listener, kept referenced

    async def listen() -> None:
        """Hear revocations (again after a lost connection: until then no live token is cached);
        then end the open connections of tokens revoked while nothing was heard."""
        try:
            if await tools.store.listen():
                for digest in await tools.store.revoked_among(list(guards.watches)):
                    guards.revoked(digest)
        except Exception:
            log.exception("could not check open connections for revoked tokens")

    async def asgi(scope, receive, send):
        if tools.store is None:
            tools.store = await TokenStore.open(settings.pgdata)
        if tools.store not in subscribed:
            tools.store.subscribe(guards.revoked)  # a revocation ends the token's open connections
            subscribed.append(tools.store)
        if scope["type"] != "lifespan" and not tools.store.listening and not any(not t.done() for t in listening):
            listening[:] = [asyncio.create_task(listen())]  # beside the request, never in its way
        await auth(scope, receive, send)

    asgi.mcp = mcp  # type: ignore[attr-defined]
    asgi.tools = tools  # type: ignore[attr-defined]
    asgi.guards = guards  # type: ignore[attr-defined]
    return asgi
