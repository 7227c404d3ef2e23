"""Producer side of the batch stream: backpressure from the consumer group, exactly-once publish, retries.

Backpressure counts stream entries the trainers have not acknowledged yet (never read + read but not acked). MAXLEN
is only a safety cap (maxlen_safety >= 4x max_backlog): producers that honour `has_capacity()` never let trimming
reach unread data.
See docs/architecture.md §5.
"""
from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from shared.config import StreamConfig
from shared.errors import DfkdError
from shared.wire import HEADER_FIELD, PAYLOAD_FIELD, BatchCodec, WireBatch

T = TypeVar("T")

# All chunks of a batch, or none, exactly once. The dedupe key is written last: a failed XADD leaves nothing behind,
# and a retry after a lost reply finds the key and adds nothing. (Atomic: no other command runs in between.)
# Each entry id also goes into a small id index (a sorted set of zero-padded ids, ordered as text): on servers
# without XINFO `lag` it counts undelivered entries without reading their multi-megabyte payloads.
# KEYS: stream, dedupe key, id index. ARGV: dedupe ttl (s), MAXLEN cap, then header/payload pairs, one per chunk.
PUBLISH_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {}
end
local function sortable(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return string.rep('0', 20 - #ms) .. ms .. '-' .. string.rep('0', 20 - #seq) .. seq
end
local ids = {}
for i = 3, #ARGV, 2 do
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'header', ARGV[i], 'payload', ARGV[i + 1])
  redis.call('ZADD', KEYS[3], 0, sortable(id))
  ids[#ids + 1] = id
end
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[2]) + 1))
redis.call('EXPIRE', KEYS[3], ARGV[1])
redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
return ids
"""


class StreamUnavailableError(DfkdError):
    """Redis stayed unreachable for the whole retry budget."""


def connect_redis(url: str, *, connect_timeout_s: float = 5.0, timeout_s: float = 30.0) -> redis.Redis:
    """A client for the stream: binary replies (payloads are raw bytes), no hidden client-side retries.

    redis-py 6+ retries every command up to 10 times on its own by default; StreamProducer retries with its own,
    bounded budget instead, so callers (the HTTP service) know how long a call can take.
    """
    return redis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s, socket_timeout=timeout_s,
                                retry=Retry(NoBackoff(), 0), decode_responses=False)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def sortable_id(entry_id: str | bytes) -> str:
    """A stream id as text that sorts like the id: '1700000000000-3' -> 20 + 1 + 20 zero-padded characters."""
    ms, seq = _text(entry_id).split("-")
    return f"{int(ms):020d}-{int(seq):020d}"


def count_undelivered(client: redis.Redis, id_index: str, last_delivered_id: str | bytes) -> int:
    """Entries added after the group's last delivered id, from the producers' id index (works on Redis 6.2).

    Ids up to the last delivered one are dropped from the index on the way: they can never be undelivered again.
    """
    last = sortable_id(last_delivered_id)
    pipe = client.pipeline(transaction=False)
    pipe.zremrangebylex(id_index, "-", f"[{last}")
    pipe.zlexcount(id_index, f"({last}", "+")
    return int(pipe.execute()[1])


def backlog_from_group_info(group: Mapping[str, Any]) -> int | None:
    """lag + pending from one XINFO GROUPS entry, or None when the server cannot say.

    `lag` (entries never delivered to the group) exists from Redis 7.0; Redis 6.2 has no such field, and 7.x answers
    nil when it cannot compute it (e.g. entries deleted after the group's last delivered id).
    """
    lag = group.get("lag")
    if lag is None:
        return None
    return int(lag) + int(group["pending"])


class StreamProducer:
    """Publishes WireBatches to `dfkd:{run}:batches` for the consumer group `config.group`."""

    def __init__(self, client: redis.Redis, config: StreamConfig, producer_id: str, *,
                 max_retry_s: float = 60.0) -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the stream needs a Redis client with decode_responses=False: payloads are raw bytes")
        self.client = client
        self.config = config
        self.producer_id = producer_id
        self.max_retry_s = max_retry_s
        self.codec = BatchCodec()
        self._publish_script = client.register_script(PUBLISH_SCRIPT)

    @property
    def stream_key(self) -> str:
        return self.config.key("batches")

    @property
    def dead_letter_key(self) -> str:
        return self.config.key("dead")

    @property
    def id_index_key(self) -> str:
        return self.config.key("batches:ids")

    def dedupe_key(self, batch_id: str) -> str:
        return self.config.key(f"seen:{batch_id}")

    def ping(self) -> bool:
        """Readiness: does Redis answer right now (no retries)?"""
        try:
            return bool(self.client.ping())
        except (RedisConnectionError, RedisTimeoutError):
            return False

    def ensure_group(self) -> None:
        """Create the stream and the consumer group (from the first entry) unless they exist."""
        self._retrying(self._create_group, "create the consumer group")

    def _create_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream_key, self.config.group, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def backlog(self) -> int:
        """Entries of the stream the group has not acknowledged: never delivered + delivered but pending.

        Redis 7+ reports it as XINFO GROUPS `lag` + `pending`. Without `lag` (Redis 6.2, or 7.x when it cannot
        tell) the undelivered entries are counted in the producers' id index instead: a bounded XRANGE would read
        every entry's payload (up to chunk_bytes each) on every poll.
        """
        return self._retrying(self._read_backlog, "read the stream backlog")

    def _read_backlog(self) -> int:
        group = self._group_info()
        if group is None:
            self._create_group()  # a missing group would make every entry invisible to backpressure
            group = self._group_info()
            if group is None:
                raise ResponseError(f"consumer group {self.config.group!r} on {self.stream_key} vanished")
        exact = backlog_from_group_info(group)
        if exact is not None:
            return exact
        undelivered = count_undelivered(self.client, self.id_index_key, group["last-delivered-id"])
        return undelivered + int(group["pending"])

    def _group_info(self) -> Mapping[str, Any] | None:
        try:
            groups = self.client.xinfo_groups(self.stream_key)
        except ResponseError as error:
            if "no such key" in str(error).lower():
                return None
            raise
        return next((g for g in groups if _text(g["name"]) == self.config.group), None)

    def has_capacity(self) -> bool:
        return self.backlog() < self.config.max_backlog

    def wait_for_capacity(self, timeout_s: float, poll_s: float = 0.1) -> bool:
        """Poll until the backlog is under max_backlog; False if it is still full after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.has_capacity():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(poll_s, remaining))

    def publish(self, batch: WireBatch, *, max_retry_s: float | None = None) -> list[str]:
        """Add every chunk of `batch` atomically; returns the entry ids, [] if this batch id was already published.

        Does not check capacity: call `has_capacity()`/`wait_for_capacity()` first. Concurrent producers can each
        pass that check at once, so the backlog can exceed max_backlog by up to one batch per producer.
        """
        if not self.config.include_logits and batch.logits is not None:
            batch = dataclasses.replace(batch, logits=None)
        entries = self.codec.encode(batch, self.config.chunk_bytes)
        args: list[Any] = [self.config.dedupe_ttl_s, self.config.maxlen_safety]
        for fields in entries:
            args += [fields[HEADER_FIELD], fields[PAYLOAD_FIELD]]
        keys = [self.stream_key, self.dedupe_key(batch.batch_id), self.id_index_key]
        ids = self._retrying(lambda: self._publish_script(keys=keys, args=args),
                             f"publish batch {batch.batch_id!r}", max_retry_s)
        return [_text(entry_id) for entry_id in ids]

    def _retrying(self, action: Callable[[], T], what: str, max_retry_s: float | None = None) -> T:
        """Run `action`, retrying connection failures with jittered exponential backoff within the budget."""
        budget = self.max_retry_s if max_retry_s is None else max_retry_s
        deadline = time.monotonic() + budget
        delay = self.config.retry_initial_s
        attempts = 0
        while True:
            attempts += 1
            try:
                return action()
            except (RedisConnectionError, RedisTimeoutError) as error:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StreamUnavailableError(
                        f"could not {what}: Redis at {self._address()} unreachable after {attempts} attempt(s) "
                        f"in {budget:g}s ({error})") from error
                # Jitter keeps several producers from reconnecting in lock-step after an outage.
                time.sleep(min(delay * random.uniform(0.5, 1.0), remaining))
                delay = min(delay * 2, self.config.retry_max_s)

    def _address(self) -> str:
        kwargs = self.client.get_connection_kwargs()
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
