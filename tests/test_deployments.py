"""prefect.yaml, the Dockerfile, the compose file and the Kubernetes job template: validated as
far as this machine can (no Docker engine, no cluster)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cronsim import CronSim
from prefect.flows import load_flow_from_entrypoint

pytestmark = pytest.mark.usefixtures("local_services")  # flows, tasks or the Prefect API

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = yaml.safe_load((ROOT / "prefect.yaml").read_text())


def test_every_deployment_entrypoint_is_a_flow_with_those_parameters():
    assert CONFIG["pull"], "pull steps must be explicit"
    for deployment in CONFIG["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(str(ROOT / path) + ":" + name)
        assert set(deployment.get("parameters", {})) <= set(flow.parameters.properties), deployment["name"]
        for schedule in deployment.get("schedules", []):
            next(iter(CronSim(schedule["cron"], __import__("datetime").datetime(2026, 1, 1))))
        # every parameter has a description for the UI's run form
        assert all(p.get("description") for p in flow.parameters.properties.values()), deployment["name"]


def test_image_deployments_build_push_and_pull_the_image():
    k8s = [d for d in CONFIG["deployments"] if d["name"].endswith("-k8s")]
    assert k8s
    for deployment in k8s:
        assert deployment["build"][0]["prefect_docker.deployments.steps.build_docker_image"]["dockerfile"] == (
            "deployments/Dockerfile"
        )
        assert "push_docker_image" in next(iter(deployment["push"][0]))
        assert deployment["work_pool"]["job_variables"]["gpu_count"] >= 1


def test_dockerfile_lints_and_copies_what_exists():
    dockerfile = ROOT / "deployments" / "Dockerfile"
    done = subprocess.run([str(BIN / "hadolint"), str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


def test_compose_file_runs_server_on_postgres_worker_and_emulator():
    compose = yaml.safe_load((ROOT / "deployments" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "worker", "emulator"} <= set(services)
    assert "postgresql+asyncpg" in services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]


def test_kubernetes_job_template_is_accepted_and_requests_gpus():
    template = ROOT / "deployments" / "k8s-base-job-template.json"
    spec = json.loads(template.read_text())
    container = spec["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert spec["variables"]["properties"]["gpu_count"]["default"] == 1
    done = subprocess.run(
        [str(BIN / "prefect"), "work-pool", "create", "homeskillet-k8s-check", "--type", "kubernetes",
         "--base-job-template", str(template), "--overwrite"],
        capture_output=True, text=True, env=os.environ.copy(), timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    shown = subprocess.run(
        [str(BIN / "prefect"), "work-pool", "inspect", "homeskillet-k8s-check"],
        capture_output=True, text=True, env=os.environ.copy(), timeout=120,
    )  # fmt: skip
    assert "nvidia.com/gpu" in shown.stdout
