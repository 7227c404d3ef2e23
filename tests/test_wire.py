"""The wire format: exact round trips (chunked or not) and a clear WireFormatError for every kind of bad entry."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from shared.errors import WireFormatError
from shared.wire import (HEADER_FIELD, LOGIT_VIEWS, PAYLOAD_FIELD, SCHEMA_VERSION, BatchCodec, EntryFields,
                         SynthesisRecord, WireBatch, decode_header)

FINGERPRINT = "ab" * 32
codec = BatchCodec()


def make_batch(batch_id: str = "b-0", *, n: int = 4, c: int = 3, size: int = 8, classes: int | None = 10,
               seed: int = 0, producer_id: str = "p-0", sequence: int = 0) -> WireBatch:
    """A batch with random content, so any byte out of place shows up in the comparison."""
    rng = np.random.default_rng(seed)
    logits = None if classes is None else rng.standard_normal((1, 1, n, classes)).astype(np.float16)
    return WireBatch(batch_id=batch_id, sequence=sequence, producer_id=producer_id, teacher_fingerprint=FINGERPRINT,
                     mean=(0.5,) * c, std=(0.25,) * c, labels=rng.integers(0, 10, n).tolist(),
                     images=rng.integers(0, 256, (n, c, size, size), dtype=np.uint8), logits=logits,
                     synthesis=SynthesisRecord(params={"iterations": 20, "lr": 0.25, "schedule": [[8, 20]]},
                                               seed=seed),
                     stats={"loss": 1.5, "bn_per_layer": [0.1, 0.2]}, created_at=1_700_000_000.5 + seed)


def assert_same_batch(got: WireBatch, want: WireBatch) -> None:
    np.testing.assert_array_equal(got.images, want.images)
    assert got.images.dtype == np.uint8 and got.images.shape == want.images.shape
    if want.logits is None:
        assert got.logits is None
    else:
        assert got.logits.dtype == np.float16
        np.testing.assert_array_equal(got.logits, want.logits)
    for name in ("batch_id", "sequence", "producer_id", "teacher_fingerprint", "labels", "synthesis", "stats",
                 "created_at") + (("logit_members", "logit_views") if want.logits is not None else ()):
        assert getattr(got, name) == getattr(want, name), name
    assert tuple(got.mean) == tuple(want.mean) and tuple(got.std) == tuple(want.std)


def edit_header(fields: EntryFields, **changes: object) -> EntryFields:
    header = json.loads(fields[HEADER_FIELD])
    header.update(changes)
    return {HEADER_FIELD: json.dumps(header).encode(), PAYLOAD_FIELD: fields[PAYLOAD_FIELD]}


@pytest.mark.parametrize("classes", [10, None], ids=["logits", "no-logits"])
def test_round_trip(classes):
    batch = make_batch(classes=classes)
    entries = codec.encode(batch, max_entry_bytes=1 << 20)
    assert len(entries) == 1 and set(entries[0]) == {HEADER_FIELD, PAYLOAD_FIELD}
    header = decode_header(entries[0])
    assert header.version == SCHEMA_VERSION and header.shape == (4, 3, 8, 8) and header.chunk_count == 1
    assert header.logits_shape == (None if classes is None else (1, 1, 4, 10))
    decoded = codec.decode(entries)
    assert_same_batch(decoded, batch)
    decoded.images[0, 0, 0, 0] ^= 1  # writable: ready for torch.from_numpy without a copy


def test_nan_stats_survive():
    batch = make_batch()
    batch.stats = {"loss": float("nan"), "per_layer": [float("inf"), 1.0]}
    decoded = codec.decode(codec.encode(batch, 1 << 20))
    assert np.isnan(decoded.stats["loss"]) and decoded.stats["per_layer"] == [float("inf"), 1.0]


def test_chunked_entries_reassemble_exactly():
    batch = make_batch(n=6, size=16)
    header_bytes = len(codec.encode(batch, 1 << 20)[0][HEADER_FIELD])
    cap = header_bytes + 200  # a tiny cap: ~200 payload bytes per entry
    entries = codec.encode(batch, max_entry_bytes=cap)
    payload_bytes = 6 * 3 * 16 * 16 + 6 * 10 * 2
    assert len(entries) >= payload_bytes // 200
    assert all(len(e[HEADER_FIELD]) + len(e[PAYLOAD_FIELD]) <= cap for e in entries)
    headers = [decode_header(e) for e in entries]
    assert [h.chunk_index for h in headers] == list(range(len(entries)))
    assert {h.chunk_count for h in headers} == {len(entries)}
    shuffled = entries[:]
    random.Random(0).shuffle(shuffled)
    assert_same_batch(codec.decode(shuffled), batch)


def test_corrupted_payload_fails_the_checksum():
    fields = codec.encode(make_batch(), 1 << 20)[0]
    payload = bytearray(fields[PAYLOAD_FIELD])
    payload[17] ^= 0x01
    with pytest.raises(WireFormatError, match="checksum"):
        codec.decode([{HEADER_FIELD: fields[HEADER_FIELD], PAYLOAD_FIELD: bytes(payload)}])


def test_unknown_version_is_rejected():
    fields = edit_header(codec.encode(make_batch(), 1 << 20)[0], version=SCHEMA_VERSION + 1)
    with pytest.raises(WireFormatError, match=f"unsupported wire schema version {SCHEMA_VERSION + 1}"):
        codec.decode([fields])


@pytest.mark.parametrize("changes, message", [
    ({"shape": [4, 3, 8, 9]}, "payload_bytes 848 != 944"),         # shape disagrees with the payload size
    ({"labels": [1, 2, 3]}, "3 labels for 4 images"),
    ({"logits": {"members": [FINGERPRINT], "views": ["hflip", "identity"], "classes": 10}}, "in the order"),
    ({"logits": {"members": ["cd" * 32], "views": ["identity"], "classes": 10}}, "must be the primary teacher"),
    ({"logits": {"members": [FINGERPRINT, FINGERPRINT], "views": ["identity"], "classes": 5}}, "listed twice"),
    ({"logits": {"members": [FINGERPRINT], "views": ["rotate"], "classes": 10}}, "views"),
    ({"version": 1, "logits": None, "logits_shape": [3, 10], "logits_dtype": "float16"}, "one row per image"),
    ({"mean": [0.5]}, "mean/std have 1/3 values for 3 channels"),
    ({"shape": [4, 5, 8, 8]}, "less than or equal to 4"),            # C outside 1..4
    ({"dtype": "float32"}, "dtype"),
    ({"batch_id": "../etc/passwd"}, "batch_id"),
    ({"surprise": 1}, "surprise"),                                    # extra fields are forbidden
])
def test_inconsistent_header_is_rejected(changes, message):
    fields = edit_header(codec.encode(make_batch(), 1 << 20)[0], **changes)
    with pytest.raises(WireFormatError, match=message):
        codec.decode([fields])


def ensemble_batch(n: int = 6, members: int = 2, views: tuple[str, ...] = LOGIT_VIEWS) -> WireBatch:
    batch = make_batch(n=n, size=16, classes=None)
    rng = np.random.default_rng(1)
    batch.logits = rng.standard_normal((members, len(views), n, 10)).astype(np.float16)
    batch.logit_members = (FINGERPRINT,) + tuple(f"{i:02x}" * 32 for i in range(1, members))
    batch.logit_views = views
    return batch


def test_ensemble_logits_survive_chunking():
    """Every member's block for every view, through entries of ~300 payload bytes in any order."""
    batch = ensemble_batch()
    header_bytes = len(codec.encode(batch, 1 << 20)[0][HEADER_FIELD])
    entries = codec.encode(batch, max_entry_bytes=header_bytes + 300)
    assert len(entries) >= (6 * 3 * 16 * 16 + 2 * 2 * 6 * 10 * 2) // 300
    header = decode_header(entries[0])
    assert header.logits.members == list(batch.logit_members) and header.logits_shape == (2, 2, 6, 10)
    random.Random(1).shuffle(entries)
    got = codec.decode(entries)
    assert_same_batch(got, batch)
    np.testing.assert_array_equal(got.primary_logits(), batch.logits[0, 0])


def test_logits_that_do_not_fit_their_names_are_refused_when_encoding():
    batch = ensemble_batch()
    batch.logit_members = batch.logit_members[:1]  # two blocks of logits, one member named
    with pytest.raises(WireFormatError, match=r"1 member\(s\), 2 view\(s\) and 6 images need \[1, 2, 6\]"):
        codec.encode(batch, 1 << 20)
    batch = ensemble_batch()
    batch.logits = batch.logits[0, 0]  # [N, K], the old layout
    with pytest.raises(WireFormatError, match=r"float16 \[M, V, N, K\]"):
        codec.encode(batch, 1 << 20)


def test_a_version_1_entry_still_decodes():
    """Stores and streams written before ensembles: one [N, K] block, the teacher's on the image as stored."""
    batch = make_batch()
    fields = codec.encode(batch, 1 << 20)[0]
    header = json.loads(fields[HEADER_FIELD])
    header.pop("logits")
    header.update(version=1, logits_shape=[4, 10], logits_dtype="float16")
    got = codec.decode([{HEADER_FIELD: json.dumps(header).encode(), PAYLOAD_FIELD: fields[PAYLOAD_FIELD]}])
    assert got.logit_members == (FINGERPRINT,) and got.logit_views == ("identity",)
    np.testing.assert_array_equal(got.logits, batch.logits)


def test_payload_length_must_match_the_header():
    fields = codec.encode(make_batch(), 1 << 20)[0]
    with pytest.raises(WireFormatError, match="payload is 847 bytes, header says 848"):
        codec.decode([{HEADER_FIELD: fields[HEADER_FIELD], PAYLOAD_FIELD: fields[PAYLOAD_FIELD][:-1]}])


def test_missing_and_duplicate_chunks_are_rejected():
    entries = codec.encode(make_batch(n=6, size=16), max_entry_bytes=1500)
    assert len(entries) >= 4
    with pytest.raises(WireFormatError, match=r"missing \[2\], duplicated \[\]"):
        codec.decode(entries[:2] + entries[3:])
    with pytest.raises(WireFormatError, match=r"missing \[\], duplicated \[1\]"):
        codec.decode(entries + [entries[1]])
    with pytest.raises(WireFormatError, match=r"missing \[2\], duplicated \[1\]"):
        codec.decode(entries[:2] + [entries[1]] + entries[3:])


def test_chunks_of_different_batches_do_not_mix():
    first = codec.encode(make_batch("b-1", n=6, size=16), max_entry_bytes=1500)
    second = codec.encode(make_batch("b-2", n=6, size=16, seed=1), max_entry_bytes=1500)
    with pytest.raises(WireFormatError, match="different batches mixed"):
        codec.decode(first[:1] + second[1:])


def test_header_that_is_not_json_is_rejected():
    with pytest.raises(WireFormatError, match="bad batch header.*(JSON|json)"):
        decode_header({HEADER_FIELD: b"\x80\x04not json", PAYLOAD_FIELD: b""})
    with pytest.raises(WireFormatError, match="no 'header' field"):
        decode_header({PAYLOAD_FIELD: b""})
    with pytest.raises(WireFormatError, match="no stream entries"):
        codec.decode([])


def test_str_keys_are_accepted():
    fields = codec.encode(make_batch(), 1 << 20)[0]
    assert decode_header({"header": fields[HEADER_FIELD]}).batch_id == "b-0"


def test_encode_rejects_bad_batches():
    batch = make_batch()
    batch.images = batch.images.astype(np.float32)
    with pytest.raises(WireFormatError, match="uint8 NCHW"):
        codec.encode(batch, 1 << 20)
    batch = make_batch()
    batch.labels = batch.labels[:-1]
    with pytest.raises(WireFormatError, match="cannot be encoded: .*3 labels for 4 images"):
        codec.encode(batch, 1 << 20)
    with pytest.raises(WireFormatError, match="leaves no room"):
        codec.encode(make_batch(), max_entry_bytes=100)
