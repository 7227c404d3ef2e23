"""Every preset starts `dfkd train` against a teacher of the shape it is meant for: the student takes its input
size, channels and classes from the teacher card, and a config that contradicts the teacher is refused at once."""
from __future__ import annotations

import numpy as np
import pytest

from shared.batch_contract import BatchContract
from shared.config import PRESETS, Settings
from shared.teacher import teacher_from_arch
from shared.wire import SynthesisRecord, WireBatch
from trainer.training import run_training
from trainer.store import SyntheticStore

# The teacher each preset is written for: architecture, classes, channels, input size.
PRESET_TEACHERS = {"digits": ("digits_cnn", 10, 1, 16), "cifar10": ("wrn_40_2", 10, 3, 32),
                   "imagenet": ("resnet50", 1000, 3, 224)}


def test_every_preset_has_a_teacher_here():
    assert set(PRESET_TEACHERS) == set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_trains_a_student_for_its_teacher(preset, tmp_path):
    arch, classes, channels, size = PRESET_TEACHERS[preset]
    teacher = teacher_from_arch(arch, num_classes=classes, in_chans=channels, image_size=size)
    card = teacher.card
    settings = Settings.load(preset, device="cpu", train={
        "steps": 2, "batch_size": 4, "out_dir": tmp_path / "run", "store_dir": tmp_path / "store",
        "checkpoint_every": 1, "eval_every": 100, "log_every": 1})
    rng = np.random.default_rng(0)
    SyntheticStore(tmp_path / "store", BatchContract.from_stream(settings.stream, card)).put(WireBatch(
        batch_id="b-0", sequence=0, producer_id="test", teacher_fingerprint=card.fingerprint, mean=card.mean,
        std=card.std, labels=rng.integers(0, classes, 4).tolist(),
        images=rng.integers(0, 256, (4, channels, size, size), dtype=np.uint8),
        logits=rng.standard_normal((1, 1, 4, classes)).astype(np.float16), synthesis=SynthesisRecord(seed=0)))
    summary = run_training(settings, teacher, log=lambda message: None)
    assert summary["step"] == 2 and (tmp_path / "run" / "student.safetensors").is_file()


def test_a_student_that_contradicts_the_teacher_is_refused_before_anything_starts(tmp_path):
    teacher = teacher_from_arch("wrn_40_2", num_classes=10, in_chans=3, image_size=32)
    settings = Settings.load("cifar10", device="cpu", student={"in_chans": 1},
                             train={"out_dir": tmp_path / "run", "store_dir": tmp_path / "store"})
    with pytest.raises(ValueError, match="student.in_chans is 1 but the teacher 'wrn_40_2' has 3"):
        run_training(settings, teacher, log=lambda message: None)
    assert not (tmp_path / "store").exists()
