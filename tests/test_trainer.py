"""DearKDTrainer and `dfkd train`: stage switch, no teacher in stage 2, checkpoints, SIGKILL resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.config import DearKDConfig, StudentConfig, TrainConfig
from shared.models import create_model
from shared.wire import SynthesisRecord, WireBatch
from trainer.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from trainer.engine import DearKDTrainer
from trainer.store import SyntheticStore

TINY = StudentConfig(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2,
                     mlp_ratio=1.0, mhca_blocks=1)
REPO = Path(__file__).resolve().parents[1]


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


def test_stage_switch_and_the_teacher_is_never_called_in_stage_2(digits_teacher):
    train = TrainConfig(steps=10, warmup_steps=1)
    trainer = DearKDTrainer(TINY, DearKDConfig(stage1_fraction=0.6, feature_pairs=[(1, 1), (2, 2)]), train,
                            digits_teacher.model)
    assert trainer.teacher_calls == 0
    stages, calls = [], []
    for x, y in batches(10):
        terms = trainer.train_step(x, y)
        stages.append(terms["stage"])
        calls.append(trainer.teacher_calls)
    assert stages == [1] * 6 + [2] * 4
    assert calls == [1, 2, 3, 4, 5, 6, 6, 6, 6, 6]


def test_stage1_losses_include_the_aligned_features(digits_teacher):
    trainer = DearKDTrainer(TINY, DearKDConfig(beta=1.0, feature_pairs=[(1, 1), (2, 2)]), TrainConfig(steps=4),
                            digits_teacher.model)
    x, y = next(batches(1))
    terms = trainer.train_step(x, y)
    assert terms["stage"] == 1 and float(terms["feature"]) > 0 and float(terms["kd"]) > 0
    assert set(dict(trainer.aligners.named_children())) == {"s1_b1", "s2_b2"}
    no_features = DearKDTrainer(TINY, DearKDConfig(beta=0.0), TrainConfig(steps=4), digits_teacher.model)
    assert float(no_features.train_step(x, y)["feature"]) == 0 and len(no_features.aligners) == 0


def test_data_free_stage1_needs_a_teacher():
    with pytest.raises(ValueError, match="teacher"):
        DearKDTrainer(TINY, DearKDConfig(), TrainConfig(steps=4), None)
    DearKDTrainer(TINY, DearKDConfig(stage1_fraction=0.0), TrainConfig(steps=4), None)  # stage 2 only is fine


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(digits_teacher, tmp_path):
    cfg = DearKDConfig(feature_pairs=[(1, 1)])
    a = DearKDTrainer(TINY, cfg, TrainConfig(steps=8), digits_teacher.model)
    data = list(batches(6))
    for x, y in data[:3]:
        a.train_step(x, y)
    save_checkpoint(tmp_path, a.model, a.optimizer, {"step": a.step})
    expected_rng = torch.rand(3)
    b = DearKDTrainer(TINY, cfg, TrainConfig(steps=8), digits_teacher.model)
    state = load_checkpoint(find_checkpoint(tmp_path), b.model, b.optimizer)
    assert torch.equal(torch.rand(3), expected_rng)  # the RNG stream continues where it was saved
    b.step = state["step"]
    for (pa, pb) in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    torch.manual_seed(1)
    la = [float(a.train_step(x, y)["loss"]) for x, y in data[3:]]
    torch.manual_seed(1)
    lb = [float(b.train_step(x, y)["loss"]) for x, y in data[3:]]
    assert la == pytest.approx(lb, rel=1e-5)


def fill_store(store_dir: Path, card, n_batches: int = 6) -> None:
    store = SyntheticStore(store_dir)
    rng = np.random.default_rng(0)
    for i in range(n_batches):
        store.put(WireBatch(batch_id=f"b{i}", sequence=i, producer_id="test", teacher_fingerprint=card.fingerprint,
                            mean=card.mean, std=card.std, labels=rng.integers(0, 10, 32).tolist(),
                            images=rng.integers(0, 256, (32, 1, 16, 16), dtype=np.uint8),
                            synthesis=SynthesisRecord(seed=i)))


def test_sigkill_resumes_at_the_same_stage_and_step(digits_teacher, teacher_dir, tmp_path):
    fill_store(tmp_path / "store", digits_teacher.card)
    env = os.environ | {
        "DFKD_STUDENT__PATCH_SIZE": "4", "DFKD_STUDENT__EMBED_DIM": "32", "DFKD_STUDENT__DEPTH": "2",
        "DFKD_STUDENT__NUM_HEADS": "2", "DFKD_STUDENT__MHCA_BLOCKS": "1", "DFKD_TRAIN__BATCH_SIZE": "16",
        "DFKD_TRAIN__CHECKPOINT_EVERY": "5", "DFKD_TRAIN__LOG_EVERY": "5", "DFKD_TRAIN__EVAL_EVERY": "1000",
        "DFKD_DEARKD__STAGE1_FRACTION": "0.5"}
    cmd = [sys.executable, "-m", "dfkd", "train", "--config", "digits", "--teacher",
           str(teacher_dir / "digits_cnn.json"), "--steps", "400", "--out", str(tmp_path / "run"),
           "--store", str(tmp_path / "store"), "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300  # generous: a loaded 2-core machine took over 120 s
    state_file = tmp_path / "run" / "checkpoint" / "state.json"
    while not (state_file.is_file() and json.loads(state_file.read_text())["step"] >= 220):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint past the stage switch in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = json.loads(state_file.read_text())
    assert saved["stage"] == 2 and saved["step"] % 5 == 0

    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resumed from {state_file.parent} at step {saved['step']}, stage 2" in res.stdout
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["step"] == 400 and summary["eval_top1"] is not None
    assert not list((tmp_path / "run").glob("*.tmp"))


def grad_norm(trainer: DearKDTrainer) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()
                                                       if p.grad is not None])))


@pytest.mark.parametrize("clip", [None, 0.01, 5.0])
def test_gradient_clipping_follows_the_config(clip):
    assert TrainConfig().clip_grad_norm == 5.0

    def one_step(clip_grad_norm: float | None) -> DearKDTrainer:
        torch.manual_seed(0)
        teacher = create_model("digits_cnn", num_classes=10, in_chans=1)  # any teacher gives gradients to clip
        trainer = DearKDTrainer(TINY, DearKDConfig(feature_pairs=[(1, 1)]),
                                TrainConfig(steps=4, clip_grad_norm=clip_grad_norm), teacher)
        torch.manual_seed(1)
        trainer.train_step(*next(batches(1)))  # the gradients stay on the parameters until the next step
        return trainer

    raw = grad_norm(one_step(None))
    assert raw > 0.01
    assert grad_norm(one_step(clip)) == pytest.approx(raw if clip is None else min(raw, clip), rel=1e-4)
