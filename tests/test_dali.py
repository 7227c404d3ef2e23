"""DALI real-image reader (CPU pipeline), ImageFolder export and the real/synthetic mix-in, on real CIFAR-10 JPEGs
and digits PNGs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="nvidia-dali-cuda130 is not installed")

from shared.data.cifar10 import CLASS_NAMES as CIFAR10_CLASSES  # noqa: E402
from shared.data.digits import load_digits_split  # noqa: E402
from trainer.dali_reader import ImageFolderError, RealImageReader, pipeline_device  # noqa: E402
from shared.data.cifar10 import train_val_positions  # noqa: E402
from trainer.imagefolder_export import export_cifar10, export_digits  # noqa: E402
from trainer.mixing import REAL, SYNTHETIC, MixInSampler  # noqa: E402

CIFAR_ROOT = Path(__file__).resolve().parents[2] / "shared/data/cifar10"
CIFAR_MEAN, CIFAR_STD = (0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606)
N_CIFAR = 220  # 220 training images, 22 of each class: 200 train, 20 validation
N_CIFAR_TRAIN = 200
FULL_VIEW = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))  # the crop is the whole image: pixels stay comparable


@pytest.fixture(scope="module")
def cifar_root() -> Path:
    if not all((CIFAR_ROOT / name).is_file() for name in ("train_jpeg.npz", "test.npz")):
        pytest.skip(f"CIFAR-10 copy not found at {CIFAR_ROOT}")
    return CIFAR_ROOT


@pytest.fixture(scope="module")
def cifar_dir(cifar_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cifar") / "train"
    export_cifar10(cifar_root, out, "train", limit=N_CIFAR)
    return out


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "train"
    export_digits(out, image_size=16, split="train")
    return out


def pillow_images(folder: Path, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of an ImageFolder decoded by Pillow: (N, H, W, C) uint8 as float, labels by folder."""
    pixels, labels = [], []
    for label, name in enumerate(class_names):
        for path in sorted((folder / name).iterdir()):
            array = np.asarray(Image.open(path))
            pixels.append(array if array.ndim == 3 else array[..., None])  # grayscale: HW -> HW1
            labels.append(label)
    return torch.from_numpy(np.stack(pixels)).float(), torch.tensor(labels)


def unnormalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, C, H, W) normalised -> (B, H, W, C) in 0..255."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return ((images * s + m) * 255).permute(0, 2, 3, 1)


def nearest_error(images: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor):
    """Per image: mean absolute error (0..255) to the closest reference image of the same label."""
    return torch.stack([(ref[ref_labels == y] - x).abs().mean(dim=(1, 2, 3)).min() for x, y in zip(images, labels)])


def test_export_cifar10_keeps_the_original_jpeg_bytes(cifar_root, cifar_dir):
    data = np.load(cifar_root / "train_jpeg.npz")
    buf, offsets, y = data["jpeg"], data["offsets"], data["y"]
    files = sorted(cifar_dir.glob("*/*.jpg"))
    train, val = train_val_positions(y, N_CIFAR)
    assert sorted(int(p.stem) for p in files) == train.tolist() and len(train) == N_CIFAR_TRAIN  # val stays out
    assert np.bincount(y[val], minlength=10).tolist() == [2] * 10
    for path in files:
        i = int(path.stem)
        assert path.parent.name == CIFAR10_CLASSES[y[i]]
        assert path.read_bytes() == buf[offsets[i]:offsets[i + 1]].tobytes()


def test_export_cifar10_test_split_is_lossless_png(cifar_root, tmp_path):
    counts = export_cifar10(cifar_root, tmp_path / "test", "test", limit=30)
    test = np.load(cifar_root / "test.npz")
    files = sorted((tmp_path / "test").glob("*/*.png"))
    assert counts == dict.fromkeys(CIFAR10_CLASSES, 3) and len(files) == 30
    for path in files:
        i = int(path.stem)
        assert path.parent.name == CIFAR10_CLASSES[test["y"][i]]
        assert np.array_equal(np.asarray(Image.open(path)), test["x"][i])


def test_partial_fraction_keeps_a_seeded_stratified_share(cifar_root, tmp_path):
    y = np.load(cifar_root / "train_jpeg.npz")["y"]
    y = y[train_val_positions(y, 2000)[0]]
    counts = export_cifar10(cifar_root, tmp_path / "a", "train", limit=2000, partial_fraction=0.1, seed=3)
    assert counts == {name: round(0.1 * int((y == c).sum())) for c, name in enumerate(CIFAR10_CLASSES)}
    again = export_cifar10(cifar_root, tmp_path / "b", "train", limit=2000, partial_fraction=0.1, seed=3)
    other = export_cifar10(cifar_root, tmp_path / "c", "train", limit=2000, partial_fraction=0.1, seed=4)
    names = {d: sorted(p.relative_to(tmp_path / d) for p in (tmp_path / d).glob("*/*")) for d in "abc"}
    assert again == counts and names["a"] == names["b"]
    assert other == counts and names["a"] != names["c"]
    with pytest.raises(FileExistsError):
        export_cifar10(cifar_root, tmp_path / "a", "train", limit=10)


def test_cpu_pipeline_decodes_real_jpegs_like_pillow(cifar_dir):
    reader = RealImageReader(cifar_dir, 50, 32, CIFAR_MEAN, CIFAR_STD, device="cpu", seed=0, flip=False,
                             **FULL_VIEW)
    assert reader.class_names == CIFAR10_CLASSES and reader.num_images == N_CIFAR_TRAIN
    ref, ref_labels = pillow_images(cifar_dir, reader.class_names)
    batches = [next(reader) for _ in range(4)]
    for images, labels in batches:
        assert images.shape == (50, 3, 32, 32) and images.dtype == torch.float32 and images.device.type == "cpu"
        assert labels.shape == (50,) and labels.dtype == torch.int64
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert abs(images.mean().item()) < 0.3 and 0.6 < images.std().item() < 1.4  # normalised, roughly N(0, 1)
    pixels = unnormalise(images, CIFAR_MEAN, CIFAR_STD)
    # Same decoded pixels (libjpeg-turbo both sides; at most rounding apart), found under the same label.
    assert nearest_error(pixels, labels, ref, ref_labels).max() < 0.5
    # One epoch of the endless stream shows each image once: no tail dropped or padded.
    closest = torch.stack([(ref - x).abs().mean(dim=(1, 2, 3)).argmin() for x in pixels])
    assert closest.unique().numel() == N_CIFAR_TRAIN
    assert abs(pixels.mean() - ref.mean()) < 3.0
    assert reader.epoch == 1.0


def test_cpu_pipeline_reads_grayscale_digit_pngs(digits_dir):
    reader = RealImageReader(digits_dir, 64, 16, (0.3,), (0.4,), in_chans=1, device="cpu", flip=False, **FULL_VIEW)
    assert reader.class_names == [str(i) for i in range(10)]
    split = load_digits_split(16)
    assert reader.num_images == len(split.y_train)
    images, labels = next(reader)
    assert images.shape == (64, 1, 16, 16) and labels.shape == (64,)
    ref = (split.x_train * 255).round().permute(0, 2, 3, 1)
    assert nearest_error(unnormalise(images, (0.3,), (0.4,)), labels, ref, split.y_train).max() < 0.5


def test_flip_mirrors_some_images_and_crops_resize(cifar_dir):
    reader = RealImageReader(cifar_dir, 100, 32, (0, 0, 0), (1, 1, 1), seed=1, flip=True, **FULL_VIEW)
    ref, ref_labels = pillow_images(cifar_dir, reader.class_names)
    images, labels = next(reader)
    pixels = unnormalise(images, (0, 0, 0), (1, 1, 1))
    plain = nearest_error(pixels, labels, ref, ref_labels)
    mirrored = nearest_error(pixels.flip(2), labels, ref, ref_labels)
    assert bool(((plain < 1.0) | (mirrored < 1.0)).all())
    assert 10 < int((mirrored < 1.0).sum()) < 90
    cropped = RealImageReader(cifar_dir, 8, 20, (0, 0, 0), (1, 1, 1), scale=(0.3, 0.6))
    assert next(cropped)[0].shape == (8, 3, 20, 20)


def test_not_an_image_folder_is_a_clear_error(tmp_path, digits_dir):
    with pytest.raises(ImageFolderError, match="does not exist"):
        RealImageReader(tmp_path / "missing", 4, 16, (0.5,), (0.5,), in_chans=1)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ImageFolderError, match="no images"):
        RealImageReader(tmp_path / "empty", 4, 16, (0.5,), (0.5,), in_chans=1)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.png").write_bytes((digits_dir / "0" / sorted(p.name for p in (digits_dir / "0").iterdir())[0])
                                 .read_bytes())
    with pytest.raises(ImageFolderError, match="directly inside"):
        RealImageReader(flat, 4, 16, (0.5,), (0.5,), in_chans=1)
    with pytest.raises(ValueError, match="mean/std"):
        RealImageReader(digits_dir, 4, 16, (0.5, 0.5, 0.5), (0.5,), in_chans=1)


def test_pipeline_device_falls_back_to_cpu_without_cuda():
    if torch.cuda.is_available():
        assert pipeline_device("auto") == "gpu"
    else:
        assert pipeline_device("auto") == "cpu"
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            pipeline_device("cuda")
    assert pipeline_device("cpu") == "cpu"


def noise_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic source at the start of inversion: normalised noise with the requested labels."""
    return torch.randn(n, 1, 16, 16), torch.arange(n) % 10


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_mix_in_ratio_holds_over_100_steps(digits_dir, fraction):
    def reader():  # a reader batch (24) unlike the per-step real count, so the sampler must re-slice
        return RealImageReader(digits_dir, 24, 16, (0.3,), (0.4,), in_chans=1, seed=2)

    sampler = MixInSampler(reader, noise_images, real_fraction=fraction, batch_size=30, seed=0)
    real = 0
    for _ in range(100):
        batch = next(sampler)
        assert batch.images.shape == (30, 1, 16, 16) and batch.labels.dtype == torch.int64
        assert set(batch.source.unique().tolist()) <= {SYNTHETIC, REAL}
        real += int((batch.source == REAL).sum())
    assert abs(real / (100 * 30) - fraction) <= 0.05
    assert sampler.real_seen == real and sampler.synthetic_seen == 100 * 30 - real


def test_real_fraction_one_is_real_only(digits_dir):
    reader = RealImageReader(digits_dir, 16, 16, (0.3,), (0.4,), in_chans=1, flip=False, **FULL_VIEW)
    sampler = MixInSampler(reader, None, real_fraction=1.0, batch_size=16)
    ref = (load_digits_split(16).x_train * 255).round().permute(0, 2, 3, 1)
    for _ in range(5):
        images, labels, source, logits = next(sampler)
        assert logits is None  # real images come with no shipped logits
        assert bool((source == REAL).all())
        assert nearest_error(unnormalise(images, (0.3,), (0.4,)), labels, ref,
                             load_digits_split(16).y_train).max() < 0.5
    assert sampler.synthetic_seen == 0 and sampler.real_seen == 80


def test_real_fraction_zero_never_opens_the_reader():
    def no_reader():
        raise AssertionError("the real reader must not be created when real_fraction is 0")

    sampler = MixInSampler(no_reader, noise_images, real_fraction=0.0, batch_size=8)
    for _ in range(3):
        assert bool((next(sampler).source == SYNTHETIC).all())
    assert sampler.real_seen == 0 and sampler.synthetic_seen == 24
    with pytest.raises(ValueError, match="needs a real-image source"):
        MixInSampler(None, noise_images, real_fraction=0.5, batch_size=8)
