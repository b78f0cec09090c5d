"""The fused answer as it grows, from a request's progress events: what a streaming client is
sent, in fusion order, so that what it has received is always the start of the final answer.

- `planned` gives the plan: its fusion and its fragments' texts, in order;
- `token` adds a delta to a fragment's text (fragments whose route makes one call stream);
- `answered` gives a fragment's final text (every fragment, streamed or not).

For an `ordered` plan, fragment k's text is sent as soon as every fragment before it is answered,
under its part's header, exactly as `tasks.fusion.fuse_results` writes the answer; independent
fragments still run at once, and what they stream early waits its turn. For a `reduce` plan, the
combining fragment's text is the answer. Whitespace at the start of a text is dropped and at its
end held back until more text follows, as the final answer strips each text.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class FusedStream:
    def __init__(self) -> None:
        self.fusion: str | None = None
        self.fragments: list[dict[str, Any]] = []
        self.partial: dict[str, str] = {}
        self.done: dict[str, str] = {}
        self.sent = ""

    def feed(self, event: dict[str, Any]) -> str:
        """The text to send after this event ("" when nothing new can be sent yet)."""
        kind = event.get("event")
        if kind == "planned":
            self.fusion, self.fragments = event["fusion"], list(event["fragments"])
        elif kind == "token":
            self.partial[event["fragment_id"]] = self.partial.get(event["fragment_id"], "") + event["text"]
        elif kind == "answered":
            self.done[event["fragment_id"]] = event["text"]
        else:
            return ""
        return self._advance(self._so_far())

    def finish(self, answer: str) -> str:
        """The rest of the final answer. A final answer that does not extend what was sent (a
        fragment's tokens that were not the start of its answer) cannot be taken back: logged."""
        if answer.startswith(self.sent):
            rest, self.sent = answer[len(self.sent) :], answer
            return rest
        log.warning("streamed text is not the start of the fused answer; the rest was not sent")
        return ""

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def _text(self, fragment_id: str) -> str:
        if fragment_id in self.done:
            return self.done[fragment_id].strip()
        return self.partial.get(fragment_id, "").lstrip().rstrip()  # its end may still grow

    def _so_far(self) -> str:
        if not self.fragments:
            return ""
        if self.fusion == "reduce":
            depended_on = {d for f in self.fragments for d in f.get("depends_on", [])}
            sink = next(f for f in self.fragments if f["id"] not in depended_on)
            return self._text(sink["id"])
        if len(self.fragments) == 1:
            return self._text(self.fragments[0]["id"])
        parts = []
        for number, fragment in enumerate(self.fragments, start=1):
            parts.append(f"{number}. {fragment['text']}\n{self._text(fragment['id'])}")
            if fragment["id"] not in self.done:
                break  # the ones after it wait their turn
        return "\n\n".join(parts)
