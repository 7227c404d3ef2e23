"""DearKD ViT students on digits, CPU: data-free (synthetic images only) and partial data at 100 % through DALI."""
from __future__ import annotations

import pytest

from shared.data.digits import load_digits_split
from shared.wire import SynthesisRecord, WireBatch
from trainer.imagefolder_export import export_digits
from trainer.training import run_training
from trainer.store import SyntheticStore

pytestmark = pytest.mark.usefixtures("all_cores")  # each test trains in this process alone

def settings_with(base, tmp_path, **train):
    cfg = type(base.train).model_validate(base.train.model_dump() | {"out_dir": tmp_path / "run",
                                                                      "store_dir": tmp_path / "store"} | train)
    return base.model_copy(update={"train": cfg})


def store_pool(pool, card, store_dir, batch: int = 100) -> None:
    store = SyntheticStore(store_dir)
    for i in range(0, len(pool.labels), batch):
        part = pool.select(i, i + batch)
        store.put(WireBatch(batch_id=f"pool-{i // batch}", sequence=i // batch, producer_id="test",
                            teacher_fingerprint=card.fingerprint, mean=card.mean, std=card.std,
                            labels=part.labels.tolist(), images=part.images.numpy(),
                            logits=part.logits.half().numpy()[None, None], synthesis=SynthesisRecord(seed=part.seed)))


@pytest.fixture(scope="module")
def heldout(digits_settings):
    split = load_digits_split(digits_settings.data.digits_size)
    return split.x_test, split.y_test


def test_data_free_dearkd_vit_on_synthetic_digits(digits_synthetic_pool, digits_teacher, digits_settings, heldout,
                                                  tmp_path):
    settings = settings_with(digits_settings, tmp_path)
    store_pool(digits_synthetic_pool, digits_teacher.card, tmp_path / "store")
    summary = run_training(settings, digits_teacher, eval_set=heldout, log=lambda m: None)
    print(f"data-free DearKD ViT ({len(digits_synthetic_pool.labels)} synthetic digits, {summary['step']} steps): "
          f"{summary['eval_top1']:.4f} on {len(heldout[1])} real held-out digits in {summary['seconds']:.0f}s")
    assert summary["step"] == settings.train.steps and summary["real_seen"] == 0
    assert summary["eval_top1"] >= 0.80


def test_partial_data_at_100_percent_through_dali(digits_teacher, digits_settings, heldout, tmp_path):
    export_digits(tmp_path / "real", digits_settings.data.digits_size, "train")
    settings = settings_with(digits_settings, tmp_path, real_dir=tmp_path / "real", real_fraction=1.0)
    summary = run_training(settings, digits_teacher, eval_set=heldout, log=lambda m: None)
    print(f"DearKD ViT on real digits via DALI (partial data, 100 %): {summary['eval_top1']:.4f} "
          f"in {summary['seconds']:.0f}s")
    assert summary["synthetic_seen"] == 0
    assert summary["real_seen"] == settings.train.steps * settings.train.batch_size
    assert summary["eval_top1"] >= 0.95


def test_mix_in_keeps_the_ratio_in_a_training_run(digits_synthetic_pool, digits_teacher, digits_settings, tmp_path):
    export_digits(tmp_path / "real", digits_settings.data.digits_size, "train", partial_fraction=0.2)
    settings = settings_with(digits_settings, tmp_path, real_dir=tmp_path / "real", real_fraction=0.25, steps=100,
                             batch_size=16)
    store_pool(digits_synthetic_pool, digits_teacher.card, tmp_path / "store")
    summary = run_training(settings, digits_teacher, eval_set=None, log=lambda m: None)
    share = summary["real_seen"] / (summary["real_seen"] + summary["synthetic_seen"])
    assert summary["real_seen"] + summary["synthetic_seen"] == 100 * 16
    assert abs(share - 0.25) <= 0.05
