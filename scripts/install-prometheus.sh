#!/usr/bin/env bash
# Put Prometheus (the server, and promtool) into VENV/bin for the tests that scrape a running native stack and
# check the Prometheus config and dashboard queries.
#
#   scripts/install-prometheus.sh [VENV]     # VENV defaults to .venv next to this repo
#
# Uses a prometheus already on PATH; otherwise unpacks Debian's package into a scratch folder (no root, no
# system service started). Idempotent.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(cd "${1:-$repo_root/.venv}" && pwd)"
bin="$venv/bin"

if [[ -x "$bin/prometheus" && -x "$bin/promtool" ]]; then
    exit 0
fi
if system="$(command -v prometheus)" && tool="$(command -v promtool)"; then
    ln -sfn "$system" "$bin/prometheus"
    ln -sfn "$tool" "$bin/promtool"
    exit 0
fi
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    echo "warning: no prometheus and no apt-get: the Prometheus test will be skipped" >&2
    exit 0
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cd "$scratch"
if ! apt-get download prometheus >/dev/null 2>&1; then
    # Stale or missing package lists: refresh them when we may.
    if [[ "$(id -u)" == 0 ]]; then
        apt-get update -qq >/dev/null
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo -n apt-get update -qq >/dev/null
    fi
    apt-get download prometheus >/dev/null
fi
dpkg-deb -x prometheus_*.deb root
install -m 0755 root/usr/bin/prometheus root/usr/bin/promtool "$bin/"
"$bin/prometheus" --version 2>&1 | head -1
