"""The layers hold: `lint-imports` checks the contracts in pyproject.toml (entry points over flows
over test doubles over tasks over connectors over the vocabulary; connectors, doubles, the
vocabulary and the routing core Prefect-free), and the layers contract names every module."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["apps", "flows", "doubles", "tasks", "connectors", "homeskillet"]


def test_import_contracts_are_kept():
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in done.stdout


def test_the_layers_contract_names_every_module():
    """A module left out of the layers is checked by nothing: each top-level module of a package is
    named, and a subpackage (the CLI, the emulator) is named as one unit."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    named = {name for layer in layers for name in re.split(r"\s*[|:]\s*", layer.strip())}
    modules = set()
    for package in PACKAGES:
        for path in (ROOT / package).iterdir():
            if path.suffix == ".py" and path.stem != "__init__":
                modules.add(f"{package}.{path.stem}")
            elif path.is_dir() and (path / "__init__.py").exists():
                modules.add(f"{package}.{path.name}")
    assert modules - named == set(), "modules missing from the layers contract"
    assert named - modules == set(), "the layers contract names modules that do not exist"


def test_ruff_finds_nothing_and_the_code_is_formatted():
    ruff = str(Path(sys.executable).with_name("ruff"))
    check = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-3000:]
    formatted = subprocess.run([ruff, "format", "--check", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert formatted.returncode == 0, formatted.stdout[-3000:]
