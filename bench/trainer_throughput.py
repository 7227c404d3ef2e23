"""Trainer throughput: DearKD stage-1 and stage-2 images/s against a bare timm training loop (same student size,
no MHCA, plain CE and AdamW) at the same batch. Synthetic random inputs, so only compute is measured.
The last line printed is one JSON object.

    python bench/trainer_throughput.py --teacher runs/teachers/digits_cnn.json --config digits --steps 30
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synth_throughput import git_commit  # noqa: E402
from shared.config import Settings, resolve_device  # noqa: E402
from shared.teacher import resolve_teacher  # noqa: E402
from trainer.engine import DearKDTrainer  # noqa: E402
from trainer.student import create_student  # noqa: E402


def timed(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="runs/teachers/digits_cnn.json", help="teacher card (JSON) or model name")
    p.add_argument("--config", default="digits", help="preset or YAML with the student/dearkd/train settings")
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    s = Settings.load(args.config)
    device = resolve_device(args.device)
    teacher = resolve_teacher(args.teacher)
    batch = args.batch or s.train.batch_size
    cfg = s.student.for_teacher(teacher.card)
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)

    trainer = DearKDTrainer(cfg, s.dearkd, s.train.model_copy(update={"steps": 10**9}), teacher.model, device)
    stage1 = timed(lambda: trainer.train_step(x, y), args.steps, args.warmup, device)
    trainer.step = 10**9 - 1  # the stage-2 side of the switch
    stage2 = timed(lambda: (trainer.train_step(x, y), setattr(trainer, "step", 10**9 - 1)), args.steps,
                   args.warmup, device)

    bare = create_student(cfg.model_copy(update={"mhca_blocks": 0})).to(device)
    opt = torch.optim.AdamW(bare.parameters(), lr=1e-3)

    def bare_step() -> None:
        cls_logits, dist_logits = bare(x)
        loss = 0.5 * F.cross_entropy(cls_logits, y) + 0.5 * F.cross_entropy(dist_logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    bare_s = timed(bare_step, args.steps, args.warmup, device)
    images = batch * args.steps
    out = {"bench": "trainer_throughput", "student": cfg.model_dump(), "teacher": teacher.card.arch, "batch": batch,
           "steps": args.steps, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": git_commit(),
           "stage1_images_per_s": round(images / stage1, 1), "stage2_images_per_s": round(images / stage2, 1),
           "bare_timm_images_per_s": round(images / bare_s, 1),
           "stage1_over_bare": round(bare_s / stage1, 3), "stage2_over_bare": round(bare_s / stage2, 3)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
