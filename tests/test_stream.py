"""The producer against a real redis-server: backpressure, exactly-once publish, no loss under concurrency, retries."""
from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest
import redis

from shared.config import StreamConfig
from dfkd.redis_server import RedisServer, free_loopback_port
from shared.stream import (StreamProducer, StreamUnavailableError, backlog_from_group_info, connect_redis,
                           count_undelivered)
from shared.wire import BatchCodec, decode_header
from test_wire import assert_same_batch, make_batch


def stream_config(**overrides) -> StreamConfig:
    base = dict(run="test", max_backlog=5, maxlen_safety=10_000, chunk_bytes=2048, retry_initial_s=0.01,
                retry_max_s=0.1)
    return StreamConfig(**{**base, **overrides})


def server_major(client: redis.Redis) -> int:
    return int(client.info("server")["redis_version"].split(".")[0])


def fill_until_full(producer: StreamProducer, attempts: int, start: int = 0, **batch_args) -> int:
    """What a well-behaved background producer does: publish while there is capacity. Returns how many it added."""
    for i in range(attempts):
        if not producer.has_capacity():
            return i
        assert producer.publish(make_batch(f"b-{start + i}", seed=start + i, **batch_args))
    return attempts


def connect_redis_like(client: redis.Redis) -> redis.Redis:
    kwargs = client.get_connection_kwargs()
    return connect_redis(f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}")


def drain(client: redis.Redis, config: StreamConfig) -> None:
    """A consumer catching up: read what is new, then ack and delete everything (the stalled reader's too)."""
    stream = config.key("batches")
    client.xreadgroup(config.group, "drainer", {stream: ">"}, count=10_000)
    ids = [entry_id for entry_id, _ in client.xrange(stream)]
    if ids:
        client.xack(stream, config.group, *ids)
        client.xdel(stream, *ids)


def test_backpressure_stops_production_at_the_backlog_and_bounds_memory(redis_client):
    config = stream_config(chunk_bytes=1 << 20)
    producer = StreamProducer(redis_client, config, "p-0")
    producer.ensure_group()
    producer.ensure_group()  # idempotent
    stream = producer.stream_key
    producer.publish(make_batch("warm-up", size=48))  # first script run: one-off Lua/buffer allocations
    drain(redis_client, config)
    baseline = redis_client.info("memory")["used_memory"]

    assert fill_until_full(producer, attempts=2, size=48) == 2
    # A consumer reads both entries and stalls: they stay pending, and still count against the backlog.
    redis_client.xreadgroup(config.group, "stalled", {stream: ">"}, count=2)
    assert producer.backlog() == 2

    assert fill_until_full(producer, attempts=50, start=2, size=48) == 3  # stops exactly at max_backlog = 5
    assert producer.backlog() == 5 and not producer.has_capacity()
    assert redis_client.xlen(stream) == 5
    started = time.monotonic()
    assert not producer.wait_for_capacity(timeout_s=0.3, poll_s=0.05)
    assert 0.25 < time.monotonic() - started < 2

    # Memory: five entries (~28 KB each: 4x3x48x48 images + logits) plus slack; 50 unthrottled batches would not fit.
    entry_bytes = 4 * 3 * 48 * 48 + 4 * 10 * 2 + 1024
    bound = 2 * config.max_backlog * entry_bytes + 256 * 1024
    assert bound < 50 * entry_bytes
    grown = redis_client.info("memory")["used_memory"] - baseline
    assert grown < bound, (grown, bound)

    # The consumer catches up while the producer waits: production resumes, and stops again at the backlog.
    consumer = threading.Timer(0.2, drain, args=(connect_redis_like(redis_client), config))
    consumer.start()
    assert producer.wait_for_capacity(timeout_s=5, poll_s=0.02)
    consumer.join()
    assert producer.backlog() == 0 and redis_client.xlen(stream) == 0
    assert fill_until_full(producer, attempts=50, start=100, size=48) == 5
    assert redis_client.xlen(stream) == 5


def test_backlog_counts_undelivered_and_pending_on_this_server(redis_client):
    config = stream_config()
    producer = StreamProducer(redis_client, config, "p-0")
    assert producer.backlog() == 0  # creates the missing stream and group instead of failing
    for i in range(4):
        producer.publish(make_batch(f"b-{i}", seed=i))
    stream = producer.stream_key
    redis_client.xreadgroup(config.group, "c", {stream: ">"}, count=1)
    assert producer.backlog() == 4  # 3 undelivered + 1 pending
    (group,) = redis_client.xinfo_groups(stream)
    assert count_undelivered(redis_client, producer.id_index_key, group["last-delivered-id"]) == 3
    if server_major(redis_client) >= 7:
        assert group["lag"] == 3
    else:
        assert "lag" not in group  # Redis 6.2: the id-index fallback is what produced the numbers above

    first_id = redis_client.xpending_range(stream, config.group, "-", "+", 10)[0]["message_id"]
    redis_client.xack(stream, config.group, first_id)
    redis_client.xdel(stream, first_id)
    assert producer.backlog() == 3
    redis_client.xreadgroup(config.group, "c", {stream: ">"}, count=10)
    assert producer.backlog() == 3  # delivered but not acknowledged: still backlog


@pytest.mark.parametrize("group, expected", [
    ({"name": b"trainers", "consumers": 1, "pending": 2, "last-delivered-id": b"5-0", "entries-read": 5, "lag": 3}, 5),
    ({"name": b"trainers", "consumers": 1, "pending": 2, "last-delivered-id": b"5-0", "entries-read": None,
      "lag": None}, None),                                                     # 7.x when lag is unknown
    ({"name": b"trainers", "consumers": 1, "pending": 2, "last-delivered-id": b"5-0"}, None),  # 6.2: no lag field
])
def test_backlog_from_group_info(group, expected):
    assert backlog_from_group_info(group) == expected


def test_no_loss_with_concurrent_producers(redis_server):
    config = stream_config(chunk_bytes=2048)
    plan = {f"p-{k}": [make_batch(f"p-{k}-b-{i}", seed=1000 * k + i, producer_id=f"p-{k}", sequence=i,
                                  size=32 if i % 10 == 0 else 8)    # every tenth batch is chunked
                       for i in range(67 if k < 2 else 66)] for k in range(3)}
    connect_redis(redis_server.url).flushall()
    errors: list[BaseException] = []

    def produce(producer_id: str) -> None:
        try:
            producer = StreamProducer(connect_redis(redis_server.url), config, producer_id)
            for batch in plan[producer_id]:
                assert producer.publish(batch)
        except BaseException as error:  # surfaced in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=produce, args=(pid,)) for pid in plan]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors

    entries = connect_redis(redis_server.url).xrange(config.key("batches"))
    positions: dict[str, list[int]] = defaultdict(list)
    fields_by_batch: dict[str, list] = defaultdict(list)
    for position, (_, fields) in enumerate(entries):
        batch_id = decode_header(fields).batch_id
        positions[batch_id].append(position)
        fields_by_batch[batch_id].append(fields)
    expected = {batch.batch_id: batch for batches in plan.values() for batch in batches}
    assert len(expected) == 200 and set(positions) == set(expected)
    chunked = 0
    for batch_id, batch in expected.items():
        decoded = BatchCodec().decode(fields_by_batch[batch_id])  # also proves each chunk appears exactly once
        assert_same_batch(decoded, batch)
        spots = positions[batch_id]
        assert spots == list(range(spots[0], spots[0] + len(spots)))  # chunks were added atomically, together
        chunked += len(spots) > 1
    assert chunked == 21


def test_publishing_the_same_batch_twice_adds_it_once(redis_client):
    producer = StreamProducer(redis_client, stream_config(), "p-0")
    batch = make_batch("dup", size=32)
    ids = producer.publish(batch)
    assert len(ids) > 1  # chunked: the whole batch is deduplicated, not entry by entry
    assert producer.publish(batch) == []
    assert StreamProducer(connect_redis_like(redis_client), stream_config(), "p-1").publish(batch) == []
    assert redis_client.xlen(producer.stream_key) == len(ids)
    assert 0 < redis_client.ttl(producer.dedupe_key("dup")) <= stream_config().dedupe_ttl_s


def test_logits_are_dropped_when_the_config_says_so(redis_client):
    producer = StreamProducer(redis_client, stream_config(include_logits=False), "p-0")
    producer.publish(make_batch("no-logits"))
    (_, fields), = redis_client.xrange(producer.stream_key)
    assert BatchCodec().decode([fields]).logits is None


def test_unreachable_redis_gives_up_within_the_budget():
    client = connect_redis(f"redis://127.0.0.1:{free_loopback_port()}/0", connect_timeout_s=0.2)
    producer = StreamProducer(client, stream_config(), "p-0", max_retry_s=0.5)
    assert not producer.ping()
    started = time.monotonic()
    with pytest.raises(StreamUnavailableError, match=r"could not publish batch 'b-0'.*unreachable after \d+ attempt"):
        producer.publish(make_batch())
    assert 0.4 < time.monotonic() - started < 2
    with pytest.raises(StreamUnavailableError, match="backlog"):
        producer.backlog()


def test_producer_recovers_when_redis_restarts():
    port = free_loopback_port()
    server = RedisServer(port=port).start()
    try:
        producer = StreamProducer(connect_redis(server.url), stream_config(), "p-0", max_retry_s=10)
        assert producer.publish(make_batch("before"))
        server.stop()
        assert not producer.ping()
        restart = threading.Timer(0.3, server.start)  # back on the same port while publish is retrying
        restart.start()
        assert producer.publish(make_batch("after"))
        restart.join()
        assert producer.ping()
        assert producer.backlog() == 1  # in-memory server: only the batch published after the restart
    finally:
        server.stop()


def test_decoding_clients_are_refused(redis_server):
    with pytest.raises(ValueError, match="decode_responses=False"):
        StreamProducer(redis.Redis.from_url(redis_server.url, decode_responses=True), stream_config(), "p-0")
