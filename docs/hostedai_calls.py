"""Count the hosted·ai API calls of fused requests, by endpoint: the figures of
docs/hostedai-integration.md. The emulator serves real HTTP on loopback, its pods run the real
local models, and fuse_request runs as in production (backend hostedai, tenant demo).

    .venv/bin/python docs/hostedai_calls.py [--requests 2] [--prompt "…"] [--faults "…"]

Request 1 finds no subscription (cold), later ones reuse the tenant's warm one; "retire" is the
unsubscribe once the share is idle. Everything runs under a temporary HOMESKILLET_HOME with its
own Prefect server, PostgreSQL and model servers, all stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
PROMPT = "What is the capital of France? Who wrote Romeo and Juliet? Write a haiku about the sea."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--faults", default="", help="emulator faults, e.g. rate_limit_rate=0.2")
    args = parser.parse_args()

    home, prefect_port, emulator_port = Path(tempfile.mkdtemp(prefix="hs-calls-")), free_port(), free_port()
    os.environ.update(
        HOMESKILLET_HOME=str(home),
        HOMESKILLET_PREFECT_PORT=str(prefect_port),
        PREFECT_API_URL=f"http://127.0.0.1:{prefect_port}/api",
        PREFECT_HOME=str(home / "prefect"),
        PREFECT_LOGGING_LEVEL="WARNING",
        PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="ignore",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HOMESKILLET_HOSTEDAI_IDLE_S="600",  # the share stays warm between the requests; retired at the end
    )
    os.environ.pop("HOMESKILLET_CATALOG", None)
    import uvicorn

    from connectors.model_server import ModelServers
    from connectors.prefect_server import ensure_prefect_server, stop_prefect_server
    from doubles.hostedai_emulator import Faults, create_app, default_config

    config = default_config().model_copy(update={"faults": Faults.parse(args.faults)})
    demo = config.teams[0]
    os.environ.update(
        HOMESKILLET_HOSTEDAI_URL=f"http://127.0.0.1:{emulator_port}",
        HOMESKILLET_HOSTEDAI_TEAM_ID=demo.id,
        HOMESKILLET_HOSTEDAI_API_KEY=demo.api_key,
    )
    app = create_app(config)
    phase = ["start"]
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    async def counted(scope, receive, send):  # every API call by endpoint (team ids and pod names folded)
        if scope["type"] == "http":
            path = re.sub(r"/gpuaas/[0-9a-f-]{36}/", "/gpuaas/{team_id}/", scope["path"])
            path = re.sub(r"^/pods/[^/]+/[^/]+/v1/.*", "/pods/{pod}/v1/… (inference, OpenAI-compatible)", path)
            counts[phase[0]][f"{scope['method']} {path}"] += 1
        await app(scope, receive, send)

    server = uvicorn.Server(uvicorn.Config(counted, host="127.0.0.1", port=emulator_port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    try:
        ensure_prefect_server(home, prefect_port)
        while not server.started:
            time.sleep(0.05)
        from flows.fusion import fuse_request
        from tasks import runtime

        async def run() -> None:
            for i in range(1, args.requests + 1):
                phase[0] = f"request {i}"
                started = time.perf_counter()
                result = await fuse_request(prompt=args.prompt, tenant="demo", constraints={"backend": "hostedai"})
                print(
                    f"request {i}: {len(result.fragments)} fragments, "
                    f"{sorted({(f.model, f.pool) for f in result.fragments})}, {time.perf_counter() - started:.1f} s"
                )
            phase[0] = "retire"
            await runtime.backend(None, "hostedai").shutdown()

        asyncio.run(run())
    finally:
        server.should_exit = True
        ModelServers(home, 60).stop_all()
        stop_prefect_server(home)
        shutil.rmtree(home, ignore_errors=True)
    phases = list(counts)
    endpoints = sorted({e for c in counts.values() for e in c}, key=lambda e: (e.split()[1], e))
    print("\n| endpoint | " + " | ".join(phases) + " |")
    print("| --- |" + " --- |" * len(phases))
    for endpoint in endpoints:
        print(f"| `{endpoint}` | " + " | ".join(str(counts[p][endpoint]) for p in phases) + " |")
    print(
        "| **API calls (without inference)** | "
        + " | ".join(str(sum(n for e, n in counts[p].items() if "inference" not in e)) for p in phases)
        + " |"
    )


if __name__ == "__main__":
    main()
