"""The warm per-class pool: recent synthetic images of every class, served at once to `"fresh": false` requests.

Each image is served once, oldest first; the engine's spare batches refill every class back to its target (the
pool is one of the batcher's fill sources, and balanced filler can land here too). Bytes are capped per class
(`max_bytes` split evenly), so the whole never exceeds `max_bytes`. On disk, each image is one npz in the store's
array layout (`images` uint8 [1, C, H, W], `labels` int64 [1], `meta`: JSON with its figures and age) under
`<directory>/<class>/`, named by creation time; the pool then survives a restart. One service per directory (a lock
file enforces it).
"""
from __future__ import annotations

import fcntl
import io
import itertools
import json
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.atomic_file import TMP_SUFFIX, atomic_write
from shared.config import PoolConfig
from shared.errors import DfkdError
from shared.teacher import TeacherCard
from synth_service.batcher import FillSource
from synth_service.filler import capped_deficit_labels
from synth_service.metrics import SynthMetrics
from synth_service.result import SynthResult

ENTRY_OVERHEAD = 256  # bytes counted per in-memory image beside its pixels (figures, bookkeeping)
FIGURES = ("teacher_top1", "teacher_confidence", "teacher_margin", "verifier_top1")


@dataclass
class PoolImage:
    label: int
    created_at: float  # unix time
    figures: dict[str, float]  # FIGURES (verifier_top1 only when a verifier is configured)
    nbytes: int  # what it counts against the cap
    pixels: np.ndarray | None = None  # (C, H, W) uint8, in memory
    path: Path | None = None  # its npz, on disk


@dataclass
class PoolDraw:
    """Images taken for one request, in the request's label order."""

    result: SynthResult
    age_s: np.ndarray  # (N,) seconds since each image was made


class ClassPool:
    def __init__(self, cfg: PoolConfig, card: TeacherCard, metrics: SynthMetrics | None = None,
                 log: Callable[[str], None] = print):
        self.cfg, self.card, self.metrics, self.log = cfg, card, metrics, log
        self.num_classes = card.num_classes
        self.shape = (card.in_chans, card.image_size, card.image_size)
        self.share = cfg.max_bytes // self.num_classes  # per-class byte cap
        entry = self._entry_bytes_estimate()
        if cfg.per_class is None:
            self.target = self.share // entry
            if self.target < 1:
                raise DfkdError(f"service.pool.max_bytes ({cfg.max_bytes}) holds less than one image per class "
                                f"({self.num_classes} classes, about {entry} bytes per image): raise it")
        else:
            self.target = cfg.per_class
            if cfg.per_class * entry > self.share:
                raise DfkdError(f"service.pool.per_class ({cfg.per_class}) images of about {entry} bytes for each of "
                                f"{self.num_classes} classes need {cfg.per_class * entry * self.num_classes} bytes, "
                                f"over service.pool.max_bytes ({cfg.max_bytes})")
        self._classes: list[deque[PoolImage]] = [deque() for _ in range(self.num_classes)]
        self._bytes = [0] * self.num_classes
        self._reserved = [0] * self.num_classes  # refill images in flight
        self._lock = threading.Lock()
        self._names = itertools.count()
        self._lock_file: int | None = None
        if cfg.directory is not None:
            self._open_directory(Path(cfg.directory))
        self._publish_metrics()

    # -- serving ----------------------------------------------------------------------------------------------------
    def take(self, labels: Sequence[int]) -> PoolDraw | None:
        """Take images of these labels (each image once, oldest first); None when some class has too few (cold)."""
        need = Counter(labels)
        with self._lock:
            if any(len(self._classes[c]) < k for c, k in need.items()):
                return None
            picked = {c: [self._classes[c].popleft() for _ in range(k)] for c, k in need.items()}
            for c, entries in picked.items():
                self._bytes[c] -= sum(e.nbytes for e in entries)
        queues = {c: iter(entries) for c, entries in picked.items()}
        ordered = [next(queues[c]) for c in labels]
        try:
            pixels = [self._read(e) for e in ordered]
        except (OSError, ValueError, KeyError) as exc:  # a file changed under us: keep the rest, answer cold
            self.log(f"pool: cannot read an image ({exc}); serving by synthesis instead")
            self._put_back([e for e in ordered if e.path is None or e.path.exists()])
            self._publish_metrics()
            return None
        for e in ordered:
            if e.path is not None:
                e.path.unlink(missing_ok=True)
        self._publish_metrics()
        return self._draw(ordered, pixels)

    @property
    def in_memory(self) -> bool:
        return self.cfg.directory is None

    def status(self) -> dict:
        now = time.time()
        with self._lock:
            counts = [len(q) for q in self._classes]
            oldest = min((q[0].created_at for q in self._classes if q), default=None)
            return {"enabled": True, "directory": str(self.cfg.directory) if self.cfg.directory else None,
                    "target_per_class": self.target, "images": sum(counts), "images_per_class": counts,
                    "bytes": sum(self._bytes), "max_bytes": self.cfg.max_bytes,
                    "oldest_age_s": None if oldest is None else round(now - oldest, 3),
                    "refilling": sum(self._reserved)}

    # -- filling ----------------------------------------------------------------------------------------------------
    def put(self, result: SynthResult) -> int:
        """Add a batch's images (evicting each class's oldest beyond its target or byte share); returns how many
        were kept. A disk that refuses a write loses that image, logged, never the service."""
        now = time.time()
        entries = []
        for i in range(len(result.labels)):
            figures = {"teacher_top1": int(result.teacher_top1[i]),
                       "teacher_confidence": float(result.teacher_confidence[i]),
                       "teacher_margin": float(result.teacher_margin[i])}
            if result.verifier_top1 is not None:
                figures["verifier_top1"] = int(result.verifier_top1[i])
            label = int(result.labels[i])
            # A copy: a view would keep the whole batch's tensor alive behind a one-image entry.
            pixels = result.images[i].numpy().copy()
            if self.cfg.directory is None:
                entries.append(PoolImage(label, now, figures, pixels.nbytes + ENTRY_OVERHEAD, pixels=pixels))
                continue
            try:
                path = self._write(label, pixels, figures, now)
            except OSError as exc:
                self.log(f"pool: cannot write to {self.cfg.directory} ({exc}); image dropped")
                continue
            entries.append(PoolImage(label, now, figures, path.stat().st_size, path=path))
        evicted: list[PoolImage] = []
        with self._lock:
            for e in entries:
                self._classes[e.label].append(e)
                self._bytes[e.label] += e.nbytes
            for c in {e.label for e in entries}:
                evicted += self._trim(c)
        self._unlink(evicted)
        self._publish_metrics()
        return len(entries)

    def deficit(self) -> dict[int, int]:
        """Images each class is short of its target, counting refills in flight."""
        with self._lock:
            return {c: short for c in range(self.num_classes)
                    if (short := self.target - len(self._classes[c]) - self._reserved[c]) > 0}

    def refill_source(self) -> FillSource:
        return FillSource(name="pool", active=self._short, next_labels=self._refill_labels, deliver=self._refilled,
                          release=self._release)

    def close(self) -> None:
        if self._lock_file is not None:
            os.close(self._lock_file)  # releases the flock
            self._lock_file = None

    # -- internals --------------------------------------------------------------------------------------------------
    def _short(self) -> bool:
        return any(self.target - len(q) - r > 0 for q, r in zip(self._classes, self._reserved))

    def _refill_labels(self, space: int) -> list[int]:
        labels = capped_deficit_labels(self.deficit(), space, self.num_classes)
        with self._lock:
            for c in labels:
                self._reserved[c] += 1
        return labels

    def _refilled(self, result: SynthResult) -> None:
        try:
            self.put(result)
        finally:
            self._release(result.labels.tolist())

    def _release(self, labels: list[int]) -> None:
        with self._lock:
            for c in labels:
                self._reserved[c] -= 1

    def _trim(self, c: int) -> list[PoolImage]:
        out, q = [], self._classes[c]
        while q and (len(q) > self.target or self._bytes[c] > self.share):
            e = q.popleft()
            self._bytes[c] -= e.nbytes
            out.append(e)
        return out

    def _put_back(self, entries: list[PoolImage]) -> None:
        evicted = []
        with self._lock:
            for e in reversed(entries):
                self._classes[e.label].appendleft(e)
                self._bytes[e.label] += e.nbytes
            for c in {e.label for e in entries}:
                evicted += self._trim(c)
        self._unlink(evicted)

    @staticmethod
    def _unlink(entries: list[PoolImage]) -> None:
        for e in entries:
            if e.path is not None:
                e.path.unlink(missing_ok=True)

    def _draw(self, entries: list[PoolImage], pixels: list[np.ndarray]) -> PoolDraw:
        n, now = len(entries), time.time()
        fig = lambda name, dtype: torch.tensor([e.figures[name] for e in entries], dtype=dtype)  # noqa: E731
        has_verifier = all("verifier_top1" in e.figures for e in entries)
        result = SynthResult(
            images=torch.from_numpy(np.stack(pixels)), labels=torch.tensor([e.label for e in entries]),
            teacher_top1=fig("teacher_top1", torch.int64), teacher_confidence=fig("teacher_confidence", torch.float32),
            teacher_margin=fig("teacher_margin", torch.float32), features=torch.empty(n, 0), final_terms={},
            history={}, seconds=0.0, iterations=0, seed=0,
            verifier_top1=fig("verifier_top1", torch.int64) if has_verifier else None)
        return PoolDraw(result, np.array([now - e.created_at for e in entries], dtype=np.float64))

    def _publish_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.pool_images.set(sum(len(q) for q in self._classes))
            self.metrics.pool_bytes.set(sum(self._bytes))

    def _entry_bytes_estimate(self) -> int:
        if self.cfg.directory is None:
            return int(np.prod(self.shape)) + ENTRY_OVERHEAD
        sample = {k: 0.0 for k in FIGURES}
        return len(self._npz_bytes(0, np.zeros(self.shape, np.uint8), sample, time.time()))

    @staticmethod
    def _npz_bytes(label: int, pixels: np.ndarray, figures: dict[str, float], created_at: float) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, images=pixels[None], labels=np.array([label], np.int64),
                 meta=np.array(json.dumps({"created_at": created_at, "figures": figures})))
        return buf.getvalue()

    def _write(self, label: int, pixels: np.ndarray, figures: dict[str, float], created_at: float) -> Path:
        path = Path(self.cfg.directory) / str(label) / f"{time.time_ns():020d}-{next(self._names):08d}.npz"
        body = self._npz_bytes(label, pixels, figures, created_at)
        atomic_write(path, lambda f: f.write(body), durable=False)  # a cache: a power cut may lose the latest
        return path

    def _read(self, e: PoolImage) -> np.ndarray:
        if e.pixels is not None:
            return e.pixels
        with np.load(e.path, allow_pickle=False) as z:
            pixels = z["images"][0]
        if pixels.shape != self.shape or pixels.dtype != np.uint8:
            raise ValueError(f"{e.path} holds a {pixels.dtype} image of shape {pixels.shape}, not uint8 {self.shape}")
        return pixels

    def _identity(self) -> dict:
        return {"teacher_fingerprint": self.card.fingerprint, "num_classes": self.num_classes,
                "shape": list(self.shape)}

    def _open_directory(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self._lock_file = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise DfkdError(f"service.pool.directory {root} is in use by another service; give each its own") \
                from None
        identity_path = root / "pool.json"
        if identity_path.exists():
            try:
                stored = json.loads(identity_path.read_text())
            except (OSError, ValueError) as exc:
                self.close()
                raise DfkdError(f"{identity_path} is unreadable ({exc}); remove the pool directory or point "
                                "service.pool.directory elsewhere") from None
            if stored != self._identity():
                self.close()
                raise DfkdError(f"service.pool.directory {root} holds images of another teacher or shape "
                                f"({stored}); point service.pool.directory at an empty directory or remove it")
        else:
            atomic_write(identity_path, lambda f: f.write(json.dumps(self._identity()).encode()))
        kept = quarantined = 0
        for c in range(self.num_classes):
            directory = root / str(c)
            directory.mkdir(exist_ok=True)
            for tmp in directory.glob(f".*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)  # a write cut short by a crash; this service holds the lock
            for path in sorted(directory.glob("*.npz")):
                try:
                    entry = self._scan(path, c)
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    self._quarantine(root, path, exc)
                    quarantined += 1
                    continue
                self._classes[c].append(entry)
                self._bytes[c] += entry.nbytes
                kept += 1
            self._unlink(self._trim(c))
        self.log(f"pool: {kept} images read back from {root}" + (f", {quarantined} unreadable quarantined"
                                                                  if quarantined else ""))

    def _scan(self, path: Path, c: int) -> PoolImage:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            label = int(z["labels"][0])
            shape = z["images"].shape
        if label != c or shape != (1, *self.shape):
            raise ValueError(f"class {label}, shape {shape}: expected class {c}, shape {(1, *self.shape)}")
        figures = {k: float(v) for k, v in meta["figures"].items() if k in FIGURES}
        return PoolImage(c, float(meta["created_at"]), figures, path.stat().st_size, path=path)

    def _quarantine(self, root: Path, path: Path, exc: Exception) -> None:
        target = root / "quarantine" / f"{path.parent.name}-{path.name}"
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        self.log(f"pool: {path} is unreadable ({exc}); moved to {target}")
