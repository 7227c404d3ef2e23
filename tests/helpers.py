"""Small helpers for tests (imported as `helpers`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from shared.stream import StreamProducer
from shared.teacher import TeacherCard
from live_server import free_port
from shared.wire import SynthesisRecord, WireBatch


def accuracy(model: torch.nn.Module, card: TeacherCard, images_uint8: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 of `model` (normalised with `card`'s mean/std) on uint8 images."""
    mean = torch.tensor(card.mean).view(1, -1, 1, 1)
    std = torch.tensor(card.std).view(1, -1, 1, 1)
    with torch.no_grad():
        pred = model.eval()((images_uint8.float() / 255 - mean) / std).argmax(1)
    return float((pred == labels).float().mean())


def publish(producer: StreamProducer, card, start: int, count: int) -> list[str]:
    """`count` random 16-image batches with ids batch-{start}..., as a synth replica would publish them."""
    rng = np.random.default_rng(start)
    ids = []
    for i in range(start, start + count):
        ids.append(f"batch-{i}")
        producer.publish(WireBatch(
            batch_id=ids[-1], sequence=i, producer_id="test", teacher_fingerprint=card.fingerprint,
            mean=card.mean, std=card.std, labels=rng.integers(0, 10, 16).tolist(),
            images=rng.integers(0, 256, (16, 1, 16, 16), dtype=np.uint8),
            logits=rng.standard_normal((1, 1, 16, 10)).astype(np.float16), synthesis=SynthesisRecord(seed=i)))
    return ids


def metric_values(text: str) -> dict[str, float]:
    """Sample name (with sorted labels) -> value, from the Prometheus text format."""
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return values


@contextmanager
def dfkd_serve(card_path: Path, cwd: Path, headers: dict[str, str] | None = None,
               **env_settings: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`dfkd serve --config digits` in its own process, as a user starts it, until it answers /readyz."""
    port = free_port()
    env = os.environ | {"DFKD_SERVICE__ACCESS_LOG": "false"} | env_settings
    log = Path(cwd) / f"serve-{port}.log"  # a file, not a pipe: a pipe nobody reads would block a chatty service
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dfkd", "serve", "--config", "digits", "--teacher",
                                 str(card_path), "--port", str(port), "--device", "cpu"], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/readyz", headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "dfkd serve did not become ready"
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
