"""Session fixtures: real digits teachers trained once per test run (seconds on 2 cores)."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from shared.config import Settings, TeacherRecipe
from shared.teacher import Teacher, load_teacher
from trainer.teacher_train import train_teacher

pytest_plugins = ["redis_fixture"]  # real Redis fixtures: redis_server, redis_client

# One torch thread in the test process: the tensors are small, and a second thread only spins against the services
# and trainers the tests start as subprocesses, which keep their own settings.
torch.set_num_threads(1)


@contextmanager
def all_torch_threads() -> Iterator[None]:
    """Every core for work that runs in this process alone (no service or trainer subprocess beside it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def all_cores() -> Iterator[None]:
    with all_torch_threads():
        yield


@pytest.fixture(scope="session")
def digits_settings() -> Settings:
    """The shipped digits preset: what the demo runs is what the tests check."""
    return Settings.load("digits", device="cpu")


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("teachers")


@pytest.fixture(scope="session")
def digits_teacher_run(digits_settings, teacher_dir) -> tuple[Teacher, float]:
    started = time.perf_counter()
    with all_torch_threads():
        _, card_path = train_teacher(digits_settings.teacher_train, digits_settings.data, teacher_dir,
                                     name="digits_cnn", log=lambda m: None)
    return load_teacher(card_path), time.perf_counter() - started


@pytest.fixture(scope="session")
def digits_teacher(digits_teacher_run) -> Teacher:
    return digits_teacher_run[0]


@pytest.fixture(scope="session")
def digits_verifier(digits_settings, teacher_dir) -> Teacher:
    """A different architecture (5x5 convs, no BatchNorm) trained on the same real digits."""
    recipe = TeacherRecipe(dataset="digits", arch="digits_lenet")
    with all_torch_threads():
        _, card_path = train_teacher(recipe, digits_settings.data, teacher_dir, name="digits_lenet",
                                     log=lambda m: None)
    return load_teacher(card_path)


@pytest.fixture(scope="session")
def verifier_card(digits_verifier, teacher_dir) -> Path:
    """The digits verifier's card, for `synth.verifier`."""
    path = teacher_dir / "digits_lenet.json"
    assert json.loads(path.read_text())["fingerprint"] == digits_verifier.card.fingerprint
    return path


@pytest.fixture(scope="session")
def digits_synthetic_pool(digits_teacher, digits_settings):
    """500 synthetic digits (50 per class) from the shipped preset, shared by the quality tests."""
    from synth_service.engine import InversionEngine

    with all_torch_threads(), InversionEngine(digits_teacher, digits_settings.synth) as engine:
        return engine.synthesize_classes(list(range(10)), 50, seed=0, return_logits=True)
