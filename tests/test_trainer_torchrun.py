"""The trainer under torchrun (2 CPU ranks, gloo): each rank consumes its own share of one stream, and the ranks
take identical optimisation steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from shared.config import StreamConfig
from shared.stream import StreamProducer
from trainer.store import SyntheticStore

from helpers import publish


def torchrun_train(teacher_card: Path, out: Path, store: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dfkd", "train",
            "--config", "digits", "--teacher", str(teacher_card), "--steps", str(steps), "--out", str(out),
            "--store", str(store)]


def test_two_ranks_share_the_stream_and_stay_in_sync(digits_teacher, teacher_dir, redis_server, redis_client,
                                                     tmp_path):
    stream = StreamConfig(redis_url=redis_server.url, run="torchrun-it", max_backlog=1000)
    producer = StreamProducer(redis_client, stream, "test")
    producer.ensure_group()

    env = os.environ | {
        "DFKD_STREAM__REDIS_URL": redis_server.url, "DFKD_STREAM__RUN": "torchrun-it",
        "DFKD_STUDENT__EMBED_DIM": "32", "DFKD_STUDENT__DEPTH": "2", "DFKD_STUDENT__NUM_HEADS": "2",
        "DFKD_STUDENT__MHCA_BLOCKS": "1", "DFKD_TRAIN__BATCH_SIZE": "16", "DFKD_TRAIN__CHECKPOINT_EVERY": "10",
        "DFKD_TRAIN__EVAL_EVERY": "1000", "DFKD_TRAIN__LOG_EVERY": "10", "OMP_NUM_THREADS": "1"}
    card = teacher_dir / "digits_cnn.json"
    proc = subprocess.Popen(torchrun_train(card, tmp_path / "run", tmp_path / "store", 30), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Like a synth replica: batches keep coming once both ranks are reading.
        deadline = time.monotonic() + 180
        while len(redis_client.xinfo_consumers(producer.stream_key, stream.group)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        published = set()
        for i in range(0, 24, 2):
            published |= set(publish(producer, digits_teacher.card, i, 2))
            time.sleep(0.3)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]

    # Each rank stored a disjoint share of the stream.
    shares = [set(SyntheticStore(tmp_path / "store" / f"rank{r}").batch_ids()) for r in (0, 1)]
    assert shares[0] and shares[1], shares
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] <= published

    # Averaged gradients: both ranks hold the same weights, although each trained on different batches.
    weights = [load_file(str(tmp_path / "run" / f"rank{r}" / "checkpoint" / "model.safetensors")) for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert (weights[0][name] == weights[1][name]).all(), name
    # Rank 0 alone writes the student and evaluates.
    assert (tmp_path / "run" / "student.safetensors").is_file()
    assert stdout.count('"eval_top1": 0.') == 1 and '"world_size": 2' in stdout

    # Ranks whose checkpoints disagree on the step are refused, instead of deadlocking in a collective.
    state_path = tmp_path / "run" / "rank1" / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    state["step"] = 20
    state_path.write_text(json.dumps(state))
    again = subprocess.run(torchrun_train(card, tmp_path / "run", tmp_path / "store", 40), env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode != 0
    assert "checkpoints are at different steps [30, 20]" in again.stderr, again.stderr[-3000:]
