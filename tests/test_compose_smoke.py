"""`docker compose up` for real: scripts/compose-smoke.sh builds the images and runs the whole stack in containers.

Part of the default test run (CI runs it through .ci/run); `./dev test -m "not slow and not compose"` leaves it
out. It needs a
Docker engine that answers, or root to start a private one (the script installs Debian's docker.io when it is
missing). The first run on a machine builds the local base images and the two product images: about 7 GB and
several minutes; later runs reuse them (DFKD_SMOKE_CACHE).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "compose-smoke.sh"
VENV = Path(sys.executable).parent.parent
TIMEOUT_S = 45 * 60  # the ceiling is 30 min for a cold run; past 45 something hangs

pytestmark = pytest.mark.compose


def _engine_answers() -> bool:
    env = {**os.environ, "DOCKER_CONFIG": str(VENV / "docker-config")}
    try:
        return subprocess.run(["docker", "info"], capture_output=True, env=env, timeout=30).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def _leftovers(work_dirs: set[str]) -> list[str]:
    """Mounts and processes that a smoke run owns, by the private paths it printed."""
    left = [line for line in Path("/proc/mounts").read_text().splitlines()
            if any(d in line for d in work_dirs) or "dfkd-smoke" in line.split()[1]]
    for proc in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdline = proc.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(d in cmdline for d in work_dirs) or "--containerd-namespace dfkd-smoke" in cmdline:
            left.append(f"pid {proc.parent.name}: {cmdline.strip()}")
    return left


def test_compose_stack_runs_in_containers(tmp_path, capsys):
    if not _engine_answers() and os.geteuid() != 0:
        pytest.skip("no Docker engine answers and this is not root, so a private one cannot be started")
    log_path = tmp_path / "compose-smoke.log"
    env = {**os.environ, "DFKD_VENV": str(VENV)}
    with log_path.open("w") as log:
        smoke = subprocess.Popen(["bash", str(SCRIPT)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            code = smoke.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # SIGTERM to the whole group: the script's trap still cleans up; SIGKILL only if that hangs too.
            os.killpg(smoke.pid, signal.SIGTERM)
            try:
                smoke.wait(300)
            except subprocess.TimeoutExpired:
                os.killpg(smoke.pid, signal.SIGKILL)
                smoke.wait()
            code = None
    output = log_path.read_text(errors="replace")
    progress = [line for line in output.splitlines() if line.startswith(("[smoke", "  dfkd", "store:"))]
    with capsys.disabled():  # the timings and figures belong in the test log, pass or fail
        print("\n" + "\n".join(progress))
    work_dirs = set(re.findall(r"work dir (\S+)", output))
    assert code == 0, f"compose smoke exited {code}; the last lines:\n" + "\n".join(output.splitlines()[-60:])
    assert any(" PASSED in " in line for line in progress), progress[-3:]
    assert not _leftovers(work_dirs), _leftovers(work_dirs)
