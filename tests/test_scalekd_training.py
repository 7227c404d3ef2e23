"""`train.recipe: scalekd` through `dfkd train`'s loop: a ViT teacher trained by the real teacher path, real digits
read by DALI, checkpoints that resume, and what the recipe does not take refused before anything runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import Settings, TeacherRecipe
from shared.data.digits import load_digits_split
from shared.data.splits import unit_to_uint8
from shared.ensemble import Ensemble
from shared.models import create_model
from shared.teacher import load_teacher
from shared.weights import load_weights
from shared.wire import SynthesisRecord, WireBatch
from trainer.imagefolder_export import export_digits
from trainer.store import SyntheticStore
from trainer.teacher_train import train_teacher
from trainer.training import run_training

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vit_card(digits_settings, tmp_path_factory) -> Path:
    """A digits ViT teacher from `dfkd teacher train`'s code path, two epochs: the plumbing, not its quality."""
    recipe = TeacherRecipe(dataset="digits", arch="vit_nano_patch2_16", epochs=2)
    _, card = train_teacher(recipe, digits_settings.data, tmp_path_factory.mktemp("vit"), log=lambda m: None)
    return card


def scalekd_settings(base, tmp_path: Path, vit_card: Path, steps: int, **scalekd):
    train = base.train.model_copy(update={"recipe": "scalekd", "steps": steps, "batch_size": 32, "warmup_steps": 2,
                                          "real_dir": tmp_path / "real", "real_fraction": 1.0, "checkpoint_every": 10,
                                          "eval_every": 1000, "log_every": 10, "out_dir": tmp_path / "run",
                                          "store_dir": tmp_path / "store"})
    return base.model_copy(update={"train": train, "scalekd": base.scalekd.model_copy(
        update={"teacher": vit_card, "student": "mixer_nano_patch2_16"} | scalekd)})


def test_scalekd_trains_a_mixer_from_a_vit_teacher_on_real_digits_and_resumes(digits_teacher, digits_settings,
                                                                              vit_card, tmp_path):
    export_digits(tmp_path / "real", digits_settings.data.digits_size, "train")
    split = load_digits_split(digits_settings.data.digits_size)
    logs: list[str] = []
    summary = run_training(scalekd_settings(digits_settings, tmp_path, vit_card, 20), digits_teacher,
                           eval_set=(split.x_test, split.y_test), log=logs.append)
    assert summary["step"] == 20 and summary["real_seen"] == 20 * 32 and summary["synthetic_seen"] == 0
    assert summary["teacher_calls"] == 20 and 0 <= summary["eval_top1"] <= 1
    assert summary["ensemble"] == [load_teacher(vit_card).card.name]  # the teacher distilled, not the CNN
    assert any("ScaleKD: mixer_nano_patch2_16 from the ViT teacher" in m for m in logs)
    assert any("spatial_tpp" in m and "frequency_final" in m for m in logs)  # every term is logged
    student = create_model("mixer_nano_patch2_16", num_classes=10, in_chans=1)
    load_weights(student, tmp_path / "run" / "student.safetensors")

    logs.clear()
    again = run_training(scalekd_settings(digits_settings, tmp_path, vit_card, 30), digits_teacher, log=logs.append)
    assert again["step"] == 30 and again["teacher_calls"] == 10  # resumed at step 20, ten more steps
    assert any("resumed from" in m and "at step 20" in m for m in logs)


def test_what_the_scalekd_recipe_does_not_take_is_refused(digits_teacher, digits_settings, vit_card, tmp_path):
    settings = scalekd_settings(digits_settings, tmp_path, vit_card, 5)
    with pytest.raises(ValueError, match="`ensemble` is for the DearKD recipe"):
        run_training(settings.model_copy(update={"ensemble": [vit_card]}), digits_teacher, log=lambda m: None)
    stored = settings.model_copy(update={"train": settings.train.model_copy(update={"teacher_logits": "stored"})})
    with pytest.raises(ValueError, match="teacher_logits: stored is for the DearKD recipe"):
        run_training(stored, digits_teacher, log=lambda m: None)
    # The synthesising CNN as the ScaleKD teacher: not a ViT.
    with pytest.raises(ValueError, match="must be a timm VisionTransformer"):
        run_training(scalekd_settings(digits_settings, tmp_path, None, 5), digits_teacher, log=lambda m: None)


def test_the_scalekd_ablation_bench_prints_every_row(vit_card):
    res = subprocess.run([sys.executable, "bench/scalekd_ablation.py", "--teacher", str(vit_card), "--students",
                          "resnet8,mixer_nano_patch2_16", "--rows", "kd,scalekd,no_tpp", "--seeds", "1", "--steps", "2",
                          "--batch", "8"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["bench"] == "scalekd_ablation" and out["data"] == "real" and out["images"] < 1146  # a 20 % share
    assert set(out["results"]) == {f"{s}/{r}" for s in ("resnet8", "mixer_nano_patch2_16")
                                   for r in ("kd", "scalekd", "no_tpp")}
    for row in out["results"].values():
        assert 0 <= row["mean_val_top1"] <= 1 and row["runs"][0]["images_per_s"] > 0
    bad = subprocess.run([sys.executable, "bench/scalekd_ablation.py", "--rows", "nope"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown row or student ['nope']" in bad.stderr


CIFAR_ROOT = REPO.parent / "shared/data/cifar10"
SCALEKD_CIFAR = [sys.executable, "bench/scalekd_ablation.py", "--dataset", "cifar10"]


def test_the_scalekd_ablation_bench_on_cifar10_says_what_it_needs(tmp_path):
    no_data = {k: v for k, v in os.environ.items() if not k.startswith("DFKD_")}
    res = subprocess.run(SCALEKD_CIFAR, cwd=REPO, capture_output=True, text=True, timeout=120, env=no_data)
    assert res.returncode != 0 and "DFKD_DATA__CIFAR10_DIR" in res.stderr and "Traceback" not in res.stderr
    missing = tmp_path / "vit.json"
    res = subprocess.run(SCALEKD_CIFAR + ["--teacher", str(missing)], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=no_data)
    assert res.returncode != 0 and f"cannot load the teacher {str(missing)!r}" in res.stderr
    wrong = subprocess.run(SCALEKD_CIFAR + ["--teacher", "any", "--students", "mixer_nano_patch2_16"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "mixer_nano_patch4_32" in wrong.stderr  # the digits Mixer is refused by name


@pytest.mark.slow  # CIFAR-10 reads and a teacher trained: the plumbing, in a minute
def test_the_scalekd_ablation_bench_runs_on_cifar10(tmp_path):
    root = CIFAR_ROOT
    if not (root / "train_jpeg.npz").is_file():
        pytest.skip(f"CIFAR-10 copy not found at {root}")
    env = {**os.environ, "DFKD_DATA__CIFAR10_DIR": str(root)}
    bench = SCALEKD_CIFAR
    recipe = TeacherRecipe(dataset="cifar10", arch="vit_nano_patch4_32", epochs=1, train_limit=400, test_limit=200)
    _, card = train_teacher(recipe, Settings.load("cifar10", data={"cifar10_dir": root}).data, tmp_path,
                            log=lambda m: None)
    res = subprocess.run(bench + ["--teacher", str(card), "--rows", "kd,scalekd", "--seeds", "1", "--steps", "2",
                                  "--batch", "8", "--limit", "400"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["dataset"] == "cifar10" and out["teacher"]["arch"] == "vit_nano_patch4_32"
    assert set(out["results"]) == {f"{s}/{r}" for s in ("resnet8", "mixer_nano_patch4_32") for r in ("kd", "scalekd")}
    assert out["images"] < 400  # a 20 % share of the training images left after validation


def test_trainer_throughput_times_scalekd_against_plain_kd(digits_teacher, teacher_dir, vit_card):
    res = subprocess.run([sys.executable, "bench/trainer_throughput.py", "--teacher",
                          str(teacher_dir / "digits_cnn.json"), "--steps", "2", "--warmup", "1", "--batch", "8",
                          "--device", "cpu", "--scalekd-teacher", str(vit_card), "--scalekd-students", "resnet8"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])["scalekd"]
    assert out["teacher"] == "vit_nano_patch2_16"
    rates = out["resnet8"]
    assert rates["scalekd"] > 0 and rates["plain_kd"] > 0 and rates["scalekd_over_plain_kd"] > 0


def test_scalekd_teaches_on_the_cnn_teachers_synthetic_batches(digits_teacher, digits_settings, vit_card, tmp_path):
    """The data-free case: batches the CNN teacher synthesised (here, stored as the stream consumer stores them), no
    real images; the ViT teacher relabels and teaches on them, and the run resumes from the same store."""
    card = digits_teacher.card
    pixels = unit_to_uint8(load_digits_split(16).x_val[:48])
    store = SyntheticStore(tmp_path / "store")
    labels = Ensemble([digits_teacher]).logits(pixels, ("identity",))[0, 0].argmax(1)  # the CNN's own labels
    for i in range(2):
        store.put(WireBatch(batch_id=f"b-{i}", sequence=i, producer_id="p", teacher_fingerprint=card.fingerprint,
                            mean=tuple(card.mean), std=tuple(card.std), labels=labels.roll(i, 0).tolist(),
                            images=pixels.roll(i, 0).numpy(), synthesis=SynthesisRecord(seed=i)))
    settings = scalekd_settings(digits_settings, tmp_path, vit_card, 4)
    settings = settings.model_copy(update={"train": settings.train.model_copy(
        update={"real_dir": None, "real_fraction": 0.0, "checkpoint_every": 2})})
    first = run_training(settings.model_copy(update={"train": settings.train.model_copy(update={"steps": 2})}),
                         digits_teacher, log=lambda m: None)
    assert first["step"] == 2 and first["synthetic_seen"] == 2 * 32 and first["real_seen"] == 0
    assert first["teacher_calls"] == 2 and first["ensemble"] == [load_teacher(vit_card).card.name]
    again = run_training(settings, digits_teacher, log=lambda m: None)
    assert again["step"] == 4 and again["teacher_calls"] == 2 and again["real_seen"] == 0
