"""What a trainer accepts from the stream and keeps in its store: size caps first, then its teacher's shapes.

The caps come before anything a header claims can size an allocation (chunk bookkeeping, payload buffers): a
hostile or broken producer can only get its entries dead-lettered, never grow the trainer's memory. The teacher
part (channels, image size, classes, logits width) keeps a batch that would crash the training step out of the
store. The consumer checks headers as they arrive; the store checks the arrays it holds when it opens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.config import StreamConfig
from shared.wire import BatchHeader


@dataclass(frozen=True)
class BatchContract:
    max_images: int                                 # images in one batch
    max_bytes: int                                  # payload bytes of one batch (images + logits)
    max_chunks: int                                 # stream entries one batch may span
    fingerprint: str | None = None                  # the teacher's; None: any
    image_shape: tuple[int, int, int] | None = None  # (C, H, W); None: any
    num_classes: int | None = None                  # labels and logits width; None: any
    ensemble: tuple[str, ...] | None = None         # fingerprints of the logits' members, teacher first; None: any

    @classmethod
    def from_stream(cls, stream: StreamConfig, card=None, ensemble: tuple[str, ...] | None = None,
                    ) -> "BatchContract":
        """The stream's caps, plus `card`'s (a TeacherCard) shapes and fingerprint when given, and the fingerprints
        of a teacher ensemble whose logits batches must carry when they carry any."""
        caps = dict(max_images=stream.max_batch_images, max_bytes=stream.max_batch_bytes,
                    max_chunks=stream.max_batch_chunks, ensemble=ensemble)
        if card is None:
            return cls(**caps)
        return cls(**caps, fingerprint=card.fingerprint or None,
                   image_shape=(card.in_chans, card.image_size, card.image_size), num_classes=card.num_classes)

    def header_violation(self, header: BatchHeader) -> str | None:
        """Why this (already self-consistent) header is refused, or None. Cheap: reads no payload."""
        n = header.shape[0]
        if n > self.max_images:
            return f"{n} images in one batch; the limit is stream.max_batch_images = {self.max_images}"
        if header.payload_bytes > self.max_bytes:
            return (f"payload of {header.payload_bytes} bytes; the limit is stream.max_batch_bytes = "
                    f"{self.max_bytes}")
        # Every chunk carries at least one payload byte, so a count above the payload size is a lie.
        if header.chunk_count > min(self.max_chunks, header.payload_bytes):
            return (f"chunk_count {header.chunk_count} is over the limit of "
                    f"{min(self.max_chunks, header.payload_bytes)} for a {header.payload_bytes}-byte payload "
                    f"(stream.max_batch_chunks = {self.max_chunks})")
        if self.fingerprint is not None and header.teacher_fingerprint != self.fingerprint:
            return (f"teacher fingerprint {header.teacher_fingerprint[:12]}... is not this trainer's teacher "
                    f"{self.fingerprint[:12]}...")
        if self.image_shape is not None and tuple(header.shape[1:]) != self.image_shape:
            c, h, w = self.image_shape
            return (f"images are {_chw(header.shape[1:])}; this trainer's teacher takes {_chw((c, h, w))}")
        if self.num_classes is not None:
            k = self.num_classes
            bad = sorted({label for label in header.labels if label >= k})
            if bad:
                return f"label(s) {bad[:10]} out of range: the teacher has {k} classes (0..{k - 1})"
            if header.logits is not None and header.logits.classes != k:
                return f"logits have {header.logits.classes} columns; the teacher has {k} classes"
        if self.ensemble is not None and header.logits is not None and tuple(header.logits.members) != self.ensemble:
            return (f"logits of the ensemble {_short(header.logits.members)}; this trainer distils from "
                    f"{_short(self.ensemble)} (its `ensemble` setting must match the service's)")
        return None

    def arrays_violation(self, header: BatchHeader, images_shape: tuple[int, ...], images_dtype: np.dtype,
                         labels: np.ndarray, logits: np.ndarray | None) -> str | None:
        """Why stored arrays are refused: the header's checks, and do the arrays agree with their header?"""
        reason = self.header_violation(header)
        if reason is not None:
            return reason
        if tuple(images_shape) != tuple(header.shape) or images_dtype != np.uint8:
            return f"images are {images_dtype} {list(images_shape)}; the header says uint8 {list(header.shape)}"
        if labels.ndim != 1 or labels.tolist() != list(header.labels):
            return "labels differ from the header's"
        if (logits is None) != (header.logits_shape is None):
            return "teacher logits are missing or unexpected for this header"
        if logits is not None:
            if tuple(logits.shape) != tuple(header.logits_shape):
                return f"logits are {list(logits.shape)}; the header says {list(header.logits_shape)}"
            if not np.isfinite(logits).all():
                return "non-finite teacher logits"
        return None


def _short(fingerprints) -> str:
    return "[" + ", ".join(f[:12] + "..." for f in fingerprints) + "]"


def _chw(shape) -> str:
    c, h, w = shape
    return f"{c}-channel {h}x{w}"
