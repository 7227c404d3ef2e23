"""Small helpers for tests (imported as `helpers`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import numpy as np
import torch

from shared.stream import StreamProducer
from shared.teacher import TeacherCard
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
            logits=rng.standard_normal((16, 10)).astype(np.float16), synthesis=SynthesisRecord(seed=i)))
    return ids
