"""The trainer's batch contract: hostile headers, wrong shapes and labels, id conflicts and bad store files are
dead-lettered or quarantined with a reason, while every valid batch around them is stored exactly once."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shared.batch_contract import BatchContract
from shared.errors import WireFormatError
from shared.wire import HEADER_FIELD, PAYLOAD_FIELD, MAX_HEADER_BYTES, BatchCodec, decode_header
from trainer.consumer import PollResult
from trainer.store import FreshFirstSampler, SyntheticStore
from test_consumer import assert_drained, dead_letters, make_consumer, poll_until_quiet, publish, stream_config
from test_wire import FINGERPRINT, ensemble_batch, make_batch

OLD_STORE = Path(__file__).parent / "data" / "store_v1"  # written by the store before contracts existed


def teacher_contract(**changes) -> BatchContract:
    """What a trainer with a 3-channel 8x8, 10-class teacher accepts (make_batch's defaults)."""
    base = dataclasses.replace(BatchContract.from_stream(stream_config()), fingerprint=FINGERPRINT,
                               image_shape=(3, 8, 8), num_classes=10)
    return dataclasses.replace(base, **changes)


def raw_entry(batch, **header_changes) -> dict[bytes, bytes]:
    """One entry for `batch` with its header edited after encoding (what a hostile writer can XADD)."""
    (fields,) = BatchCodec().encode(batch, 1 << 20)
    header = json.loads(fields[HEADER_FIELD]) | header_changes
    return {HEADER_FIELD: json.dumps(header).encode(), PAYLOAD_FIELD: fields[PAYLOAD_FIELD]}


def test_batches_the_teacher_cannot_train_on_are_dead_lettered_with_their_reason(redis_client, tmp_path):
    wrong_channels = make_batch("gray", c=1, seed=1)
    bad_labels = make_batch("label-10", seed=2, classes=None)
    bad_labels.labels = [10, 3, 12, 0]
    narrow_logits = make_batch("logits-7", seed=3, classes=7)
    too_many = make_batch("too-many", n=40, seed=4)
    producer = publish(redis_client, [make_batch("good-0"), wrong_channels, bad_labels, narrow_logits, too_many,
                                      make_batch("good-1", seed=5)])
    store = SyntheticStore(tmp_path, teacher_contract())
    consumer = make_consumer(redis_client, store, contract=teacher_contract(max_images=32))
    chunks = len(BatchCodec().encode(too_many, stream_config().chunk_bytes))  # each entry is dead-lettered
    assert chunks > 1
    assert poll_until_quiet(consumer) == PollResult(stored=2, dead_lettered=3 + chunks)
    assert store.batch_ids() == ["good-0", "good-1"]
    reasons = {json.loads(letter["header"])["batch_id"]: letter["reason"].decode()
               for letter in dead_letters(redis_client)}
    assert "1-channel 8x8; this trainer's teacher takes 3-channel 8x8" in reasons["gray"]
    assert "label(s) [10, 12] out of range: the teacher has 10 classes" in reasons["label-10"]
    assert "logits have 7 columns; the teacher has 10 classes" in reasons["logits-7"]
    assert "40 images in one batch; the limit is stream.max_batch_images = 32" in reasons["too-many"]
    assert_drained(redis_client)
    assert producer.backlog() == 0


def test_batches_of_another_ensemble_are_dead_lettered(redis_client, tmp_path):
    """A trainer distilling the ensemble (teacher, X) takes chunked batches of that ensemble and batches without
    logits, and dead-letters one carrying (teacher, Y)'s logits, saying which ensembles differ."""
    ours, theirs = ensemble_batch(), ensemble_batch()
    ours.batch_id, theirs.batch_id = "ours", "theirs"
    theirs.logit_members = (FINGERPRINT, "ee" * 32)
    plain = make_batch("plain", size=16, classes=None)
    assert len(BatchCodec().encode(ours, stream_config().chunk_bytes)) > 2
    publish(redis_client, [ours, theirs, plain])
    contract = teacher_contract(image_shape=(3, 16, 16), ensemble=ours.logit_members)
    store = SyntheticStore(tmp_path, contract)
    chunks = len(BatchCodec().encode(theirs, stream_config().chunk_bytes))
    assert poll_until_quiet(make_consumer(redis_client, store, contract=contract)) == PollResult(
        stored=2, dead_lettered=chunks)
    assert store.batch_ids() == ["ours", "plain"]
    reason = dead_letters(redis_client)[0]["reason"].decode()
    assert ("logits of the ensemble [abababababab..., eeeeeeeeeeee...]; this trainer distils from "
            "[abababababab..., 010101010101...]") in reason, reason
    np.testing.assert_array_equal(store.get("ours").logits, ours.logits)
    assert_drained(redis_client)


@pytest.mark.parametrize("chunk_count", [10**9, 500])
def test_a_header_claiming_many_chunks_sizes_nothing(redis_client, tmp_path, chunk_count):
    """10**9 is over every cap; 500 passes them (an 848-byte payload), and the search for its chunks stops at the next batch."""
    good = [make_batch(f"good-{i}", seed=i) for i in range(6)]
    producer = publish(redis_client, good[:3])
    liar = raw_entry(make_batch("liar", seed=9), chunk_count=chunk_count, chunk_index=1)
    redis_client.xadd(producer.stream_key, liar)
    for batch in good[3:]:
        producer.publish(batch)
    store = SyntheticStore(tmp_path, teacher_contract())
    assert poll_until_quiet(make_consumer(redis_client, store)) == PollResult(stored=6, dead_lettered=1)
    assert store.batch_ids() == [b.batch_id for b in good]
    (letter,) = dead_letters(redis_client)
    reason = letter["reason"].decode()
    if chunk_count == 10**9:
        assert f"chunk_count {chunk_count} is over the limit" in reason
    else:
        assert "are no longer in the stream" in reason and "..." in reason  # the list of missing chunks is cut
    assert_drained(redis_client)


def test_an_entry_over_its_declared_payload_is_dead_lettered(redis_client, tmp_path):
    producer = publish(redis_client, [make_batch("good-0")])
    batch = make_batch("padded", seed=1)
    entry = raw_entry(batch)
    entry[PAYLOAD_FIELD] += b"\0" * 1000
    redis_client.xadd(producer.stream_key, entry)
    store = SyntheticStore(tmp_path, teacher_contract())
    assert poll_until_quiet(make_consumer(redis_client, store)) == PollResult(stored=1, dead_lettered=1)
    assert "over the" in dead_letters(redis_client)[0]["reason"].decode()


def test_a_different_batch_under_a_stored_id_keeps_the_first_and_records_the_conflict(redis_client, tmp_path):
    first = make_batch("same-id", seed=1)
    producer = publish(redis_client, [first])
    store = SyntheticStore(tmp_path, teacher_contract())
    consumer = make_consumer(redis_client, store)
    assert poll_until_quiet(consumer) == PollResult(stored=1)
    kept = store.digest("same-id")
    redis_client.delete(producer.dedupe_key("same-id"))  # a second writer that does not share the dedupe key
    assert producer.publish(make_batch("same-id", seed=2))
    assert poll_until_quiet(consumer) == PollResult(dead_lettered=1, conflicts=1)
    redis_client.delete(producer.dedupe_key("same-id"))
    assert producer.publish(first)  # a true copy, re-sent: only acknowledged
    assert poll_until_quiet(consumer) == PollResult(duplicates=1)
    assert store.digest("same-id") == kept and len(store) == 1
    np.testing.assert_array_equal(store.get("same-id").images, first.images)
    (letter,) = dead_letters(redis_client)
    assert "stored already with other content" in letter["reason"].decode() and letter["payload"]
    assert_drained(redis_client)


def test_an_oversized_header_is_refused_before_it_is_parsed():
    batch = make_batch("big-header")
    batch.stats = {"noise": [0.5] * (MAX_HEADER_BYTES // 4)}
    with pytest.raises(WireFormatError, match="header is over"):
        BatchCodec().encode(batch, 1 << 30)
    huge = {HEADER_FIELD: b" " * (MAX_HEADER_BYTES + 1), PAYLOAD_FIELD: b""}
    with pytest.raises(WireFormatError, match=f"over the {MAX_HEADER_BYTES}-byte limit"):
        decode_header(huge)


def test_the_store_refuses_and_quarantines_batches_outside_its_contract(tmp_path):
    contract = teacher_contract()
    store = SyntheticStore(tmp_path, contract)
    with pytest.raises(ValueError, match="refused by the store.*1-channel"):
        store.put(make_batch("gray", c=1))
    assert store.put(make_batch("good-0"))
    # Bad files put there by hand (or by an older trainer that checked less): a wrong shape, and garbage.
    assert SyntheticStore(tmp_path).put(make_batch("gray", c=1, seed=1))
    assert SyntheticStore(tmp_path).put(make_batch("good-1", seed=2))
    (tmp_path / "batches" / "torn.npz").write_bytes(b"PK\x03\x04 not really a zip")

    reopened = SyntheticStore(tmp_path, contract)
    assert reopened.batch_ids() == ["good-0", "good-1"]
    assert sorted(reason.split(":")[0] for _, reason in reopened.quarantined) == ["images are 1-channel 8x8; this "
                                                                                  "trainer's teacher takes 3-channel "
                                                                                  "8x8", "unreadable"]
    assert sorted(p.name for p in (tmp_path / "quarantine").glob("*.npz")) == ["gray.npz", "torn.npz"]
    records = [json.loads(line) for line in (tmp_path / "quarantine" / "reasons.jsonl").read_text().splitlines()]
    assert {r["batch_id"] for r in records} == {"gray", "torn"} == reopened.quarantined_ids()
    again = SyntheticStore(tmp_path, contract)  # the index was rewritten: nothing more to move
    assert again.batch_ids() == ["good-0", "good-1"] and again.quarantined == []
    assert FreshFirstSampler(again, batch_size=8).sample().images.shape == (8, 3, 8, 8)


def test_sampling_resumes_across_a_batch_quarantined_behind_the_cursor(tmp_path):
    store = SyntheticStore(tmp_path)  # as an older trainer wrote it: labels were not checked
    for i in range(5):
        batch = make_batch(f"b-{i}", seed=i)
        if i == 1:
            batch.labels, batch.logits = [10, 11, 12, 13], None
        store.put(batch)
    sampler = FreshFirstSampler(SyntheticStore(tmp_path, teacher_contract(num_classes=None)), batch_size=10)
    sampler.sample()  # b-0 and b-1 fully, 2 images of b-2
    state = json.loads(json.dumps(sampler.state_dict()))
    assert state["cursor"] == 2 and state["offset"] == 2

    reopened = SyntheticStore(tmp_path, teacher_contract())  # b-1 is moved aside
    assert reopened.batch_ids() == ["b-0", "b-2", "b-3", "b-4"] and reopened.quarantined_ids() == {"b-1"}
    resumed = FreshFirstSampler(reopened, batch_size=6)
    resumed.load_state_dict(state)
    sample = resumed.sample()
    assert sample.n_fresh == 6  # the last 2 images of b-2, then b-3: nothing twice, nothing skipped
    np.testing.assert_array_equal(sample.images, np.concatenate([reopened.get("b-2").images[2:],
                                                                 reopened.get("b-3").images]))


def test_a_store_and_a_sampler_state_from_the_previous_version_still_load(tmp_path):
    shutil.copytree(OLD_STORE, tmp_path / "store")
    store = SyntheticStore(tmp_path / "store", teacher_contract(fingerprint=FINGERPRINT))
    assert store.batch_ids() == ["old-0", "old-1", "old-2"] and store.quarantined == []
    assert store.get("old-1").images.shape == (4, 3, 8, 8)
    sampler = FreshFirstSampler(store, batch_size=4)
    old_state = {"cursor": 1, "offset": 0, "last_fresh": "old-0", "rng": sampler.state_dict()["rng"]}
    sampler.load_state_dict(old_state)
    np.testing.assert_array_equal(sampler.sample().images, store.get("old-1").images)
    with pytest.raises(ValueError, match="does not match the store"):
        sampler.load_state_dict(old_state | {"last_fresh": "other-store-0"})
