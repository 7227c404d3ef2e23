"""`dfkd train` on a real Redis stream: every batch stored exactly once across a SIGKILL, dead letters, metrics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from shared.config import StreamConfig
from shared.stream import StreamProducer
from live_server import free_port

from helpers import publish


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_trainer_on_the_stream_survives_sigkill_and_dead_letters(digits_teacher, teacher_dir, redis_server,
                                                                 redis_client, tmp_path):
    card = digits_teacher.card
    stream = StreamConfig(redis_url=redis_server.url, run="trainer-it", max_backlog=1000, chunk_bytes=3000)
    producer = StreamProducer(redis_client, stream, "test")
    producer.ensure_group()
    published = publish(producer, card, 0, 10)
    # A corrupted entry in the middle of the stream: an unknown schema version.
    redis_client.xadd(producer.stream_key, {b"header": b'{"version": 99}', b"payload": b"\x00" * 16})
    published += publish(producer, card, 10, 10)

    metrics_port = free_port()
    env = os.environ | {
        "DFKD_STREAM__REDIS_URL": redis_server.url, "DFKD_STREAM__RUN": "trainer-it",
        "DFKD_STUDENT__EMBED_DIM": "32", "DFKD_STUDENT__DEPTH": "2", "DFKD_STUDENT__NUM_HEADS": "2",
        "DFKD_STUDENT__MHCA_BLOCKS": "1", "DFKD_TRAIN__BATCH_SIZE": "16", "DFKD_TRAIN__CHECKPOINT_EVERY": "5",
        "DFKD_TRAIN__EVAL_EVERY": "1000", "DFKD_TRAIN__LOG_EVERY": "10"}
    cmd = [sys.executable, "-m", "dfkd", "train", "--config", "digits", "--teacher",
           str(teacher_dir / "digits_cnn.json"), "--steps", "500", "--out", str(tmp_path / "run"),
           "--store", str(tmp_path / "store"), "--device", "cpu", "--metrics-port", str(metrics_port)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state_file = tmp_path / "run" / "checkpoint" / "state.json"
    wait_for(lambda: state_file.is_file() and json.loads(state_file.read_text())["step"] >= 20, "a checkpoint", proc)

    samples = {s.name: s.value for f in text_string_to_metric_families(
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text) for s in f.samples}
    assert samples["dfkd_trainer_steps_total"] >= 20 and samples["dfkd_trainer_stage"] == 1
    assert samples["dfkd_trainer_dead_lettered_total"] == 1

    proc.send_signal(signal.SIGKILL)
    proc.wait()
    published += publish(producer, card, 20, 20)  # more arrive while the trainer is down
    saved = json.loads(state_file.read_text())

    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"at step {saved['step']}, stage {saved['stage']}" in res.stdout
    assert json.loads(res.stdout.strip().splitlines()[-1])["step"] == 500

    stored = [json.loads(line)["batch_id"] for line in (tmp_path / "store" / "index.jsonl").read_text().splitlines()]
    assert sorted(stored) == sorted(published)  # every batch, exactly once
    assert len(list((tmp_path / "store" / "batches").glob("*.npz"))) == len(published)
    dead = redis_client.xrange(stream.key("dead"))
    assert len(dead) == 1 and b"version" in dead[0][1][b"reason"]
    assert redis_client.xpending(producer.stream_key, stream.group)["pending"] == 0
