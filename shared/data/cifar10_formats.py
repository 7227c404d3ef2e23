"""The on-disk layouts CIFAR-10 comes in, and which one a folder holds.

Accepted layouts (the first that matches wins, in this order):
1. torchvision's `cifar-10-batches-py`: `data_batch_1`..`data_batch_5` and `test_batch`, Python pickles of
   `{b"data": uint8 (N, 3072) CHW rows, b"labels": [N ints]}`;
2. a JPEG copy: `train_jpeg.npz` (JPEG bytes + offsets) plus `test.npz` (decoded pixels) or `test_jpeg.npz`;
3. an ImageFolder tree: `train/<class>/*.png|jpg|jpeg` and `test/<class>/...`, class folders named by
   `CLASS_NAMES` or 0-9.
Every reader gives labels in a fixed order and decodes pixels only for the positions asked for; the JPEG copy's
reader also hands out each image's original bytes.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared.errors import DfkdError

# Label order of the original `batches.meta`; also the sorted order, so ImageFolder readers agree.
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCHES_DIR = "cifar-10-batches-py"
BATCH_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ROW_BYTES = 3 * 32 * 32

LAYOUTS = (f"  - torchvision's {BATCHES_DIR} folder (or its parent): data_batch_1..5 and test_batch\n"
           "  - a JPEG copy: train_jpeg.npz plus test.npz or test_jpeg.npz\n"
           f"  - an ImageFolder tree: train/<class>/*.png|jpg|jpeg and test/<class>/..., class folders named "
           f"{', '.join(CLASS_NAMES)} or 0-9")


class Cifar10FormatError(DfkdError, ValueError):
    """A CIFAR-10 folder whose files are there but do not hold what the layout promises."""


@dataclass
class SplitReader:
    """One split (train or test) of a CIFAR-10 copy: every label up front, pixels decoded on demand."""

    labels: np.ndarray  # int64 (N,), values 0-9
    decode: Callable[[np.ndarray], np.ndarray]  # positions -> uint8 (n, 32, 32, 3) RGB
    encoded: Callable[[int], bytes] | None = None  # position -> the image's original file bytes, where kept

    def images(self, positions: np.ndarray) -> np.ndarray:
        if len(positions) == 0:
            return np.zeros((0, 32, 32, 3), np.uint8)
        return self.decode(np.asarray(positions))


def open_split(root: Path | None, split: str) -> SplitReader:
    """The 'train' or 'test' split of the CIFAR-10 copy in `root`, whichever layout it is in."""
    if split not in BATCH_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _layout_reader(root)(split)


def missing_data_error(root: Path | None) -> FileNotFoundError:
    where = "data.cifar10_dir is not set" if root is None else f"no CIFAR-10 copy found in {root}"
    return FileNotFoundError(
        f"{where}. Point data.cifar10_dir at your CIFAR-10 folder: env DFKD_DATA__CIFAR10_DIR=/path, or "
        f"data.cifar10_dir in a --config file (`dfkd export cifar10` also takes --source). Accepted layouts:\n"
        f"{LAYOUTS}")


def _layout_reader(root: Path | None) -> Callable[[str], SplitReader]:
    if root is None or not Path(root).is_dir():
        raise missing_data_error(root)
    root = Path(root)
    batches = root / BATCHES_DIR if (root / BATCHES_DIR).is_dir() else root
    if any((batches / name).is_file() for names in BATCH_FILES.values() for name in names):
        return partial(_read_batches, batches)
    if (root / "train_jpeg.npz").is_file():
        return partial(_read_npz, root)
    if (root / "train").is_dir() or (root / "test").is_dir():
        return partial(_read_image_folder, root)
    raise missing_data_error(root)


def _checked_labels(labels: object, source: Path) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise Cifar10FormatError(f"{source}: labels must be a list of integers, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise Cifar10FormatError(f"{source}: labels must be 0-9 (10 classes), found {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


# --- torchvision's cifar-10-batches-py ------------------------------------------------------------------------

def _numpy_reconstruct() -> Callable:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


# Exactly what rebuilding a uint8 array needs; py2-era files name numpy.core, newer ones numpy._core.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], object]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _BatchUnpickler(pickle.Unpickler):
    """A pickle can call any importable function while loading; this one resolves only numpy's array rebuilders."""

    def __init__(self, file: io.BufferedReader, source: Path):
        super().__init__(file, encoding="bytes")  # the files are Python 2 pickles: keep their str as bytes
        self.source = source

    def find_class(self, module: str, name: str) -> object:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise Cifar10FormatError(f"{self.source}: refusing to load the pickle global {module}.{name}; a "
                                     "CIFAR-10 batch needs only numpy's array reconstruction")
        return allowed()


def _batch_field(batch: dict, key: str, source: Path) -> object:
    for k in (key.encode(), key):  # bytes keys as distributed; str keys if re-saved by Python 3
        if k in batch:
            return batch[k]
    raise Cifar10FormatError(f"{source}: no {key!r} entry; a CIFAR-10 batch holds 'data' and 'labels'")


def _load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, path).load()
    except Cifar10FormatError:
        raise
    except Exception as exc:  # a damaged pickle fails in many ways (ValueError, TypeError, KeyError, ...)
        raise Cifar10FormatError(f"{path} is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise Cifar10FormatError(f"{path}: expected a dict with 'data' and 'labels', got {type(batch).__name__}")
    data = _batch_field(batch, "data", path)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == ROW_BYTES):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise Cifar10FormatError(f"{path}: 'data' must be uint8 rows of {ROW_BYTES} bytes (3x32x32), got {got}")
    labels = _checked_labels(_batch_field(batch, "labels", path), path)
    if len(labels) != len(data):
        raise Cifar10FormatError(f"{path}: {len(labels)} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_batches(folder: Path, split: str) -> SplitReader:
    missing = [name for name in BATCH_FILES[split] if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} looks like torchvision's {BATCHES_DIR} but lacks {', '.join(missing)}")
    batches = [_load_batch(folder / name) for name in BATCH_FILES[split]]
    pixels = np.concatenate([x for x, _ in batches])
    return SplitReader(np.concatenate([y for _, y in batches]), lambda positions: pixels[positions])


# --- the JPEG copy (npz) ----------------------------------------------------------------------------------------

def _npz_arrays(path: Path, *keys: str) -> tuple[np.ndarray, ...]:
    """The named arrays of an npz file, read into memory (the file is closed again)."""
    try:
        data = np.load(path)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise Cifar10FormatError(f"{path} is a single array, not an npz archive of {', '.join(keys)}")
        with data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise Cifar10FormatError(f"{path} has no {', '.join(missing)} array (it holds {data.files})")
            return tuple(data[k] for k in keys)
    except Cifar10FormatError:
        raise
    except Exception as exc:  # not a zip, a damaged member, an object array (pickle, refused)
        raise Cifar10FormatError(f"{path} is not a readable npz file ({type(exc).__name__}: {exc})") from exc


def _decode_jpeg(blob: bytes, path: Path, index: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(blob)) as img:
            img.load()
            if img.size != (32, 32) or img.mode != "RGB":
                raise Cifar10FormatError(f"{path}: image {index} is a {img.size[0]}x{img.size[1]} {img.mode} "
                                         "image; CIFAR-10 images are 32x32 RGB")
            return np.asarray(img)
    except (UnidentifiedImageError, OSError) as exc:
        raise Cifar10FormatError(f"{path}: image {index} is not a readable JPEG ({exc})") from exc


def _jpeg_npz_split(path: Path) -> SplitReader:
    buf, offsets, y = _npz_arrays(path, "jpeg", "offsets", "y")
    labels = _checked_labels(y, path)
    if offsets.ndim != 1 or len(offsets) != len(labels) + 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise Cifar10FormatError(f"{path}: 'offsets' must be {len(labels) + 1} integers (one more than the "
                                 f"{len(labels)} labels), got {offsets.dtype} {offsets.shape}")
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise Cifar10FormatError(f"{path}: 'jpeg' must be the uint8 bytes of the JPEG files, got {buf.dtype} "
                                 f"{buf.shape}")
    if np.any(np.diff(offsets) < 0) or offsets[0] < 0 or offsets[-1] > len(buf):
        raise Cifar10FormatError(f"{path}: 'offsets' must not decrease and must lie within the {len(buf)} bytes "
                                 "of 'jpeg'")

    def encoded(i: int) -> bytes:
        return buf[offsets[i]:offsets[i + 1]].tobytes()

    return SplitReader(labels, lambda positions: np.stack([_decode_jpeg(encoded(i), path, i)
                                                           for i in positions.tolist()]), encoded)


def _read_npz(root: Path, split: str) -> SplitReader:
    if split == "train":
        return _jpeg_npz_split(root / "train_jpeg.npz")
    if (root / "test.npz").is_file():
        path = root / "test.npz"
        pixels, y = _npz_arrays(path, "x", "y")
        labels = _checked_labels(y, path)
        if pixels.dtype != np.uint8 or pixels.shape != (len(labels), 32, 32, 3):
            raise Cifar10FormatError(f"{path}: 'x' must be uint8 ({len(labels)}, 32, 32, 3), one 32x32 RGB image "
                                     f"per label, got {pixels.dtype} {pixels.shape}")
        return SplitReader(labels, lambda positions: pixels[positions])
    if (root / "test_jpeg.npz").is_file():
        return _jpeg_npz_split(root / "test_jpeg.npz")
    raise FileNotFoundError(f"{root} has train_jpeg.npz but neither test.npz nor test_jpeg.npz")


# --- ImageFolder tree ---------------------------------------------------------------------------------------------

def _class_label(folder: Path) -> int:
    if folder.name in CLASS_NAMES:
        return CLASS_NAMES.index(folder.name)
    if folder.name in [str(i) for i in range(len(CLASS_NAMES))]:
        return int(folder.name)
    raise Cifar10FormatError(f"unknown class folder {folder}: name class folders {', '.join(CLASS_NAMES)} or 0-9")


def _image_files(split_dir: Path) -> list[tuple[int, Path]]:
    """(label, file) pairs sorted by class, then file name: the same order on every machine."""
    found = []
    for folder in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = _class_label(folder)
        found += [(label, f) for f in folder.iterdir()  # dot files and folders: OS or tool metadata (._name.png)
                  if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file()]
    if not found:
        raise Cifar10FormatError(f"no .png/.jpg/.jpeg images in {split_dir}/<class>/")
    return sorted(found, key=lambda item: (item[0], item[1].name))


def _decode_image_file(path: Path) -> np.ndarray:
    try:
        img = Image.open(path)
    except UnidentifiedImageError as exc:
        raise Cifar10FormatError(f"{path} is not a readable image") from exc
    with img:
        if img.size != (32, 32):
            raise Cifar10FormatError(f"{path} is {img.size[0]}x{img.size[1]} pixels; CIFAR-10 images are 32x32")
        if img.mode not in ("RGB", "RGBA", "L"):
            raise Cifar10FormatError(f"{path} has mode {img.mode}; expected RGB (or RGBA / L, converted to RGB)")
        return np.asarray(img.convert("RGB"))


def _read_image_folder(root: Path, split: str) -> SplitReader:
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{root} looks like an ImageFolder tree but has no {split}/ folder")
    files = _image_files(split_dir)
    paths = [path for _, path in files]
    return SplitReader(np.array([label for label, _ in files], np.int64),
                       lambda positions: np.stack([_decode_image_file(paths[i]) for i in positions.tolist()]))
