"""`dfkd teacher half`: an fp16 copy of a trained teacher that loads like any card, with its fingerprint and its
accuracies measured again on the rounded weights."""
import json
import subprocess
import sys
from pathlib import Path

from shared.teacher import load_teacher

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
