"""Benchmark figures from samples (pure pandas) and the chart a person reads at a glance."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from homeskillet.schemas import FragmentResult

PROMPTS = [
    "What is the capital of Italy?",
    "Write a haiku about autumn.",
    "Name three rivers in Europe.",
    "Explain in one sentence what a GPU does.",
]


def sample(result: FragmentResult, params_m: float, concurrency: int, repetition: int) -> dict:
    t = result.timings
    decode_s = t.infer_s - (t.first_token_s or 0)
    return {
        "model": result.model,
        "parameters_m": params_m,
        "concurrency": concurrency,
        "repetition": repetition,
        "ttft_s": t.first_token_s,
        "latency_s": t.allocate_s + t.infer_s + t.release_s,
        "alloc_overhead_s": t.allocate_s + t.release_s,
        "tokens_out": result.tokens_out,
        "tokens_per_s": (result.tokens_out - 1) / decode_s if decode_s > 0 and result.tokens_out > 1 else None,
        "cost_usd": result.cost_usd,
    }


def summarise(samples: pd.DataFrame) -> pd.DataFrame:
    """Per model and concurrency: TTFT, latency p50/p95, tokens/s, allocation overhead, $ per 1k tokens."""
    rows = []
    for (model, conc), g in samples.groupby(["model", "concurrency"], sort=True):
        rows.append(
            {
                "model": model,
                "parameters_m": g.parameters_m.iloc[0],
                "concurrency": int(conc),
                "samples": len(g),
                "ttft_p50_s": g.ttft_s.median(),
                "latency_p50_s": g.latency_s.quantile(0.5),
                "latency_p95_s": g.latency_s.quantile(0.95),
                "tokens_per_s": g.tokens_per_s.mean(),
                "alloc_overhead_p50_s": g.alloc_overhead_s.median(),
                "usd_per_1k_tokens": g.cost_usd.sum() / max(1, g.tokens_out.sum()) * 1000,
            }
        )
    return pd.DataFrame(rows).round(6)


def chart(summary: pd.DataFrame, path: Path) -> Path:
    """Two panels: decode speed and latency (p50 bar, p95 tick) per model and concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [f"{r.model}\n(x{r.concurrency})" for r in summary.itertuples()]
    xs = range(len(summary))
    speed.bar(xs, summary.tokens_per_s, color="#3b7dd8")
    speed.set_title("Decode speed (tokens/s, higher is better)")
    latency.bar(xs, summary.latency_p50_s, color="#e0893a", label="p50")
    latency.scatter(xs, summary.latency_p95_s, color="black", marker="_", s=400, label="p95")
    latency.set_title("Fragment latency (s, lower is better)")
    latency.legend()
    for ax, column in ((speed, "tokens_per_s"), (latency, "latency_p50_s")):
        ax.set_xticks(list(xs), labels, fontsize=8)
        for x, value in zip(xs, summary[column]):
            ax.annotate(
                f"{value:.2f}" if value < 10 else f"{value:.0f}", (x, value), ha="center", va="bottom", fontsize=8
            )
    fig.suptitle("Homeskillet benchmark across model sizes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@task(name="summarise-benchmark", cache_policy=NO_CACHE, persist_result=False)
async def summarise_benchmark(samples: pd.DataFrame) -> pd.DataFrame:
    return summarise(samples)
