"""Load the catalog file and look things up in it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import yaml
from pydantic import ValidationError

from homeskillet.errors import InvalidRequest, UnknownModel, UnknownPool, UnknownTenant
from homeskillet.schemas import Catalog, ModelSpec, PoolSpec


def load_catalog(path: Path) -> Catalog:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidRequest(f"cannot read catalog {path}: {exc}") from None
    try:
        catalog = Catalog.model_validate(raw)
    except ValidationError as exc:
        raise InvalidRequest(f"catalog {path} is invalid: {exc}") from None
    for kind, names in (
        ("model", [m.name for m in catalog.models]),
        ("pool", [p.id for p in catalog.pools]),
        ("tenant", [t.id for t in catalog.tenants]),
    ):
        dupes = [n for n, c in Counter(names).items() if c > 1]
        if dupes:
            raise InvalidRequest(f"catalog {path} names {kind} {', '.join(dupes)} more than once")
    return catalog


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


def with_measured_speeds(catalog: Catalog, latest: Path) -> Catalog:
    """The catalog with tokens/s that the benchmark flow measured (its latest.json), if any."""
    try:
        speeds = json.loads(latest.read_text())["tokens_per_second"]
    except (OSError, ValueError, KeyError):
        return catalog
    models = [
        m.model_copy(update={"tokens_per_second": float(speeds[m.name])}) if speeds.get(m.name) else m
        for m in catalog.models
    ]
    return catalog.model_copy(update={"models": models})
