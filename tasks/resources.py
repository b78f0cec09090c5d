"""Tasks that hold GPU shares: allocate a slice, run inference on it, release it.

`allocate` stores its allocation in the surrounding Prefect transaction; if anything fails
before the transaction commits (inference error, cancellation), the rollback hook releases it.
"""

from __future__ import annotations

import os
from datetime import datetime

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction

from connectors import openai_client
from homeskillet import catalog as cat
from homeskillet.errors import AllocationNotFound, InferenceError, Preempted
from homeskillet.schemas import Allocation, Completion, ModelChoice, ModelSpec
from tasks import runtime


@task(name="allocate", task_run_name="allocate-{choice.fragment_id}", cache_policy=NO_CACHE)
async def allocate(tenant: str, request_id: str, choice: ModelChoice, catalog_path: str, wait_s: float) -> Allocation:
    backend = runtime.backend_for_pool(catalog_path, choice.pool)
    model = cat.model(runtime.catalog(catalog_path), choice.model)
    allocation_id = backend.new_allocation_id()
    # Recorded before the slice is reserved: a failure or cancellation at any later point rolls
    # the transaction back, and the hook releases whatever was reserved under this id.
    txn = get_transaction()
    if txn is not None:
        txn.set(
            "release",
            {"allocation_id": allocation_id, "tenant": tenant, "catalog_path": catalog_path, "pool": choice.pool},
        )
    return await backend.allocate(
        allocation_id=allocation_id, tenant=tenant, request_id=request_id, pool=choice.pool, model=model, wait_s=wait_s
    )


@allocate.on_rollback
async def release_on_rollback(txn: Transaction) -> None:
    target = txn.get("release", None)
    if target is None:
        return
    try:
        backend = runtime.backend_for_pool(target["catalog_path"], target["pool"])
        await backend.release(target["allocation_id"], target["tenant"])
    except AllocationNotFound:
        pass  # interrupted before the slice was reserved: nothing to release


@task(name="release", task_run_name="release-{allocation.model}", cache_policy=NO_CACHE)
async def release(allocation: Allocation, catalog_path: str) -> datetime:
    return await runtime.backend_for_pool(catalog_path, allocation.pool).release(
        allocation.allocation_id, allocation.tenant
    )


def render(model: ModelSpec, text: str) -> dict:
    """The request body fields for the model's prompt style."""
    if model.prompt_style == "chat":
        return {"messages": [{"role": "user", "content": text}]}
    cue = "" if text.rstrip().endswith("Answer:") else "\nAnswer:"  # a few-shot prompt brings its own
    return {"prompt": f"Question: {text.rstrip()}{cue}", "stop": model.stop or None}


@task(name="infer", task_run_name="infer-{allocation.model}", cache_policy=NO_CACHE)
async def infer(allocation: Allocation, text: str, max_tokens: int, catalog_path: str, stream: bool = False) -> Completion:
    model = cat.model(runtime.catalog(catalog_path), allocation.model)
    serving = model.serving
    api_key = os.environ.get(serving.api_key_env) if serving.kind == "openai" and serving.api_key_env else None
    name = serving.model if serving.kind == "openai" else model.name
    try:
        return await openai_client.complete(
            allocation.endpoint,
            name,
            max_tokens=max_tokens,
            timeout_s=runtime.settings().infer_timeout_s,
            api_key=api_key,
            stream=stream,
            **render(model, text),
        )
    except InferenceError as exc:
        if not await runtime.backend_for_pool(catalog_path, allocation.pool).verify(allocation):
            raise Preempted(f"the GPU share of {allocation.allocation_id} on {allocation.pool} vanished: {exc}") from None
        raise
