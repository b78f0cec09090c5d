"""Tasks that hold GPU shares: allocate a slice, run inference on it, release it.

Each takes the run's `Services` as a parameter and finds its backend there by name (a choice's,
or an allocation's own). `allocate` stores what to release in the surrounding Prefect
transaction; if anything fails before the transaction commits (inference error, cancellation),
the rollback hook releases it.

No task keeps its result (`persist_result=False`): a flow with persisted results would otherwise
have every task write its return value to result storage, a file per task run on the request's
path that nothing reads (the flow's own result is what callers read back).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import datetime

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction

from connectors import openai_client
from homeskillet import catalog as cat
from homeskillet.errors import AllocationNotFound, InferenceError, Preempted
from homeskillet.schemas import Allocation, ChatTurn, Completion, ModelChoice, ModelSpec
from tasks.runtime import Services


@task(
    name="allocate",
    task_run_name="allocate-{choice.fragment_id}-{choice.model}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
async def allocate(
    services: Services, tenant: str, request_id: str, choice: ModelChoice, wait_s: float, allocation_id: str
) -> Allocation:
    """Reserve the choice's slice under allocation_id (from `new_allocation_id`, made by the caller
    so that the caller can release it even when this task is cancelled before it returns)."""
    backend = services.backend(choice.backend)
    model = cat.model(services.catalog, choice.model)
    # Recorded before the slice is reserved: a failure or cancellation at any later point rolls
    # the transaction back, and the hook releases whatever was reserved under this id.
    txn = get_transaction()
    if txn is not None:
        txn.set(
            "release",
            {"services": services, "backend": choice.backend, "allocation_id": allocation_id, "tenant": tenant},
        )
    return await backend.allocate(
        allocation_id=allocation_id, tenant=tenant, request_id=request_id, pool=choice.pool, model=model, wait_s=wait_s
    )


@allocate.on_rollback
async def release_on_rollback(txn: Transaction) -> None:
    target = txn.get("release", None)
    if target is not None:
        await release_if_reserved(**target)


async def release_if_reserved(services: Services, backend: str, allocation_id: str, tenant: str) -> None:
    """Release what was reserved under allocation_id, if anything was."""
    try:
        await services.backend(backend).release(allocation_id, tenant)
    except AllocationNotFound:
        pass  # interrupted before the slice was reserved: nothing to release


@task(name="release", task_run_name="release-{allocation.allocation_id}", cache_policy=NO_CACHE, persist_result=False)
async def release(services: Services, allocation: Allocation) -> datetime:
    return await services.backend_of(allocation).release(allocation.allocation_id, allocation.tenant)


def transcript(context: Sequence[ChatTurn]) -> str:
    """The context as plain text lines ("System: …", "User: …", "Assistant: …"), one a turn, for
    models that take a prompt rather than messages."""
    return "".join(f"{turn.role.capitalize()}: {turn.content}\n" for turn in context)


def render(model: ModelSpec, text: str, context: Sequence[ChatTurn] = (), stop: Sequence[str] | None = None) -> dict:
    """The request body fields for the model's prompt style: the context (the conversation before
    the request, in order) comes before the text, as messages or as transcript lines. `stop` (the
    request's stop sequences) applies with the model's own, which end its completion template's
    answer: both are sent, each once, the model's first."""
    if model.prompt_style == "chat":
        turns = [{"role": turn.role, "content": turn.content} for turn in context]
        fields = {"messages": [*turns, {"role": "user", "content": text}]}
        return fields | ({"stop": _stops(stop)} if stop else {})
    cue = "" if text.rstrip().endswith("Answer:") else "\nAnswer:"  # a few-shot prompt brings its own
    return {"prompt": f"{transcript(context)}Question: {text.rstrip()}{cue}", "stop": _stops(model.stop, stop or ())}


def _stops(*lists: Sequence[str]) -> list[str] | None:
    """The stop sequences of every list, in order, each once; None when there are none."""
    return list(dict.fromkeys(s for stops in lists for s in stops)) or None


@task(name="infer", task_run_name="infer-{allocation.model}", cache_policy=NO_CACHE, persist_result=False)
async def infer(
    services: Services,
    allocation: Allocation,
    text: str,
    max_tokens: int,
    stream: bool = False,
    context: Sequence[ChatTurn] = (),
    prefill: str = "",
    on_text: Callable[[str], None] | None = None,
    temperature: float | None = None,
    stop: Sequence[str] | None = None,
) -> Completion:
    """The model's answer to `text`, after the context's turns. Streamed, each new piece of it goes
    to `on_text` as it arrives; with a `prefill` (the start of the answer, already sent), the model
    continues it: the answer starts with the prefill, `on_text` sees what follows. `temperature`
    (None: the client's greedy default) and `stop` (with the model's own) are the request's."""
    model = cat.model(services.catalog, allocation.model)
    serving = model.serving
    api_key = os.environ.get(serving.api_key_env) if serving.kind == "openai" and serving.api_key_env else None
    name = serving.model if serving.kind == "openai" else model.name
    try:
        return await openai_client.complete(
            allocation.endpoint,
            name,
            max_tokens=max_tokens,
            timeout_s=services.settings.infer_timeout_s,
            api_key=api_key,
            stream=stream,
            prefill=prefill,
            on_text=on_text,
            temperature=temperature,
            **render(model, text, context, stop),
        )
    except InferenceError as exc:
        if not await services.backend_of(allocation).verify(allocation):
            raise Preempted(
                f"the GPU share of {allocation.allocation_id} on {allocation.pool} vanished: {exc}"
            ) from None
        raise
