"""The trainer under torchrun (2 CPU ranks, gloo): each rank consumes its own share of one stream, and the ranks
take identical optimisation steps; DDP's step equals one process's on the ranks' batches together."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from shared.config import DearKDConfig, StreamConfig, StudentConfig, TrainConfig
from shared.models import create_model
from shared.stream import StreamProducer
from trainer.engine import DearKDTrainer
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


# No dropout or drop-path: the ranks and the single process must see the same network.
EXACT = StudentConfig(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2,
                      mlp_ratio=1.0, mhca_blocks=1, mhca_dropout=0.0, drop_path=0.0)


def make_trainer(dearkd: DearKDConfig, steps: int, distributed: bool) -> DearKDTrainer:
    torch.manual_seed(0)
    teacher = create_model("digits_cnn", num_classes=10, in_chans=1)
    return DearKDTrainer(EXACT, dearkd, TrainConfig(steps=steps, warmup_steps=0, lr=1e-3), teacher,
                         distributed=distributed)


def ddp_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(steps)]


def ddp_worker(rank: int, out: str, dearkd: DearKDConfig, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        trainer = make_trainer(dearkd, steps, distributed=True)
        if rank == 1:  # a different start: DDP must begin every rank from rank 0's weights
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.add_(1.0)
        for x, y in ddp_batches(steps):
            trainer.train_step(x[rank * 8:(rank + 1) * 8], y[rank * 8:(rank + 1) * 8])  # each rank half the batch
        torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ddp(tmp_path, dearkd: DearKDConfig, steps: int) -> list[dict[str, torch.Tensor]]:
    mp.spawn(ddp_worker, args=(str(tmp_path), dearkd, steps), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_ddp_step_equals_one_process_on_the_whole_batch(tmp_path):
    # No feature term: BatchNorm and the teacher-map standardisation see the batch, so only without them is a
    # step on two halves the same as a step on the whole.
    dearkd = DearKDConfig(beta=0.0, stage1_fraction=0.5)
    ranks = run_ddp(tmp_path, dearkd, steps=4)  # 2 steps of each stage
    single = make_trainer(dearkd, 4, distributed=False)
    for x, y in ddp_batches(4):
        single.train_step(x, y)
    expected = single.model.state_dict()
    assert ranks[0].keys() == ranks[1].keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], value, atol=1e-5), name


def test_ddp_trains_through_the_stage_switch_with_idle_aligners(tmp_path):
    # Stage 2 leaves the aligners without gradients: DDP must not wait for them, and the state stays shared.
    dearkd = DearKDConfig(beta=1.0, feature_pairs=[(1, 1), (2, 2)], stage1_fraction=0.5)
    ranks = run_ddp(tmp_path, dearkd, steps=6)
    keys = make_trainer(dearkd, 6, distributed=False).model.state_dict().keys()
    assert ranks[0].keys() == keys and any(k.startswith("aligners.") for k in keys)  # checkpoint keys unchanged
    for name in keys:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
