"""`dfkd teacher half`: an fp16 copy of a trained teacher that loads like any card, with its fingerprint and its
accuracies measured again on the rounded weights; it never replaces the input teacher, and refuses data whose
validation images are not the ones the card was scored on."""
import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dfkd.cli import main
from shared.config import DataConfig, TeacherRecipe
from shared.data.digits import load_digits_split
from shared.data.splits import split_digest
from shared.errors import DfkdError
from shared.teacher import TeacherCard, load_teacher
from test_cifar10_formats import write_batches, write_image_folder
from trainer.teacher_half import write_half_teacher
from trainer.teacher_train import train_teacher

REPO = Path(__file__).resolve().parents[1]


def test_half_copy_loads_and_keeps_its_accuracy(digits_teacher, teacher_dir, tmp_path):
    res = subprocess.run([sys.executable, "-m", "dfkd", "teacher", "half", str(teacher_dir / "digits_cnn.json"),
                          "--out", str(tmp_path), "--name", "digits_half", "--device", "cpu"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    half = load_teacher(tmp_path / "digits_half.json")  # checks the fingerprint against the fp16 file
    full = digits_teacher.card
    assert half.card.fingerprint != full.fingerprint and half.card.recipe["weights_dtype"] == "float16"
    weights = (tmp_path / "digits_half.safetensors").stat().st_size
    assert weights < 0.6 * (teacher_dir / "digits_cnn.safetensors").stat().st_size
    m = half.card.metrics
    assert m["fp32_test_top1"] == full.metrics["test_top1"] and abs(m["test_top1"] - m["fp32_test_top1"]) <= 0.01
    assert abs(m["val_top1"] - full.metrics["val_top1"]) <= 0.01
    assert json.loads((tmp_path / "digits_half.json").read_text())["weights"] == "digits_half.safetensors"
    bad = subprocess.run([sys.executable, "-m", "dfkd", "teacher", "half", str(tmp_path / "missing.json"),
                          "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "missing.json" in bad.stderr and "Traceback" not in bad.stderr


def copy_teacher(teacher_dir: Path, to: Path, **card_changes) -> Path:
    """The session's fp32 digits teacher in a folder of its own, its card optionally changed."""
    to.mkdir(parents=True)
    shutil.copy(teacher_dir / "digits_cnn.safetensors", to / "digits_cnn.safetensors")
    card = json.loads((teacher_dir / "digits_cnn.json").read_text()) | card_changes
    (to / "digits_cnn.json").write_text(json.dumps(card))
    return to / "digits_cnn.json"


def half(*args: str) -> tuple[int, str]:
    """`dfkd teacher half ARGS` in this process: exit code and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["teacher", "half", *args])
    return code, err.getvalue()


def test_the_card_records_the_validation_digest(digits_teacher, digits_settings):
    x_val, y_val = load_digits_split(digits_settings.data.digits_size).images("val")
    assert digits_teacher.card.recipe["val_sha256"] == split_digest(x_val, y_val)


def test_an_output_onto_the_input_teacher_is_refused(digits_teacher, teacher_dir, tmp_path):
    card = copy_teacher(teacher_dir, tmp_path / "t")
    before = {p.name: p.read_bytes() for p in card.parent.iterdir()}
    (tmp_path / "link").symlink_to(card.parent)
    for out in (card.parent, tmp_path / "link"):  # the same folder, however it is spelled
        code, err = half(str(card), "--out", str(out), "--device", "cpu")
        assert code == 2 and "input teacher's own file" in err and "--name" in err, err
    assert {p.name: p.read_bytes() for p in card.parent.iterdir()} == before  # nothing written
    assert half(str(card), "--out", str(card.parent), "--name", "digits_half", "--device", "cpu")[0] == 0
    assert load_teacher(card.parent / "digits_half.json").card.recipe["weights_dtype"] == "float16"
    assert load_teacher(card).card.fingerprint == digits_teacher.card.fingerprint


def test_a_copy_of_an_fp16_card_keeps_its_fp32_figures(digits_teacher, teacher_dir, tmp_path):
    first = write_half_teacher(teacher_dir / "digits_cnn.json", DataConfig(), tmp_path / "a", name="h")
    full = digits_teacher.card.metrics
    assert load_teacher(first).card.metrics["fp32_val_top1"] == full["val_top1"]
    # On digits fp16 rounding rarely moves a prediction, so mark the fp32 figures to tell them from fp16 ones.
    card = json.loads(first.read_text())
    card["metrics"] |= {"fp32_val_top1": 0.25, "fp32_test_top1": 0.5}
    first.write_text(json.dumps(card))
    second = write_half_teacher(first, DataConfig(), tmp_path / "b", name="h")
    m1, m2 = card["metrics"], load_teacher(second).card.metrics
    assert (m2["fp32_val_top1"], m2["fp32_test_top1"]) == (0.25, 0.5)
    assert m2["val_top1"] == m1["val_top1"] and m2["test_top1"] == m1["test_top1"]  # fp16 again: the same weights


def test_a_card_without_a_recipe_gets_a_clear_error(teacher_dir, tmp_path):
    card = copy_teacher(teacher_dir, tmp_path / "t", recipe={})
    code, err = half(str(card), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert code == 2 and "no training recipe" in err and "invalid configuration" not in err, err
    card = copy_teacher(teacher_dir, tmp_path / "u", recipe={"dataset": "imagenet"})
    code, err = half(str(card), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert code == 2 and "not one `dfkd teacher train` writes" in err and "invalid configuration" not in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a missing CUDA device")
def test_the_device_option_is_honoured(teacher_dir, tmp_path):
    code, err = half(str(teacher_dir / "digits_cnn.json"), "--out", str(tmp_path), "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err, err
    assert not any(tmp_path.iterdir())


def test_other_validation_images_are_refused(teacher_dir, tmp_path):
    card = copy_teacher(teacher_dir, tmp_path / "t")
    recipe = json.loads(card.read_text())["recipe"]
    copy_teacher(teacher_dir, tmp_path / "u", recipe=recipe | {"val_sha256": "0" * 64})
    code, err = half(str(tmp_path / "u" / "digits_cnn.json"), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert code == 2 and "not the ones this teacher was scored on" in err, err
    assert not (tmp_path / "out").exists()
    del recipe["val_sha256"]  # a card from before the digest: not checked
    copy_teacher(teacher_dir, tmp_path / "v", recipe=recipe)
    assert half(str(tmp_path / "v" / "digits_cnn.json"), "--out", str(tmp_path / "out"), "--device", "cpu")[0] == 0


def test_cifar10_validation_images_are_checked_across_layouts(tmp_path):
    """A teacher trained from torchvision's batches: an ImageFolder of the same images in the same order scores it
    again; one whose file names order each class differently holds other validation images and is refused."""
    rng = np.random.default_rng(0)
    pixels = {"train": (rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), np.repeat(np.arange(10), 4)),
              "test": (rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), np.arange(10))}
    batches = write_batches(tmp_path / "batches" / "cifar-10-batches-py", pixels)
    recipe = TeacherRecipe(dataset="cifar10", arch="resnet8", epochs=1, batch_size=16)
    _, card = train_teacher(recipe, DataConfig(cifar10_dir=batches), tmp_path / "teacher", name="r8",
                            log=lambda m: None)
    assert "val_sha256" in TeacherCard.read(card).recipe

    same = write_image_folder(tmp_path / "same", pixels)
    out = write_half_teacher(card, DataConfig(cifar10_dir=same), tmp_path / "half", name="r8_half")
    assert load_teacher(out).card.metrics["val_images"] == 10

    reordered = write_image_folder(tmp_path / "reordered", pixels)
    for folder in (reordered / "train").iterdir():  # the same files, named in the opposite order
        files = sorted(folder.iterdir())
        for f in files:
            f.rename(f.with_name("x" + f.name))
        for f, name in zip(sorted(folder.iterdir()), reversed([f.name for f in files])):
            f.rename(f.with_name(name))
    with pytest.raises(DfkdError, match="not the ones this teacher was scored on"):
        write_half_teacher(card, DataConfig(cifar10_dir=reordered), tmp_path / "half2", name="r8_half")
    assert not (tmp_path / "half2").exists()
