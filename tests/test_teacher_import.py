"""`dfkd teacher import`: local weights (safetensors or a weights-only .pt) become a card a service can load."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from shared.models import create_model
from shared.teacher import load_teacher
from shared.weights import fingerprint, save_weights

REPO = Path(__file__).resolve().parents[1]


def dfkd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfkd", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_import_local_safetensors_writes_a_loadable_card(tmp_path):
    model = create_model("digits_cnn", num_classes=10, in_chans=1)
    save_weights(model, tmp_path / "mine.safetensors")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"digit {i}" for i in range(10)) + "\n")
    run = dfkd("teacher", "import", "digits_cnn", "--weights", str(tmp_path / "mine.safetensors"), "--out",
               str(tmp_path / "teachers"), "--name", "teacher", "--num-classes", "10", "--in-chans", "1",
               "--image-size", "16", "--class-names", str(names))
    assert run.returncode == 0, run.stderr
    card = json.loads((tmp_path / "teachers" / "teacher.json").read_text())
    assert card["arch"] == "digits_cnn" and card["image_size"] == 16 and card["class_names"][3] == "digit 3"
    assert card["fingerprint"] == fingerprint(model.state_dict())
    teacher = load_teacher(tmp_path / "teachers" / "teacher.json")  # checks the fingerprint against the file
    assert teacher.card.num_classes == 10


def test_import_weights_only_pt_state_dict(tmp_path):
    model = create_model("resnet18_cifar", num_classes=10)
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    run = dfkd("teacher", "import", "resnet18_cifar", "--weights", str(tmp_path / "r18.pt"), "--out",
               str(tmp_path), "--num-classes", "10", "--image-size", "32")
    assert run.returncode == 0, run.stderr
    assert load_teacher(tmp_path / "resnet18_cifar.json").card.image_size == 32


def test_import_rejects_weights_of_another_architecture(tmp_path):
    save_weights(create_model("digits_cnn", num_classes=10, in_chans=1), tmp_path / "w.safetensors")
    run = dfkd("teacher", "import", "resnet18_cifar", "--weights", str(tmp_path / "w.safetensors"), "--out",
               str(tmp_path), "--num-classes", "10")
    assert run.returncode == 2
    assert "dfkd: error:" in run.stderr and not (tmp_path / "resnet18_cifar.json").exists()


def test_import_needs_exactly_one_source(tmp_path):
    run = dfkd("teacher", "import", "resnet50", "--out", str(tmp_path))
    assert run.returncode == 2 and "--weights" in run.stderr


def test_pretrained_without_network_fails_clearly(tmp_path):
    run = dfkd("teacher", "import", "resnet18", "--pretrained", "--out", str(tmp_path),
               env={"HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2
    assert "could not fetch timm's pretrained weights for 'resnet18'" in run.stderr
    assert "--weights" in run.stderr and not any(tmp_path.iterdir())


def test_import_local_weights_takes_the_timm_pretrained_cfg(tmp_path):
    from shared.teacher_import import import_teacher

    save_weights(create_model("tf_efficientnet_lite0", num_classes=10), tmp_path / "w.safetensors")
    card_path = import_teacher("tf_efficientnet_lite0", tmp_path / "out", "lite", weights=tmp_path / "w.safetensors",
                               num_classes=10)
    card = load_teacher(card_path).card
    assert (card.mean, card.std, card.image_size, card.interpolation) == ((0.5,) * 3, (0.5,) * 3, 224, "bicubic")
    card_path = import_teacher("tf_efficientnet_lite0", tmp_path / "out", "lite96", weights=tmp_path / "w.safetensors",
                               num_classes=10, image_size=96)
    assert load_teacher(card_path).card.image_size == 96
