"""prefect.yaml parses and every deployment's entrypoint loads as a Prefect flow."""

from pathlib import Path

import yaml
from prefect.flows import load_flow_from_entrypoint

ROOT = Path(__file__).resolve().parents[1]


def test_every_deployment_entrypoint_is_a_flow():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert config["pull"], "pull steps must be explicit"
    for deployment in config["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(str(ROOT / path) + ":" + name)
        assert flow.name.replace("-", "_") == name
        assert set(deployment["parameters"]) <= set(flow.parameters.properties)
