"""The services a run uses, handed down as one value: the catalog and the GPU backends.

`Services` is a small serializable value (a catalog file and a state folder), so it crosses
Prefect task and transaction boundaries like any parameter; the live objects it hands out (the
parsed catalog, the backends with their ledger pools and hosted·ai clients) are built once per
process and per value, the way a Prefect block hands out clients.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from connectors.backend import Backend
from connectors.hostedai_backend import HostedAIBackend
from connectors.ledger import Ledger
from connectors.local_backend import LocalBackend
from connectors.telemetry import serve_metrics
from homeskillet.catalog import load_catalog, with_measurements
from homeskillet.errors import InvalidRequest, UnknownTenant
from homeskillet.schemas import Allocation, Catalog, Covenant
from homeskillet.settings import Settings, get_settings
from tasks.credentials import hostedai_credentials
from tasks.learned import Router, router_path
from tasks.strategies import Stats


class Services(BaseModel):
    model_config = ConfigDict(frozen=True)

    catalog_path: Path
    home: Path

    @property
    def catalog(self) -> Catalog:
        """The catalog with the latest benchmark's measurements (`benchmarks/latest.json`), taken
        again whenever a benchmark writes new ones: routing follows them without a restart."""
        latest = self.home / "benchmarks" / "latest.json"
        try:
            version = latest.stat().st_mtime_ns
        except OSError:
            version = None
        return _measured(self, version)

    @property
    def settings(self) -> Settings:
        """The process settings, with this value's catalog file and state folder."""
        return _settings(self)

    def covenant(self, tenant: str) -> Covenant:
        """The tenant's covenant as the catalog file says now: re-read when the file changes, so a
        new covenant holds from the next request on without a restart (models and pools stay as
        this process first read them)."""
        covenants = self.covenants()
        if tenant not in covenants:
            raise UnknownTenant(f"unknown tenant {tenant!r}; add it to the catalog's tenants")
        return covenants[tenant]

    def covenants(self) -> dict[str, Covenant]:
        """Every tenant's covenant as the catalog file says now (parsed again only when it changed)."""
        try:
            version = self.catalog_path.stat().st_mtime_ns
        except OSError as exc:
            raise InvalidRequest(f"catalog {self.catalog_path}: {exc.strerror}") from None
        return _covenants(self.catalog_path, version)

    async def ledger(self) -> Ledger:
        """The shared ledger (allocations, tenants' quotas, running requests, spend)."""
        return await self.local.ledger()

    def backend(self, name: str) -> Backend:
        """The backend of that name; an unknown name is an error, never a silent default."""
        backends = _built(self)[1]
        if name not in backends:
            raise InvalidRequest(f"unknown backend {name!r}; known: {', '.join(sorted(backends))}")
        return backends[name]

    def backend_of(self, allocation: Allocation) -> Backend:
        return self.backend(allocation.backend)

    @property
    def local(self) -> LocalBackend:
        return _built(self)[1]["local"]

    async def held(self, tenant: str | None = None) -> list[Allocation]:
        """Active allocations of every backend (all tenants, or one)."""
        return [a for backend in _built(self)[1].values() for a in await backend.held(tenant)]

    async def shutdown(self) -> None:
        """Give back what this process holds: idle hosted·ai subscriptions first."""
        for backend in reversed(_built(self)[1].values()):
            await backend.shutdown()


def services(catalog_path: str | Path | None = None) -> Services:
    """The services for a catalog file (default: HOMESKILLET_CATALOG, else the packaged one)."""
    s = get_settings()
    return Services(catalog_path=Path(catalog_path or s.catalog).resolve(), home=s.home.resolve())


@lru_cache
def _settings(services: Services) -> Settings:
    return get_settings().model_copy(update={"catalog": services.catalog_path, "home": services.home})


@lru_cache(maxsize=32)
def _measured(services: Services, latest_version: int | None) -> Catalog:
    return with_measurements(_built(services)[0], services.home / "benchmarks" / "latest.json")


@lru_cache
def _built(services: Services) -> tuple[Catalog, dict[str, Backend]]:
    """The catalog as written, and the backends (built once: they hold connections and shares)."""
    _serve_metrics_once()
    catalog = load_catalog(services.catalog_path)
    settings = _settings(services)
    backends: dict[str, Backend] = {
        "local": LocalBackend(settings, catalog),
        "hostedai": HostedAIBackend(settings, catalog, hostedai_credentials),
    }
    return catalog, backends


# Shorthands for callers outside a run (CLI, MCP server, tests).
def catalog_path(path: str | Path | None = None) -> Path:
    return services(path).catalog_path


def catalog(catalog_path: str | Path | None = None) -> Catalog:
    return services(catalog_path).catalog


def backend(catalog_path: str | Path | None = None, name: str = "local") -> Backend:
    return services(catalog_path).backend(name)


async def shutdown(catalog_path: str | Path | None = None) -> None:
    await services(catalog_path).shutdown()


@lru_cache
def _serve_metrics_once() -> None:
    """Prometheus /metrics for this process, when HOMESKILLET_METRICS_PORT is set (workers, servers)."""
    port = get_settings().metrics_port
    if port:
        serve_metrics(port)


def routing_stats(path: str | Path) -> Stats:
    """Learned routing figures (`homeskillet learn-routing`), loaded once per file version."""
    path = Path(path).resolve()
    try:
        version = path.stat().st_mtime_ns
    except OSError as exc:
        raise InvalidRequest(f"routing stats {path}: {exc.strerror}") from None
    return _routing_stats(path, version)


@lru_cache(maxsize=16)
def _covenants(path: Path, version: int) -> dict[str, Covenant]:
    return {t.id: t.covenant for t in load_catalog(path).tenants}


@lru_cache(maxsize=16)
def _routing_stats(path: Path, version: int) -> Stats:
    return Stats.load(path)


def router_for(tenant: str, settings: Settings) -> Router | None:
    """The learned router a tenant's requests route with (`tasks.learned.router_path`), loaded
    once per file version; None when learned routing is off or there is no router."""
    if not settings.learned_routing:
        return None
    path = router_path(settings.routers, tenant)
    if path is None:
        return None
    try:
        version = path.stat().st_mtime_ns
    except OSError:  # unpublished between the check and now: the next request sees what is there
        return None
    return _router(path.resolve(), version)


@lru_cache(maxsize=32)
def _router(path: Path, version: int) -> Router:
    return Router.load(path)
