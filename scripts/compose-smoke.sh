#!/usr/bin/env bash
# The whole stack in real containers on this machine's CPU (docker-compose.yml + docker/compose.cpu.yml):
# build, up, every health check green, Prometheus' generation rate above 0, a PNG of one class over HTTP, a
# stop and restart of the trainer that resumes with no batch lost or stored twice, and the student's held-out
# top-1 on digits. Then `down -v`, and nothing of the run is left behind: containers, daemon, mounts.
#
#   scripts/compose-smoke.sh                       # uses a running Docker engine, else starts a private one
#
# A private engine (Debian's docker.io; installed when missing, which needs root) runs with its own data root
# under DFKD_SMOKE_CACHE (kept between runs, so the local base image is built once per machine) and no bridge
# network: every container, and every build step, uses the host's network. There is no registry here, so the
# base image is a Debian rootfs from debootstrap, and Redis and Prometheus come from Debian's packages. pip in
# the images installs from a wheelhouse (docker/wheels, filled from this machine's pip configuration) served on
# loopback for the build. Grafana is not started in the smoke run.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
venv="${DFKD_VENV:-$repo/.venv}"
cache="${DFKD_SMOKE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dfkd-smoke}"
work="$(mktemp -d /tmp/dfkd-smoke.XXXXXX)"
project="dfkd-smoke"
base_image="dfkd-local/debian:bookworm"
started=$SECONDS

log() { printf '[smoke %4ds] %s\n' "$((SECONDS - started))" "$*"; }
fail() { log "FAILED: $*"; exit 1; }

free_port() { "$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# ---- cleanup: always, pass or fail ---------------------------------------------------------------------------
dockerd_pid=""
wheel_server_pid=""
cleanup() {
    local code=$?
    set +e
    if [[ -n "${compose_ready:-}" ]]; then
        log "down -v"
        compose down -v --remove-orphans --timeout 60 >"$work/down.log" 2>&1 || cat "$work/down.log"
    fi
    [[ -n "$wheel_server_pid" ]] && kill "$wheel_server_pid" 2>/dev/null && wait "$wheel_server_pid" 2>/dev/null
    if [[ -n "$dockerd_pid" ]]; then
        kill "$dockerd_pid" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$dockerd_pid" 2>/dev/null
        # A daemon that died hard can leave its overlay and netns mounts behind: take them down too.
        grep -o "$cache/[^ ]*\|$work/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
    fi
    left="$(grep -c "$work\|$cache/data" /proc/mounts || true)"
    [[ "$left" == "0" ]] || log "warning: $left mounts left under $work or $cache"
    rm -rf "$work"
    log "exit $code"
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log "work dir $work"

install_packages() {  # Debian packages, when missing (needs root)
    log "installing $* (Debian packages)"
    # A fresh machine may have no package lists yet: refresh them only when the install needs it.
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" \
        || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; }; } \
        >"$work/apt.log" 2>&1 || { tail -20 "$work/apt.log"; fail "could not install $* (root and apt are needed)"; }
}

# ---- engine --------------------------------------------------------------------------------------------------
export DOCKER_CONFIG="${DOCKER_CONFIG:-$venv/docker-config}"  # the Compose v2 plugin that ./dev installs
if docker info >/dev/null 2>&1; then
    log "using the running Docker engine"
else
    command -v dockerd >/dev/null || install_packages docker.io
    mkdir -p "$cache/data"
    dockerd --data-root "$cache/data" --exec-root "$work/exec" --pidfile "$work/dockerd.pid" \
        -H "unix://$work/docker.sock" --containerd-namespace dfkd-smoke --containerd-plugins-namespace dfkd-smoke-p \
        --bridge=none --iptables=false --ip6tables=false --ip-masq=false --userland-proxy=false \
        >"$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
    export DOCKER_HOST="unix://$work/docker.sock"
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { tail -20 "$work/dockerd.log"; fail "the private dockerd did not start"; }
    log "private dockerd (pid $dockerd_pid, data root $cache/data)"
fi
docker compose version >/dev/null || fail "no Compose v2 plugin in $DOCKER_CONFIG (run ./dev test once)"

# ---- settings for this run -----------------------------------------------------------------------------------
export COMPOSE_PROJECT_NAME="$project" DOCKER_BUILDKIT=0 COMPOSE_BAKE=false  # the classic builder: no BuildKit
export DFKD_CONFIG=digits REDIS_PASSWORD="smoke$RANDOM$RANDOM" DFKD_AUTH_TOKEN=""
export REDIS_PORT="$(free_port)" SYNTH_PORT="$(free_port)" TRAINER_METRICS_PORT="$(free_port)"
export PROMETHEUS_PORT="$(free_port)" GRAFANA_PORT="$(free_port)"
export REDIS_IMAGE=dfkd-local/redis:bookworm PROMETHEUS_IMAGE=dfkd-local/prometheus:bookworm
export DFKD_BASE_IMAGE="$base_image" DFKD_PROMETHEUS_CONFIG="$work/prometheus.yml"
cat >"$DFKD_PROMETHEUS_CONFIG" <<EOF
global: {scrape_interval: 2s, evaluation_interval: 2s}
scrape_configs:
  - {job_name: synth, static_configs: [{targets: ["127.0.0.1:$SYNTH_PORT"]}]}
  - {job_name: trainer, static_configs: [{targets: ["127.0.0.1:$TRAINER_METRICS_PORT"]}]}
EOF
compose() { docker compose --env-file /dev/null -f docker-compose.yml -f docker/compose.cpu.yml "$@"; }

# Safety: nothing this run starts may sit on a bridge network or publish ports.
compose config --format json | "$venv/bin/python" -c '
import json, sys
services = json.load(sys.stdin)["services"]
bad = [name for name, s in services.items() if s.get("network_mode") != "host" or s.get("ports")]
sys.exit(f"services not on the host network: {bad}" if bad else 0)' || fail "refusing to run: see above"

# ---- images --------------------------------------------------------------------------------------------------
if ! docker image inspect "$base_image" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || install_packages debootstrap
    mirror="$(grep -hm1 -oP '^URIs:\s*\K\S+|^deb\s+\K(http\S+)(?=\s+bookworm\s)' \
        /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -1 || true)"
    log "building $base_image: debootstrap from ${mirror:-deb.debian.org}"
    debootstrap --variant=minbase --include=ca-certificates bookworm "$work/rootfs" \
        "${mirror:-http://deb.debian.org/debian}" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log"; fail "debootstrap failed"; }
    # This machine's CA bundle (it may sit behind a TLS-intercepting proxy): a property of the build machine,
    # so it goes into this local base, never into docker/Dockerfile.
    cp /etc/ssl/certs/ca-certificates.crt "$work/rootfs/usr/local/share/host-ca.crt"
    tar -C "$work/rootfs" -c . | docker import \
        -c 'ENV PIP_CERT=/usr/local/share/host-ca.crt SSL_CERT_FILE=/usr/local/share/host-ca.crt REQUESTS_CA_BUNDLE=/usr/local/share/host-ca.crt' \
        - "$base_image" >/dev/null
    rm -rf "$work/rootfs"
fi
for service in redis prometheus; do
    package=$([[ $service == redis ]] && echo redis-server || echo prometheus)
    entry=$([[ $service == redis ]] && echo '' || echo 'ENTRYPOINT ["/usr/bin/prometheus"]')
    if ! docker image inspect "dfkd-local/$service:bookworm" >/dev/null 2>&1; then
        log "building dfkd-local/$service:bookworm from Debian's $package"
        printf 'FROM %s\nRUN apt-get update -q && apt-get install -y -q --no-install-recommends %s && rm -rf /var/lib/apt/lists/*\n%s\n' \
            "$base_image" "$package" "$entry" | docker build -q --network host -t "dfkd-local/$service:bookworm" - >/dev/null
    fi
done

log "filling the wheelhouse docker/wheels from this machine's pip configuration"
mkdir -p docker/wheels
"$venv/bin/python" -m pip download -q -r docker/requirements.txt -d docker/wheels >"$work/wheels.log" 2>&1 \
    || { tail -20 "$work/wheels.log"; fail "pip download failed"; }
# Pins behind an environment marker that is false here (this Python) may be true in the image's: fetch them too.
marked="$(grep -oP '^[A-Za-z0-9._-]+==\S+(?=\s*;)' docker/requirements.txt || true)"
if [[ -n "$marked" ]]; then
    # shellcheck disable=SC2086  # one argument per pin
    "$venv/bin/python" -m pip download -q --no-deps -d docker/wheels $marked >>"$work/wheels.log" 2>&1 \
        || { tail -20 "$work/wheels.log"; fail "pip download failed"; }
fi
# A fixed port when it is free: the wheelhouse URL is a build argument, so a new one would rebuild the pip layers.
wheel_port="${DFKD_WHEELHOUSE_PORT:-38641}"
if ! "$venv/bin/python" -c "import socket, sys; socket.socket().bind(('127.0.0.1', int(sys.argv[1])))" "$wheel_port" \
        2>/dev/null; then
    wheel_port="$(free_port)"
    log "port ${DFKD_WHEELHOUSE_PORT:-38641} is taken: serving the wheelhouse on $wheel_port (the pip layers rebuild)"
fi
"$venv/bin/python" -m http.server --bind 127.0.0.1 --directory docker/wheels "$wheel_port" >/dev/null 2>&1 &
wheel_server_pid=$!
export DFKD_WHEELHOUSE="http://127.0.0.1:$wheel_port/"

log "building dfkd-synth and dfkd-trainer"
build_started=$SECONDS
compose build synth trainer >"$work/build.log" 2>&1 || { tail -40 "$work/build.log"; fail "image build failed"; }
log "images built in $((SECONDS - build_started))s"
docker image ls --format '  {{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'dfkd' || true

# ---- the run -------------------------------------------------------------------------------------------------
compose_ready=1
up_started=$SECONDS
compose up -d redis teacher synth trainer prometheus >"$work/up.log" 2>&1 || { cat "$work/up.log"; fail "up failed"; }
log "up (grafana is not started in the smoke run)"

healthy() { [[ "$(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q "$1")" 2>/dev/null)" == healthy ]]; }
wait_until() {  # wait_until SECONDS WHAT COMMAND...
    local limit=$1 what=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@"; do
        ((SECONDS < deadline)) || { compose logs --tail 40 >"$work/logs.txt" 2>&1; cat "$work/logs.txt"; fail "$what"; }
        sleep 2
    done
}
for service in redis synth trainer; do
    wait_until 600 "$service did not become healthy" healthy "$service"
done
log "healthy: redis, synth, trainer ($((SECONDS - up_started))s after up)"

query() {  # query PROMQL -> the first value, or nothing
    curl -sf "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/query" --data-urlencode "query=$1" \
        | "$venv/bin/python" -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'
}
rate_above_zero() { local v; v="$(query 'sum(rate(dfkd_synth_images_generated_total[1m]))')"; [[ -n "$v" ]] && awk "BEGIN{exit !($v > 0)}"; }
wait_until 300 "Prometheus never saw synthetic images being generated" rate_above_zero
log "prometheus: sum(rate(dfkd_synth_images_generated_total[1m])) = $(query 'sum(rate(dfkd_synth_images_generated_total[1m]))') images/s"

curl -sf -X POST "http://127.0.0.1:$SYNTH_PORT/v1/images" -H 'content-type: application/json' \
    -d '{"class_ids": [3], "per_class": 4, "format": "png"}' -o "$work/class3.png" || fail "POST /v1/images failed"
[[ "$(head -c 8 "$work/class3.png" | od -An -tx1 | tr -d ' \n')" == 89504e470d0a1a0a ]] || fail "not a PNG"
log "PNG of class 3: $(stat -c %s "$work/class3.png") bytes, $("$venv/bin/python" -c "from PIL import Image; print(Image.open('$work/class3.png').size)")"

trainer_step() { curl -sf "http://127.0.0.1:$TRAINER_METRICS_PORT/metrics" | awk '/^dfkd_trainer_steps_total /{print int($2)}'; }
past_first_checkpoint() { local s; s="$(trainer_step)"; [[ -n "$s" ]] && ((s >= 320)); }
wait_until 900 "the trainer did not reach step 320" past_first_checkpoint
stored() { docker run --rm --network none -v "${project}_store:/store:ro" --entrypoint sh dfkd-trainer:latest \
    -c 'cat /store/index.jsonl 2>/dev/null' | "$venv/bin/python" -c 'import json, sys; print(" ".join(json.loads(l)["batch_id"] for l in sys.stdin))'; }
compose stop trainer >/dev/null 2>&1
saved="$(compose logs trainer 2>/dev/null | grep -oP 'interrupted at step \K[0-9]+' | tail -1)"
[[ -n "$saved" ]] || { compose logs --tail 20 trainer; fail "the trainer did not checkpoint on SIGTERM"; }
before="$(stored)"
log "trainer stopped (SIGTERM) at step $saved with $(wc -w <<<"$before") batches stored"
compose up -d trainer >/dev/null 2>&1
resumed() { compose logs trainer 2>/dev/null | grep -q "at step $saved, stage"; }
wait_until 300 "the trainer did not resume from step $saved" resumed
log "trainer resumed: $(compose logs trainer 2>/dev/null | grep -o "resumed from .*" | tail -1)"

finished() { [[ "$(docker inspect -f '{{.State.Status}}' "$(compose ps -aq trainer)")" == exited ]]; }
wait_until 1500 "the trainer did not finish" finished
summary="$(compose logs --no-log-prefix trainer 2>/dev/null | grep '^{' | tail -1)"
top1="$("$venv/bin/python" -c 'import json, sys; print(json.loads(sys.argv[1])["eval_top1"])' "$summary")"
after="$(stored)"
"$venv/bin/python" - "$before" "$after" <<'EOF' || fail "the store lost or duplicated batches across the restart"
import sys
before, after = sys.argv[1].split(), sys.argv[2].split()
assert len(after) == len(set(after)), "a batch stored twice"
assert set(before) <= set(after), f"lost across the restart: {sorted(set(before) - set(after))}"
print(f"store: {len(before)} batches before the restart, {len(after)} after, none twice, none lost")
EOF
log "trainer finished: held-out top-1 $top1 (first up to the end: $((SECONDS - up_started))s)"
awk "BEGIN{exit !($top1 >= 0.80)}" || fail "top-1 $top1 < 0.80"
log "PASSED in $((SECONDS - started))s"
