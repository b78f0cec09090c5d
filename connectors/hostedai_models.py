"""What each hosted·ai endpoint answers, as typed models: answers are parsed, never indexed.

hosted·ai publishes no schema, so each model accepts the variants seen or documented and ignores
fields it does not use (`extra="ignore"`): a new field on the panel's side changes nothing here.
Anything else becomes a `HostedAIError` that names the endpoint and the shape it got (`shape`
describes a body by its type, size and keys, never by its values: a body may hold secrets, and
errors reach tenants), never a KeyError or a traceback.

- Lists come as a bare array, as `{"items": [...]}` (with paging fields), or as null (`listed`).
- `connection-info` is documented only as "pods with `ssh_info` and `discovered_services`": its
  pods come as `{"pods": [...]}`, as a bare array of pods, or as subscription entries each with
  its `pods` (bare, or under `items`); `pods_of` finds the subscription's pods in any of them.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, TypeAdapter, ValidationError

from homeskillet.errors import HostedAIError

T = TypeVar("T", bound=BaseModel)


def _text(value: Any) -> Any:
    """Ids and names that the panel sends as numbers or as strings, as strings."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _empty_list(value: Any) -> Any:
    return [] if value is None else value


Text = Annotated[str, BeforeValidator(_text)]


class Answer(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Region(Answer):
    gpuaas_id: int
    id: int | None = None
    name: Text | None = None


class Pool(Answer):
    id: int
    pool_name: Text
    pool_label: Text | None = ""
    gpu_model_type: Text
    available_vgpus: int
    sharing_ratio: int | None = 1
    pricing_hourly: float


class PodRef(Answer):
    """A pod as a subscription's list item names it."""

    pod_name: Text
    pod_status: Text | None = None


class SubscriptionItem(Answer):
    id: int
    pool_id: int
    team_id: Text
    status: Text | None = None
    pods: Annotated[list[PodRef], BeforeValidator(_empty_list)] = []
    metrics: Annotated[dict[str, Any], BeforeValidator(lambda v: {} if v is None else v)] = {}


class Service(Answer):
    name: Text | None = None
    url: Text | None = None
    port: Text | None = None


class Pod(Answer):
    pod_name: Text
    pod_status: Text | None = None
    discovered_services: Annotated[list[Service], BeforeValidator(_empty_list)] = []


class SubscribeAnswer(Answer):
    subscription_id: int | None = None


class ExposeAnswer(Answer):
    service_name: Text | None = None
    status: Text | None = None
    url: Text | None = None


class Estimate(Answer):
    model_config = ConfigDict(extra="allow", frozen=True)  # the breakdown is passed on as it came
    total_cost: float
    hourly_cost: float | None = None
    currency: Text = "USD"


class TeamMetrics(Answer):
    items: Annotated[list[dict[str, Any]], BeforeValidator(_empty_list)] = []
    total_items: int | None = None
    pool_hours: float | None = None


class Page(Answer):
    total_pages: int | None = None


# --- describing what came, without its values -------------------------------------------------


def shape(data: Any, limit: int = 6) -> str:
    """A body's shape in words: its type, its size, the keys of an object or of a list's objects
    (at most `limit`), never a value."""
    if data is None or data == "":
        return "an empty body"
    if isinstance(data, str):
        return f"a text body of {len(data)} characters"
    if isinstance(data, dict):
        return f"an object with {_keys(data, limit)}"
    if isinstance(data, list):
        if not data:
            return "an empty list"
        if all(isinstance(i, dict) for i in data):
            keys = sorted({k for i in data for k in i})
            return f"a list of {len(data)} objects: {_keys(dict.fromkeys(keys), limit)}"
        kinds = sorted({type(i).__name__ for i in data})
        return f"a list of {len(data)} items ({', '.join(kinds)})"
    return f"a {type(data).__name__}"


def _keys(obj: dict, limit: int) -> str:
    keys = [k if len(k) <= 40 else k[:40] + "…" for k in map(str, obj)]
    if not keys:
        return "no keys"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "keys " + ", ".join(keys[:limit]) + more


def _problem(exc: ValidationError) -> str:
    """The first field a body lacks or has wrong, by location only (no input value)."""
    first = exc.errors(include_input=False, include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "(the body)"
    return f"{where}: {first['msg']}"


# --- parsing ----------------------------------------------------------------------------------


def listed(data: Any, where: str) -> list[Any]:
    """The items of a list answer: a bare array, `{"items": [...]}`, or null/empty for none."""
    if data is None or data == "":
        return []
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and isinstance(data.get("items"), list):
        return data["items"]
    if isinstance(data, dict) and data.get("items") is None and "items" in data:
        return []
    raise HostedAIError(f"hosted·ai {where} answered {shape(data)}, not a list (a bare array or {{items: [...]}})")


def parse(model: type[T], data: Any, where: str) -> T:
    """One object of an answer as `model`, or a HostedAIError naming the endpoint and the shape."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise HostedAIError(
            f"hosted·ai {where} answered {shape(data)}, not the {model.__name__} expected ({_problem(exc)})"
        ) from None


def parse_list(model: type[T], data: Any, where: str) -> list[T]:
    """Every item of a list answer as `model`."""
    rows = listed(data, where)
    try:
        return TypeAdapter(list[model]).validate_python(rows)
    except ValidationError as exc:
        raise HostedAIError(
            f"hosted·ai {where} answered {shape(rows)}, not a list of {model.__name__} ({_problem(exc)})"
        ) from None


SUBSCRIPTION_IDS = ("id", "subscription_id", "pool_subscription_id")


def pods_of(data: Any, subscription_id: int, where: str) -> list[Pod]:
    """The subscription's pods in a connection-info answer, in any of its documented shapes:
    `{"pods": [...]}`, a bare array of pods, or subscription entries each with its `pods` (the
    entry for this subscription when entries carry ids, else all of them). Empty when the pod is
    not there yet; a HostedAIError naming the endpoint and the shape for anything else."""
    if data is None or data == "":
        return []
    if isinstance(data, dict) and "pods" in data:
        return parse_list(Pod, data.get("pods"), where)
    rows = listed(data, where)
    if not rows:
        return []
    if not all(isinstance(r, dict) for r in rows):
        raise HostedAIError(f"hosted·ai {where} answered {shape(rows)}, neither pods nor subscriptions with pods")
    if all("pod_name" in r for r in rows):
        return parse_list(Pod, rows, where)
    if all("pods" in r for r in rows):
        ids = [next((r[k] for k in SUBSCRIPTION_IDS if r.get(k) is not None), None) for r in rows]
        entries = [r for r, i in zip(rows, ids) if str(i) == str(subscription_id)]
        if not entries and all(i is None for i in ids):
            entries = rows  # entries without ids: the answer is about this subscription only
        return [pod for entry in entries for pod in parse_list(Pod, entry.get("pods"), where)]
    keys = shape(rows).split(": ", 1)[-1]
    raise HostedAIError(f"hosted·ai {where} answered a list of {len(rows)} objects without pods: {keys}")


__all__ = [
    "Estimate",
    "ExposeAnswer",
    "Page",
    "Pod",
    "PodRef",
    "Pool",
    "Region",
    "Service",
    "SubscribeAnswer",
    "SubscriptionItem",
    "TeamMetrics",
    "listed",
    "parse",
    "parse_list",
    "pods_of",
    "shape",
]
