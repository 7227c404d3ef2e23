"""The trainer's durable, append-only store of synthetic batches: one npz per batch, readable without us.

Layout under `root`:
  batches/{batch_id}.npz  arrays `images` (uint8 NCHW), `labels` (int64), optional `teacher_logits` (float16
                          [M, V, N, K]: ensemble members x views, as on the wire; [N, K] in stores written before),
                          `meta` (0-d unicode: the batch's wire header as JSON) and `position` (0-d int64: arrival
                          order). `np.load(path, allow_pickle=False)` reads it; nothing in it is pickled.
  index.jsonl             one line per batch in arrival order: a cache for fast opening. The npz files are the truth:
                          a missing, torn or stale index is rebuilt from them on open.
  quarantine/             batches refused on open (unreadable, or outside the trainer's contract), moved aside
                          with `reasons.jsonl` saying why: a bad file is kept for inspection, never trained on.

Writes are crash-safe: temp file in the same directory, fsync, atomic rename, fsync of the directory. A SIGKILL at
any point leaves either the whole batch or nothing (plus a temp file that the next open removes).
One writing process per store; any number of readers.
See docs/architecture.md §5.
"""
from __future__ import annotations

import json
import os
import re
import time
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from shared.atomic_file import TMP_SUFFIX, atomic_write, fsync_dir, temp_writer_pid  # noqa: F401 (re-exported)
from shared.batch_contract import BatchContract
from shared.wire import SAFE_ID, BatchCodec, BatchHeader, SynthesisRecord, WireBatch, logit_names

_SAFE_ID = re.compile(SAFE_ID)


@dataclass(frozen=True)
class StoredBatch:
    """One batch read back from the store."""

    batch_id: str
    images: np.ndarray            # uint8 [N, C, H, W]
    labels: np.ndarray            # int64 [N]
    logits: np.ndarray | None     # float16 [M, V, N, K] (ensemble members x views), if shipped
    header: dict[str, Any]        # the wire header it arrived with (fingerprint, synthesis params, stats, ...)
    position: int                 # arrival order in this store
    logit_members: tuple[str, ...] = ()
    logit_views: tuple[str, ...] = ()

    def to_wire(self) -> WireBatch:
        h = self.header
        return WireBatch(batch_id=self.batch_id, sequence=h["sequence"], producer_id=h["producer_id"],
                         teacher_fingerprint=h["teacher_fingerprint"], mean=tuple(h["mean"]), std=tuple(h["std"]),
                         labels=self.labels.tolist(), images=self.images,
                         synthesis=SynthesisRecord.model_validate(h["synthesis"]), logits=self.logits,
                         **({"logit_members": self.logit_members, "logit_views": self.logit_views}
                            if self.logits is not None else {}),
                         stats=h.get("stats", {}), created_at=h["created_at"])


def check_batch_id(batch_id: str) -> str:
    # Ids become file names: refuse anything that could escape the directory or clash with temp files.
    if not isinstance(batch_id, str) or not _SAFE_ID.match(batch_id):
        raise ValueError(f"invalid batch id {batch_id!r}: expected {SAFE_ID}")
    return batch_id


def _writer_alive(tmp: Path) -> bool:
    pid = temp_writer_pid(tmp)
    if pid is None:
        return False
    if pid == os.getpid():
        return False  # this process is only opening the store: the file is a previous life's (pid reused)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SyntheticStore:
    """`store.put(batch)` once per batch id; `store.get(id)`, `store.batch_ids()` in arrival order.

    With a `contract`, every batch is checked against it: on put (refused with ValueError) and on open (a stored
    batch that breaks it is quarantined, so a bad file can never crash-loop the trainer).
    """

    def __init__(self, root: Path | str, contract: BatchContract | None = None) -> None:
        self.root = Path(root)
        self.batch_dir = self.root / "batches"
        self.index_path = self.root / "index.jsonl"
        self.quarantine_dir = self.root / "quarantine"
        self.batch_dir.mkdir(parents=True, exist_ok=True)
        self.contract = contract
        self.quarantined: list[tuple[str, str]] = []  # (batch id, reason) moved aside by this open
        self._codec = BatchCodec()
        self._ids: list[str] = []
        self._counts: dict[str, int] = {}
        self._positions: dict[str, int] = {}
        self._digests: dict[str, str] = {}  # payload sha256 by batch id, filled as files are read
        self._next_position = 0  # above every position used, even by files deleted since: order stays unambiguous
        self._remove_dead_temp_files()
        self._load_index()

    # ---- reading -------------------------------------------------------------------------------------------------

    def __contains__(self, batch_id: object) -> bool:
        return batch_id in self._counts

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self.batch_ids())

    def batch_ids(self) -> list[str]:
        """All batch ids, in the order they were stored."""
        return list(self._ids)

    def image_count(self, batch_id: str) -> int:
        return self._counts[batch_id]

    def position(self, batch_id: str) -> int:
        """Arrival order: increases along batch_ids(), and is never reused, even after a batch is moved aside."""
        return self._positions[batch_id]

    @property
    def next_position(self) -> int:
        """The position the next stored batch gets."""
        return self._next_position

    def quarantined_ids(self) -> set[str]:
        """Every batch id ever moved aside from this store (by any open)."""
        try:
            lines = (self.quarantine_dir / "reasons.jsonl").read_bytes().splitlines()
        except FileNotFoundError:
            return set()
        ids = set()
        for line in lines:
            try:
                ids.add(json.loads(line)["batch_id"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line
        return ids

    def images_count(self) -> int:
        """Images in the whole store."""
        return sum(self._counts.values())

    def path(self, batch_id: str) -> Path:
        return self.batch_dir / f"{check_batch_id(batch_id)}.npz"

    def get(self, batch_id: str) -> StoredBatch:
        if batch_id not in self:
            raise KeyError(f"batch {batch_id!r} is not in the store at {self.root}")
        return read_batch(self.path(batch_id))

    def digest(self, batch_id: str) -> str:
        """The stored batch's payload sha256 (as on the wire): tells a true copy from another batch with its id."""
        if batch_id not in self._digests:
            if not self.path(batch_id).is_file():
                raise KeyError(f"batch {batch_id!r} is not in the store at {self.root}")
            self._digests[batch_id] = inspect_batch(self.path(batch_id)).header.payload_sha256
        return self._digests[batch_id]

    # ---- writing -------------------------------------------------------------------------------------------------

    def put(self, batch: WireBatch) -> bool:
        """Store `batch` durably; False (and nothing written) if its id is already stored."""
        path = self.path(batch.batch_id)
        if batch.batch_id in self or path.exists():
            return False
        position = self._next_position
        # The wire header (checksum, shapes, synthesis record) travels with the arrays: the file explains itself.
        wire_header = self._codec.header(batch, self._codec.payload(batch))
        if self.contract is not None:
            reason = self.contract.arrays_violation(wire_header, batch.images.shape, batch.images.dtype,
                                                    np.asarray(batch.labels), batch.logits)
            if reason is not None:
                raise ValueError(f"batch {batch.batch_id!r} refused by the store at {self.root}: {reason}")
        header = wire_header.model_dump_json(exclude={"chunk_index", "chunk_count"})
        arrays: dict[str, np.ndarray] = {
            "images": np.ascontiguousarray(batch.images, dtype=np.uint8),
            "labels": np.asarray(batch.labels, dtype=np.int64),
            "meta": np.array(header),
            "position": np.array(position, dtype=np.int64),
        }
        if batch.logits is not None:
            arrays["teacher_logits"] = np.asarray(batch.logits, dtype=np.float16)
        atomic_write(path, lambda f: np.savez(f, **arrays))
        # The file is durable now; a crash before the index line only costs a rebuild on the next open.
        self._append_index(batch.batch_id, len(batch.labels), position)
        self._ids.append(batch.batch_id)
        self._counts[batch.batch_id] = len(batch.labels)
        self._positions[batch.batch_id] = position
        self._digests[batch.batch_id] = wire_header.payload_sha256
        self._next_position = position + 1
        return True

    # ---- export --------------------------------------------------------------------------------------------------

    def export_imagefolder(self, out_dir: Path | str, class_names: Sequence[str] | None = None) -> int:
        """Write every image as `out_dir/{class}/{batch_id}_{i}.png` (an ImageFolder tree). Returns images written."""
        from PIL import Image  # only export needs Pillow

        out = Path(out_dir)
        if class_names is not None:
            for name in class_names:
                if not name or "/" in name or name in (".", ".."):
                    raise ValueError(f"class name {name!r} cannot be a directory name")
        written = 0
        for batch_id in self._ids:
            batch = self.get(batch_id)
            for i, (image, label) in enumerate(zip(batch.images, batch.labels.tolist())):
                if class_names is not None and not 0 <= label < len(class_names):
                    raise ValueError(f"batch {batch_id!r} image {i}: label {label} has no name among "
                                     f"{len(class_names)} class names")
                folder = out / (class_names[label] if class_names is not None else str(label))
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_hwc(image, batch_id)).save(folder / f"{batch_id}_{i}.png")
                written += 1
        return written

    # ---- index ---------------------------------------------------------------------------------------------------

    def _append_index(self, batch_id: str, images: int, position: int) -> None:
        created = not self.index_path.exists()
        line = json.dumps({"batch_id": batch_id, "images": images, "position": position}) + "\n"
        with open(self.index_path, "ab") as f:
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_dir(self.root)

    def _load_index(self) -> None:
        # Only names this store could have written: temp files and foreign files are not batches.
        on_disk = {name for name in (p.name.removesuffix(".npz") for p in self.batch_dir.glob("*.npz"))
                   if _SAFE_ID.match(name)}
        listed, intact = self._read_index()
        kept = {}
        for batch_id, images, position in listed:
            if batch_id in on_disk and batch_id not in kept:  # lines for lost files, or twice, are dropped
                kept[batch_id] = (position, images)
        # Files the index never heard of (a crash between rename and index append, or a deleted index):
        # their `position` array puts them back in arrival order.
        unlisted = {}
        for batch_id in sorted(on_disk - set(kept)):
            try:
                unlisted[batch_id] = self._position_and_count(batch_id)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
                self._quarantine(batch_id, f"unreadable: {error}")
        ordered = sorted({**kept, **unlisted}.items(), key=lambda item: (item[1][0], item[0]))
        if self.contract is not None:
            # The file's own label count wins over the index's: the index is only a cache.
            checked = ((batch_id, position, self._admitted_count(batch_id)) for batch_id, (position, _) in ordered)
            ordered = [(batch_id, (position, n)) for batch_id, position, n in checked if n is not None]
        self._ids = [batch_id for batch_id, _ in ordered]
        self._counts = {batch_id: images for batch_id, (_, images) in ordered}
        self._positions = {batch_id: position for batch_id, (position, _) in ordered}
        positions = [position for _, (position, _) in ordered] + [position for _, _, position in listed]
        self._next_position = max(positions, default=-1) + 1
        if not intact or unlisted or len(kept) != len(listed) or self.quarantined:
            self._rewrite_index([position for _, (position, _) in ordered])

    def _admitted_count(self, batch_id: str) -> int | None:
        """Check one stored batch against the contract (no image data is read): its image count, or None when it
        fails and was quarantined."""
        try:
            summary = inspect_batch(self.path(batch_id))
            reason = self.contract.arrays_violation(summary.header, summary.images_shape, summary.images_dtype,
                                                    summary.labels, summary.logits)
            if reason is None and summary.header.batch_id != batch_id:
                reason = f"its header names batch {summary.header.batch_id!r}"
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            reason = f"unreadable: {error}"
        if reason is not None:
            self._quarantine(batch_id, reason)
            return None
        self._digests[batch_id] = summary.header.payload_sha256
        return len(summary.labels)

    def _quarantine(self, batch_id: str, reason: str) -> None:
        """Move a bad batch file aside (kept for inspection) and say why, in the store and to the caller."""
        self.quarantine_dir.mkdir(exist_ok=True)
        target = self.quarantine_dir / f"{batch_id}.npz"
        suffix = 1
        while target.exists():  # an earlier quarantine of the same id keeps its file too
            target = self.quarantine_dir / f"{batch_id}.{suffix}.npz"
            suffix += 1
        os.replace(self.path(batch_id), target)
        line = json.dumps({"batch_id": batch_id, "file": target.name, "reason": reason, "at": round(time.time(), 3)})
        with open(self.quarantine_dir / "reasons.jsonl", "ab") as f:
            f.write(line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.quarantine_dir)
        fsync_dir(self.batch_dir)
        self.quarantined.append((batch_id, reason))

    def _read_index(self) -> tuple[list[tuple[str, int, int]], bool]:
        """(batch id, image count, position) lines up to the first unreadable one; whether all of it was readable."""
        try:
            raw = self.index_path.read_bytes()
        except FileNotFoundError:
            return [], False
        lines = raw.split(b"\n")
        intact = lines[-1] == b""  # a torn append leaves a last line without its newline
        entries: list[tuple[str, int, int]] = []
        for line in lines[:-1]:
            try:
                record = json.loads(line)
                entries.append((check_batch_id(record["batch_id"]), int(record["images"]), int(record["position"])))
            except (ValueError, KeyError, TypeError):
                return entries, False
        return entries, intact

    def _position_and_count(self, batch_id: str) -> tuple[int, int]:
        with np.load(self.path(batch_id), allow_pickle=False) as z:
            return int(z["position"]), len(z["labels"])

    def _rewrite_index(self, positions: list[int]) -> None:
        lines = "".join(json.dumps({"batch_id": b, "images": self._counts[b], "position": p}) + "\n"
                        for b, p in zip(self._ids, positions))
        atomic_write(self.index_path, lambda f: f.write(lines.encode()))

    def _remove_dead_temp_files(self) -> None:
        for directory in (self.root, self.batch_dir):
            for tmp in directory.glob(f".*{TMP_SUFFIX}"):
                if not _writer_alive(tmp):
                    tmp.unlink(missing_ok=True)



class Sample(NamedTuple):
    images: np.ndarray          # uint8 [B, C, H, W]
    labels: np.ndarray          # int64 [B]
    logits: np.ndarray | None   # float16 [M, V, B, K]; None unless every image drawn has logits of the same
                                # members and views
    n_fresh: int                # how many of the B images had never been sampled before
    logit_members: tuple[str, ...] = ()
    logit_views: tuple[str, ...] = ()


class FreshFirstSampler:
    """Training batches from a store: images never sampled before first (arrival order), the rest uniform replay.

    Fresh synthetic images are the expensive, informative ones, so each is used as soon as it arrives; replay keeps
    the batch full (and the student from forgetting) when synthesis is slower than training.
    """

    def __init__(self, store: SyntheticStore, batch_size: int, seed: int = 0, *, cache_batches: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.store = store
        self.batch_size = batch_size
        self._rng = np.random.default_rng(seed)
        # The store is append-only and ordered, so "seen" is a position: batches before `_cursor` are fully
        # used, and the first `_offset` images of batch `_cursor`.
        self._cursor = 0
        self._offset = 0
        self._totals = np.zeros(0, dtype=np.int64)  # running image count over batches in store order (for replay)
        self._cache: OrderedDict[str, StoredBatch] = OrderedDict()
        self._cache_batches = cache_batches

    def sample(self, count: int | None = None) -> Sample:
        """`count` images (default: `batch_size`): fresh ones first, the rest replayed."""
        ids = self.store.batch_ids()
        if not ids:
            raise LookupError(f"the store at {self.store.root} is empty: nothing to sample yet")
        picks: list[tuple[str, np.ndarray]] = []
        total = self.batch_size if count is None else count
        need = total
        while need and self._cursor < len(ids):
            batch_id = ids[self._cursor]
            count = self.store.image_count(batch_id)
            take = min(need, count - self._offset)
            picks.append((batch_id, np.arange(self._offset, self._offset + take)))
            need -= take
            self._offset += take
            if self._offset == count:
                self._cursor, self._offset = self._cursor + 1, 0
        n_fresh = total - need
        if need:
            picks += self._replay(ids, need)
        return self._gather(picks, n_fresh)

    def _replay(self, ids: list[str], count: int) -> list[tuple[str, np.ndarray]]:
        """`count` images drawn uniformly (with replacement) from every image stored."""
        if len(self._totals) < len(ids):
            new = [self.store.image_count(b) for b in ids[len(self._totals):]]
            start = self._totals[-1] if len(self._totals) else 0
            self._totals = np.concatenate([self._totals, start + np.cumsum(new, dtype=np.int64)])
        flat = self._rng.integers(0, self._totals[-1], size=count)
        which = np.searchsorted(self._totals, flat, side="right")
        picks = []
        for b in np.unique(which):
            first = self._totals[b - 1] if b else 0
            picks.append((ids[b], flat[which == b] - first))
        return picks

    def _gather(self, picks: list[tuple[str, np.ndarray]], n_fresh: int) -> Sample:
        batches = [(self._load(batch_id), index) for batch_id, index in picks]
        shapes = {b.images.shape[1:] for b, _ in batches}
        if len(shapes) > 1:
            raise ValueError(f"the store mixes image shapes {sorted(shapes)}: one sampler batch cannot hold them")
        images = np.concatenate([b.images[i] for b, i in batches])
        labels = np.concatenate([b.labels[i] for b, i in batches])
        names = {(b.logit_members, b.logit_views) for b, _ in batches}
        if len(names) == 1 and all(b.logits is not None for b, _ in batches):
            logits = np.concatenate([b.logits[:, :, i] for b, i in batches], axis=2)  # type: ignore[index]
            members, views = names.pop()
            return Sample(images, labels, logits, n_fresh, members, views)
        return Sample(images, labels, None, n_fresh)

    def _load(self, batch_id: str) -> StoredBatch:
        # Stored files never change, so a small LRU cache is always valid.
        batch = self._cache.pop(batch_id, None) or self.store.get(batch_id)
        self._cache[batch_id] = batch
        while len(self._cache) > self._cache_batches:
            self._cache.popitem(last=False)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state: where fresh sampling stands (as a store position too), and the RNG."""
        ids = self.store.batch_ids()
        fresh = self.store.position(ids[self._cursor]) if self._cursor < len(ids) else self.store.next_position
        return {"cursor": self._cursor, "offset": self._offset,
                "last_fresh": ids[self._cursor - 1] if self._cursor else None, "fresh_position": fresh,
                "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cursor, offset = int(state["cursor"]), int(state["offset"])
        ids = self.store.batch_ids()
        last = state.get("last_fresh")
        if "fresh_position" in state:
            # By position, not index: batches quarantined since the state was saved shift indices, not positions.
            fresh = int(state["fresh_position"])
            positions = [self.store.position(batch_id) for batch_id in ids]
            cursor = sum(p < fresh for p in positions)
            if cursor == len(ids) or positions[cursor] != fresh:
                offset = 0  # the batch being read was moved aside: carry on with the next one
            known = last is None or last in self.store or last in self.store.quarantined_ids()
        else:  # a state saved before positions were recorded
            if cursor and last in self.store:
                cursor = ids.index(last) + 1
            known = cursor <= len(ids) and (not cursor or ids[cursor - 1] == last)
        # The state is only meaningful against the store it was taken from: refuse a different one.
        if not known:
            raise ValueError(f"sampler state (cursor {state['cursor']}, last fresh batch {state.get('last_fresh')!r})"
                             f" does not match the store at {self.store.root} ({len(ids)} batches)")
        if offset and (cursor == len(ids) or offset >= self.store.image_count(ids[cursor])):
            raise ValueError(f"sampler state offset {offset} is out of range for batch {cursor} of the store")
        self._rng.bit_generator.state = state["rng"]
        self._cursor, self._offset = cursor, offset


class BatchSummary(NamedTuple):
    """A stored batch without its image data: enough to check it against a contract."""

    header: BatchHeader
    images_shape: tuple[int, ...]
    images_dtype: np.dtype
    labels: np.ndarray
    logits: np.ndarray | None


def inspect_batch(path: Path | str) -> BatchSummary:
    """Header, labels and logits of a stored npz, and its images' shape and dtype read from the .npy header only."""
    with np.load(path, allow_pickle=False) as z:
        header = BatchHeader.model_validate_json(z["meta"].item())
        labels = z["labels"]
        logits = _stored_logits(z)
    with zipfile.ZipFile(path) as archive, archive.open("images.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    return BatchSummary(header, shape, dtype, labels, logits)


def read_batch(path: Path | str) -> StoredBatch:
    """One stored npz, without a SyntheticStore (e.g. another tool reading a copied store)."""
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(z["meta"].item())  # parsed once: the dict is returned, the model checks it
        return StoredBatch(batch_id=header["batch_id"], images=z["images"], labels=z["labels"],
                           logits=_stored_logits(z), header=header, position=int(z["position"]),
                           **logit_names(BatchHeader.model_validate(header)))


def _stored_logits(z) -> np.ndarray | None:
    """[M, V, N, K]; a store written before ensembles holds the teacher's [N, K], which is [1, 1, N, K]."""
    if "teacher_logits" not in z.files:
        return None
    logits = z["teacher_logits"]
    return logits[None, None] if logits.ndim == 2 else logits


def _hwc(image: np.ndarray, batch_id: str) -> np.ndarray:
    """CHW uint8 -> what Pillow takes: HW (gray), HWC (RGB/RGBA)."""
    channels = image.shape[0]
    if channels == 1:
        return image[0]
    if channels in (3, 4):
        return np.ascontiguousarray(image.transpose(1, 2, 0))
    raise ValueError(f"batch {batch_id!r}: {channels}-channel images cannot be written as PNG (1, 3 or 4)")
