"""The warm per-class pool and the class-balanced filler, without a server: dealing, byte cap, disk round-trip."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch

from shared.config import PoolConfig
from shared.errors import DfkdError
from synth_service.batcher import request_noise
from synth_service.class_pool import ENTRY_OVERHEAD, ClassPool
from synth_service.filler import capped_deficit_labels, filler_labels
from synth_service.result import SynthResult


def batch(labels: list[int], card, seed: int = 0, verifier: bool = True) -> SynthResult:
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    shape = (n, card.in_chans, card.image_size, card.image_size)
    y = torch.tensor(labels)
    return SynthResult(images=torch.randint(0, 256, shape, generator=g, dtype=torch.uint8), labels=y,
                       teacher_top1=y.clone(), teacher_confidence=torch.rand(n, generator=g),
                       teacher_margin=torch.rand(n, generator=g) * 5, features=torch.zeros(n, 4), final_terms={},
                       history={}, seconds=1.0, iterations=10, seed=seed,
                       verifier_top1=y.clone() if verifier else None)


def test_filler_evens_out_the_batch_in_pairs():
    labels = [3] * 4 + filler_labels([3] * 4, 36, 10)
    counts = Counter(labels)
    assert len(labels) == 40 and set(counts) == set(range(10))
    assert max(counts.values()) - min(counts.values()) <= 2 and counts[3] == 4
    # pairs: every class but the last dealt holds an even count
    assert sum(v % 2 for v in Counter(filler_labels([3] * 4, 36, 10)).values()) == 0
    assert filler_labels([1, 2], 0, 10) == [] and filler_labels([1, 2], -3, 10) == []
    # many classes: successive batches start where the last left off, so every class is covered
    seen = set()
    cursor = 0
    for _ in range(10):
        dealt = filler_labels([], 64, 320, cursor)
        seen |= set(dealt)
        cursor = (cursor + len(dealt) // 2) % 320
    assert seen == set(range(320))


def test_refill_labels_stay_balanced_and_capped():
    everyone_short = capped_deficit_labels({c: 20 for c in range(10)}, 40, 10)
    assert Counter(everyone_short) == {c: 4 for c in range(10)}
    one_short = capped_deficit_labels({3: 16}, 40, 10)
    assert one_short == [3] * 8  # twice a balanced share; filler completes the batch
    assert capped_deficit_labels({3: 1, 5: 7}, 40, 10) == [5, 5, 3, 5, 5, 5, 5, 5]
    assert capped_deficit_labels({}, 40, 10) == []


def test_request_noise_depends_only_on_seed_class_and_rank():
    shape = (1, 4, 4)
    alone = request_noise([3, 3], 7, shape)
    mixed = request_noise([0, 3, 1, 3], 7, shape)
    assert torch.equal(alone[0], mixed[1]) and torch.equal(alone[1], mixed[3])
    assert not torch.equal(alone[0], alone[1]) and not torch.equal(alone, request_noise([3, 3], 8, shape))


def test_memory_pool_serves_each_image_once_oldest_first(digits_teacher):
    card = digits_teacher.card
    pool = ClassPool(PoolConfig(enabled=True, per_class=4), card)
    assert pool.deficit() == {c: 4 for c in range(10)} and pool.take([0]) is None
    first, second = batch([0, 0, 1, 1, 2], card, seed=1), batch([0, 0, 0, 1], card, seed=2)
    assert pool.put(first) == 5 and pool.put(second) == 4
    assert pool.status()["images_per_class"][:3] == [4, 3, 1]  # class 0: 5 offered, the oldest evicted
    draw = pool.take([1, 0, 0, 1])
    assert draw.result.labels.tolist() == [1, 0, 0, 1]
    # oldest first: class 0's survivors are first[1], second[0..2]; class 1's are first[2], first[3], second[3]
    assert torch.equal(draw.result.images[1], first.images[1]) and torch.equal(draw.result.images[2], second.images[0])
    assert torch.equal(draw.result.images[0], first.images[2]) and torch.equal(draw.result.images[3], first.images[3])
    assert draw.result.teacher_margin[0] == pytest.approx(float(first.teacher_margin[2]))
    assert draw.result.verifier_top1.tolist() == [1, 0, 0, 1] and (draw.age_s >= 0).all()
    assert pool.take([2, 2]) is None and pool.status()["images_per_class"][2] == 1  # cold takes nothing
    left = pool.take([0, 0, 1])
    assert left is not None and pool.status()["images_per_class"][:2] == [0, 0]
    assert pool.status()["bytes"] == ENTRY_OVERHEAD + int(np.prod(first.images.shape[1:]))


def test_byte_cap_holds_and_bad_sizes_are_refused(digits_teacher):
    card = digits_teacher.card
    per_image = card.in_chans * card.image_size ** 2 + ENTRY_OVERHEAD
    pool = ClassPool(PoolConfig(enabled=True, max_bytes=10 * 3 * per_image + 9), card)
    assert pool.target == 3
    for seed in range(20):
        pool.put(batch(list(range(10)) * 2, card, seed=seed))
        assert pool.status()["bytes"] <= pool.cfg.max_bytes
    assert pool.status()["images_per_class"] == [3] * 10
    with pytest.raises(DfkdError, match="less than one image per class"):
        ClassPool(PoolConfig(enabled=True, max_bytes=1024), card)
    with pytest.raises(DfkdError, match="over service.pool.max_bytes"):
        ClassPool(PoolConfig(enabled=True, max_bytes=10 * 3 * per_image, per_class=4), card)


def test_disk_pool_survives_a_restart_and_quarantines_a_bad_file(digits_teacher, verifier_card, tmp_path):
    card = digits_teacher.card
    cfg = PoolConfig(enabled=True, per_class=3, directory=tmp_path / "pool")
    pool = ClassPool(cfg, card)
    pool.put(batch([4, 4, 5], card, seed=3))
    with pytest.raises(DfkdError, match="in use by another service"):
        ClassPool(cfg, card)
    before = pool.status()
    pool.close()
    files = sorted((tmp_path / "pool" / "4").glob("*.npz"))
    assert len(files) == 2 and before["bytes"] == sum(f.stat().st_size for f in
                                                      (tmp_path / "pool").glob("*/*.npz"))
    (tmp_path / "pool" / "5" / "00000000000000000001-00000000.npz").write_bytes(b"not an npz")
    (tmp_path / "pool" / "5" / f".x.npz.{os.getpid()}.tmp").write_bytes(b"torn")

    reopened = ClassPool(cfg, card)
    assert reopened.status()["images_per_class"] == before["images_per_class"]
    assert (tmp_path / "pool" / "quarantine" / "5-00000000000000000001-00000000.npz").exists()
    assert not list((tmp_path / "pool" / "5").glob(".*.tmp"))
    draw = reopened.take([4, 5])
    assert draw.result.labels.tolist() == [4, 5] and not list((tmp_path / "pool" / "5").glob("*.npz"))
    assert draw.age_s.min() > 0
    reopened.close()

    from shared.teacher import load_teacher
    other = load_teacher(verifier_card).card  # same classes and size, another teacher
    with pytest.raises(DfkdError, match="another teacher"):
        ClassPool(cfg, other)


def test_refill_reservations_are_released_on_delivery_and_on_failure(digits_teacher):
    card = digits_teacher.card
    pool = ClassPool(PoolConfig(enabled=True, per_class=4), card)
    source = pool.refill_source()
    assert source.active()
    dealt = source.next_labels(40)
    assert Counter(dealt) == {c: 4 for c in range(10)}
    assert pool.deficit() == {} and not source.active()  # in flight: not dealt again
    source.release(dealt[:20])  # that batch failed
    assert sum(pool.deficit().values()) == 20 and source.active()
    source.deliver(batch(dealt[20:], card))
    assert sum(pool.deficit().values()) == 20 and pool.status()["images"] == 20
