"""`dfkd up`, the README's main command, end to end: a fresh teacher, the three real processes, a real Prometheus
scraping them, images over HTTP, the printed held-out accuracy, and a SIGTERM that leaves no process behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from dfkd.redis_server import free_loopback_port

ROOT = Path(__file__).resolve().parents[1]


class UpProcess:
    """`dfkd up` as a user runs it, with its output collected line by line."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.run_dir = tmp / "run"
        env = {**os.environ, "DFKD_RUNS_DIR": str(tmp / "runs"), **(env or {})}
        self.process = subprocess.Popen([sys.executable, "-m", "dfkd.cli", "up", "--run-dir", str(self.run_dir),
                                         *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.process.poll() is not None:
                self._reader.join(timeout=5)
                break
            time.sleep(0.2)
        raise AssertionError(f"no line with {text!r} within {timeout_s:.0f}s; output:\n{self.output()[-4000:]}")

    def stack(self) -> dict:
        return json.loads((self.run_dir / "stack.json").read_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def sigterm_and_check_nothing_remains(up: UpProcess) -> int:
    children = descendants(up.process.pid)
    running = {p for p in up.stack()["pids"].values() if alive(p)}  # the trainer is gone once training ended
    assert running and running <= children, f"the stack's services {running} are not children of up ({children})"
    up.process.send_signal(signal.SIGTERM)
    code = up.process.wait(timeout=60)
    deadline = time.monotonic() + 5
    while any(alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in children if alive(p)]
    assert not left, f"processes left after SIGTERM to up: {left}\n{up.output()[-3000:]}"
    return code


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README demo (the digits preset, every default) on a machine with no teacher yet; kept serving."""
    tmp = tmp_path_factory.mktemp("up")
    up = UpProcess(tmp, "--keep-serving", env={"DFKD_TEACHER": str(tmp / "teachers" / "digits_cnn.json")})
    up.started = time.monotonic()
    up.wait_for("trainer: up in", timeout_s=180)
    yield up
    up.stop()


def test_up_trains_the_missing_teacher_and_starts_every_service(demo):
    out = demo.output()
    assert "training digits_cnn on digits (first run only)" in out
    assert (demo.run_dir.parent / "teachers" / "digits_cnn.json").is_file()
    assert "redis: " in out and "synth: ready" in out
    stack = demo.stack()
    assert set(stack["pids"]) == {"synth", "trainer", "redis"}
    assert httpx.get(f"{stack['synth_url']}/readyz").json()["redis"] == "ok"
    # Logs are prefixed by service.
    assert any(line.startswith("trainer | ") for line in demo.lines)
    assert any(line.startswith("  synth | ") for line in demo.lines)


def test_prometheus_scrapes_the_generation_rate(demo, tmp_path):
    binary = shutil.which("prometheus", path=f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: `./dev test` installs Debian's prometheus package")
        pytest.skip("prometheus not installed (Debian: apt-get install prometheus)")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: dfkd\n"
        f"    file_sd_configs: [{{files: ['{demo.run_dir / 'targets.json'}'], refresh_interval: 1s}}]\n")
    port = free_loopback_port()
    prometheus = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    api = f"http://127.0.0.1:{port}/api/v1/query"

    def query(expr: str) -> list[dict]:
        try:
            reply = httpx.get(api, params={"query": expr}, timeout=5)
        except httpx.TransportError:
            return []
        return reply.json()["data"]["result"] if reply.status_code == 200 else []

    try:
        deadline, rate, up = time.monotonic() + 150, [], []
        while time.monotonic() < deadline:
            assert prometheus.poll() is None, prometheus.stderr.read().decode()[-2000:]
            rate = query("sum(rate(dfkd_synth_images_generated_total[1m]))")
            up = query("up")
            if rate and float(rate[0]["value"][1]) > 0 and len(up) == 2:
                break
            time.sleep(1)
        assert rate and float(rate[0]["value"][1]) > 0, f"rate: {rate}; targets up: {up}\n{demo.output()[-2000:]}"
        assert sorted(float(u["value"][1]) for u in up) == [1.0, 1.0], up  # the trainer is scraped too
        assert query("dfkd_trainer_steps_total"), "the trainer's metrics did not reach Prometheus"
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)


def test_up_serves_images_of_a_class_over_http(demo):
    reply = httpx.post(f"{demo.stack()['synth_url']}/v1/images",
                       json={"class_ids": [3], "per_class": 2, "format": "png"}, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "image/png"
    assert reply.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_up_demo_prints_a_heldout_accuracy_of_at_least_80_percent(demo):
    line = demo.wait_for("student held-out top-1:", timeout_s=300)
    seconds = time.monotonic() - demo.started
    top1 = float(line.split("top-1:")[1].split()[0])
    print(f"\n{line}\n(demo wall time {seconds:.0f}s, teacher trained on the way)")
    assert top1 >= 0.80, demo.output()[-3000:]
    summary = json.loads((demo.run_dir / "summary.json").read_text())
    assert summary["images_generated"] > 0 and summary["images_per_second"] > 0
    assert summary["heldout_images"] == 450
    assert Path(summary["student"]).is_file()
    assert summary["store_batches"] > 0
    assert "images generated:" in demo.output() and "store:" in demo.output()


def test_sigterm_to_up_stops_every_process(demo):
    demo.wait_for("keeps serving", timeout_s=60)
    code = sigterm_and_check_nothing_remains(demo)
    assert code == 130, demo.output()[-2000:]


def test_sigterm_while_training_on_an_external_redis_checkpoints_and_leaves_nothing(
        tmp_path, digits_teacher, teacher_dir, redis_server, redis_client):
    # REDIS_URL set: up uses that server (the demo fixture covers the embedded one) and must leave it running.
    up = UpProcess(tmp_path, "--steps", "100000", env={"DFKD_TEACHER": str(teacher_dir / "digits_cnn.json"),
                                                       "REDIS_URL": redis_server.url})
    try:
        up.wait_for("trainer: up in", timeout_s=180)
        up.wait_for("stage 1 loss", timeout_s=120)  # training on streamed batches
        code = sigterm_and_check_nothing_remains(up)
    finally:
        up.stop()
    assert code == 130
    out = up.output()
    assert f"redis: {redis_server.url} (external)" in out
    assert "checkpoint saved" in out, out[-3000:]
    assert (up.run_dir / "checkpoints" / "checkpoint" / "model.safetensors").is_file()
    assert "Traceback" not in out, out[-3000:]
    # The batches went through this server: the run's consumer group saw them.
    [group] = redis_client.xinfo_groups(f"dfkd:{up.run_dir.name}:batches")
    assert group["last-delivered-id"] != b"0-0"
    assert redis_server.running and redis_client.ping()  # an external Redis is left alone


def test_up_with_an_unreachable_redis_url_fails_clearly(tmp_path, digits_teacher, teacher_dir):
    up = UpProcess(tmp_path, env={"DFKD_TEACHER": str(teacher_dir / "digits_cnn.json"),
                                  "REDIS_URL": f"redis://127.0.0.1:{free_loopback_port()}/0"})
    code = up.process.wait(timeout=120)
    up.stop()
    assert code == 2
    assert "does not answer" in up.output() and "Traceback" not in up.output()
