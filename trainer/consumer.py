"""Trainer side of the batch stream: read, validate, store durably, then acknowledge and delete.

At-least-once delivery + an idempotent store = every batch stored exactly once:
  - the store write (fsync, atomic rename) happens before XACK, so a crash in between re-delivers a batch that
    is already stored, and the store's batch id check turns it into a duplicate that is only acknowledged;
  - a restarted consumer reads its own pending entries (XREADGROUP id 0) before new ones (id >);
  - a janitor (`claim_stale`) takes over entries that dead consumers left pending (XAUTOCLAIM);
  - entries that fail validation, or keep coming back, go to the dead-letter stream and training goes on.

A chunked batch is a run of consecutive stream entries (StreamProducer adds them atomically). When a read cuts the
run, the consumer fetches the missing chunks right where they must be in the stream, takes them over, and stores
the whole batch; it never acknowledges part of a batch.

An entry is processed on at most max_deliveries deliveries: a redelivery (own pending list after a restart, or a
janitor claim) that makes it max_deliveries + 1 dead-letters it instead. Counts come from XPENDING's extended form
(id range + count + consumer), asked right after the read or claim, so they include that delivery.

Redis 6.2 vs 7.x, as this module relies on them (checked against 6.2.14 and 7.0.15):
  - XAUTOCLAIM replies [next-id, entries] on 6.2 and [next-id, entries, deleted-ids] on 7.x. On 6.2 an entry
    deleted from the stream while pending comes back as nil (redis-py: (None, None), its id is lost) and stays in
    the claimer's pending list; 7.x drops it from the pending list and names it in the third element.
  - XREADGROUP with id 0 (a consumer's own history) increments the delivery count of each entry it returns, and
    lists an entry deleted while pending as (id, {}) on both.
  - XCLAIM/XAUTOCLAIM increment the delivery count unless JUSTID; XCLAIM ignores ids that were never delivered.
  - XAUTOCLAIM and exclusive "(id" ranges exist from 6.2 on: 6.2 is the oldest server supported.
See docs/architecture.md §5.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
from redis.exceptions import ResponseError

from shared.batch_contract import BatchContract
from shared.config import StreamConfig
from shared.errors import WireFormatError
from shared.wire import HEADER_FIELD, PAYLOAD_FIELD, BatchCodec, BatchHeader, decode_header
from trainer.store import SyntheticStore

Fields = Mapping[bytes, bytes]
Entry = tuple[str, Fields]

DEAD_LETTER_PAYLOAD_CAP = 1 << 20  # bigger payloads are left out of the dead letter (its header says how big)
DEAD_LETTER_HEADER_CAP = 64 << 10  # a header is a few KB; a longer one is cut in the dead letter (its size is kept)
SCAN_PAGE = 4  # entries read per round when looking for a batch's other chunks


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class PollResult:
    """What one poll() or claim_stale() did: batches stored, batches already stored, entries dead-lettered."""

    stored: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    conflicts: int = 0  # of the dead-lettered: another batch under a stored batch's id


@dataclass(frozen=True)
class AutoclaimReply:
    next_id: str                       # cursor for the next call; "0-0" once the pending list was scanned through
    entries: list[Entry]               # claimed entries with their fields
    deleted_ids: list[str]             # 7.x: pending entries no longer in the stream (already dropped from the PEL)
    nil_entries: int                   # 6.2: claimed entries no longer in the stream (still in our PEL, ids unknown)


def parse_autoclaim_reply(reply: Sequence[Any]) -> AutoclaimReply:
    """XAUTOCLAIM's reply on Redis 6.2 (2 elements) or 7.x (3 elements), raw or as redis-py parses it."""
    if not isinstance(reply, (list, tuple)) or len(reply) not in (2, 3):
        raise ValueError(f"unexpected XAUTOCLAIM reply: {reply!r}")
    entries: list[Entry] = []
    nil = 0
    for item in reply[1] or []:
        entry_id, fields = (None, None) if item is None else (item[0], item[1])
        if entry_id is None or fields is None:
            nil += 1
            continue
        if isinstance(fields, (list, tuple)):  # raw RESP: flat [field, value, ...]
            fields = dict(zip(fields[::2], fields[1::2]))
        entries.append((_text(entry_id), fields))
    deleted = [_text(i) for i in reply[2]] if len(reply) == 3 and reply[2] else []
    return AutoclaimReply(next_id=_text(reply[0]), entries=entries, deleted_ids=deleted, nil_entries=nil)


@dataclass
class _Partial:
    """The chunks of one batch read so far."""

    header: BatchHeader
    chunks: dict[int, Entry] = field(default_factory=dict)
    payload_bytes: int = 0  # received so far: never more than the header's payload_bytes

    @property
    def complete(self) -> bool:
        return len(self.chunks) == self.header.chunk_count

    @property
    def ids(self) -> list[str]:
        return [self.chunks[i][0] for i in sorted(self.chunks)]

    def chunks_in_order(self) -> list[Entry]:
        return [self.chunks[i] for i in sorted(self.chunks)]


class StreamConsumer:
    """One trainer's reader of `dfkd:{run}:batches` in the consumer group `config.group`."""

    def __init__(self, client: redis.Redis, config: StreamConfig, consumer_name: str, store: SyntheticStore, *,
                 contract: BatchContract | None = None, max_deliveries: int = 5, claim_idle_ms: int = 30_000,
                 block_ms: int = 1000, batch_entries: int = 16,
                 dead_letter_payload_cap: int = DEAD_LETTER_PAYLOAD_CAP) -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the stream needs a Redis client with decode_responses=False: payloads are raw bytes")
        if max_deliveries < 1 or batch_entries < 1 or claim_idle_ms < 0 or block_ms < 0:
            raise ValueError("max_deliveries and batch_entries must be >= 1, claim_idle_ms and block_ms >= 0")
        self.client = client
        self.config = config
        self.stream_key = config.key("batches")
        self.dead_letter_key = config.key("dead")  # beside the stream, one per run
        self.name = consumer_name
        self.store = store
        # Without a teacher's contract the stream's size caps still apply: no header may size our memory.
        self.contract = contract or BatchContract.from_stream(config)
        self.max_deliveries = max_deliveries
        self.claim_idle_ms = claim_idle_ms
        self.block_ms = block_ms
        self.batch_entries = batch_entries
        self.dead_letter_payload_cap = dead_letter_payload_cap
        self.codec = BatchCodec()
        # Counters for metrics (plain attributes; exported by whoever embeds the consumer).
        self.stored = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self.conflicts = 0  # batches whose id was stored already with different content
        self._own_pending_from: str | None = "0"  # where the scan of our own pending list resumes; None: done
        self._claim_from = "0-0"
        self._partials: dict[str, _Partial] = {}

    def ensure_group(self) -> None:
        """Create the stream and the consumer group (reading from the first entry) unless they exist."""
        try:
            self.client.xgroup_create(self.stream_key, self.config.group, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):  # the group exists already: the normal case after the first start
                raise

    # ---- reading -------------------------------------------------------------------------------------------------

    def poll(self) -> PollResult:
        """Read one page (own pending entries first, then new ones), store complete batches, acknowledge them.

        Errors (Redis unreachable, disk full) propagate: the caller decides how to wait. The next call then starts
        over from this consumer's pending list, so nothing read before the error is left waiting for the janitor.
        """
        before = self._counts()
        with self._rescan_on_error():
            entries = self._read_own_pending() if self._own_pending_from is not None else None
            if entries is None:
                entries = self._read_new(self.batch_entries, block=True)
            else:
                entries = self._without_worn_out(entries)  # redeliveries: count them
            self._absorb(entries)
            self._settle()
        return self._since(before)

    @contextmanager
    def _rescan_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            # What was read but not acknowledged is still in our pending list: read it again from there.
            self._partials.clear()
            self._own_pending_from = "0"
            raise

    def _read_own_pending(self) -> list[Entry] | None:
        """The next page of entries delivered to this consumer earlier and never acknowledged; None when done."""
        entries = self._xreadgroup(self._own_pending_from or "0", self.batch_entries)
        if not entries:
            self._own_pending_from = None
            return None
        self._own_pending_from = entries[-1][0]
        return entries

    def _read_new(self, count: int, *, block: bool) -> list[Entry]:
        return self._xreadgroup(">", count, block_ms=self.block_ms if block and self.block_ms else None)

    def _xreadgroup(self, start: str, count: int, block_ms: int | None = None) -> list[Entry]:
        streams = {self.stream_key: start}
        try:
            reply = self.client.xreadgroup(self.config.group, self.name, streams, count=count, block=block_ms)
        except ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            self.ensure_group()  # e.g. an in-memory Redis restarted: start over on the new, empty stream
            reply = self.client.xreadgroup(self.config.group, self.name, streams, count=count, block=block_ms)
        if not reply:
            return []
        return [(_text(entry_id), fields or {}) for entry_id, fields in reply[0][1]]

    # ---- janitor -------------------------------------------------------------------------------------------------

    def claim_stale(self) -> int:
        """Take over entries pending for over claim_idle_ms (a dead consumer's) and process them; returns how many."""
        with self._rescan_on_error():
            reply = parse_autoclaim_reply(self.client.xautoclaim(
                self.stream_key, self.config.group, self.name, self.claim_idle_ms, start_id=self._claim_from,
                count=self.batch_entries))
            self._claim_from = reply.next_id
            for entry_id in reply.deleted_ids:  # 7.x: already out of the pending list; only record the loss
                self._record_dead_letter(entry_id, {}, "entry was deleted from the stream before it was stored")
            if reply.nil_entries:
                self._own_pending_from = "0"  # 6.2: ours now, ids unknown; the next poll's rescan finds them
            self._absorb(self._without_worn_out(reply.entries))
            self._settle()
        return len(reply.entries) + reply.nil_entries

    def _without_worn_out(self, entries: list[Entry]) -> list[Entry]:
        """Dead-letter the entries delivered more than max_deliveries times (this delivery included); the rest."""
        if not entries:
            return entries
        ids = sorted((entry_id for entry_id, _ in entries), key=_id_key)
        # Extended XPENDING: one range query over this page's ids, limited to this consumer.
        pending = self.client.xpending_range(self.stream_key, self.config.group, ids[0], ids[-1],
                                             max(4 * len(ids), 100), consumername=self.name)
        deliveries = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        keep = []
        for entry_id, fields in entries:
            times = deliveries.get(entry_id, 0)
            if times > self.max_deliveries:
                self._dead_letter([(entry_id, fields)], f"delivered {times} times without being stored "
                                  f"(max_deliveries {self.max_deliveries})")
            else:
                keep.append((entry_id, fields))
        return keep

    # ---- grouping chunks into batches ----------------------------------------------------------------------------

    def _absorb(self, entries: Iterable[Entry]) -> None:
        for entry_id, fields in entries:
            if not fields:
                self._dead_letter([(entry_id, fields)], "entry was deleted from the stream before it was stored "
                                  "(trimmed by MAXLEN?)")
                continue
            try:
                header = decode_header(fields)
            except WireFormatError as error:
                self._dead_letter([(entry_id, fields)], str(error))
                continue
            # Before any bookkeeping: the header's counts and sizes are only trusted within the contract.
            reason = self.contract.header_violation(header)
            if reason is not None:
                self._dead_letter([(entry_id, fields)], f"batch {header.batch_id!r}: {reason}")
                continue
            partial = self._partials.get(header.batch_id)
            if partial is not None:
                held = partial.chunks.get(header.chunk_index)
                if held is not None and held[0] == entry_id:
                    continue  # the same entry again (our pending list re-read): nothing new
                if held is not None or not _same_batch(partial.header, header):
                    self._dead_letter([(entry_id, fields)], f"batch {header.batch_id!r}: chunk "
                                      f"{header.chunk_index} conflicts with entry "
                                      f"{held[0] if held else partial.ids[0]} already read")
                    continue
            size = len(fields.get(PAYLOAD_FIELD, b""))
            if (partial.payload_bytes if partial else 0) + size > header.payload_bytes:
                self._dead_letter([(entry_id, fields)], f"batch {header.batch_id!r}: chunk {header.chunk_index} "
                                  f"brings the payload over the {header.payload_bytes} bytes its header declares")
                continue
            if partial is None:
                partial = self._partials[header.batch_id] = _Partial(header)
            partial.payload_bytes += size
            partial.chunks[header.chunk_index] = (entry_id, fields)

    def _settle(self) -> None:
        """Store the complete batches; fetch the missing chunks of incomplete ones (a few rounds at most)."""
        for _ in range(4):
            for batch_id, partial in list(self._partials.items()):
                if batch_id in self.store:  # stored before a crash (or by a consumer sharing the store)
                    del self._partials[batch_id]
                    self._settle_duplicate(partial)
                elif partial.complete:
                    del self._partials[batch_id]
                    self._finish(partial)
            # A list, not a generator: every incomplete batch gets its fetch, not just the first that progresses.
            if not self._partials or not any([self._fetch_missing(p) for p in list(self._partials.values())]):
                return

    def _fetch_missing(self, partial: _Partial) -> bool:
        """Get the chunks of `partial` that this consumer does not have; True if any arrived."""
        found = self._find_chunks(partial)
        header = partial.header
        if len(found) + len(partial.chunks) < header.chunk_count:
            missing = [i for i in range(header.chunk_count) if i not in found and i not in partial.chunks]
            del self._partials[header.batch_id]
            self._dead_letter(self._still_ours(partial), f"batch {header.batch_id!r}: chunks {missing[:20]}"
                              f"{'...' if len(missing) > 20 else ''} of {header.chunk_count} are no longer in the "
                              "stream; the batch cannot be rebuilt")
            return False
        if 0 not in partial.chunks and self._pending_elsewhere(found[0][0]):
            # Another consumer holds the first chunk: it completes the batch and takes these entries from us.
            del self._partials[header.batch_id]
            return False
        wanted = [found[i][0] for i in sorted(found)]
        # Chunks pending with another consumer (a read cut between consumers, or a dead one): take them over.
        # JUSTID: ownership only, no extra delivery counted. Ids never delivered are skipped by XCLAIM.
        claimed = {_text(i) for i in self.client.xclaim(self.stream_key, self.config.group, self.name, 0, wanted,
                                                        justid=True)}
        by_id = {entry_id: (index, fields) for index, (entry_id, fields) in found.items()}
        for entry_id in claimed:
            index, fields = by_id[entry_id]
            partial.chunks[index] = (entry_id, fields)
            partial.payload_bytes += len(fields.get(PAYLOAD_FIELD, b""))
        undelivered = len(wanted) - len(claimed)
        # The rest were never delivered: they are the next entries of the stream, so read them the normal way
        # (deleting them unread would break the producers' backlog count).
        if undelivered:
            self._absorb(self._read_new(undelivered, block=False))
        return bool(claimed) or bool(undelivered)

    def _find_chunks(self, partial: _Partial) -> dict[int, Entry]:
        """The batch's chunks that `partial` lacks, read from where they must be: next to the ones it holds.

        A batch's chunks are consecutive entries (added in one script), so each scan stops at the first entry of
        another batch: what is read is bounded by the batch itself, whatever its header claims.
        """
        held = sorted(partial.chunks.items())
        (low, (low_id, _)), (high, (high_id, _)) = held[0], held[-1]
        count = partial.header.chunk_count
        found: dict[int, Entry] = {}

        def take(entries: Iterator[Entry]) -> None:
            for entry_id, fields in entries:
                try:
                    header = decode_header(fields)
                except WireFormatError:
                    return
                if not _same_batch(partial.header, header):
                    return
                if header.chunk_index not in partial.chunks:
                    found[header.chunk_index] = (entry_id, fields)

        if low > 0:
            take(self._scan(f"({low_id}", "-", low, reverse=True))
        if high - low + 1 > len(held):
            take(self._scan(f"({low_id}", f"({high_id}", high - low - 1))
        if high < count - 1:
            take(self._scan(f"({high_id}", "+", count - 1 - high))
        return found

    def _scan(self, start: str, end: str, limit: int, *, reverse: bool = False) -> Iterator[Entry]:
        """Up to `limit` entries from `start` towards `end`, nearest first, read a page at a time as consumed."""
        while limit > 0:
            count = min(SCAN_PAGE, limit)
            page = (self.client.xrevrange(self.stream_key, max=start, min=end, count=count) if reverse
                    else self.client.xrange(self.stream_key, min=start, max=end, count=count))
            if not page:
                return
            for entry_id, fields in page:
                yield _text(entry_id), fields
            limit -= len(page)
            start = f"({_text(page[-1][0])}"

    def _pending_elsewhere(self, entry_id: str) -> bool:
        pending = self.client.xpending_range(self.stream_key, self.config.group, entry_id, entry_id, 1)
        return bool(pending) and _text(pending[0]["consumer"]) != self.name

    def _still_ours(self, partial: _Partial) -> list[Entry]:
        """The entries of `partial` still pending with this consumer (others may have been taken over meanwhile)."""
        ids = partial.ids
        pending = self.client.xpending_range(self.stream_key, self.config.group, ids[0], ids[-1], len(ids) * 2,
                                             consumername=self.name)
        ours = {_text(p["message_id"]) for p in pending}
        return [entry for entry in partial.chunks_in_order() if entry[0] in ours]

    # ---- storing -------------------------------------------------------------------------------------------------

    def _finish(self, partial: _Partial) -> None:
        entries = partial.chunks_in_order()
        try:
            batch = self.codec.decode([fields for _, fields in entries])
        except WireFormatError as error:
            self._dead_letter(entries, str(error))
            return
        reason = self.contract.arrays_violation(partial.header, batch.images.shape, batch.images.dtype,
                                                np.asarray(batch.labels), batch.logits)
        if reason is not None:
            self._dead_letter(entries, f"batch {batch.batch_id!r}: {reason}")
            return
        if self.store.put(batch):  # durable (fsync + rename) before the ack below
            self.stored += 1
            self._ack(partial.ids)
        else:
            self._settle_duplicate(partial)

    def _settle_duplicate(self, partial: _Partial) -> None:
        """A batch id the store holds: acknowledge a true copy; dead-letter a different batch under that id."""
        stored = self.store.digest(partial.header.batch_id)
        if stored != partial.header.payload_sha256:
            # The first copy stays (it may have been trained on already); the conflict is recorded, not lost.
            self._dead_letter(partial.chunks_in_order(), f"batch {partial.header.batch_id!r}: this id is stored "
                              f"already with other content (stored sha256 {stored[:12]}..., this one "
                              f"{partial.header.payload_sha256[:12]}...); the first copy is kept")
            self.conflicts += 0 in partial.chunks
            return
        self._ack(partial.ids)  # chunk by chunk as they come: no need to gather the rest
        self.duplicates += 0 in partial.chunks  # one per copy of the batch, however it was cut

    def _ack(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        # One transaction: acked entries are deleted at once, so the stream's memory goes back to Redis and no
        # entry lingers acked-but-present.
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.stream_key, self.config.group, *ids)
        pipe.xdel(self.stream_key, *ids)
        pipe.execute()

    # ---- dead letters --------------------------------------------------------------------------------------------

    def _dead_letter(self, entries: Sequence[Entry], reason: str) -> None:
        """Move `entries` to the dead-letter stream: record, acknowledge and delete in one transaction."""
        if not entries:
            return
        pipe = self.client.pipeline(transaction=True)
        for entry_id, fields in entries:
            pipe.xadd(self.dead_letter_key, self._dead_letter_fields(entry_id, fields, reason),
                      maxlen=self.config.maxlen_safety, approximate=True)
        ids = [entry_id for entry_id, _ in entries]
        pipe.xack(self.stream_key, self.config.group, *ids)
        pipe.xdel(self.stream_key, *ids)
        pipe.execute()
        self.dead_lettered += len(entries)

    def _record_dead_letter(self, entry_id: str, fields: Fields, reason: str) -> None:
        """A dead letter for an entry that is no longer pending (nothing to acknowledge)."""
        self.client.xadd(self.dead_letter_key, self._dead_letter_fields(entry_id, fields, reason),
                         maxlen=self.config.maxlen_safety, approximate=True)
        self.dead_lettered += 1

    def _dead_letter_fields(self, entry_id: str, fields: Fields, reason: str) -> dict[bytes, bytes | str | int]:
        header = fields.get(HEADER_FIELD, b"")
        payload = fields.get(PAYLOAD_FIELD, b"")
        record: dict[bytes, bytes | str | int] = {
            b"entry_id": entry_id, b"stream": self.stream_key, b"group": self.config.group,
            b"consumer": self.name, b"reason": reason[:4000], b"failed_at": f"{time.time():.3f}",
            HEADER_FIELD: header[:DEAD_LETTER_HEADER_CAP], b"header_bytes": len(header),
            b"payload_bytes": len(payload)}
        if len(payload) <= self.dead_letter_payload_cap:
            record[PAYLOAD_FIELD] = payload
        return record

    # ---- counters ------------------------------------------------------------------------------------------------

    def _counts(self) -> PollResult:
        return PollResult(self.stored, self.duplicates, self.dead_lettered, self.conflicts)

    def _since(self, before: PollResult) -> PollResult:
        return PollResult(self.stored - before.stored, self.duplicates - before.duplicates,
                          self.dead_lettered - before.dead_lettered, self.conflicts - before.conflicts)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def _same_batch(a: BatchHeader, b: BatchHeader) -> bool:
    return (a.batch_id, a.payload_sha256, a.chunk_count) == (b.batch_id, b.payload_sha256, b.chunk_count)
