"""Cost optimisation analysis over the telemetry dataset. Pure pandas; the task wraps `analyse`.

- cost per tenant, model, pool and tier;
- idle and over-provisioned cost: each slice reserved TFLOPS/VRAM for the whole time it was held,
  but used compute only while decoding (2 FLOPs per parameter per token) and memory for its
  weights (~0.6 byte per parameter in 4-bit GGUF) plus its context;
- a dedicated-vs-preemptible what-if at the catalog's prices, counting preempted attempts;
- recommendations: a right size per model and a tier per task type;
- spend against budget per tenant (the ledger's spend, the covenants' budgets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from homeskillet.schemas import Catalog, Covenant, ModelSpec
from tasks.routing import slice_rate

BYTES_PER_PARAM = 0.6  # Q4 GGUF weights, with scales
KV_GB_PER_1K_CTX = 0.02  # small models: tens of MB per thousand tokens of context
HEADROOM_TFLOPS = 1.5
HEADROOM_VRAM = 1.25


@dataclass(frozen=True)
class CostReport:
    markdown: str
    by_tenant: pd.DataFrame
    by_model: pd.DataFrame
    rightsizing: pd.DataFrame
    tiers: pd.DataFrame


def used_tflops(model: ModelSpec, tokens_per_s: float) -> float:
    return 2 * model.parameters_m * 1e6 * tokens_per_s / 1e12


def used_vram_gb(model: ModelSpec) -> float:
    return model.parameters_m * 1e6 * BYTES_PER_PARAM / 1e9 + KV_GB_PER_1K_CTX * model.context_length / 1000


def _round_up(value: float, step: float) -> float:
    return max(step, math.ceil(value / step) * step)


def budgets(covenants: dict[str, Covenant], spend: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """Per tenant: spend today and this month (UTC) against its covenant's budgets (None: unlimited)."""
    rows = []
    for tenant, covenant in covenants.items():
        day, month = spend.get(tenant, (0.0, 0.0))
        day_budget, month_budget = covenant.budget_usd_per_day, covenant.budget_usd_per_month
        rows.append(
            {
                "tenant": tenant,
                "spend_today_usd": day,
                "budget_day_usd": day_budget,
                "day_used": None if not day_budget else f"{day / day_budget:.0%}",
                "spend_month_usd": month,
                "budget_month_usd": month_budget,
                "month_used": None if not month_budget else f"{month / month_budget:.0%}",
            }
        )
    return pd.DataFrame(rows)


def analyse(frame: pd.DataFrame, catalog: Catalog, budget: pd.DataFrame | None = None) -> CostReport:
    budget_md = "" if budget is None or budget.empty else "\n## Spend against budget\n\n" + _table(budget)
    if frame.empty:
        empty = pd.DataFrame()
        markdown = "# Cost report\n\nNo telemetry yet: run some requests first.\n" + budget_md
        return CostReport(markdown, empty, empty, empty, empty)
    models = {m.name: m for m in catalog.models}
    pools = {p.id: p for p in catalog.pools}
    ok = frame[frame.outcome == "ok"].copy()
    ok["held_s"] = ok[["allocate_s", "infer_s", "release_s"]].fillna(0).sum(axis=1)
    ok["busy_share"] = (ok["infer_s"].fillna(0) / ok["held_s"].where(ok["held_s"] > 0)).fillna(0).clip(0, 1)
    ok["idle_cost_usd"] = ok["cost_usd"] * (1 - ok["busy_share"])

    def group(by: str) -> pd.DataFrame:
        return (
            ok.groupby(by)
            .agg(
                fragments=("fragment_id", "count"),
                tokens=("tokens_out", "sum"),
                cost_usd=("cost_usd", "sum"),
                idle_cost_usd=("idle_cost_usd", "sum"),
            )
            .sort_values("cost_usd", ascending=False)
            .reset_index()
        )

    by_tenant, by_model, by_pool, by_tier = group("tenant"), group("model"), group("pool"), group("tier")

    sizing = []
    for name, rows in ok.groupby("model"):
        spec = models.get(name)
        if spec is None:
            continue
        infer = rows["infer_s"].fillna(0).sum()
        tps = rows["tokens_out"].sum() / infer if infer > 0 else 0.0
        need_t, need_v = used_tflops(spec, tps), used_vram_gb(spec)
        sizing.append(
            {
                "model": name,
                "requested_tflops": spec.tflops,
                "used_tflops": round(need_t, 4),
                "requested_vram_gb": spec.vram_gb,
                "used_vram_gb": round(need_v, 3),
                "over_provisioned_x": round(max(spec.tflops / max(need_t, 1e-9), spec.vram_gb / max(need_v, 1e-9)), 1),
                "recommended_tflops": _round_up(need_t * HEADROOM_TFLOPS, 0.25),
                "recommended_vram_gb": _round_up(need_v * HEADROOM_VRAM, 0.25),
            }
        )
    rightsizing = pd.DataFrame(sizing)

    tiers = _tier_what_if(frame, ok, models, pools)
    markdown = _markdown(ok, by_tenant, by_model, by_pool, by_tier, rightsizing, tiers) + budget_md
    return CostReport(markdown, by_tenant, by_model, rightsizing, tiers)


def _tier_what_if(frame, ok, models, pools) -> pd.DataFrame:
    """Per task type: what the held time cost, and would cost, on each tier's cheapest pool; a
    preempted attempt is paid again in full."""
    attempts = frame.groupby("task_type").size()
    preempted = frame[frame.error_class == "Preempted"].groupby("task_type").size()
    rows = []
    for task_type, group in ok.groupby("task_type"):
        costs = {}
        for tier in ("dedicated", "preemptible"):
            tier_pools = [p for p in pools.values() if p.tier == tier and p.backend == "local"] or [
                p for p in pools.values() if p.tier == tier
            ]
            total = 0.0
            for _, r in group.iterrows():
                spec = models.get(r.model)
                if spec is None or not tier_pools:
                    continue
                total += min(slice_rate(spec, p) for p in tier_pools) * r.held_s / 3600
            costs[tier] = total
        rate = float(preempted.get(task_type, 0)) / float(attempts.get(task_type, 1))
        expected_preemptible = costs["preemptible"] / max(1e-9, 1 - rate)
        rows.append(
            {
                "task_type": task_type,
                "fragments": len(group),
                "dedicated_usd": costs["dedicated"],
                "preemptible_usd": expected_preemptible,
                "preemption_rate": round(rate, 3),
                "recommended_tier": "preemptible" if expected_preemptible < costs["dedicated"] else "dedicated",
            }
        )
    return pd.DataFrame(rows)


def _table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)\n"
    head = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    body = "".join(
        "| " + " | ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + " |\n"
        for row in frame.itertuples(index=False)
    )
    return head + body


def _markdown(ok, by_tenant, by_model, by_pool, by_tier, rightsizing, tiers) -> str:
    total, idle = ok["cost_usd"].sum(), ok["idle_cost_usd"].sum()
    lines = [
        "# Cost report",
        "",
        f"{len(ok)} fragments, {int(ok['tokens_out'].sum())} output tokens, ${total:.6f} in all; "
        f"${idle:.6f} ({(idle / total * 100) if total else 0:.0f} %) paid for slices held while not decoding.",
        "",
        "## Recommendations",
        "",
    ]
    for r in rightsizing.itertuples(index=False):
        lines.append(
            f"- **{r.model}**: reserve {r.recommended_tflops:g} TFLOPS and {r.recommended_vram_gb:g} GB instead of "
            f"{r.requested_tflops:g} and {r.requested_vram_gb:g} (used {r.used_tflops:g} TFLOPS while decoding, "
            f"~{r.used_vram_gb:g} GB; over-provisioned {r.over_provisioned_x:g}x)."
        )
    for r in tiers.itertuples(index=False):
        lines.append(
            f"- **{r.task_type}** fragments: run on **{r.recommended_tier}** "
            f"(${r.dedicated_usd:.6f} dedicated vs ${r.preemptible_usd:.6f} preemptible with "
            f"{r.preemption_rate:.1%} preempted attempts paid twice)."
        )
    for title, frame in (
        ("By tenant", by_tenant),
        ("By model", by_model),
        ("By pool", by_pool),
        ("By tier", by_tier),
        ("Right-sizing", rightsizing),
        ("Dedicated vs preemptible", tiers),
    ):
        lines += ["", f"## {title}", "", _table(frame)]
    return "\n".join(lines)


@task(name="analyse-costs", cache_policy=NO_CACHE, persist_result=False)
async def analyse_costs(frame: pd.DataFrame, catalog: Catalog, budget: pd.DataFrame | None = None) -> CostReport:
    return analyse(frame, catalog, budget)
