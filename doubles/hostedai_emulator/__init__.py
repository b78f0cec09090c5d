"""The hosted·ai emulator: a stateful local stand-in for the hosted·ai GPUaaS API, which the
hosted·ai connector is tested against, and which the CLI, the load test and the documentation
examples serve on loopback.

Its parts, each importable on its own:

- `faults`: `Faults`, what goes wrong and how often, and its parsing from the command line;
- `accounts`: the account an emulator serves (teams and keys, regions, pools) and two fixtures,
  `default_config` and `other_account_config`;
- `state`: `Subscription` and `State`, the books and the state machine a subscription goes through;
- `routes`: each route of the API as a named handler, with the dependencies they share;
- `app`: `create_app`, which puts these together into one FastAPI app.
"""

from doubles.hostedai_emulator.accounts import (
    EmulatorConfig,
    PoolConfig,
    TeamConfig,
    default_config,
    other_account_config,
)
from doubles.hostedai_emulator.app import create_app
from doubles.hostedai_emulator.faults import BODY_ERROR, INTERNAL, Faults
from doubles.hostedai_emulator.routes import (
    INFERENCE_PORT,
    INSUFFICIENT,
    EstimateBody,
    ExposeBody,
    SubscribeBody,
    UnsubscribeBody,
)
from doubles.hostedai_emulator.state import State, Subscription

__all__ = [
    "BODY_ERROR",
    "INFERENCE_PORT",
    "INSUFFICIENT",
    "INTERNAL",
    "EmulatorConfig",
    "EstimateBody",
    "ExposeBody",
    "Faults",
    "PoolConfig",
    "State",
    "SubscribeBody",
    "Subscription",
    "TeamConfig",
    "UnsubscribeBody",
    "create_app",
    "default_config",
    "other_account_config",
]
