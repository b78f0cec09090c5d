"""Load the catalog file and look things up in it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import get_args

import yaml
from pydantic import ValidationError

from homeskillet.errors import InvalidRequest, UnknownModel, UnknownPool, UnknownTenant
from homeskillet.schemas import Catalog, Covenant, ModelSpec, PoolSpec, TaskType

TASK_TYPES = set(get_args(TaskType))


def load_catalog(path: Path) -> Catalog:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidRequest(f"cannot read catalog {path}: {exc}") from None
    try:
        catalog = Catalog.model_validate(raw)
    except ValidationError as exc:
        raise InvalidRequest(f"catalog {path} is invalid: {_problems(exc, raw)}") from None
    for kind, names in (
        ("model", [m.name for m in catalog.models]),
        ("pool", [p.id for p in catalog.pools]),
        ("tenant", [t.id for t in catalog.tenants]),
    ):
        dupes = [n for n, c in Counter(names).items() if c > 1]
        if dupes:
            raise InvalidRequest(f"catalog {path} names {kind} {', '.join(dupes)} more than once")
    aliases = tenant_aliases(catalog)
    if aliases:
        raise InvalidRequest(
            f"catalog {path} names tenants {', '.join(map(repr, aliases))} that differ only in case: a tenant's "
            f"hosted·ai Secret block is hostedai-<its id in lower case>, so they would use one another's credentials"
        )
    for tenant in catalog.tenants:
        problem = covenant_problem(catalog, tenant.covenant)
        if problem:
            raise InvalidRequest(f"catalog {path} is invalid: tenant {tenant.id!r} covenant.{problem}")
    return catalog


def tenant_aliases(catalog: Catalog) -> list[str]:
    """Tenant ids that another tenant's id equals ignoring case (they would share a Secret block)."""
    folded = Counter(t.id.lower() for t in catalog.tenants)
    return [t.id for t in catalog.tenants if folded[t.id.lower()] > 1]


def covenant_problem(catalog: Catalog, covenant: Covenant) -> str | None:
    """The first covenant term that names something the catalog lacks, as 'field: what', or None."""
    known = {"allowed_models": {m.name for m in catalog.models}, "allowed_pools": {p.id for p in catalog.pools}}
    for term, names in known.items():
        unknown = sorted(set(getattr(covenant, term) or []) - names)
        if unknown:
            return f"{term}: unknown {term.removeprefix('allowed_')[:-1]} {', '.join(map(repr, unknown))}"
    return None


def _problems(exc: ValidationError, raw: object) -> str:
    """Pydantic's errors, each located by tenant id instead of list index (tenants.1 → tenant 'acme')."""
    out = []
    for error in exc.errors():
        where = ".".join(map(str, error["loc"]))
        loc = error["loc"]
        if loc[:1] == ("tenants",) and len(loc) > 2 and isinstance(loc[1], int):
            try:
                where = f"tenant {raw['tenants'][loc[1]]['id']!r} " + ".".join(map(str, loc[2:]))
            except (KeyError, IndexError, TypeError):
                pass
        out.append(f"{where}: {error['msg']}")
    return "; ".join(out)


def model(catalog: Catalog, name: str) -> ModelSpec:
    for spec in catalog.models:
        if spec.name == name:
            return spec
    known = ", ".join(m.name for m in catalog.models)
    raise UnknownModel(f"unknown model {name!r}; the catalog has: {known}")


def pool(catalog: Catalog, pool_id: str) -> PoolSpec:
    for spec in catalog.pools:
        if spec.id == pool_id:
            return spec
    known = ", ".join(p.id for p in catalog.pools)
    raise UnknownPool(f"unknown pool {pool_id!r}; the catalog has: {known}")


def check_tenant(catalog: Catalog, tenant: str) -> None:
    if tenant not in {t.id for t in catalog.tenants}:
        raise UnknownTenant(f"unknown tenant {tenant!r}; add it to the catalog's tenants")


def with_measurements(catalog: Catalog, latest: Path) -> Catalog:
    """The catalog with what the benchmark flow measured (its latest.json), if anything: tokens/s,
    and quality per task type, which replaces the typed-in prior for those task types."""
    try:
        measured = json.loads(latest.read_text())
    except (OSError, ValueError):
        return catalog
    if not isinstance(measured, dict):
        return catalog
    speeds = measured.get("tokens_per_second") or {}
    quality = measured.get("quality") or {}
    models = []
    for m in catalog.models:
        update: dict = {}
        if speeds.get(m.name):
            update["tokens_per_second"] = float(speeds[m.name])
        scores = {t: float(v) for t, v in (quality.get(m.name) or {}).items() if t in TASK_TYPES}
        if scores:
            update["task_types"] = {**m.task_types, **scores}
            update["measured_task_types"] = sorted(scores)
        models.append(m.model_copy(update=update))
    return catalog.model_copy(update={"models": models})
