"""Batches that mix real images (from a reader such as RealImageReader) into synthetic ones at a fixed share.

The real count per step comes from error diffusion: step t takes round((t+1)·f·B) - round(t·f·B) real images,
so after any number of steps the real total is within half an image of f·B·steps, with no randomness.
real_fraction=1.0 is the partial-data setting (the synthetic source is never called); 0.0 never opens the reader.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, NamedTuple, Union

import torch

from trainer.augment import to_device

Batch = tuple[torch.Tensor, torch.Tensor]
SyntheticSampleFn = Callable[[int], Union[Batch, tuple[torch.Tensor, torch.Tensor, Union[torch.Tensor, None]]]]
RealSource = Union[Iterator[Batch], Iterable[Batch], Callable[[], Iterator[Batch]]]

SYNTHETIC, REAL = 0, 1


class MixedBatch(NamedTuple):
    images: torch.Tensor  # (B, C, H, W) float, normalised
    labels: torch.Tensor  # (B,) int64
    source: torch.Tensor  # (B,) int64: SYNTHETIC (0) or REAL (1), on the images' device
    teacher_logits: torch.Tensor | None = None  # (M, B, K) shipped with the synthetic images (real rows: zeros)


class MixInSampler:
    """`next()` gives a MixedBatch of `batch_size` images, `real_count(step)` of them real.

    `real` is an iterator of `(images, labels)` batches of any size, or a zero-argument factory for one (called
    on first use, so a run that mixes in nothing never starts DALI). Real images are moved to the synthetic
    images' device. With `shuffle`, a seeded permutation interleaves the two sources, so a slice of the batch
    (a micro-batch) also holds both. The synthetic source may return `(images, labels, logits)`, logits
    (M, n, K) or None: they ride along, zero-filled for the real rows.
    """

    def __init__(self, real: RealSource | None, synthetic_sample_fn: SyntheticSampleFn | None,
                 real_fraction: float, batch_size: int, seed: int = 0, *, shuffle: bool = True) -> None:
        if not 0.0 <= real_fraction <= 1.0:
            raise ValueError(f"real_fraction must be in [0, 1], got {real_fraction}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if real_fraction > 0 and real is None:
            raise ValueError(f"real_fraction={real_fraction} needs a real-image source (set real_dir)")
        if real_fraction < 1 and synthetic_sample_fn is None:
            raise ValueError(f"real_fraction={real_fraction} < 1 needs a synthetic source")
        self.real_fraction, self.batch_size, self.shuffle = real_fraction, batch_size, shuffle
        self._real_source, self._real_iter = real, None
        self._synthetic = synthetic_sample_fn
        self._gen = torch.Generator().manual_seed(seed)
        self._buffer: list[Batch] = []  # real images fetched but not yet used (reader batches need not match)
        self.step = 0
        self.real_seen = 0
        self.synthetic_seen = 0

    def real_count(self, step: int) -> int:
        """Real images in the batch of `step` (0-based)."""
        per_step = self.real_fraction * self.batch_size
        return _round_half_up((step + 1) * per_step) - _round_half_up(step * per_step)

    def __iter__(self) -> Iterator[MixedBatch]:
        return self

    def __next__(self) -> MixedBatch:
        n_real = self.real_count(self.step)
        n_syn = self.batch_size - n_real
        parts: list[Batch] = []
        logits = None
        if n_syn:
            images, labels, logits = self._take_synthetic(n_syn)
            parts.append((images, labels))
        if n_real:
            parts.append(self._take_real(n_real))
        if len(parts) == 2 and parts[0][0].shape[1:] != parts[1][0].shape[1:]:
            raise ValueError(f"synthetic images are {tuple(parts[0][0].shape[1:])} but real ones are "
                             f"{tuple(parts[1][0].shape[1:])}; give the reader the teacher's in_chans and image_size")
        device = parts[0][0].device  # the synthetic side's device when there is one (it is usually the GPU)
        # Host-to-GPU copies go through pinned memory: a pageable one would make the host wait for the GPU.
        images = torch.cat([to_device(x, device) for x, _ in parts])
        labels = torch.cat([to_device(y, device).long() for _, y in parts])
        source = torch.cat([torch.full((n_syn,), SYNTHETIC, dtype=torch.long, device=device),
                            torch.full((n_real,), REAL, dtype=torch.long, device=device)])
        if logits is not None:
            logits = to_device(logits, device).float()
            if n_real:
                logits = torch.cat([logits, logits.new_zeros(logits.shape[0], n_real, logits.shape[2])], dim=1)
        if self.shuffle:
            perm = to_device(torch.randperm(self.batch_size, generator=self._gen), device)
            images, labels, source = images[perm], labels[perm], source[perm]
            logits = logits[:, perm] if logits is not None else None
        self.step += 1
        self.real_seen += n_real
        self.synthetic_seen += n_syn
        return MixedBatch(images, labels, source, logits)

    def _take_synthetic(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        images, labels, *rest = self._synthetic(n)
        logits = rest[0] if rest else None
        if images.shape[0] != n or labels.shape != (n,):
            raise ValueError(f"synthetic_sample_fn({n}) returned images {tuple(images.shape)} and labels "
                             f"{tuple(labels.shape)}; expected {n} images and labels of shape ({n},)")
        if logits is not None and (logits.ndim != 3 or logits.shape[1] != n):
            raise ValueError(f"synthetic_sample_fn({n}) returned logits {tuple(logits.shape)}; expected (M, {n}, K)")
        return images, labels, logits

    def _take_real(self, n: int) -> Batch:
        have = sum(len(y) for _, y in self._buffer)
        while have < n:
            images, labels = next(self._real())
            self._buffer.append((images, labels.view(-1)))
            have += len(labels)
        if len(self._buffer) == 1:
            images, labels = self._buffer[0]
        else:
            images, labels = torch.cat([x for x, _ in self._buffer]), torch.cat([y for _, y in self._buffer])
        self._buffer = [(images[n:], labels[n:])] if have > n else []
        return images[:n], labels[:n]

    def _real(self) -> Iterator[Batch]:
        if self._real_iter is None:
            src = self._real_source
            if hasattr(src, "__next__"):
                self._real_iter = src
            elif callable(src):
                self._real_iter = src()
            else:
                self._real_iter = iter(src)
        return self._real_iter


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)
