"""The staging stack's smoke requests; deployments/staging.sh pipes this file into the worker's
container (which has the project and the stack's network):

    python - deployment      < staging_smoke.py   # run_deployment("fuse-request/fuse-request"), on hosted·ai (the emulator)
    python - mcp URL         < staging_smoke.py   # the MCP server's fuse tool over Streamable HTTP;
                                                  # the token in HOMESKILLET_MCP_TOKEN, never an argument

Each prints the answer and one line per fragment, and exits 1 unless the request completed with
an answer for every fragment.
"""

import asyncio
import os
import sys

PROMPT = "What is the capital of France? Who wrote Romeo and Juliet?"


def show(how: str, result: dict) -> None:
    print(f"{how}: request {result['request_id']} (tenant {result['tenant']}) answered in {result['wall_s']:.1f} s")
    for f in result["fragments"]:
        print(
            f"  {f['fragment_id']} {f['model']} on {f['backend']} pool {f['pool']} "
            f"allocation {f['allocation_id']}: {f['text'].strip()[:80]!r}"
        )
    print("  answer:", " / ".join(result["answer"].split("\n"))[:200])
    if len(result["fragments"]) < 2 or not all(f["text"].strip() for f in result["fragments"]):
        sys.exit(f"{how}: an empty answer")


def deployment() -> None:
    from prefect.deployments import run_deployment

    run = run_deployment(
        "fuse-request/fuse-request",
        timeout=900,
        parameters={"prompt": PROMPT, "tenant": "demo", "constraints": {"backend": "hostedai"}},
    )
    if not run.state.is_completed():
        sys.exit(f"run_deployment: flow run {run.id} ended {run.state.type.value}: {run.state.message}")
    result = run.state.result()
    show(f"run_deployment (flow run {run.id})", result if isinstance(result, dict) else result.model_dump())


async def mcp(url: str) -> None:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    headers = {"Authorization": f"Bearer {os.environ['HOMESKILLET_MCP_TOKEN']}"}
    async with Client(streamable_http_client(url, http_client=create_mcp_http_client(headers=headers))) as client:
        result = await client.call_tool("fuse", {"prompt": PROMPT})
    if result.is_error:
        sys.exit(f"mcp fuse: {result.content}")
    show(f"MCP fuse at {url}", result.structured_content)


if __name__ == "__main__":
    if sys.argv[1:] == ["deployment"]:
        deployment()
    elif sys.argv[1:2] == ["mcp"] and len(sys.argv) == 3:
        asyncio.run(mcp(sys.argv[2]))
    else:
        sys.exit(__doc__)
