"""The teachers shipped in `teachers/` load (fingerprint checked), describe themselves, and score what their cards
say on the real test split when the data is at hand."""
from pathlib import Path

import pytest
import torch

from shared.data.cifar10 import load_cifar10_images
from shared.teacher import load_teacher
from trainer.teacher_train import evaluate

REPO = Path(__file__).resolve().parents[1]
CIFAR_COPY = REPO.parent / "shared" / "data" / "cifar10"  # optional, beside the repo

pytestmark = pytest.mark.usefixtures("all_cores")  # inference on the test split, in this process alone


def scored_top1(teacher, limit: int | None = None) -> float:
    """The teacher's top-1 on the CIFAR-10 test split beside the repo (skips without it)."""
    if not (CIFAR_COPY / "test.npz").is_file():
        pytest.skip(f"no CIFAR-10 copy at {CIFAR_COPY} to score the card against")
    x, y = load_cifar10_images(CIFAR_COPY, "test", limit)
    card = teacher.card
    mean, std = torch.tensor(card.mean).view(1, -1, 1, 1), torch.tensor(card.std).view(1, -1, 1, 1)
    return evaluate(teacher.model, x, y, mean, std)


def test_the_cifar10_resnet20_teacher_loads_and_scores_its_card():
    teacher = load_teacher(REPO / "teachers" / "cifar10_resnet20.json")
    card = teacher.card
    assert (card.arch, card.num_classes, card.in_chans, card.image_size) == ("resnet20", 10, 3, 32)
    assert card.recipe["weights_dtype"] == "float16" and card.recipe["dataset"] == "cifar10"
    assert card.metrics["test_top1"] >= 0.88 and card.metrics["train_seconds"] <= 3600
    assert (REPO / "teachers" / card.weights).stat().st_size < 700_000
    assert scored_top1(teacher) == pytest.approx(card.metrics["test_top1"], abs=0.002)


def test_the_cifar10_rednet_teacher_loads_and_scores_its_card():
    """The involution ensemble member of the LIB-KD bench: trained on the training split only, so its card has a
    validation figure too."""
    teacher = load_teacher(REPO / "teachers" / "cifar10_rednet_cifar.json")
    card = teacher.card
    assert (card.arch, card.num_classes, card.in_chans, card.image_size) == ("rednet_cifar", 10, 3, 32)
    assert card.recipe["weights_dtype"] == "float16" and card.recipe["refit"] is False
    assert card.metrics["val_top1"] >= 0.75 and card.metrics["test_top1"] >= 0.75
    # 2,000 test images (a fifth of the cost; the fingerprint already pins the weights): a standard error near 0.9
    # points, so 3 points of tolerance.
    assert scored_top1(teacher, 2000) == pytest.approx(card.metrics["test_top1"], abs=0.03)


def test_the_cifar10_vit_teacher_loads_and_scores_its_card():
    """The ViT teacher of the CIFAR-10 ScaleKD bench (LayerNorm, so it teaches but cannot invert)."""
    teacher = load_teacher(REPO / "teachers" / "cifar10_vit_nano_patch4_32.json")
    card = teacher.card
    assert (card.arch, card.num_classes, card.in_chans, card.image_size) == ("vit_nano_patch4_32", 10, 3, 32)
    assert card.recipe["weights_dtype"] == "float16" and card.recipe["refit"] is False
    assert card.metrics["val_top1"] >= 0.75 and card.metrics["test_top1"] >= 0.75
    assert (REPO / "teachers" / card.weights).stat().st_size < 1_500_000
    assert scored_top1(teacher, 2000) == pytest.approx(card.metrics["test_top1"], abs=0.03)  # as for the RedNet
