"""The trainer's stream consumer against a real redis-server: exactly once into the store, restarts, the janitor,
dead letters, and a SIGKILLed consumer process."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from shared.batch_contract import BatchContract
from shared.config import StreamConfig
from shared.stream import StreamProducer
from shared.wire import HEADER_FIELD, PAYLOAD_FIELD, BatchCodec
from trainer.consumer import AutoclaimReply, PollResult, StreamConsumer, parse_autoclaim_reply
from trainer.store import SyntheticStore
from test_wire import FINGERPRINT, assert_same_batch, edit_header, make_batch

REPO = Path(__file__).resolve().parents[1]


def stream_config(**overrides) -> StreamConfig:
    base = dict(run="consume", max_backlog=1000, maxlen_safety=10_000, chunk_bytes=2048, retry_initial_s=0.01,
                retry_max_s=0.1)
    return StreamConfig(**{**base, **overrides})


def make_consumer(client: redis.Redis, store: SyntheticStore, name: str = "c-0", **overrides) -> StreamConsumer:
    contract = dataclasses.replace(BatchContract.from_stream(stream_config()), fingerprint=FINGERPRINT)
    args = dict(contract=contract, block_ms=0, batch_entries=4, claim_idle_ms=30_000)
    consumer = StreamConsumer(client, stream_config(), name, store, **{**args, **overrides})
    consumer.ensure_group()
    return consumer


def batches(count: int, start: int = 0, chunked_every: int = 3):
    """Every `chunked_every`-th batch is 32x32 (about ten 2 KB chunks), the rest fit in one entry."""
    return [make_batch(f"b-{i}", seed=i, sequence=i, size=32 if i % chunked_every == 0 else 8)
            for i in range(start, start + count)]


def publish(client: redis.Redis, items) -> StreamProducer:
    producer = StreamProducer(client, stream_config(), "p-0")
    producer.ensure_group()
    for batch in items:
        assert producer.publish(batch)
    return producer


def poll_until_quiet(*consumers: StreamConsumer, rounds: int = 500) -> PollResult:
    """Poll until the stream is empty, or nothing happened for a few rounds (entries pending elsewhere)."""
    client, stream = consumers[0].client, consumers[0].stream_key
    total, idle = PollResult(), 0
    for _ in range(rounds):
        results = [c.poll() for c in consumers]
        total = PollResult(*(sum(x) for x in zip(*(tuple(vars(r).values()) for r in [total, *results]))))
        idle = idle + 1 if all(r == PollResult() for r in results) else 0
        if client.xlen(stream) == 0 or idle == 5:
            return total
    raise AssertionError("consumers never went quiet")


def pending(client: redis.Redis) -> list[dict]:
    config = stream_config()
    return client.xpending_range(config.key("batches"), config.group, "-", "+", 1000)


def dead_letters(client: redis.Redis) -> list[dict]:
    return [{k.decode(): v for k, v in fields.items()} for _, fields in client.xrange(stream_config().key("dead"))]


def assert_drained(client: redis.Redis) -> None:
    assert client.xlen(stream_config().key("batches")) == 0  # acked entries are deleted too
    assert pending(client) == []


def test_every_batch_ends_up_in_the_store_exactly_once(redis_client, tmp_path):
    sent = batches(30)
    producer = publish(redis_client, sent)
    assert redis_client.xlen(producer.stream_key) > 60  # chunked: reads of 4 entries cut most big batches
    store = SyntheticStore(tmp_path)
    consumer = make_consumer(redis_client, store)
    assert poll_until_quiet(consumer) == PollResult(stored=30)
    assert (consumer.stored, consumer.duplicates, consumer.dead_lettered) == (30, 0, 0)
    assert sorted(store.batch_ids()) == sorted(b.batch_id for b in sent)
    for batch in sent:
        assert_same_batch(store.get(batch.batch_id).to_wire(), batch)
    assert_drained(redis_client)
    assert producer.backlog() == 0 and dead_letters(redis_client) == []


def test_two_consumers_split_chunked_batches_between_them_and_still_store_each_once(redis_client, tmp_path):
    sent = batches(12, chunked_every=2)
    publish(redis_client, sent)
    stores = [SyntheticStore(tmp_path / "a"), SyntheticStore(tmp_path / "b")]
    # 3-entry reads, alternating: most chunked batches start with one consumer and go on with the other.
    consumers = [make_consumer(redis_client, store, f"c-{k}", batch_entries=3) for k, store in enumerate(stores)]
    total = poll_until_quiet(*consumers)
    assert total == PollResult(stored=12)
    a, b = (set(s.batch_ids()) for s in stores)
    assert a and b and not a & b and a | b == {x.batch_id for x in sent}
    assert_drained(redis_client)
    assert dead_letters(redis_client) == []


def test_a_restarted_consumer_reads_its_pending_entries_first(redis_client, tmp_path):
    config = stream_config()
    publish(redis_client, batches(4))
    # Consumer c-0 read everything and died before storing or acknowledging anything.
    redis_client.xreadgroup(config.group, "c-0", {config.key("batches"): ">"}, count=1000)
    publish(redis_client, batches(2, start=4))
    store = SyntheticStore(tmp_path)
    reborn = make_consumer(redis_client, store, "c-0", batch_entries=100)
    assert reborn.poll() == PollResult(stored=4)  # the pending ones, before anything new
    assert sorted(store.batch_ids()) == ["b-0", "b-1", "b-2", "b-3"]
    assert poll_until_quiet(reborn) == PollResult(stored=2)
    assert_drained(redis_client)


def test_a_batch_stored_before_the_crash_is_only_acknowledged(redis_client, tmp_path):
    config = stream_config()
    sent = batches(2)
    publish(redis_client, sent)
    redis_client.xreadgroup(config.group, "c-0", {config.key("batches"): ">"}, count=1000)
    store = SyntheticStore(tmp_path)
    store.put(sent[0])  # stored, then SIGKILL before XACK
    consumer = make_consumer(redis_client, store, "c-0")
    assert poll_until_quiet(consumer) == PollResult(stored=1, duplicates=1)
    assert len(store) == 2
    assert_drained(redis_client)


def test_after_a_failed_store_write_the_next_poll_retries_from_the_pending_list(redis_client, tmp_path):
    publish(redis_client, batches(2, start=1))
    store = SyntheticStore(tmp_path)
    consumer = make_consumer(redis_client, store)
    store.batch_dir.rename(tmp_path / "away")
    store.batch_dir.write_bytes(b"")  # a file where the directory should be: the write fails for real
    with pytest.raises(OSError):
        consumer.poll()
    assert len(pending(redis_client)) >= 1  # read, not stored, not acknowledged
    store.batch_dir.unlink()
    (tmp_path / "away").rename(store.batch_dir)
    assert poll_until_quiet(consumer) == PollResult(stored=2)  # at once, not after claim_idle_ms
    assert_drained(redis_client)


def test_the_janitor_takes_over_a_dead_consumers_entries(redis_client, tmp_path):
    config = stream_config()
    sent = batches(6, chunked_every=2)
    publish(redis_client, sent)
    redis_client.xreadgroup(config.group, "dead", {config.key("batches"): ">"}, count=1000)
    store = SyntheticStore(tmp_path)
    janitor = make_consumer(redis_client, store, "janitor", claim_idle_ms=500)
    assert poll_until_quiet(janitor) == PollResult()  # nothing new: everything is pending with "dead"
    assert janitor.claim_stale() == 0  # not idle long enough yet
    time.sleep(0.6)
    claimed = 0
    for _ in range(50):
        claimed += janitor.claim_stale()  # 4 entries per call: cuts chunked batches; the rest is taken over
        if len(store) == 6:
            break
    assert claimed > 0 and sorted(store.batch_ids()) == sorted(b.batch_id for b in sent)
    assert janitor.stored == 6 and janitor.dead_lettered == 0
    assert_drained(redis_client)


def test_an_entry_deleted_while_pending_is_recorded_as_a_dead_letter(redis_client, tmp_path):
    config = stream_config()
    publish(redis_client, batches(2, start=1))
    stream = config.key("batches")
    (_, entries), = redis_client.xreadgroup(config.group, "dead", {stream: ">"}, count=10)
    lost = entries[0][0]
    redis_client.xdel(stream, lost)  # e.g. trimmed: its data is gone
    store = SyntheticStore(tmp_path)
    janitor = make_consumer(redis_client, store, "janitor", claim_idle_ms=0)
    janitor.claim_stale()
    poll_until_quiet(janitor)  # Redis 6.2: the claimed nil entry is found by rescanning our own pending list
    assert store.batch_ids() == ["b-2"]
    (letter,) = dead_letters(redis_client)
    assert letter["entry_id"] == lost and b"deleted" in letter["reason"]
    assert_drained(redis_client)


@pytest.mark.parametrize("reply, expected", [
    # Redis 6.2, as redis-py parses it: [next-id, entries]; a deleted entry is nil, its id unknown.
    ([b"0-0", [(b"1-0", {b"header": b"h"}), (None, None)]],
     AutoclaimReply("0-0", [("1-0", {b"header": b"h"})], [], 1)),
    # Redis 7.x: [next-id, entries, deleted-ids].
    ([b"5-1", [(b"1-0", {b"header": b"h"})], [b"2-0", b"3-0"]],
     AutoclaimReply("5-1", [("1-0", {b"header": b"h"})], ["2-0", "3-0"], 0)),
    ([b"0-0", [], []], AutoclaimReply("0-0", [], [], 0)),
    # Raw RESP (no client-side parsing): flat field lists.
    (["0-0", [[b"1-0", [b"header", b"h", b"payload", b"p"]]], []],
     AutoclaimReply("0-0", [("1-0", {b"header": b"h", b"payload": b"p"})], [], 0)),
])
def test_parse_autoclaim_reply_of_both_server_generations(reply, expected):
    assert parse_autoclaim_reply(reply) == expected


@pytest.mark.parametrize("reply", [None, [b"0-0"], [b"0-0", [], [], []]])
def test_parse_autoclaim_reply_refuses_other_shapes(reply):
    with pytest.raises(ValueError, match="unexpected XAUTOCLAIM reply"):
        parse_autoclaim_reply(reply)


def test_the_live_server_reply_parses(redis_client):
    config = stream_config()
    publish(redis_client, batches(1, start=1))
    stream = config.key("batches")
    redis_client.xreadgroup(config.group, "dead", {stream: ">"}, count=10)
    reply = parse_autoclaim_reply(redis_client.xautoclaim(stream, config.group, "other", 0, count=10))
    assert reply.next_id == "0-0" and len(reply.entries) == 1 and reply.deleted_ids == []


def test_bad_entries_go_to_the_dead_letter_stream_and_consumption_goes_on(redis_client, tmp_path):
    config = stream_config()
    stream = config.key("batches")
    publish(redis_client, batches(2))
    (good,) = BatchCodec().encode(make_batch("flipped", seed=7), 1 << 20)
    flipped = bytearray(good[PAYLOAD_FIELD])
    flipped[10] ^= 0xFF
    bad = {
        redis_client.xadd(stream, {HEADER_FIELD: good[HEADER_FIELD], PAYLOAD_FIELD: bytes(flipped)}): "checksum",
        redis_client.xadd(stream, edit_header(good, version=99)): "version 99",
        redis_client.xadd(stream, {b"junk": b"1"}): "no 'header' field",
    }
    big = BatchCodec().encode(make_batch("big-bad", seed=8, size=32), 1 << 20)[0]
    bad[redis_client.xadd(stream, edit_header(big, labels=[1, 2]))] = "2 labels for 4 images"
    publish(redis_client, batches(2, start=2))
    store = SyntheticStore(tmp_path)
    consumer = make_consumer(redis_client, store, dead_letter_payload_cap=4096)
    assert poll_until_quiet(consumer) == PollResult(stored=4, dead_lettered=4)
    assert sorted(store.batch_ids()) == ["b-0", "b-1", "b-2", "b-3"]
    letters = {letter["entry_id"].decode(): letter for letter in dead_letters(redis_client)}
    assert set(letters) == {i.decode() for i in bad}
    for entry_id, reason in bad.items():
        letter = letters[entry_id.decode()]
        assert reason.encode() in letter["reason"], letter["reason"]
        assert letter["stream"] == stream.encode() and letter["consumer"] == b"c-0"
    flipped_letter = letters[next(iter(bad)).decode()]
    assert flipped_letter["header"] == good[HEADER_FIELD] and flipped_letter["payload"] == bytes(flipped)
    big_letter = letters[list(bad)[-1].decode()]
    assert "payload" not in big_letter and int(big_letter["payload_bytes"]) == len(big[PAYLOAD_FIELD]) > 4096
    assert_drained(redis_client)


def test_a_batch_from_another_teacher_is_dead_lettered(redis_client, tmp_path):
    stranger = make_batch("stranger", seed=5)
    stranger.teacher_fingerprint = "cd" * 32
    stranger.logit_members = (stranger.teacher_fingerprint,)
    publish(redis_client, [make_batch("ours-0"), stranger, make_batch("ours-1", seed=1)])
    store = SyntheticStore(tmp_path)
    assert poll_until_quiet(make_consumer(redis_client, store)) == PollResult(stored=2, dead_lettered=1)
    (letter,) = dead_letters(redis_client)
    assert b"teacher fingerprint" in letter["reason"] and json.loads(letter["header"])["batch_id"] == "stranger"
    assert "stranger" not in store


def test_an_entry_delivered_too_often_is_dead_lettered_by_the_janitor(redis_client, tmp_path):
    config = stream_config()
    stream = config.key("batches")
    publish(redis_client, [make_batch("poison"), make_batch("fine", seed=1)])
    (_, entries), = redis_client.xreadgroup(config.group, "crashy", {stream: ">"}, count=1)
    poison_id = entries[0][0]
    # As if "crashy" had died on it five times: delivered 5 times, idle for a minute.
    redis_client.xclaim(stream, config.group, "crashy", 0, [poison_id], idle=60_000, retrycount=5)
    store = SyntheticStore(tmp_path)
    janitor = make_consumer(redis_client, store, "janitor", max_deliveries=5)
    assert janitor.claim_stale() == 1  # the 6th delivery: over the limit
    assert janitor.dead_lettered == 1 and "poison" not in store
    (letter,) = dead_letters(redis_client)
    assert letter["entry_id"] == poison_id and b"delivered 6 times" in letter["reason"]
    assert poll_until_quiet(janitor) == PollResult(stored=1)
    assert_drained(redis_client)


def test_an_entry_that_keeps_crashing_its_consumer_is_dead_lettered_on_restart(redis_client, tmp_path):
    config = stream_config()
    stream = config.key("batches")
    publish(redis_client, [make_batch("poison")])
    redis_client.xreadgroup(config.group, "c-0", {stream: ">"}, count=1)
    for _ in range(4):  # deliveries 2..5: four restarts that each read it back and crashed on it
        redis_client.xreadgroup(config.group, "c-0", {stream: "0"}, count=1)
    store = SyntheticStore(tmp_path)
    consumer = make_consumer(redis_client, store, "c-0", max_deliveries=5)
    assert consumer.poll() == PollResult(dead_lettered=1)  # the 6th delivery
    assert len(store) == 0 and b"delivered 6 times" in dead_letters(redis_client)[0]["reason"]
    assert_drained(redis_client)


def test_a_batch_cut_between_two_consumers_is_completed_by_the_one_holding_its_first_chunk(redis_client, tmp_path):
    config = stream_config()
    stream = config.key("batches")
    batch = make_batch("cut", size=32)
    publish(redis_client, [batch])
    chunks = redis_client.xlen(stream)
    assert chunks >= 8
    redis_client.xreadgroup(config.group, "c-1", {stream: ">"}, count=3)  # c-1 reads the head, then stalls
    store = SyntheticStore(tmp_path)
    c0 = make_consumer(redis_client, store, "c-0", batch_entries=3)
    assert c0.poll() == PollResult()  # the middle: c-1 holds the first chunk, so c-0 leaves the batch to c-1
    assert {p["consumer"] for p in pending(redis_client)} == {b"c-0", b"c-1"}
    c1 = make_consumer(redis_client, store, "c-1", batch_entries=3)
    assert c1.poll() == PollResult(stored=1)  # takes c-0's chunks over, reads the undelivered rest
    assert_same_batch(store.get("cut").to_wire(), batch)
    assert_drained(redis_client)
    assert dead_letters(redis_client) == []


def test_a_batch_with_a_chunk_gone_from_the_stream_is_dead_lettered_whole(redis_client, tmp_path):
    config = stream_config()
    stream = config.key("batches")
    publish(redis_client, [make_batch("holed", size=32)])
    ids = [entry_id for entry_id, _ in redis_client.xrange(stream)]
    redis_client.xdel(stream, ids[5])
    publish(redis_client, [make_batch("after", seed=1)])
    store = SyntheticStore(tmp_path)
    consumer = make_consumer(redis_client, store, batch_entries=3)
    assert poll_until_quiet(consumer) == PollResult(stored=1, dead_lettered=len(ids) - 1)
    assert store.batch_ids() == ["after"]
    letters = dead_letters(redis_client)
    assert {letter["entry_id"] for letter in letters} == set(ids) - {ids[5]}
    assert all(b"no longer in the stream" in letter["reason"] for letter in letters)
    assert b"chunks [5] of" in letters[0]["reason"]  # the rest then also miss the chunks dead-lettered before them
    assert_drained(redis_client)


def test_refuses_a_decoding_client(redis_server, tmp_path):
    with pytest.raises(ValueError, match="decode_responses=False"):
        StreamConsumer(redis.Redis.from_url(redis_server.url, decode_responses=True), stream_config(), "c",
                       SyntheticStore(tmp_path))


def _start_consumer(redis_url: str, store: Path, until: int) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "tests" / "consume_main.py"), "--redis-url", redis_url, "--run", "consume",
               "--store", str(store), "--consumer", "trainer-0", "--until", str(until), "--fingerprint", FINGERPRINT,
               "--batch-entries", "3", "--block-ms", "100"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _stored_files(store: Path) -> int:
    return len(list((store / "batches").glob("*.npz")))


def test_sigkill_mid_run_loses_nothing_and_duplicates_nothing(redis_server, redis_client, tmp_path):
    sent = batches(60, chunked_every=4)
    store_dir = tmp_path / "store"
    producer = publish(redis_client, sent[:25])
    process = _start_consumer(redis_server.url, store_dir, until=60)
    try:
        deadline = time.monotonic() + 20
        while _stored_files(store_dir) < 8 and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(5)
        at_kill = _stored_files(store_dir)
        assert 8 <= at_kill < 60, at_kill
        for batch in sent[25:]:
            assert producer.publish(batch)
        process = _start_consumer(redis_server.url, store_dir, until=60)
        output, _ = process.communicate(timeout=25)
        assert process.returncode == 0, output.decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert [p for p in store_dir.rglob("*") if p.name.endswith(".tmp")] == []
    index_ids = [json.loads(line)["batch_id"] for line in (store_dir / "index.jsonl").read_text().splitlines()]
    assert sorted(index_ids) == sorted(b.batch_id for b in sent)  # each once
    store = SyntheticStore(store_dir)
    assert sorted(store.batch_ids()) == sorted(b.batch_id for b in sent)
    for batch in sent[::7]:
        assert_same_batch(store.get(batch.batch_id).to_wire(), batch)
    assert_drained(redis_client)
    assert dead_letters(redis_client) == []
