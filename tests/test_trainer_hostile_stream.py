"""`dfkd train` on a real Redis stream that carries hostile entries: each is dead-lettered with its reason, the
trainer's memory stays put, training goes on, and a bad batch already in the store is quarantined on restart."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np

from shared.config import StreamConfig
from shared.stream import StreamProducer
from shared.wire import HEADER_FIELD, PAYLOAD_FIELD, BatchCodec, SynthesisRecord, WireBatch
from trainer.store import SyntheticStore

from helpers import publish
from test_trainer_stream import wait_for

MB = 1 << 20


def peak_rss(pid: int) -> int:
    """VmHWM: the most resident memory the process has ever had, in bytes."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def digits_batch(card, batch_id: str, *, channels: int = 1, labels=None, logits: bool = True,
                 seed: int = 0) -> WireBatch:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, 16).tolist() if labels is None else labels
    return WireBatch(batch_id=batch_id, sequence=seed, producer_id="hostile", teacher_fingerprint=card.fingerprint,
                     mean=(card.mean[0],) * channels, std=(card.std[0],) * channels, labels=labels,
                     images=rng.integers(0, 256, (16, channels, 16, 16), dtype=np.uint8),
                     logits=rng.standard_normal((1, 1, 16, 10)).astype(np.float16) if logits else None,
                     synthesis=SynthesisRecord(seed=seed))


def test_hostile_entries_are_dead_lettered_and_training_goes_on(digits_teacher, teacher_dir, redis_server,
                                                                redis_client, tmp_path):
    card = digits_teacher.card
    stream = StreamConfig(redis_url=redis_server.url, run="hostile", max_backlog=1000)
    producer = StreamProducer(redis_client, stream, "test")
    producer.ensure_group()
    published = publish(producer, card, 0, 5)

    env = os.environ | {
        "DFKD_STREAM__REDIS_URL": redis_server.url, "DFKD_STREAM__RUN": "hostile",
        "DFKD_STUDENT__EMBED_DIM": "32", "DFKD_STUDENT__DEPTH": "2", "DFKD_STUDENT__NUM_HEADS": "2",
        "DFKD_STUDENT__MHCA_BLOCKS": "1", "DFKD_TRAIN__BATCH_SIZE": "16", "DFKD_TRAIN__CHECKPOINT_EVERY": "5",
        "DFKD_TRAIN__EVAL_EVERY": "100000", "DFKD_TRAIN__LOG_EVERY": "50"}
    store_dir = tmp_path / "store"

    def command(steps: int) -> list[str]:
        return [sys.executable, "-m", "dfkd", "train", "--config", "digits", "--teacher",
                str(teacher_dir / "digits_cnn.json"), "--steps", str(steps), "--out", str(tmp_path / "run"),
                "--store", str(store_dir), "--device", "cpu"]

    def stored() -> list[str]:
        index = store_dir / "index.jsonl"
        return [json.loads(line)["batch_id"] for line in index.read_text().splitlines()] if index.is_file() else []

    state_file = tmp_path / "run" / "checkpoint" / "state.json"

    def step() -> int:
        return json.loads(state_file.read_text())["step"] if state_file.is_file() else 0

    proc = subprocess.Popen(command(1_000_000), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(stored()) == 5 and step() >= 20, "the first batches and some training", proc)
        peak_before = peak_rss(proc.pid)

        # 1: a small entry whose header claims ten million chunks.
        (entry,) = BatchCodec().encode(digits_batch(card, "many-chunks", seed=50), stream.chunk_bytes)
        header = json.loads(entry[HEADER_FIELD]) | {"chunk_count": 10**7}
        redis_client.xadd(producer.stream_key, {HEADER_FIELD: json.dumps(header), PAYLOAD_FIELD: entry[PAYLOAD_FIELD]})
        # 2: labels the teacher does not have, and no logits to give them away.
        producer.publish(digits_batch(card, "label-12", labels=[12] + [3] * 15, logits=False, seed=51))
        # 3: RGB images with this teacher's fingerprint (it takes 1 channel).
        producer.publish(digits_batch(card, "rgb", channels=3, seed=52))
        # A second, different batch under an id already stored.
        redis_client.delete(producer.dedupe_key(published[0]))
        producer.publish(digits_batch(card, published[0], seed=53))
        published += publish(producer, card, 5, 5)

        wait_for(lambda: len(stored()) == 10 and redis_client.xlen(stream.key("dead")) == 4,
                 "the later batches and four dead letters", proc)
        trained_to = step()
        wait_for(lambda: step() >= trained_to + 20, "training to go on", proc)
        growth = peak_rss(proc.pid) - peak_before
        print(f"trainer peak RSS grew by {growth / MB:.1f} MB across the hostile entries")
        assert growth < 200 * MB
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, output

    assert sorted(stored()) == sorted(published)  # every valid batch, exactly once
    reasons = {json.loads(fields[b"header"])["batch_id"]: fields[b"reason"].decode()
               for _, fields in redis_client.xrange(stream.key("dead"))}
    assert "chunk_count 10000000 is over the limit" in reasons["many-chunks"]
    assert "label(s) [12] out of range: the teacher has 10 classes" in reasons["label-12"]
    assert "images are 3-channel 16x16; this trainer's teacher takes 1-channel 16x16" in reasons["rgb"]
    assert "stored already with other content" in reasons[published[0]]
    assert redis_client.xpending(producer.stream_key, stream.group)["pending"] == 0

    # A bad batch already in the store (written by hand, as an older trainer could have): the restart moves it
    # aside and trains.
    assert SyntheticStore(store_dir).put(digits_batch(card, "by-hand", channels=3, seed=60))
    saved = step()
    res = subprocess.run(command(saved + 20), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "batch 'by-hand' quarantined" in res.stdout and "3-channel 16x16" in res.stdout
    assert json.loads(res.stdout.strip().splitlines()[-1])["step"] == saved + 20
    assert (store_dir / "quarantine" / "by-hand.npz").is_file()
    assert sorted(stored()) == sorted(published)
