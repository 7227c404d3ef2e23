"""An endless stream of augmented, normalised real images from an ImageFolder tree, decoded by NVIDIA DALI.

CPU mode (`device="cpu"`, no CUDA needed) decodes with libjpeg-turbo/libpng in DALI's threads; GPU mode decodes
with nvJPEG (`device="mixed"`) and augments on the GPU, so batches arrive as CUDA tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch

from shared.errors import DfkdError

PipelineDevice = Literal["cpu", "gpu"]
# The suffixes fn.readers.file picks up (case-insensitive); used only to explain an empty tree before DALI does.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".pnm", ".ppm", ".pgm", ".pbm",
                            ".jp2", ".webp"})


class ImageFolderError(DfkdError, ValueError):
    """A real-data folder that is not an ImageFolder tree (`root/{class}/{image}`) with at least one image."""


def pipeline_device(requested: str = "auto") -> PipelineDevice:
    """Where the DALI pipeline runs: "gpu" only when asked for (auto, gpu, cuda, cuda:N) and CUDA is there."""
    if requested == "cpu":
        return "cpu"
    if requested not in ("auto", "gpu", "cuda") and not requested.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu, gpu, cuda or cuda:N, got {requested!r}")
    if torch.cuda.is_available():
        return "gpu"
    if requested != "auto":
        raise RuntimeError(f"DALI device {requested!r} asked for, but CUDA is not available; use 'cpu' or 'auto'")
    return "cpu"


def image_folder_classes(root: Path) -> list[str]:
    """Class names in label order, exactly as fn.readers.file assigns them: every sub-folder, sorted.

    Raises ImageFolderError for what DALI would silently misread: loose images in root (ignored by DALI),
    hidden folders (DALI makes them classes), or no images at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise ImageFolderError(f"real-image folder {root} does not exist or is not a folder")
    entries = sorted(root.iterdir())
    loose = [p.name for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise ImageFolderError(f"{root} has images directly inside it ({loose[:3]}...); an ImageFolder keeps "
                               "each image in a per-class sub-folder: root/{class}/{image}")
    classes = [p.name for p in entries if p.is_dir()]
    hidden = [c for c in classes if c.startswith(".")]
    if hidden:
        raise ImageFolderError(f"{root} has hidden folders {hidden}; DALI would read them as classes, remove them")
    if not any(f.suffix.lower() in IMAGE_SUFFIXES for c in classes for f in (root / c).iterdir() if f.is_file()):
        raise ImageFolderError(f"no images in {root}: expected root/{{class}}/{{image}} with one of the suffixes "
                               f"{sorted(IMAGE_SUFFIXES)} (sub-folders of class folders are not read)")
    return sorted(classes)


class RealImageReader:
    """Iterate forever over `(images (B, C, H, W) float32 normalised, labels (B,) int64)`.

    Per image: random-resized crop to `image_size` (area share in `scale`), optional horizontal flip, then
    `(x / 255 - mean) / std`. Labels index `class_names` (sorted folder names). Shuffling uses DALI's
    `initial_fill`-image buffer; `shard_id`/`num_shards` split the files across data-parallel workers.
    """

    def __init__(self, root: Path, batch_size: int, image_size: int, mean: Sequence[float], std: Sequence[float],
                 *, in_chans: int = 3, device: PipelineDevice = "cpu", device_id: int = 0, seed: int = 0,
                 num_threads: int = 2, scale: tuple[float, float] = (0.6, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True, shard_id: int = 0,
                 num_shards: int = 1, prefetch: int = 2, initial_fill: int = 1024) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean/std need {in_chans} values each, got {len(mean)}/{len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {list(std)}")
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu' (see pipeline_device()), got {device!r}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if batch_size < 1 or image_size < 1:
            raise ValueError(f"batch_size and image_size must be >= 1, got {batch_size}, {image_size}")
        self.root = Path(root)
        self.class_names = image_folder_classes(self.root)
        self.batch_size, self.image_size, self.in_chans, self.device = batch_size, image_size, in_chans, device
        from nvidia.dali import fn, pipeline_def, types  # local: DALI is only needed when real data is mixed in
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        @pipeline_def(batch_size=batch_size, num_threads=num_threads, seed=seed, prefetch_queue_depth=prefetch,
                      device_id=device_id if device == "gpu" else None)  # None: no CUDA context at all
        def pipe():
            files, labels = fn.readers.file(file_root=str(self.root), random_shuffle=True, initial_fill=initial_fill,
                                            shard_id=shard_id, num_shards=num_shards, name="Reader")
            images = fn.decoders.image(files, device="mixed" if device == "gpu" else "cpu",
                                       output_type=types.GRAY if in_chans == 1 else types.RGB)
            images = fn.random_resized_crop(images, size=[image_size, image_size], random_area=list(scale),
                                            random_aspect_ratio=list(ratio))
            # crop_mirror_normalize's `mirror` is the flip, fused into the normalising pass (no extra copy).
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              mean=[m * 255 for m in mean], std=[s * 255 for s in std],
                                              mirror=fn.random.coin_flip() if flip else 0)
            return images, labels.gpu() if device == "gpu" else labels

        self._pipe = pipe()
        try:
            self._pipe.build()
        except RuntimeError as e:  # DALI's C++ assert text; say which folder and keep the cause
            raise ImageFolderError(f"DALI could not read {self.root}: {str(e).splitlines()[-1][:300]}") from e
        self.num_images: int = self._pipe.epoch_size("Reader")  # files in this shard, as DALI counted them
        # No reader_name: the reader wraps into the next epoch inside a batch, so the stream never stops and no
        # image is dropped or padded at epoch ends (a reader_name + auto_reset iterator drops or repeats a tail).
        self._iter = DALIGenericIterator(self._pipe, ["images", "labels"])
        self.batches_seen = 0

    @property
    def epoch(self) -> float:
        """Passes over this shard's images so far."""
        return self.batches_seen * self.batch_size / self.num_images

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = next(self._iter)[0]
        self.batches_seen += 1
        return out["images"], out["labels"].view(-1).long()
