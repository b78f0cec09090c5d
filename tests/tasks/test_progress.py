"""Progress events of a request (`tasks.progress`): only that request's listeners hear them, and
only while they listen; without listeners an event is nothing, and a failing listener never fails
the request nor keeps the others from hearing."""

import logging

from tasks.progress import emit, listening, subscribe


def test_a_requests_listeners_hear_its_events_while_they_listen():
    emit("r-nobody", "allocated", fragment_id="f1")  # no listener: nothing happens
    heard: list[dict] = []
    other: list[dict] = []
    with listening("r1", heard.append), listening("r2", other.append):
        emit("r1", "allocated", fragment_id="f1", model="m")
    emit("r1", "completed", fragment_id="f1")  # no longer listening
    assert heard == [{"event": "allocated", "request_id": "r1", "fragment_id": "f1", "model": "m"}]
    assert other == []


def test_a_failing_listener_is_logged_and_the_others_still_hear(caplog):
    def broken(event):
        raise RuntimeError("listener bug")

    heard: list[dict] = []
    unsubscribe = subscribe("r3", broken)
    try:
        with caplog.at_level(logging.ERROR, logger="tasks.progress"), listening("r3", heard.append):
            emit("r3", "allocated")
    finally:
        unsubscribe()
        unsubscribe()  # twice does no harm
    assert heard == [{"event": "allocated", "request_id": "r3"}]
    assert any(r.name == "tasks.progress" and "listener failed" in r.getMessage() for r in caplog.records)
