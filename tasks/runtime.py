"""What tasks share inside one process: the catalog and the GPU backends, loaded once per path."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from connectors.hostedai_backend import HostedAIBackend, catalog_pool_of
from connectors.local_backend import LocalBackend
from connectors.telemetry import serve_metrics
from homeskillet import catalog as cat
from homeskillet.catalog import load_catalog, with_measurements
from homeskillet.errors import InvalidRequest
from homeskillet.schemas import Catalog
from homeskillet.settings import Settings, get_settings
from tasks.credentials import hostedai_credentials
from tasks.policy import Stats


@lru_cache
def _load(catalog_path: Path, home: Path) -> tuple[Catalog, LocalBackend, HostedAIBackend]:
    _serve_metrics_once()
    catalog = with_measurements(load_catalog(catalog_path), home / "benchmarks" / "latest.json")
    settings = get_settings().model_copy(update={"catalog": catalog_path, "home": home})
    hosted = HostedAIBackend(settings, catalog, hostedai_credentials)
    return catalog, LocalBackend(settings, catalog), hosted


def catalog_path(path: str | Path | None = None) -> Path:
    """The catalog file in use: the given one, else HOMESKILLET_CATALOG, else the packaged one."""
    return _key(path)[0]


def catalog(catalog_path: str | Path | None = None) -> Catalog:
    return _load(*_key(catalog_path))[0]


def backend(catalog_path: str | Path | None = None, name: str = "local") -> LocalBackend | HostedAIBackend:
    _, local, hosted = _load(*_key(catalog_path))
    return hosted if name == "hostedai" else local


def backend_for_pool(catalog_path: str | Path | None, pool_id: str) -> LocalBackend | HostedAIBackend:
    """The backend that serves a catalog pool (or a hosted·ai ledger pool `<pool>/<tenant>`)."""
    pool = cat.pool(catalog(catalog_path), catalog_pool_of(pool_id))
    return backend(catalog_path, pool.backend)


async def shutdown(catalog_path: str | Path | None = None) -> None:
    """Give back what this process holds: idle hosted·ai subscriptions, local model servers."""
    _, local, hosted = _load(*_key(catalog_path))
    await hosted.shutdown()
    await local.shutdown()


@lru_cache
def _serve_metrics_once() -> None:
    """Prometheus /metrics for this process, when HOMESKILLET_METRICS_PORT is set (workers, servers)."""
    port = get_settings().metrics_port
    if port:
        serve_metrics(port)


def settings() -> Settings:
    return get_settings()


def routing_stats(path: str | Path) -> Stats:
    """Learned routing figures (`homeskillet learn-routing`), loaded once per file version."""
    path = Path(path).resolve()
    try:
        version = path.stat().st_mtime_ns
    except OSError as exc:
        raise InvalidRequest(f"routing stats {path}: {exc.strerror}") from None
    return _routing_stats(path, version)


@lru_cache(maxsize=16)
def _routing_stats(path: Path, version: int) -> Stats:
    return Stats.load(path)


def _key(catalog_path: str | Path | None) -> tuple[Path, Path]:
    s = get_settings()
    return Path(catalog_path or s.catalog).resolve(), s.home.resolve()
