"""`server start|stop|status|check`: the local services a run needs (PostgreSQL, the Prefect
server, the llama.cpp model servers), started, stopped, reported on and smoke-checked."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from apps.cli.running import console, errors, fail
from homeskillet.errors import HomeskilletError
from homeskillet.settings import get_settings


def start() -> None:
    """Start (or reuse) PostgreSQL and the Prefect server; print the API URL."""
    from connectors.prefect_server import ensure_prefect_server

    settings = get_settings()
    try:
        url = ensure_prefect_server(settings.home, settings.prefect_port)
    except HomeskilletError as exc:
        fail(exc)
    console.print(f"Prefect API {url} · UI {url.removesuffix('/api')} · state {settings.home}")
    console.print(f"export PREFECT_API_URL={url}", highlight=False)


def stop() -> None:
    """Stop the model servers, the Prefect server and PostgreSQL."""
    from connectors.model_server import ModelServers
    from connectors.prefect_server import stop_prefect_server

    settings = get_settings()
    models = ModelServers(settings.home, settings.model_idle_s).stop_all()
    console.print(f"model servers stopped: {', '.join(models)}" if models else "no model server was running")
    stopped = stop_prefect_server(settings.home)
    console.print("stopped" if stopped else "no Prefect server was running (PostgreSQL stopped if it ran)")


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """The Prefect server, PostgreSQL and each model server; exit 1 when the Prefect server is down."""
    from connectors import postgres
    from connectors.model_server import ModelServers
    from connectors.prefect_server import running_server

    settings = get_settings()
    info = running_server(settings.home)
    try:
        pg_socket: str | None = str(postgres.socket_dir(settings.pgdata))
    except HomeskilletError:
        pg_socket = None
    servers = ModelServers(settings.home, settings.model_idle_s)
    models = [
        {
            "model": r.model,
            "pid": r.server_pid,
            "supervisor_pid": r.pid,
            "port": r.port,
            "endpoint": r.endpoint,
            "slots": r.slots,
            "up_s": round(time.time() - r.since, 1),
            "idle_s": round(servers.idle_seconds(r), 1),
            "stops_when_idle_s": r.idle_s,
        }
        for r in servers.running()
    ]
    status = {
        "prefect": {"pid": info.pid, "api_url": info.api_url} if info else None,
        "postgres": {"socket": pg_socket} if pg_socket else None,
        "model_servers": models,
    }
    if as_json:
        print(json.dumps(status))
    else:
        console.print(f"prefect: {f'running, pid {info.pid}, {info.api_url}' if info else 'stopped'}")
        console.print(f"postgres: {'running, socket ' + pg_socket if pg_socket else 'stopped'}")
        if not models:
            console.print("model servers: none running")
        for m in models:
            console.print(
                f"model server {m['model']}: pid {m['pid']}, {m['endpoint']}, {m['slots']} slots, "
                f"up {m['up_s']:.0f}s, idle {m['idle_s']:.0f}s (stops at {m['stops_when_idle_s']:g}s)"
            )
    if info is None:
        raise typer.Exit(1)


def check() -> None:
    """The set-up's smoke check: one multi-token chat completion on a fresh llama-server."""
    from connectors.model_server import check_build, gguf_path, llama_server_binary
    from homeskillet.catalog import load_catalog

    settings = get_settings()
    try:
        binary = llama_server_binary(settings.llama_server)
        spec = next(m for m in load_catalog(settings.catalog).models if m.serving.kind == "llama_cpp")
        answer = check_build(binary, gguf_path(spec.serving, settings.home / "models"))
    except HomeskilletError as exc:
        errors.print(f"[bold red]llama-server smoke check failed:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"llama-server smoke check passed ({binary}, {spec.name}): {answer.strip()!r}")
