#!/usr/bin/env bash
# The staging stack on Docker, end to end (`make staging`), or its tear-down (`make staging-down`):
#
#   deployments/staging.sh         engine, base images, project image, `compose up --wait`, deploy,
#                                  one request through run_deployment and one through the MCP
#                                  server, where each service listens, then tear-down
#   deployments/staging.sh down    stop and remove the stack (and dockerd, if this script started it)
#
# HOMESKILLET_STAGING_KEEP=1 leaves the stack up after the smoke requests (then `make staging-down`).
# The Prefect API's auth string: HOMESKILLET_STAGING_PREFECT_AUTH if set, else the one in
# $STATE/prefect-auth (made here on first use, readable by its owner only; never in the repository).
# Host ports (127.0.0.1 only): HOMESKILLET_STAGING_PREFECT_PORT, HOMESKILLET_STAGING_EMULATOR_PORT,
# HOMESKILLET_STAGING_MCP_PORT; unset, each is 4200 / 8700 / 8765, or a free port if that one is taken.
#
# No image registry is reachable here, so every base image is made locally: a Debian bookworm
# minbase root (debootstrap) imported as an image, a Python base on it that trusts the host's CA
# certificates (pip goes through a TLS-intercepting proxy), and stand-ins for the postgres and
# prefecthq/prefect images. Each is built once and reused. Docker itself: Debian's docker.io
# (dockerd 20.10); compose v2 and buildx, which bookworm lacks, come from Debian trixie's packages
# into the CLI plugins folder.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=${HOMESKILLET_STAGING_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/homeskillet/staging}
ROOT_IMAGE=homeskillet-staging/bookworm:minbase
export HOMESKILLET_BASE_IMAGE=homeskillet-staging/python:3.11-bookworm
export HOMESKILLET_POSTGRES_IMAGE=homeskillet-staging/postgres:15-bookworm
PREFECT_VERSION=$(sed -n 's/^ *"prefect==\([0-9.]*\)".*/\1/p' pyproject.toml)
export HOMESKILLET_PREFECT_IMAGE=homeskillet-staging/prefect:$PREFECT_VERSION
export HOMESKILLET_IMAGE=${HOMESKILLET_IMAGE:-homeskillet:latest}
COMPOSE=(docker compose -f deployments/compose.yaml)
mkdir -p "$STATE"
TIMINGS=()

prefect_auth() {  # the API's auth string (user:password): compose requires it for every command
  local file=$STATE/prefect-auth secret
  if [ -z "${HOMESKILLET_STAGING_PREFECT_AUTH:-}" ]; then
    if [ ! -s "$file" ]; then
      secret=$(openssl rand -hex 24 2>/dev/null || python3 -c 'import secrets; print(secrets.token_hex(24))')
      (umask 077 && printf 'homeskillet:%s\n' "$secret" >"$file")
    fi
    chmod 600 "$file"
    HOMESKILLET_STAGING_PREFECT_AUTH=$(cat "$file")
  fi
  export HOMESKILLET_STAGING_PREFECT_AUTH
}
prefect_auth

step() {  # step NAME COMMAND...: run it, note how long it took
  local name=$1 t0 t1
  shift
  echo "== $name"
  t0=$EPOCHREALTIME
  "$@"
  t1=$EPOCHREALTIME
  TIMINGS+=("$(awk -v n="$name" -v a="$t0" -v b="$t1" 'BEGIN { printf "%-34s %7.1f s", n, b - a }')")
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

engine() {
  if ! command -v dockerd >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends docker.io >/dev/null
  fi
  if ! docker info >/dev/null 2>&1; then
    echo "starting dockerd (log: $STATE/dockerd.log)"
    dockerd >"$STATE/dockerd.log" 2>&1 &
    echo $! >"$STATE/dockerd.pid"
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null
  fi
  if ! docker compose version 2>/dev/null | grep -q 'version v\?2'; then
    plugins   # bookworm's docker-compose is v1, which rejects the compose file's top-level `name:`
  fi
}

plugins() {  # compose v2 and buildx from Debian trixie, without adding trixie to this machine's apt sources
  local apt=$STATE/trixie-apt dir=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/debs" "$dir"
  echo "deb http://deb.debian.org/debian trixie main" >"$apt/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
              -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o Debug::NoLocking=1)
  apt-get "${opts[@]}" update -qq
  (cd "$apt/debs" && apt-get "${opts[@]}" download docker-compose docker-buildx 2>/dev/null)
  for deb in "$apt"/debs/*.deb; do dpkg-deb -x "$deb" "$apt/x"; done
  cp "$apt"/x/usr/libexec/docker/cli-plugins/docker-{compose,buildx} "$dir/"
  docker compose version
}

base_images() {
  if ! have_image "$ROOT_IMAGE"; then
    command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
    local root
    root=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$STATE/debootstrap.log"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import - "$ROOT_IMAGE"
    rm -rf "$root"
  fi
  if ! have_image "$HOMESKILLET_BASE_IMAGE"; then
    local ctx
    ctx=$(mktemp -d)
    cp /etc/ssl/certs/ca-certificates.crt "$ctx/host-trust-store.crt"
    docker build -q -f deployments/staging/python-base.Dockerfile --build-arg ROOT_IMAGE="$ROOT_IMAGE" \
      -t "$HOMESKILLET_BASE_IMAGE" "$ctx"
    rm -rf "$ctx"
  fi
}

stand_ins() {  # the postgres and prefecthq/prefect images, which are unreachable here
  have_image "$HOMESKILLET_POSTGRES_IMAGE" || docker build -q -f deployments/staging/postgres.Dockerfile \
    --build-arg BASE_IMAGE="$HOMESKILLET_BASE_IMAGE" -t "$HOMESKILLET_POSTGRES_IMAGE" deployments/staging
  have_image "$HOMESKILLET_PREFECT_IMAGE" || docker build -q -f deployments/staging/prefect.Dockerfile \
    --build-arg BASE_IMAGE="$HOMESKILLET_BASE_IMAGE" --build-arg PREFECT_VERSION="$PREFECT_VERSION" \
    -t "$HOMESKILLET_PREFECT_IMAGE" deployments/staging
}

project_image() {
  docker build -f deployments/Dockerfile --build-arg BASE_IMAGE="$HOMESKILLET_BASE_IMAGE" \
    -t "$HOMESKILLET_IMAGE" . >"$STATE/image-build.log" 2>&1 || { tail -40 "$STATE/image-build.log"; return 1; }
  docker image ls "$HOMESKILLET_IMAGE" --format '{{.Repository}}:{{.Tag}} {{.Size}}'
}

free_port() {  # free_port DEFAULT: DEFAULT if nothing listens there, else one the kernel picks
  python3 -c '
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' "$1"
}

up() {
  export HOMESKILLET_STAGING_PREFECT_PORT=${HOMESKILLET_STAGING_PREFECT_PORT:-$(free_port 4200)}
  export HOMESKILLET_STAGING_EMULATOR_PORT=${HOMESKILLET_STAGING_EMULATOR_PORT:-$(free_port 8700)}
  export HOMESKILLET_STAGING_MCP_PORT=${HOMESKILLET_STAGING_MCP_PORT:-$(free_port 8765)}
  "${COMPOSE[@]}" up --detach --wait --no-build
}

deploy() {
  "${COMPOSE[@]}" exec -T worker prefect --no-prompt deploy -n fuse-request -n benchmark -n cost-report
}

smoke_deployment() {
  "${COMPOSE[@]}" exec -T worker python - deployment <deployments/staging_smoke.py
}

smoke_mcp() {
  local token
  token=$("${COMPOSE[@]}" exec -T mcp homeskillet tokens create --tenant demo --json \
          | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')
  "${COMPOSE[@]}" exec -T -e HOMESKILLET_MCP_TOKEN="$token" worker python - mcp http://mcp:8765/mcp \
    <deployments/staging_smoke.py
}

where() {
  local prefect=http://127.0.0.1:$HOMESKILLET_STAGING_PREFECT_PORT emulator=http://127.0.0.1:$HOMESKILLET_STAGING_EMULATOR_PORT
  local mcp=http://127.0.0.1:$HOMESKILLET_STAGING_MCP_PORT
  curl -fsS "$prefect/api/health" >/dev/null  # open to probes; the rest of the API wants the auth string:
  local flows=(-X POST -H 'Content-Type: application/json' -d '{}' "$prefect/api/flows/filter")
  [ "$(curl -s -o /dev/null -w '%{http_code}' "${flows[@]}")" = 401 ]
  # the auth string through a config on a pipe, not an argument that `ps` shows
  curl -fsS -o /dev/null -K <(printf 'user = "%s"\n' "$HOMESKILLET_STAGING_PREFECT_AUTH") "${flows[@]}"
  if curl -s -D - -o /dev/null -X OPTIONS -H 'Origin: http://evil.example' -H 'Access-Control-Request-Method: POST' \
      "$prefect/api/flows/filter" | grep -qi '^access-control-allow-origin:'; then
    echo "the Prefect API allows cross-origin calls from http://evil.example" >&2
    return 1
  fi
  curl -fsS "$emulator/openapi.json" >/dev/null
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$mcp/mcp")" = 401 ]  # it answers, and wants a token
  cat <<WHERE
Prefect UI and API   $prefect  (PREFECT_API_URL=$prefect/api; auth string, which the UI asks for: $STATE/prefect-auth)
hosted·ai emulator   $emulator  (OpenAPI: $emulator/openapi.json)
MCP server           $mcp/mcp and ws://127.0.0.1:$HOMESKILLET_STAGING_MCP_PORT/ws  (token: docker compose -f deployments/compose.yaml exec mcp homeskillet tokens create --tenant demo)
PostgreSQL           inside the stack only (postgres:5432)
WHERE
  "${COMPOSE[@]}" ps --format 'table {{.Service}}\t{{.Status}}\t{{.Ports}}'
}

down() {
  if docker info >/dev/null 2>&1; then
    if [ -n "$("${COMPOSE[@]}" ps -aq 2>/dev/null)" ]; then
      mkdir -p "$STATE/logs"
      "${COMPOSE[@]}" logs --no-color --timestamps >"$STATE/logs/compose.log" 2>&1 || true
      echo "the stack's logs: $STATE/logs/compose.log"
    fi
    "${COMPOSE[@]}" down --volumes --remove-orphans --timeout 20
  fi
  if [ -f "$STATE/dockerd.pid" ]; then
    local pid
    pid=$(cat "$STATE/dockerd.pid")
    if kill "$pid" 2>/dev/null; then
      echo "stopping dockerd ($pid), which staging.sh started"
      for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -f "$STATE/dockerd.pid"
  fi
}

if [ "${1:-}" = down ]; then
  down
  exit 0
fi

finish() {
  local status=$?
  if [ "$status" != 0 ]; then
    echo "staging failed (exit $status); the last lines of each service:" >&2
    "${COMPOSE[@]}" logs --no-color --tail 30 >&2 2>/dev/null || true
  fi
  if [ "${HOMESKILLET_STAGING_KEEP:-0}" = 1 ] && [ "$status" = 0 ]; then
    echo "left running (HOMESKILLET_STAGING_KEEP=1): make staging-down stops it"
  else
    step "tear-down" down
  fi
  printf '%s\n' "timings:" "${TIMINGS[@]}"
  exit "$status"
}
trap finish EXIT

step "docker engine and compose v2" engine
step "base images" base_images
step "postgres and prefect stand-ins" stand_ins
step "project image" project_image
step "compose up --wait" up
step "register the deployments" deploy
step "request via run_deployment" smoke_deployment
step "request via the MCP server" smoke_mcp
step "where each service listens" where
