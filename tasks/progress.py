"""In-process progress events of a request: the flow emits, whoever subscribed to that request
id (the MCP server) hears it. Without subscribers `emit` does nothing; a failing listener never
fails the flow."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)
Listener = Callable[[dict[str, Any]], None]
_listeners: dict[str, list[Listener]] = {}


def subscribe(request_id: str, listener: Listener) -> Callable[[], None]:
    """Call `listener(event)` for every event of this request; returns the unsubscribe function."""
    _listeners.setdefault(request_id, []).append(listener)

    def unsubscribe() -> None:
        listeners = _listeners.get(request_id, [])
        if listener in listeners:
            listeners.remove(listener)
        if not listeners:
            _listeners.pop(request_id, None)

    return unsubscribe


@contextmanager
def listening(request_id: str, listener: Listener) -> Iterator[None]:
    unsubscribe = subscribe(request_id, listener)
    try:
        yield
    finally:
        unsubscribe()


def emit(request_id: str, event: str, **fields: Any) -> None:
    """Tell this request's listeners (none: a no-op). Listeners must not block."""
    listeners = _listeners.get(request_id)
    if not listeners:
        return
    payload = {"event": event, "request_id": request_id, **fields}
    for listener in list(listeners):
        try:
            listener(payload)
        except Exception:  # progress must never fail a request
            log.exception("progress listener failed")
