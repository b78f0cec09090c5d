"""The emulator's fault model: what goes wrong on hosted·ai, and how often.

Each field is one misbehaviour the real API has shown, as a rate per API call or a delay: a bare
HTTP 500 with nothing done, a 500 with the API's own error envelope (code `INTERNAL`), an error
object inside a 200 body (code `BODY_ERROR`), a write that takes effect and is still answered as
an internal error, a 429 with Retry-After, a subscribe that is done but stalls or answers an empty
body, business errors sent as 200 or as 500, preemption of pods on preemptible pools, and the
delays before a new subscription is listed, before it is active and before an unsubscribed one is
gone. Then what hosted·ai answers that no schema promises, in shapes the client must parse rather
than index: `connection-info` in another documented shape (subscription entries each with its
pods, a bare array of pods) or in one nobody documented; the inference server already discovered
under another name (with a service that is not one listed first); an error object in the body of
the first N reads, in words of the fault's choosing (e.g. "permission"); and service URLs that
point where the caller chooses (a loopback port, a metadata address), as a hostile or broken
panel would answer. `Faults()` is a well-behaved API with the real one's timings and its habit of sending half
of its business errors inside a 2xx; a seed makes a run repeatable.

`Faults.parse` reads the command line's `--faults`: `key=value,...` (each value JSON where it
parses, a string where not), where a key it does not know is an error so that a misspelt fault
cannot pass for a fault-free run; or a JSON object, validated as the model (which ignores keys it
does not know, and is the form for a list of more than one item, as the other splits at commas).
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, Field

INTERNAL = 50000001  # the envelope of an internal error answered as HTTP 500
BODY_ERROR = 12370004  # an error object answered inside a 200 body


class Faults(BaseModel):
    """What goes wrong, and how often. Rates are probabilities per API call."""

    latency_s: float = Field(0.0, ge=0, description="Added to every API call.")
    error_rate: float = Field(0.0, ge=0, le=1, description="HTTP 500 without a business code, action not done.")
    read_error_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description=f"A read (GET, the estimate) answers HTTP 500 with the envelope {{code {INTERNAL}, 'internal error'}}.",
    )
    read_error_in_body_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description=f"A read (GET, the estimate) answers 200 with an error object in the body (code {BODY_ERROR}).",
    )
    write_error_after_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description=f"A subscribe or unsubscribe takes effect, then answers HTTP 500 with the envelope "
        f"{{code {INTERNAL}, 'internal error'}}.",
    )
    fault_paths: list[str] = Field(
        [], description="When set, the per-call rate faults above hit only paths that start with one of these."
    )
    rate_limit_rate: float = Field(0.0, ge=0, le=1, description="HTTP 429 with Retry-After, action not done.")
    retry_after_s: float = Field(0.1, ge=0, description="The Retry-After of a 429.")
    insufficient_pools: list[int] = Field([], description="Pools whose subscribe always answers Insufficient.")
    timeout_rate: float = Field(0.0, ge=0, le=1, description="Subscribe is done, then the answer stalls.")
    timeout_s: float = Field(30.0, ge=0, description="How long a stalled answer stalls.")
    empty_subscribe_rate: float = Field(0.0, ge=0, le=1, description="Subscribe is done, the body is empty.")
    business_in_2xx_rate: float = Field(0.5, ge=0, le=1, description="Business errors sent as 200, not 500.")
    preempt_rate: float = Field(0.0, ge=0, le=1, description="Inference on a preemptible pool kills its pod.")
    visibility_s: float = Field(0.2, ge=0, description="A new subscription is missing from lists this long.")
    activation_s: float = Field(0.5, ge=0, description="Then it is `subscribing` until this age.")
    unsubscribe_s: float = Field(0.5, ge=0, description="An unsubscribed item is `un_subscribing` this long.")
    connection_info_shape: Literal["pods", "subscriptions", "bare", "unknown"] = Field(
        "pods",
        description="connection-info's answer: {pods: [...]}; a list of subscription entries each with its pods; "
        "a bare array of pods; or a list of objects without pods (a shape no client knows).",
    )
    discovered_as: str | None = Field(
        None,
        description="The pod's inference server is discovered from the start under this name (its URL without /v1), "
        "listed after a service of another name that serves no models.",
    )
    body_error_reads: int = Field(
        0, ge=0, description=f"The first N reads (GET) answer 200 with an error object (code {BODY_ERROR})."
    )
    body_error_message: str = Field(
        "permission check failed, try again", description="The message of body_error_reads' error object."
    )
    service_url: str | None = Field(
        None, description="Every service connection-info lists is at this URL (a hostile panel's choice)."
    )
    seed: int | None = None

    @classmethod
    def parse(cls, text: str) -> Faults:
        """`error_rate=0.2,latency_s=0.05` (or a JSON object) → Faults; unknown keys are an error."""
        if text.strip().startswith("{"):
            return cls.model_validate_json(text)
        values: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"fault {part!r} is not key=value")
            try:
                values[key.strip()] = json.loads(value)  # numbers, [lists], true/false
            except ValueError:
                values[key.strip()] = value.strip()
        unknown = set(values) - set(cls.model_fields)
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; known: {sorted(cls.model_fields)}")
        return cls.model_validate(values)
