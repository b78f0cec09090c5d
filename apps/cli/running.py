"""What every `homeskillet` command shares: the consoles it prints to, pointing the process at the
local Prefect server, turning an error into one line and an exit code, and running flows so that
SIGTERM or SIGINT cancels them cleanly.

Exit codes: 0 done, 1 a well-formed request could not be served, 2 the input was wrong, 128 + the
signal's number when a signal cancelled the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console

from homeskillet.errors import CovenantViolation, HomeskilletError, InvalidRequest
from homeskillet.settings import get_settings

console = Console(width=None if sys.stdout.isatty() else 200)  # pipes and logs get the whole table
errors = Console(stderr=True)

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
T = TypeVar("T")


def use_local_prefect() -> str:
    """Start or reuse the local Prefect server and point this process's Prefect client at it.

    Must run before anything imports prefect: Prefect reads these settings at import.
    """
    from connectors.prefect_server import ensure_prefect_server

    settings = get_settings()
    if "prefect" in sys.modules and os.environ.get("PREFECT_API_URL") is None:
        raise RuntimeError("use_local_prefect() must run before prefect is imported")
    url = os.environ.get("PREFECT_API_URL") or ensure_prefect_server(settings.home, settings.prefect_port)
    os.environ["PREFECT_API_URL"] = url
    os.environ.setdefault("PREFECT_HOME", str(settings.home / "prefect"))
    # Run logs still reach the Prefect server (the UI shows them); the terminal shows our own output.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "connectors")  # backend logs in the run's log
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    return url


def fail(exc: Exception) -> NoReturn:
    """One line on stderr; exit 1 when a well-formed request could not be served (no route, no
    capacity, a service down), 2 when the input itself was wrong or its tenant's covenant refused it."""
    errors.print(f"[bold red]error:[/] {exc}", highlight=False)
    served = isinstance(exc, HomeskilletError) and not isinstance(exc, InvalidRequest | CovenantViolation)
    raise typer.Exit(1 if served else 2)


class Interrupted(Exception):
    """SIGTERM or SIGINT cancelled the run."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def run_until_signalled(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on an event loop in a thread of its own and return its result; SIGTERM or SIGINT
    cancels it at its current await instead, so that the flow's rollback hooks release what it
    holds and the run is not left Running, then raises Interrupted.

    The loop runs outside the main thread because Prefect's flow engine replaces the main thread's
    SIGTERM handler with one that raises wherever the thread happens to be; here both signals reach
    this handler alone. A second signal while the cancellation unwinds is ignored, so that it
    cannot cut the releases short.
    """
    loop = asyncio.new_event_loop()
    main = loop.create_task(coro)
    received: list[int] = []

    def on_signal(signum: int, _frame) -> None:
        if not received and not main.done():
            received.append(signum)
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing left to cancel
                loop.call_soon_threadsafe(main.cancel)

    def drive() -> None:
        with asyncio.Runner(loop_factory=lambda: loop) as runner:
            runner.run(asyncio.wait([main]))

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker = threading.Thread(target=drive, name="homeskillet-run")
        worker.start()
        worker.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if main.cancelled() and received:
        raise Interrupted(received[0])
    return main.result()


def run_flows(coro: Coroutine[Any, Any, T], what: str = "the work") -> T:
    """What every command that runs flows in this process runs them with: `run_until_signalled`,
    and on SIGTERM or SIGINT one line ("… `what` was cancelled") and exit 128 + the signal's number."""
    try:
        return run_until_signalled(coro)
    except Interrupted as exc:
        errors.print(f"[bold red]error:[/] {exc}: {what} was cancelled", highlight=False)
        raise typer.Exit(128 + exc.signum) from None
