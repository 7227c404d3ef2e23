"""The trainer's GPU path, checked on the CPU where the code allows: bf16 autocast, no per-step host reads, on-device
augmentation, fresh synthetic images never skipped under mix-in. CUDA-only checks skip without a GPU."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.config import DearKDConfig, Settings, StudentConfig, TrainConfig
from shared.models import create_model
from shared.teacher import teacher_from_arch
from shared.wire import SynthesisRecord, WireBatch
from trainer.engine import DearKDTrainer
from trainer.training import _synthetic_source, run_training
from trainer.metrics import TrainerMetrics
from trainer.mixing import SYNTHETIC, MixInSampler
from image_pool import augment_normalize
from trainer.augment import Augment
from trainer.store import FreshFirstSampler, SyntheticStore
from trainer.teacher_train import random_crop_flip

TINY = StudentConfig(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2,
                     mlp_ratio=1.0, mhca_blocks=1)
TRAINER_DIR = str(Path(__file__).resolve().parents[1] / "trainer")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("digits_cnn", num_classes=10, in_chans=1)


def one_step(precision: str, stage1_fraction: float) -> tuple[DearKDTrainer, dict, torch.Tensor]:
    torch.manual_seed(0)
    trainer = DearKDTrainer(TINY, DearKDConfig(kd="soft", temperature=4.0, stage1_fraction=stage1_fraction),
                            TrainConfig(steps=2, warmup_steps=0, precision=precision), teacher())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    torch.manual_seed(2)  # the same drop-path and dropout draws on both sides
    terms = trainer.train_step(x, y)
    trainer.student.eval()
    with torch.no_grad():
        logits = trainer.student(x)
    return trainer, terms, logits


@pytest.mark.parametrize("stage1_fraction", [1.0, 0.0])
def test_bf16_autocast_matches_fp32_on_the_cpu(stage1_fraction):
    fp32, terms32, logits32 = one_step("fp32", stage1_fraction)
    bf16, terms16, logits16 = one_step("bf16", stage1_fraction)
    assert fp32.amp_dtype is None and bf16.amp_dtype is torch.bfloat16
    assert DearKDTrainer(TINY, DearKDConfig(stage1_fraction=0.0), TrainConfig(), None).amp_dtype is None  # auto
    # bf16 keeps 8 mantissa bits: about 0.4 % per rounding, a little more through a few layers.
    for name in terms32:
        if name != "stage":
            assert float(terms16[name]) == pytest.approx(float(terms32[name]), rel=0.03, abs=0.01), name
    assert terms16["loss"].dtype == torch.float32  # losses are computed in fp32
    assert (logits16 - logits32).abs().max() < 0.05 * logits32.abs().max()
    for p32, p16 in zip(fp32.model.parameters(), bf16.model.parameters()):
        assert p16.dtype == torch.float32  # weights and optimizer state stay fp32
        assert torch.allclose(p16, p32, atol=2e-3), "one step should move the weights alike"


@cuda
def test_cuda_defaults_to_bf16_with_tf32():
    trainer = DearKDTrainer(TINY, DearKDConfig(kd="soft"), TrainConfig(steps=2), teacher(), device="cuda")
    assert trainer.amp_dtype is torch.bfloat16
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    terms = trainer.train_step(torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,)))
    assert terms["loss"].device.type == "cuda" and torch.isfinite(terms["loss"])


def fill_store(root: Path, fingerprint: str, mean=(0.0,), std=(1 / 255,), batches: int = 6,
               per_batch: int = 32) -> SyntheticStore:
    """Image i is a constant image of value i: the pixels say which stored image a sample came from."""
    store = SyntheticStore(root)
    for b in range(batches):
        ids = np.arange(b * per_batch, (b + 1) * per_batch)
        store.put(WireBatch(batch_id=f"b{b}", sequence=b, producer_id="test", teacher_fingerprint=fingerprint,
                            mean=mean, std=std, labels=(ids % 10).tolist(),
                            images=np.broadcast_to(ids[:, None, None, None], (per_batch, 1, 16, 16)).astype(np.uint8),
                            synthesis=SynthesisRecord(seed=b)))
    return store


def test_mix_in_skips_no_fresh_synthetic_image(tmp_path):
    store = fill_store(tmp_path / "store", "f" * 64)  # 192 images
    batch, fraction = 16, 0.25  # 12 synthetic images a step
    sampler = FreshFirstSampler(store, batch, seed=0)
    augment = Augment((0.0,), (1 / 255,), crop_padding=0, flip=False)
    synthetic = _synthetic_source(store, sampler, augment, TrainerMetrics(), print, seed=0)

    def real():
        while True:
            yield torch.full((5, 1, 16, 16), 255.0), torch.zeros(5, dtype=torch.long)

    mix = MixInSampler(real(), synthetic, fraction, batch, seed=0)
    seen: list[int] = []
    for _ in range(20):
        b = next(mix)
        ids = b.images[b.source == SYNTHETIC][:, 0, 0, 0].round().long()
        assert torch.equal(ids % 10, b.labels[b.source == SYNTHETIC])  # images keep their labels
        seen += ids.tolist()
    assert len(seen) == 240 and mix.synthetic_seen == 240
    # Every stored image once before any repeats; replay only after that.
    assert sorted(seen[:192]) == list(range(192))
    assert sampler.state_dict()["fresh_position"] == store.next_position


@pytest.mark.parametrize("padding,flip", [(0, False), (2, False), (2, True), (3, True)])
def test_device_augmentation_keeps_the_reference_semantics(padding, flip):
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    reference_gen, gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    for _ in range(3):  # the generators stay in step from batch to batch
        expected = (random_crop_flip(images.float() / 255.0, padding, flip, reference_gen) - m) / s
        assert torch.equal(Augment(mean, std, padding, flip)(images, gen), expected)
    assert torch.equal(reference_gen.get_state(), gen.get_state())


@cuda
def test_device_augmentation_on_cuda_matches_the_cpu():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    on_cpu = augment_normalize(images, (0.5,) * 3, (0.25,) * 3, 4, True, torch.Generator().manual_seed(3))
    augment = Augment((0.5,) * 3, (0.25,) * 3, 4, True, "cuda")
    on_gpu = augment(images, torch.Generator().manual_seed(3))
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-6)


class HostReads:
    """Counts tensor-to-Python reads (float(), item(), tolist(), ...) made directly by trainer/ code."""

    NAMES = ("__float__", "__int__", "__bool__", "item", "tolist")

    def __init__(self, monkeypatch, skip: tuple[str, ...] = ("checkpoint.py",)):
        self.calls: list[str] = []
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), skip))

    def _wrap(self, original, skip):
        def read(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(TRAINER_DIR) and not caller.co_filename.endswith(skip):
                self.calls.append(f"{Path(caller.co_filename).name}:{caller.co_name}")
            return original(tensor, *args, **kwargs)
        return read


def test_training_reads_losses_to_the_host_only_when_logging(tmp_path, monkeypatch):
    torch.manual_seed(0)
    teacher = teacher_from_arch("digits_cnn", num_classes=10, in_chans=1, image_size=16, mean=(0.5,), std=(0.25,))
    store = tmp_path / "store"
    fill_store(store, teacher.card.fingerprint, teacher.card.mean, teacher.card.std)
    settings = Settings.load("digits", device="cpu").model_copy(update={
        "student": TINY,
        "dearkd": DearKDConfig(stage1_fraction=0.5, feature_pairs=[(1, 1)]),
        "train": TrainConfig(steps=20, batch_size=8, warmup_steps=2, log_every=10, eval_every=1000,
                             checkpoint_every=1000, out_dir=tmp_path / "run", store_dir=store)})
    reads = HostReads(monkeypatch)
    logged: list[str] = []
    summary = run_training(settings, teacher, eval_set=None, log=logged.append)
    assert summary["step"] == 20
    # One read of all the loss terms per logged step (steps 10 and 20), none in between.
    assert reads.calls == ["metrics.py:losses"] * 2, reads.calls
    lines = [m for m in logged if m.startswith("step ")]
    assert [m.split()[1] for m in lines] == ["10/20", "20/20"]
    assert " kd " in lines[0] and " ce_dist " in lines[1]  # stage 1, then stage 2
