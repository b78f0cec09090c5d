"""mutmut's hooks (mutmut 2.x reads this file from the repository root): which tests run against a mutant.

Each mutant runs only the tests that exercise its file, in an order that puts the quick and
discriminating ones first (pytest stops at the first failure, `-x`), and for a few functions that
only a flow reaches, those flow tests. Every run is a new pytest process, so the session's
PostgreSQL, Prefect server and model servers start from a clean state folder for each mutant.

Why mutmut 2 and not 3: mutmut 3 does not mutate decorated functions (it skips any function with a
decorator other than staticmethod/classmethod), and here that is nearly everything worth mutating:
the ledger's methods are wrapped by `_reconnecting` (reserve, release, held, ...), the resources
tasks by Prefect's `@task`. mutmut 2 edits the file in place and runs the test command as a
subprocess, so decorators make no difference to it.
"""

from __future__ import annotations

import ast
import functools
import shlex
import subprocess
import sys
from pathlib import Path

# the interpreter mutmut runs under (the venv's), whatever `python` is on PATH
PYTEST = f"{shlex.quote(sys.executable)} -m pytest -x -q -p no:randomly -p no:cacheprovider --timeout=120"

# the whole file (quotas across processes included), so that a test added there runs against the
# ledger's mutants without editing this list (a stale or missing name would make mutants look killed
# or survive unseen); the slow restart test (two PostgreSQL restarts, the last in the file) only for
# the reconnecting machinery, the decorators (a mutant on a decorator line is outside its function)
# and module-level lines
LEDGER_RESTART = "tests/connectors/test_ledger.py::test_a_postgresql_restart_is_ridden_out_and_an_outage_fails_clearly"
LEDGER_TESTS = ["tests/connectors/test_ledger.py", f"--deselect={LEDGER_RESTART}"]
LEDGER_ALL = ["tests/connectors/test_ledger.py"]

# spend and usage are reached through a flow (recorded by fuse_request, read by the covenant
# check and the CLI), set_endpoint through the local backend's allocate; DAY and MONTH are spend's
LEDGER_FLOW_TESTS = [
    "tests/tasks/test_covenant.py::test_a_budget_crossed_mid_request_stops_it_and_releases_everything",
    "tests/tasks/test_covenant.py::test_the_cli_exits_2_naming_the_term_and_shows_the_usage",
    "tests/tasks/test_covenant.py::test_a_request_is_routed_within_its_covenant_and_its_provenance_says_so",
    LEDGER_RESTART,
]

# (not the three-part request on the real models: it adds a minute per surviving mutant and reaches
# no line of resources.py that these do not; llama-server ignores the request's model name). The
# pure `render` tests come first in test_resources.py.
RESOURCES_TESTS = [
    "tests/tasks/test_resources.py",
    "tests/flows/test_fusion.py::test_a_failing_fragment_fails_the_request_and_releases_every_allocation",
    "tests/flows/test_fusion.py::test_cancelling_a_request_mid_inference_releases_its_allocations",
    "tests/flows/test_fusion.py::test_the_run_log_says_each_routing_decision_allocation_and_release",
    "tests/connectors/test_hostedai_backend.py::test_a_preempted_fragment_errs_without_the_key",
]

HOSTEDAI_TESTS = [
    "tests/connectors/test_hostedai.py",
    "tests/connectors/test_hostedai_backend.py",
    "tests/doubles/test_hostedai_emulator.py",
]

# file -> {name of the function or module-level assignment a mutant is in -> tests}; FUNCTION: any
# other function's; None: any other line (module level, decorators)
FUNCTION = "<function>"
LEDGER_FLOW = ("record_spend", "spend", "usage", "set_endpoint", "capacities", "DAY", "MONTH")
LEDGER_RECONNECT = ("_reconnecting", "call", "_lost_connection", "_connect", "open_ledger", "__init__")
TESTS = {
    "connectors/ledger.py": {
        None: LEDGER_ALL,
        FUNCTION: LEDGER_TESTS,
        **dict.fromkeys(LEDGER_FLOW, LEDGER_FLOW_TESTS),
        **dict.fromkeys(LEDGER_RECONNECT, LEDGER_ALL),
    },
    "tasks/resources.py": {None: RESOURCES_TESTS},
    "connectors/hostedai.py": {None: HOSTEDAI_TESTS},
    "connectors/hostedai_backend.py": {None: HOSTEDAI_TESTS},
}


@functools.cache
def _scopes(filename: str) -> list[tuple[int, int, str, str | None]]:
    """(first line, last line, name, FUNCTION or None) of every function and module-level
    assignment in the file, 1-based, outer before inner."""
    tree = ast.parse(Path(filename).read_text())
    found = [
        (node.lineno, node.end_lineno, node.name, FUNCTION)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    found += [
        (node.lineno, node.end_lineno, target.id, None)
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    ]
    return sorted(found)


def tests_for(filename: str, line_number: int) -> list[str]:
    """The tests for a mutant on this line (1-based) of this file: those of the innermost enclosing
    function (or module-level name) that has its own list, else those for any function, else the
    file's."""
    by_function = TESTS.get(filename.removeprefix("./"))
    if by_function is None:
        return []
    scopes = [(name, kind) for first, last, name, kind in _scopes(filename) if first <= line_number <= last]
    for name, _ in reversed(scopes):
        if name in by_function:
            return by_function[name]
    if any(kind == FUNCTION for _, kind in scopes):
        return by_function.get(FUNCTION, by_function[None])
    return by_function[None]


def _present(test: str) -> bool:
    """An option (--deselect=...) or a test whose file this checkout has."""
    return Path(test.split("=", 1)[-1].split("::")[0]).exists()


def init():
    """Before the run (source unmutated): every test named above must collect, else its mutants
    would all look killed (pytest exits 4 on a name it cannot find)."""
    tests = sorted(
        {t for by_name in TESTS.values() for ts in by_name.values() for t in ts if Path(t.split("::")[0]).exists()}
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", *tests],
        capture_output=True,
        text=True,
    )
    collected = set(done.stdout.split())
    named = [t.split("=", 1)[-1] for t in tests if "::" in t]
    missing = [t for t in named if not any(c == t or c.startswith(t + "[") for c in collected)]
    if done.returncode != 0 or missing:
        raise SystemExit(f"mutmut_config.py names tests that do not collect: {missing}\n{done.stdout[-3000:]}")


def pre_mutation(context):
    tests = tests_for(context.filename, context.mutation_id.line_number + 1)  # mutmut counts from 0
    # a checkout without one of these files (an older one) runs the rest: pytest's "not found" exit
    # status (4) would count as a surviving mutant, since mutmut 2 counts only status 1 as killed
    tests = [t for t in tests if _present(t)]
    if tests:
        # mutmut 2 counts only exit status 1 as killed. A mutant that breaks an import makes pytest
        # exit 2 (collection errors) or 4 (the named tests are then "not found"), 3 is an internal
        # error: all killed. `init` has checked that every listed test collects unmutated, so a 4
        # is never a stale name here. 5 (nothing collected) stays a survivor, to be looked at.
        # (mutmut 2 splits the command and runs it without a shell, hence sh -c)
        script = f"{PYTEST} {' '.join(tests)}; rc=$?; case $rc in 2|3|4) exit 1;; *) exit $rc;; esac"
        context.config.test_command = f"sh -c {shlex.quote(script)}"
