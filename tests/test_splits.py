"""Every dataset has train, validation and test splits: disjoint, stratified, the same on every call, and the
teacher never trains on the validation images."""
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.data.cifar10 import load_cifar10_images, load_cifar10_split
from shared.data.digits import load_digits_split
from shared.data.splits import split_digest, stratified_limit, train_val_indices
from trainer.imagefolder_export import export_digits


CIFAR_ROOT = Path(__file__).resolve().parents[2] / "shared/data/cifar10"


@pytest.fixture
def cifar10_root() -> Path:
    if not all((CIFAR_ROOT / name).is_file() for name in ("train_jpeg.npz", "test.npz")):
        pytest.skip(f"CIFAR-10 copy not found at {CIFAR_ROOT}")
    return CIFAR_ROOT


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.flatten(1)}


def test_digits_splits_are_disjoint_stratified_and_fixed():
    split = load_digits_split(8)  # 8x8: the original pixels, so equal images mean the same sample
    assert (len(split.y_train), len(split.y_val), len(split.y_test)) == (1146, 201, 450)
    assert split.x_train.shape[1:] == split.x_val.shape[1:] == (1, 8, 8)
    counts = torch.bincount(split.y_val, minlength=10)
    assert counts.min() >= 19 and counts.max() <= 21  # 15 % of each class's ~135 training images
    again = load_digits_split(8)
    assert torch.equal(split.x_val, again.x_val) and torch.equal(split.y_train, again.y_train)
    assert len(split.y_train) + len(split.y_val) + len(split.y_test) == 1797  # each sample in exactly one split
    x_val, y_val = split.images("val")
    assert x_val is split.x_val and y_val is split.y_val
    with pytest.raises(ValueError, match="'train', 'val' or 'test'"):
        split.images("holdout")


def test_train_val_indices_partition_every_class():
    labels = np.repeat(np.arange(5), [10, 20, 1, 7, 40])
    train, val = train_val_indices(labels, 0.1)
    assert np.intersect1d(train, val).size == 0 and np.union1d(train, val).tolist() == list(range(len(labels)))
    assert [int((labels[val] == c).sum()) for c in range(5)] == [1, 2, 1, 1, 4]  # at least one of each class


def test_a_limit_keeps_the_same_share_of_each_class():
    labels = np.repeat(np.arange(3), [6, 3, 1])  # class-sorted, as an ImageFolder lists its images
    assert stratified_limit(labels, 5).tolist() == [0, 1, 2, 6, 7]  # 3.0, 1.5, 0.5: the tie goes to class 1
    shuffled = np.array([2, 0, 1, 0, 0, 1, 0, 1, 0, 0])
    assert shuffled[stratified_limit(shuffled, 5)].tolist() == [0, 1, 0, 0, 1]  # each class's first images
    assert stratified_limit(labels, None).tolist() == stratified_limit(labels, 99).tolist() == list(range(10))
    with pytest.raises(ValueError, match="limit must be >= 1"):
        stratified_limit(labels, 0)


def test_the_split_digest_is_of_the_images_and_their_order():
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    assert split_digest(x, y) == split_digest(x.clone(), y.clone())
    assert split_digest(x[[1, 0, 2, 3]], y[[1, 0, 2, 3]]) != split_digest(x, y)
    assert split_digest(x, torch.tensor([0, 1, 1, 1])) != split_digest(x, y)


def test_teacher_trains_without_the_validation_images(digits_teacher):
    m = digits_teacher.card.metrics
    assert m["train_images"] == 1146 and m["val_images"] == 201 and m["test_images"] == 450
    assert 0.9 <= m["val_top1"] <= 1.0
    assert digits_teacher.card.recipe["split"] == "train-val-test/1"


def test_digits_export_of_the_validation_split(tmp_path):
    counts = export_digits(tmp_path / "val", 16, "val")
    assert sum(counts.values()) == 201
    with pytest.raises(ValueError, match="'train', 'val' or 'test'"):
        export_digits(tmp_path / "x", 16, "holdout")


def test_cifar10_validation_is_carved_off_the_training_images(cifar10_root):
    split = load_cifar10_split(cifar10_root, train_limit=300, test_limit=10)
    assert len(split.y_train) + len(split.y_val) == 300 and 25 <= len(split.y_val) <= 35
    assert not rows(split.x_train) & rows(split.x_val)
    x_val, y_val = load_cifar10_images(cifar10_root, "val")
    assert len(y_val) == 5000 and torch.bincount(y_val).tolist() == [500] * 10
    x_test, y_test = load_cifar10_images(cifar10_root, "test")
    assert len(y_test) == 10000 and x_test.shape[1:] == (3, 32, 32)
