"""CIFAR-10 loads from each layout users keep it in, gives the same images from each, and refuses bad files clearly."""
from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.config import PRESETS_DIR, DataConfig, Settings, TeacherRecipe
from shared.data.cifar10 import CLASS_NAMES, load_cifar10_images, load_cifar10_split, train_val_positions
from shared.data.cifar10_formats import Cifar10FormatError, open_split

N_TRAIN, N_TEST = 20, 10
LAYOUT_HINTS = ("cifar-10-batches-py", "train_jpeg.npz", "test_jpeg.npz", "train/<class>/", "DFKD_DATA__CIFAR10_DIR")
REAL_COPY = Path(__file__).resolve().parents[2] / "shared/data/cifar10"  # optional, beside the repo


@pytest.fixture(scope="module")
def pixels() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random uint8 HWC images, two train and one test image per class, grouped by class so that every layout
    (an ImageFolder tree is read class by class) lists them in the same order."""
    rng = np.random.default_rng(0)
    return {"train": (rng.integers(0, 256, (N_TRAIN, 32, 32, 3), dtype=np.uint8), np.repeat(np.arange(10), 2)),
            "test": (rng.integers(0, 256, (N_TEST, 32, 32, 3), dtype=np.uint8), np.arange(10))}


# --- writers, one per layout ----------------------------------------------------------------------------------

class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 `str` opcodes, as the distributed batches were written."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: str | bytes) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        head = pickle.SHORT_BINSTRING + bytes([len(raw)]) if len(raw) < 256 else pickle.BINSTRING + struct.pack(
            "<i", len(raw))
        self.write(head + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def py2_dumps(obj: object) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")  # numpy 1's name


def batch(x: np.ndarray, y: np.ndarray, name: str) -> dict:
    rows = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # CHW-planar rows of 3072 bytes
    return {b"batch_label": name.encode(), b"labels": [int(v) for v in y], b"data": rows,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(len(x))]}


def write_batches(folder: Path, pixels, py2: bool = False) -> Path:
    folder.mkdir(parents=True)
    x, y = pixels["train"]
    per_batch = len(x) // 5
    parts = {f"data_batch_{i + 1}": (x[i * per_batch:(i + 1) * per_batch], y[i * per_batch:(i + 1) * per_batch])
             for i in range(5)}
    parts["test_batch"] = pixels["test"]
    for name, (xs, ys) in parts.items():
        payload = batch(xs, ys, name)
        (folder / name).write_bytes(py2_dumps(payload) if py2 else pickle.dumps(payload, protocol=4))
    return folder


def write_image_folder(root: Path, pixels, suffix: str = ".png", digit_names: bool = False) -> Path:
    for split, (x, y) in pixels.items():
        for i, (img, label) in enumerate(zip(x, y)):
            folder = root / split / (str(label) if digit_names else CLASS_NAMES[label])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:05d}{suffix}")
    return root


def jpeg_bytes(images: np.ndarray) -> list[bytes]:
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=75)
        out.append(buf.getvalue())
    return out


def write_jpeg_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    blobs = jpeg_bytes(images)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    np.savez(path, jpeg=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets, y=labels.astype(np.uint8))


def decode_jpegs(blobs: list[bytes]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])


def assert_split_equals(split, expected) -> None:
    reference = load_cifar10_split(expected)
    for name in ("train", "val", "test"):
        x, y = split.images(name)
        x_ref, y_ref = reference.images(name)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref), name


# --- the same images from every layout ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["batches-py3", "batches-py2", "batches-parent", "png-names", "png-digits"])
def test_lossless_layouts_give_the_original_pixels(tmp_path, pixels, layout):
    if layout.startswith("batches"):
        root = tmp_path / "cifar-10-batches-py"
        write_batches(root, pixels, py2=layout == "batches-py2")
        if layout == "batches-parent":
            root = tmp_path
    else:
        root = write_image_folder(tmp_path, pixels, digit_names=layout == "png-digits")
    split = load_cifar10_split(root)
    x_all = torch.cat([split.x_train, split.x_val])
    y_all = torch.cat([split.y_train, split.y_val])
    order = torch.from_numpy(np.concatenate(train_val_positions(pixels["train"][1])))
    expected = torch.from_numpy(pixels["train"][0]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(x_all, expected[order]) and torch.equal(y_all, torch.from_numpy(pixels["train"][1])[order])
    assert torch.equal(split.x_test, torch.from_numpy(pixels["test"][0]).permute(0, 3, 1, 2).float() / 255)
    assert split.y_test.tolist() == pixels["test"][1].tolist() and split.y_test.dtype == torch.int64


def test_every_lossless_layout_agrees(tmp_path, pixels):
    batches = write_batches(tmp_path / "b" / "cifar-10-batches-py", pixels, py2=True)
    folder = write_image_folder(tmp_path / "f", pixels)
    assert_split_equals(load_cifar10_split(batches), folder)


@pytest.mark.parametrize("test_file", ["test.npz", "test_jpeg.npz"])
def test_jpeg_copy_matches_an_image_folder_of_the_same_jpeg_bytes(tmp_path, pixels, test_file):
    npz = tmp_path / "npz"
    npz.mkdir()
    write_jpeg_npz(npz / "train_jpeg.npz", *pixels["train"])
    x_test = decode_jpegs(jpeg_bytes(pixels["test"][0]))  # what a JPEG copy's test.npz holds
    if test_file == "test.npz":
        np.savez(npz / "test.npz", x=x_test, y=pixels["test"][1].astype(np.uint8))
    else:
        write_jpeg_npz(npz / "test_jpeg.npz", *pixels["test"])
    folder = write_image_folder(tmp_path / "jpg", pixels, suffix=".jpg")  # PIL writes the same JPEG bytes again
    for split in ("train", "test"):
        files = sorted((tmp_path / "jpg" / split).rglob("*.jpg"), key=lambda p: p.name)
        assert [p.read_bytes() for p in files] == jpeg_bytes(pixels[split][0])
    assert_split_equals(load_cifar10_split(npz), folder)
    loaded, _ = load_cifar10_images(npz, "test")
    assert torch.equal(loaded, torch.from_numpy(x_test).permute(0, 3, 1, 2).float() / 255)


def test_validation_is_a_disjoint_stratified_tenth(tmp_path, pixels):
    root = write_image_folder(tmp_path, pixels)
    split = load_cifar10_split(root)
    assert torch.bincount(split.y_val, minlength=10).tolist() == [1] * 10  # 10 % of 2 per class, at least one
    assert len(split.y_train) + len(split.y_val) == N_TRAIN
    train_rows = {r.numpy().tobytes() for r in split.x_train.flatten(1)}
    assert not any(r.numpy().tobytes() in train_rows for r in split.x_val.flatten(1))
    x_val, y_val = load_cifar10_images(root, "val")
    assert torch.equal(x_val, split.x_val) and torch.equal(y_val, split.y_val)


def test_train_and_test_limits(tmp_path, pixels):
    split = load_cifar10_split(write_batches(tmp_path / "cifar-10-batches-py", pixels), train_limit=10, test_limit=3)
    assert len(split.y_train) + len(split.y_val) == 10 and len(split.y_test) == 3


@pytest.fixture(scope="module")
def four_per_class() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Four train and two test images per class, grouped by class."""
    rng = np.random.default_rng(1)
    return {"train": (rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), np.repeat(np.arange(10), 4)),
            "test": (rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), np.repeat(np.arange(10), 2))}


def test_limits_keep_the_same_share_of_every_class_of_an_image_folder(tmp_path, four_per_class):
    """An ImageFolder tree lists its images class by class: a limit must not keep only the first classes."""
    from trainer.imagefolder_export import export_cifar10

    root = write_image_folder(tmp_path / "folder", four_per_class)
    split = load_cifar10_split(root, train_limit=20, test_limit=10)
    assert torch.bincount(torch.cat([split.y_train, split.y_val]), minlength=10).tolist() == [2] * 10
    assert torch.bincount(split.y_val, minlength=10).tolist() == [1] * 10
    assert torch.bincount(split.y_test, minlength=10).tolist() == [1] * 10
    x_val, y_val = load_cifar10_images(root, "val", limit=20)
    x_test, y_test = load_cifar10_images(root, "test", limit=10)
    assert torch.equal(x_val, split.x_val) and torch.equal(y_val, split.y_val)
    assert torch.equal(x_test, split.x_test) and torch.equal(y_test, split.y_test)
    assert export_cifar10(root, tmp_path / "test", "test", limit=10) == dict.fromkeys(CLASS_NAMES, 1)
    assert export_cifar10(root, tmp_path / "train", "train", limit=20) == dict.fromkeys(CLASS_NAMES, 1)
    exported = sorted(int(p.stem) for p in (tmp_path / "train").rglob("*.png"))
    assert exported == train_val_positions(four_per_class["train"][1], 20)[0].tolist()


@pytest.mark.skipif(not (REAL_COPY / "train_jpeg.npz").is_file(), reason=f"no CIFAR-10 copy at {REAL_COPY}")
def test_the_real_jpeg_copy_matches_an_image_folder_of_its_bytes(tmp_path):
    data = np.load(REAL_COPY / "train_jpeg.npz")
    labels, n = data["y"].astype(np.int64), 40
    for i in range(n):
        folder = tmp_path / "train" / CLASS_NAMES[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(data["jpeg"][data["offsets"][i]:data["offsets"][i + 1]].tobytes())
    folder_train = open_split(tmp_path, "train")
    npz_train = open_split(REAL_COPY, "train")
    by_class = np.argsort(labels[:n], kind="stable")  # the ImageFolder's order: class, then file name
    assert folder_train.labels.tolist() == labels[by_class].tolist()
    assert np.array_equal(folder_train.images(np.arange(n)), npz_train.images(by_class))
    assert npz_train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # frog, truck, truck, deer, ...


# --- refusals --------------------------------------------------------------------------------------------------

class RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_calls_a_function_is_refused_without_running_it(tmp_path, pixels):
    folder = write_batches(tmp_path / "cifar-10-batches-py", pixels)
    marker = tmp_path / "ran"
    evil = batch(*pixels["test"], "test_batch") | {b"data": RunsACommand(marker)}
    (folder / "test_batch").write_bytes(pickle.dumps(evil, protocol=4))
    with pytest.raises(Cifar10FormatError, match=f"refusing to load the pickle global {os.system.__module__}.system"):
        load_cifar10_images(tmp_path, "test")
    assert not marker.exists()


@pytest.mark.parametrize("change,message", [
    (lambda b: b | {b"data": b[b"data"][:, :3000]}, "uint8 rows of 3072 bytes"),
    (lambda b: b | {b"data": b[b"data"].astype(np.int16)}, "uint8 rows of 3072 bytes"),
    (lambda b: b | {b"labels": [10] * len(b[b"labels"])}, "labels must be 0-9"),
    (lambda b: b | {b"labels": b[b"labels"][:-1]}, "9 labels for 10 images"),
    (lambda b: {b"data": b[b"data"]}, "no 'labels' entry"),
])
def test_malformed_batches_are_refused(tmp_path, pixels, change, message):
    folder = write_batches(tmp_path / "cifar-10-batches-py", pixels)
    (folder / "test_batch").write_bytes(pickle.dumps(change(batch(*pixels["test"], "test_batch")), protocol=4))
    with pytest.raises(Cifar10FormatError, match=message) as err:
        load_cifar10_images(folder, "test")
    assert "test_batch" in str(err.value)


def test_a_missing_batch_is_named(tmp_path, pixels):
    folder = write_batches(tmp_path / "cifar-10-batches-py", pixels)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        load_cifar10_split(folder)


def test_a_wrong_image_size_is_refused_with_the_file_named(tmp_path, pixels):
    root = write_image_folder(tmp_path, pixels)
    bad = root / "test" / "cat" / "00003.png"
    Image.new("RGB", (64, 64)).save(bad)
    with pytest.raises(Cifar10FormatError, match="64x64") as err:
        load_cifar10_images(root, "test")
    assert str(bad) in str(err.value)


def test_grayscale_and_rgba_files_become_rgb(tmp_path, pixels):
    root = write_image_folder(tmp_path, pixels)
    Image.fromarray(pixels["test"][0][0]).convert("L").save(root / "test" / "airplane" / "00000.png")
    Image.fromarray(pixels["test"][0][1]).convert("RGBA").save(root / "test" / "automobile" / "00001.png")
    x, _ = load_cifar10_images(root, "test")
    gray = np.array(Image.fromarray(pixels["test"][0][0]).convert("L").convert("RGB"))
    assert torch.equal(x[0], torch.from_numpy(gray).permute(2, 0, 1).float() / 255)
    assert torch.equal(x[1], torch.from_numpy(pixels["test"][0][1]).permute(2, 0, 1).float() / 255)


def test_unknown_class_folders_are_refused(tmp_path, pixels):
    root = write_image_folder(tmp_path, pixels)
    (root / "train" / "cats").mkdir()
    with pytest.raises(Cifar10FormatError, match="unknown class folder .*cats"):
        load_cifar10_split(root)


def test_a_batch_that_fails_in_any_other_way_is_named(tmp_path, pixels):
    folder = write_batches(tmp_path / "cifar-10-batches-py", pixels)

    class BadDtype:  # an allowed global called with arguments it refuses: TypeError, not UnpicklingError
        def __reduce__(self):
            return np.dtype, ("nonsense",)

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": BadDtype()}, protocol=4))
    with pytest.raises(Cifar10FormatError, match="not a readable CIFAR-10 batch .*TypeError") as err:
        load_cifar10_images(folder, "test")
    assert str(folder / "test_batch") in str(err.value)


def write_npz_copy(root: Path, pixels, test_file: str = "test.npz") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_jpeg_npz(root / "train_jpeg.npz", *pixels["train"])
    if test_file == "test.npz":
        np.savez(root / "test.npz", x=decode_jpegs(jpeg_bytes(pixels["test"][0])), y=pixels["test"][1])
    else:
        write_jpeg_npz(root / "test_jpeg.npz", *pixels["test"])
    return root


@pytest.mark.parametrize("change,message", [
    (lambda x, y: (x.astype(np.float32), y), "'x' must be uint8 \\(10, 32, 32, 3\\).*float32"),
    (lambda x, y: (x[:9], y), "'x' must be uint8 \\(10, 32, 32, 3\\).*\\(9, 32, 32, 3\\)"),
    (lambda x, y: (x[:, :16], y), "\\(10, 16, 32, 3\\)"),
])
def test_a_malformed_test_npz_is_refused(tmp_path, pixels, change, message):
    root = write_npz_copy(tmp_path, pixels)
    x, y = change(*pixels["test"])
    np.savez(root / "test.npz", x=x, y=y)
    with pytest.raises(Cifar10FormatError, match=message) as err:
        load_cifar10_images(root, "test")
    assert str(root / "test.npz") in str(err.value)


def test_jpeg_offsets_must_fit_the_labels_and_the_bytes(tmp_path, pixels):
    root = write_npz_copy(tmp_path, pixels)
    data = dict(np.load(root / "train_jpeg.npz"))
    np.savez(root / "train_jpeg.npz", **data | {"offsets": data["offsets"][:-1]})
    with pytest.raises(Cifar10FormatError, match="'offsets' must be 21 integers .*20 labels"):
        load_cifar10_split(root)
    np.savez(root / "train_jpeg.npz", **data | {"offsets": data["offsets"] + 10})
    with pytest.raises(Cifar10FormatError, match="within the .* bytes of 'jpeg'"):
        load_cifar10_split(root)
    np.savez(root / "train_jpeg.npz", jpeg=data["jpeg"], y=data["y"])
    with pytest.raises(Cifar10FormatError, match="train_jpeg.npz has no offsets array"):
        load_cifar10_split(root)
    (root / "train_jpeg.npz").write_bytes(b"not a zip")
    with pytest.raises(Cifar10FormatError, match="train_jpeg.npz is not a readable npz file"):
        load_cifar10_split(root)


@pytest.mark.parametrize("bad,message", [(Image.new("RGB", (16, 16)), "16x16 RGB"),
                                         (Image.new("L", (32, 32)), "32x32 L"),
                                         (None, "not a readable JPEG")])
def test_a_jpeg_that_is_not_32x32_rgb_is_named_by_file_and_index(tmp_path, pixels, bad, message):
    x, y = pixels["test"]
    blobs = jpeg_bytes(x)
    if bad is None:
        blobs[3] = blobs[3][:40]  # cut off mid-header
    else:
        buf = io.BytesIO()
        bad.save(buf, format="JPEG")
        blobs[3] = buf.getvalue()
    root = write_npz_copy(tmp_path, pixels, "test_jpeg.npz")
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    np.savez(root / "test_jpeg.npz", jpeg=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets, y=y)
    with pytest.raises(Cifar10FormatError, match=message) as err:
        load_cifar10_images(root, "test")
    assert f"{root / 'test_jpeg.npz'}: image 3 " in str(err.value)


def test_hidden_folders_are_skipped_like_hidden_files(tmp_path, pixels):
    root = write_image_folder(tmp_path, pixels)
    (root / "train" / ".ipynb_checkpoints").mkdir()
    Image.fromarray(pixels["train"][0][0]).save(root / "train" / ".ipynb_checkpoints" / "00000.png")
    (root / "train" / "cat" / ".thumbnails").mkdir()
    assert_split_equals(load_cifar10_split(root), write_image_folder(tmp_path / "clean", pixels))


@pytest.mark.parametrize("where", ["unset", "missing", "empty"])
def test_no_data_names_the_three_layouts_and_how_to_point_at_them(tmp_path, where):
    root = {"unset": None, "missing": tmp_path / "nowhere", "empty": tmp_path}[where]
    with pytest.raises(FileNotFoundError) as err:
        load_cifar10_split(root)
    message = str(err.value)
    assert all(hint in message for hint in LAYOUT_HINTS), message
    assert "data.cifar10_dir" in message and "--data" not in message  # no command has a --data option
    assert ("data.cifar10_dir is not set" if root is None else str(root)) in message


def test_callers_without_a_data_folder_get_the_same_message(tmp_path, monkeypatch, capsys):
    from dfkd.cli import main
    from trainer.teacher_train import load_split

    monkeypatch.delenv("DFKD_DATA__CIFAR10_DIR", raising=False)
    monkeypatch.delenv("DFKD_CONFIG", raising=False)
    with pytest.raises(FileNotFoundError, match="DFKD_DATA__CIFAR10_DIR"):
        load_split(TeacherRecipe(dataset="cifar10").resolved(), DataConfig())
    assert main(["export", "cifar10", "--out", str(tmp_path / "out")]) == 2
    assert "data.cifar10_dir is not set" in capsys.readouterr().err


def test_the_cifar10_preset_names_no_folder(monkeypatch):
    monkeypatch.delenv("DFKD_DATA__CIFAR10_DIR", raising=False)
    settings = Settings.load("cifar10")
    assert settings.data.cifar10_dir is None
    assert "../shared" not in settings.model_dump_json() and "../shared" not in (
        PRESETS_DIR / "cifar10.yaml").read_text()


def test_export_reads_every_layout(tmp_path, pixels):
    """`dfkd export cifar10` from torchvision's batches: lossless PNGs named by position, split as the loaders split."""
    from trainer.imagefolder_export import export_cifar10

    root = write_batches(tmp_path / "cifar-10-batches-py", pixels)
    x, y = pixels["train"]
    idx_train, _ = train_val_positions(y)
    counts = export_cifar10(root, tmp_path / "train", "train")
    assert sum(counts.values()) == len(idx_train)
    for i in idx_train.tolist():
        written = np.asarray(Image.open(tmp_path / "train" / CLASS_NAMES[y[i]] / f"{i:05d}.png"))
        assert np.array_equal(written, x[i])
    counts = export_cifar10(root, tmp_path / "test", "test")
    assert counts == dict.fromkeys(CLASS_NAMES, 1)
    with pytest.raises(FileNotFoundError, match="DFKD_DATA__CIFAR10_DIR"):
        export_cifar10(None, tmp_path / "none", "train")


@pytest.mark.parametrize("test_file", ["test.npz", "test_jpeg.npz"])
def test_export_of_the_jpeg_copy_keeps_its_bytes(tmp_path, pixels, test_file):
    root = write_npz_copy(tmp_path / "npz", pixels, test_file)
    from trainer.imagefolder_export import export_cifar10

    for split, source in (("train", pixels["train"]), ("test", pixels["test"])):
        export_cifar10(root, tmp_path / split, split)
        blobs = jpeg_bytes(source[0])
        if split == "test" and test_file == "test.npz":  # decoded pixels only: lossless PNGs
            files = sorted((tmp_path / split).rglob("*.png"))
            assert [np.asarray(Image.open(p)).tobytes() for p in files] == [
                decode_jpegs([blobs[int(p.stem)]])[0].tobytes() for p in files]
        else:
            files = sorted((tmp_path / split).rglob("*.jpg"))
            assert files and [p.read_bytes() for p in files] == [blobs[int(p.stem)] for p in files]


def test_export_takes_the_bytes_of_the_layout_it_reads(tmp_path, pixels):
    """A folder with torchvision's batches and a JPEG copy of other images: the batches are read (the first layout
    that matches), so no JPEG bytes of the other copy may be mixed in."""
    from trainer.imagefolder_export import export_cifar10

    write_batches(tmp_path / "data" / "cifar-10-batches-py", pixels)
    other = {"train": (255 - pixels["train"][0], pixels["train"][1][::-1].copy()), "test": pixels["test"]}
    write_npz_copy(tmp_path / "data", other)
    counts = export_cifar10(tmp_path / "data", tmp_path / "out", "train")
    x, y = pixels["train"]
    files = sorted((tmp_path / "out").rglob("*.*"))
    assert len(files) == sum(counts.values()) == len(train_val_positions(y)[0])
    for path in files:
        i = int(path.stem)
        assert path.suffix == ".png" and path.parent.name == CLASS_NAMES[y[i]]
        assert np.array_equal(np.asarray(Image.open(path)), x[i])
