"""The layers hold: `lint-imports` checks the contracts in pyproject.toml (entry points over
flows over tasks over connectors over the vocabulary; connectors and the vocabulary Prefect-free)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in done.stdout


def test_ruff_finds_nothing_and_the_code_is_formatted():
    ruff = str(Path(sys.executable).with_name("ruff"))
    check = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-3000:]
    formatted = subprocess.run([ruff, "format", "--check", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert formatted.returncode == 0, formatted.stdout[-3000:]
