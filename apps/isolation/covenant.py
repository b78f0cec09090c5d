"""B past its own covenant: B's covenant (in a copy of the catalog) allows one model on preemptible
pools; asking for another model or tier through the flow is refused before anything is allocated,
and a request that asks for nothing in particular is routed inside the covenant."""

from __future__ import annotations

from apps.isolation.report import B, Report, Target, catalog_with
from homeskillet.errors import CovenantViolation


async def attacks(report: Report, target: Target) -> None:
    from flows.fusion import fuse_request

    services = target.services
    local = [m.name for m in services.catalog.models if m.serving.kind == "llama_cpp"]
    allowed, other = local[0], local[-1]
    with catalog_with(services, {"allowed_models": [allowed], "allowed_tiers": ["preemptible"]}) as path:
        for term, constraints in (
            ("allowed_models", {"allowed_models": [other]}),
            ("allowed_tiers", {"tier": "dedicated"}),
        ):
            try:
                await fuse_request(
                    prompt="Say hi.", tenant=B, constraints={**constraints, "max_tokens": 4}, catalog_path=str(path)
                )
                refused, detail = False, "ran"
            except CovenantViolation as exc:
                refused, detail = exc.term == term, str(exc)
            report.check(
                f"widen B's covenant ({term}) in a request", "fuse_request constraints", refused, detail=detail
            )
        result = await fuse_request(prompt="Say hi.", tenant=B, constraints={"max_tokens": 4}, catalog_path=str(path))
        inside = all(f.model == allowed and f.tier == "preemptible" for f in result.fragments)
        report.check(
            "be routed outside B's covenant",
            "fuse_request without constraints",
            inside,
            detail=f"ran {result.fragments[0].model} on {result.fragments[0].tier}",
        )
