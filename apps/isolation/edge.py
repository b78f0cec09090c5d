"""The edge worker (edge/worker.mjs) as a way past Homeskillet: a request path, or an upstream's
redirect, that would have the worker fetch something other than the endpoint it is configured
with (the Prefect API on loopback, the cloud metadata address, a local file, another path of the
endpoint's host). The worker runs under Node with a recording fetch (edge/probe.mjs), so nothing
is fetched for real; an attempt is refused when nothing was sent anywhere but one of the URLs the
endpoint serves. The control: a chat completion is forwarded there, its body intact."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

from apps.isolation.report import Attack, Report, Target

EDGE = Path(__file__).resolve().parents[2] / "edge"
WORKER = EDGE / "worker.mjs"
PROBE = EDGE / "probe.mjs"
ENDPOINT = "https://homeskillet.example/pool"  # the endpoint's base URL has a path: leaving it shows
SERVED = {ENDPOINT + path for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/mcp")}
LOOPBACK_PREFECT = "http://127.0.0.1:4200/api/health"
CHAT = {
    "path": "/v1/chat/completions",
    "method": "POST",
    "headers": {"content-type": "application/json"},
    "body": json.dumps({"model": "m", "messages": [{"role": "user", "content": "What is the capital of Peru?"}]}),
}
# (attack, request path, the request): each path is sent as a chat completion would be.
ATTACKS = (
    ("reach the Prefect API on loopback through the edge worker", "/" + LOOPBACK_PREFECT, {}),
    ("reach the cloud metadata address through the edge worker", "///169.254.169.254/latest/meta-data/", {}),
    ("read a local file through the edge worker", "/file:///etc/passwd", {}),
    ("reach another path of the endpoint's host through the edge worker", "//admin/secret", {}),
    (
        "reach a path the endpoint does not serve through the edge worker, by dot segments",
        "/v1/chat/completions/../../admin",
        {},
    ),
    ("reach a path the endpoint does not serve through the edge worker, by encoded dot segments", "/%2e%2e/admin", {}),
    (
        "reach the Prefect API on loopback by an upstream redirect the edge worker follows",
        "/v1/chat/completions",
        {"upstream": {"status": 302, "headers": {"location": LOOPBACK_PREFECT}}},
    ),
)


def path_of(path: str, case: dict) -> str:
    redirect = case.get("upstream", {}).get("headers", {}).get("location")
    return f"edge worker {path}" + (f", upstream 302 → {redirect}" if redirect else "")


async def probe(node: str, cases: list[dict], worker: Path) -> list[dict]:
    """The worker's answer to each case, and what it forwarded (edge/probe.mjs)."""
    spec = {"worker": worker.as_uri(), "options": {"endpoints": {"default": ENDPOINT}}, "cases": cases}
    process = await asyncio.create_subprocess_exec(
        node,
        str(PROBE),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(json.dumps(spec).encode()), timeout=60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"edge/probe.mjs exited {process.returncode}: {err.decode()[-500:]}")
    return json.loads(out)["results"]


def elsewhere(result: dict) -> list[str]:
    """Where the worker sent anything but the endpoint's served URLs (a followed redirect included)."""
    return [f["url"] for f in result["forwarded"] if f["url"] not in SERVED or f.get("followed")]


async def attacks(report: Report, target: Target, worker: Path = WORKER) -> None:
    """One row per attack; `worker`: the worker module to try (a test points it at a broken one)."""
    node = shutil.which("node")
    if node is None or not PROBE.exists():
        why = "node is not installed" if node is None else "edge/probe.mjs is not in this checkout"
        for attack, path, case in ATTACKS:
            report.rows.append(Attack(attack, path_of(path, case), "n/a", why))
        return
    cases = [CHAT] + [{**CHAT, "path": path, **case} for _, path, case in ATTACKS]
    try:
        control, *results = await probe(node, cases, worker)
    except (RuntimeError, TimeoutError, ValueError, KeyError) as exc:
        for attack, path, case in ATTACKS:
            report.check(attack, path_of(path, case), True, control=False, detail=str(exc))
        return
    ok = control.get("status") == 200 and [(f["url"], f.get("body")) for f in control["forwarded"]] == [
        (ENDPOINT + CHAT["path"], CHAT["body"])
    ]
    for (attack, path, case), result in zip(ATTACKS, results):
        sent = elsewhere(result)
        said = result.get("status", result.get("error"))
        detail = f"{said}, sent to {', '.join(sent)}" if sent else f"{said}, nothing sent outside {ENDPOINT}"
        report.check(attack, path_of(path, case), not sent, control=ok, detail=detail)
