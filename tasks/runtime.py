"""What tasks share inside one process: the catalog and the GPU backend, loaded once per path."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from connectors.local_backend import LocalBackend
from homeskillet.catalog import load_catalog
from homeskillet.schemas import Catalog
from homeskillet.settings import Settings, get_settings


@lru_cache
def _load(catalog_path: Path, home: Path) -> tuple[Catalog, LocalBackend]:
    catalog = load_catalog(catalog_path)
    settings = get_settings().model_copy(update={"catalog": catalog_path, "home": home})
    return catalog, LocalBackend(settings, catalog)


def catalog_path(path: str | Path | None = None) -> Path:
    """The catalog file in use: the given one, else HOMESKILLET_CATALOG, else the packaged one."""
    return _key(path)[0]


def catalog(catalog_path: str | Path | None = None) -> Catalog:
    return _load(*_key(catalog_path))[0]


def backend(catalog_path: str | Path | None = None) -> LocalBackend:
    return _load(*_key(catalog_path))[1]


def settings() -> Settings:
    return get_settings()


def _key(catalog_path: str | Path | None) -> tuple[Path, Path]:
    s = get_settings()
    return Path(catalog_path or s.catalog).resolve(), s.home.resolve()
