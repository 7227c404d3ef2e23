"""The `dfkd` CLI as a user runs it: a real subprocess, real files, clear errors with exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.models import create_model
from shared.weights import save_weights

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"


def dfkd(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfkd", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=None if env is None else os.environ | env)


@pytest.fixture(scope="module")
def card_path(digits_teacher, teacher_dir) -> Path:
    return teacher_dir / "digits_cnn.json"


def test_synth_writes_grid_npz_and_report(card_path, tmp_path):
    out = tmp_path / "run"
    res = dfkd("synth", "--config", "digits", "--teacher", str(card_path), "--classes", "0,3,7",
               "--per-class", "4", "--iterations", "8", "--logits", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["images"] == 12 and summary["out"] == str(out)
    assert "synth" in res.stderr  # the progress bar

    grid = Image.open(out / "grid.png")
    grid.load()
    assert grid.size == (4 * 50 + 2, 3 * 50 + 2)  # a row per class, 4 tiles of 16 px x3 + 2 px gaps
    data = np.load(out / "images.npz")
    assert data["images"].shape == (12, 1, 16, 16) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [0] * 4 + [3] * 4 + [7] * 4
    assert data["teacher_logits"].shape == (12, 10)
    report = json.loads((out / "report.json").read_text())
    assert set(report["per_class"]) == {"0", "3", "7"}
    for stats in report["per_class"].values():
        assert {"teacher_top1", "teacher_confidence", "intra_class_diversity"} <= set(stats)
    assert report["bn_distance_first"] > 0 and report["images_per_second"] > 0
    assert {"ce", "bn", "diversity", "boundary"} <= set(report["final_terms"])
    assert report["teacher"]["fingerprint"] == json.loads(card_path.read_text())["fingerprint"]


@pytest.mark.parametrize("args,message", [
    (["--classes", "0,12"], "unknown class id(s) [12]"),
    (["--classes", "two"], "--classes must be 'all' or comma-separated"),
    (["--per-class", "0"], "per-class count must be >= 1"),
    (["--iterations", "0"], "iterations must be >= 1"),
])
def test_synth_bad_requests(card_path, tmp_path, args, message):
    res = dfkd("synth", "--config", "digits", "--teacher", str(card_path), "--out", str(tmp_path / "o"), *args,
               cwd=tmp_path)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_synth_bad_teachers(tmp_path):
    res = dfkd("synth", "--teacher", "resnet_9000", cwd=tmp_path)
    assert res.returncode == 2 and "unknown model 'resnet_9000'" in res.stderr
    res = dfkd("synth", "--teacher", "resnet18", "--weights", str(tmp_path / "gone.safetensors"), cwd=tmp_path)
    assert res.returncode == 2 and "weights file not found" in res.stderr
    save_weights(create_model("wrn_16_2", num_classes=10), tmp_path / "wrn.safetensors")
    res = dfkd("synth", "--teacher", "resnet18", "--weights", str(tmp_path / "wrn.safetensors"), cwd=tmp_path)
    assert res.returncode == 2 and "do not fit ResNet" in res.stderr
    res = dfkd("synth", "--teacher", str(tmp_path / "card.json"), cwd=tmp_path)
    assert res.returncode == 2 and "teacher card not found" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.skipif(not (CIFAR / "train_jpeg.npz").is_file(), reason="CIFAR-10 copy not beside the repo")
def test_cifar10_teacher_training_smoke(tmp_path):
    res = dfkd("teacher", "train", "--dataset", "cifar10", "--arch", "wrn_16_2", "--epochs", "1",
               "--train-limit", "256", "--test-limit", "256", "--out", str(tmp_path), "--name", "wrn",
               "--device", "cpu", cwd=REPO, env={"DFKD_DATA__CIFAR10_DIR": str(CIFAR)})
    assert res.returncode == 0, res.stderr
    card = json.loads((tmp_path / "wrn.json").read_text())
    assert card["image_size"] == 32 and card["in_chans"] == 3 and card["class_names"][0] == "airplane"
    assert 0.0 <= card["metrics"]["test_top1"] <= 1.0 and card["metrics"]["test_images"] == 256
    assert (tmp_path / "wrn.safetensors").is_file()


def test_serve_runs_the_service(card_path, tmp_path):
    import time

    import httpx

    from live_server import free_port

    port = free_port()
    env = os.environ | {"DFKD_SERVICE__AUTH_TOKEN": "t0ken", "DFKD_SYNTH__ITERATIONS": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "dfkd", "serve", "--config", "digits", "--teacher", str(card_path),
                             "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/readyz", headers={"Authorization": "Bearer t0ken"}, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "dfkd serve did not become ready"
            time.sleep(0.3)
        assert httpx.get(f"{url}/v1/classes").status_code == 401  # the env var turned auth on
        assert httpx.get(f"{url}/readyz").status_code == 401
        res = httpx.post(f"{url}/v1/images", json={"class_ids": [2], "per_class": 2},
                         headers={"Authorization": "Bearer t0ken"}, timeout=60)
        assert res.status_code == 200 and res.headers["x-labels"] == "2,2"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode in (0, -15)


def test_serve_without_a_teacher_is_a_clear_error(tmp_path):
    res = dfkd("serve", "--port", "0", cwd=tmp_path)
    assert res.returncode == 2 and "no teacher" in res.stderr


def test_export_commands_write_imagefolders(tmp_path):
    res = dfkd("export", "digits", "--split", "test", "--fraction", "0.5", "--out", str(tmp_path / "digits"),
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    folders = sorted(p.name for p in (tmp_path / "digits").iterdir())
    assert folders == [str(i) for i in range(10)]
    pngs = list((tmp_path / "digits").rglob("*.png"))
    assert 200 <= len(pngs) <= 250  # half of the 450 held-out digits, per class
    Image.open(pngs[0]).load()
    if (CIFAR / "train_jpeg.npz").is_file():
        res = dfkd("export", "cifar10", "--split", "test", "--fraction", "0.01", "--source", str(CIFAR),
                   "--out", str(tmp_path / "cifar"), cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert len(list((tmp_path / "cifar").rglob("*.png"))) == 100
    res = dfkd("export", "digits", "--split", "test", "--out", str(tmp_path / "digits"), cwd=tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr  # refuses to mix old and new exports
