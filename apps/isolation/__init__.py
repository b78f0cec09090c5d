"""`homeskillet isolation-report`: every way tenant B could reach tenant A's work, tried for real.

A (acme) holds a slice and a finished request result, locally and on hosted·ai (the emulator on
loopback, each tenant its own team and key in its own Secret block); B (globex) then tries to
release, list and read them through the backends, the ledger's listings, hosted·ai's API with its
own key and the MCP server (a real one on loopback, both transports' auth path), to ride on A's
MCP session and subscription, to reach A's pod, to run with A's tenant or Secret block, to read
A's telemetry and spend, and to reach the Prefect API from off the host. Secrets are looked for
where they must not be: reprs, the token table, Prometheus metrics, B's answers and errors.

A row (`Attack`) is one attempt: what B tried (attack), the way in (path), the result and a
detail (what B was told, what came back). The result is one of

- "refused": B did not get there, and the control worked;
- "ALLOWED": B got there; the guarantee is broken;
- "control failed": the control did not work, so the attempt proves nothing;
- "n/a": there is nothing to try here (no non-loopback address, hosted·ai credentials that are
  not the emulator's to lend);
- "operator surface": what docs/operating.md documents as the operator's (the cost report, the
  telemetry dataset, Prometheus), not a tenant's way in.

`broken(rows)` is true unless every row is refused, n/a or an operator surface.

Each attack has a control: A doing the same to its own work (listing its own allocations,
reading its own result, reaching its own pod). A refusal means something only if the same call
by the owner succeeds; otherwise a set-up that is broken (a server not up, a result never saved,
a wrong URL) would refuse everyone and pass for isolation.

The attacks come in groups, one module each, in the order they run:

- `tenancy`: the backend and the result store ("backend", "results");
- `mcp`: the MCP server's tools, resources and sessions ("mcp");
- `api`: the OpenAI-compatible API: A's name in the body, a made-up key, a model B's covenant
  forbids, A's allocations in B's answer ("api");
- `feedback`: B's score of A's finished request through the API, MCP (both transports) and the
  command line, and A's ids told from unknown ones by the refusal ("feedback");
- `availability`: everyone's share of the server (floods of made-up tokens, sessions and calls, a
  huge prompt, a capacity hog, a revoked token on an open socket) while A's `fuse` keeps within
  its baseline + 2 s, and the metadata a tenant must not see ("availability");
- `network`: the Prefect API from off the host and without its auth string, the local model
  servers without their key ("network");
- `edge`: the edge worker as a proxy to anywhere but its endpoint ("edge");
- `covenant`: B past its own covenant ("covenant");
- `cost`: B past its own budget, by parallel calls or by cancelling a call to run it free ("cost");
- `hostedai`: A's work on hosted·ai through its API, its pods and the backend ("hostedai");
- `secrets`: Secret blocks across flow runs ("secret_blocks") and secrets where they must not
  be ("secrets");
- `telemetry`: A's figures, cost and spend ("telemetry").

`report` holds what they share: the tenants, the rows, `Target` (the work they attack, set up by
`run_attacks`) and `Report.check`, which turns an attempt and its control into a row.

To add a group: write a module with `async def attacks(report: Report, target: Target)` that,
for each attack, makes the attempt as B and its control as A and calls `report.check(attack,
path, refused, control=..., detail=...)`; then name it in `LOCAL` (on A's local work) or
`WITH_HOSTED` (run while A and B hold work on hosted·ai; add its name to `NEEDS_HOSTED` if it
reads `target.hosted`, which is None when that work could not be set up). Its name joins
`GROUPS`, so `run_attacks(groups=(name,))` runs it alone.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from apps.isolation import (
    api,
    availability,
    cost,
    covenant,
    edge,
    feedback,
    hostedai,
    mcp,
    network,
    secrets,
    telemetry,
    tenancy,
)
from apps.isolation.report import OPERATOR, A, Attack, B, Report, Target, broken
from connectors.ledger import new_allocation_id
from homeskillet.errors import AllocationNotFound
from homeskillet.settings import get_settings
from tasks import runtime

__all__ = ["GROUPS", "OPERATOR", "Attack", "Report", "Target", "broken", "run_attacks"]

Group = tuple[str, Callable[[Report, Target], Awaitable[None]]]
# On A's local work, in this order:
LOCAL: tuple[Group, ...] = (
    ("backend", tenancy.backend_attacks),
    ("results", tenancy.result_attacks),
    ("mcp", mcp.attacks),
    ("api", api.attacks),
    ("feedback", feedback.attacks),
    ("availability", availability.attacks),
    ("network", network.attacks),
    ("edge", edge.attacks),
    ("covenant", covenant.attacks),
    ("cost", cost.attacks),
)
# Then, while A and B hold work on hosted·ai too (set up only when a group of NEEDS_HOSTED runs):
WITH_HOSTED: tuple[Group, ...] = (
    ("hostedai", hostedai.attacks),
    ("secret_blocks", secrets.secret_block_attacks),
    ("telemetry", telemetry.attacks),
    ("secrets", secrets.secret_checks),
)
NEEDS_HOSTED = frozenset({"hostedai", "secret_blocks", "secrets"})
GROUPS = tuple(name for name, _ in LOCAL + WITH_HOSTED)


async def run_attacks(
    catalog_path: str | None = None, lend_emulator: bool = True, groups: tuple[str, ...] = GROUPS
) -> list[Attack]:
    """Set up A's work, try every attack of the groups as B, clean up; the rows of the report.

    lend_emulator: start the hosted·ai emulator in this process and lend A and B its teams as their
    Secret blocks for the run (where either has credentials already, the hosted·ai rows say n/a);
    False: their blocks already point at an emulator (the tests' session one)."""
    from connectors.tokens import TokenStore

    report = Report()
    services = runtime.services(catalog_path)
    local = services.local
    model = next(m for m in services.catalog.models if m.serving.kind == "llama_cpp")
    pool = next(p for p in services.catalog.pools if p.backend == "local")
    request_id = "iso-" + uuid.uuid4().hex[:12]
    allocation = await local.allocate(
        allocation_id=new_allocation_id(), tenant=A, request_id=request_id, pool=pool.id, model=model, wait_s=30
    )
    store = await TokenStore.open(get_settings().pgdata)
    made = {tenant: await store.create(tenant) for tenant in (A, B)}
    tokens = {tenant: token for tenant, (_, token) in made.items()}
    await store.save_result(A, request_id, {"request_id": request_id, "tenant": A, "answer": "A's answer"})
    target = Target(services, catalog_path, store, tokens, allocation, request_id)
    try:
        for name, attacks in LOCAL:
            if name in groups:
                await attacks(report, target)
        wanted = bool(NEEDS_HOSTED & set(groups))
        async with hostedai.work(report, services, request_id, lend_emulator, wanted) as hosted:
            target.hosted = hosted
            for name, attacks in WITH_HOSTED:
                if name in groups:
                    await attacks(report, target)
    finally:
        try:
            await local.release(allocation.allocation_id, A)
        except AllocationNotFound:
            pass
        for token_id, _ in made.values():
            await store.revoke(token_id)
    return report.rows
