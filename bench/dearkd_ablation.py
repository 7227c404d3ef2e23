"""DearKD ablations on digits (CPU-sized): the full recipe vs stage 1 only, stage 2 only, no MHCA, hard KD, and
DeiT-style logit distillation into the same ViT. Each variant trains the same student on the same synthetic pool; the last line
printed is one JSON object with the held-out real top-1 of each.

    python bench/dearkd_ablation.py --per-class 50      # the digits teacher by default (trained on first use)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the in-memory image pool the tests use too

from bench.bench_teacher import HELP as TEACHER_HELP, bench_teacher  # noqa: E402
from bench.synth_throughput import git_commit  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.data.digits import load_digits_split  # noqa: E402
from synth_service.synthesizer import create_synthesizer  # noqa: E402
from image_pool import ImagePool  # noqa: E402
from trainer.engine import DearKDTrainer  # noqa: E402

VARIANTS = {
    "dearkd": {},
    "stage1_only": {"dearkd": {"stage1_fraction": 1.0}},
    "stage2_only": {"dearkd": {"stage1_fraction": 0.0}},
    "no_mhca": {"student": {"mhca_blocks": 0}},
    "hard_kd": {"dearkd": {"kd": "hard"}},
    # DeiT-style distillation: logits through the distillation token only, no MHCA, no features, no stage 2.
    "deit_distillation": {"dearkd": {"stage1_fraction": 1.0, "beta": 0.0}, "student": {"mhca_blocks": 0}},
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", help=TEACHER_HELP)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--steps", type=int)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args(argv)
    base = Settings.load("digits")
    teacher = bench_teacher(args.teacher)
    card = teacher.card
    started = time.perf_counter()
    with create_synthesizer(teacher, base.synth) as engine:
        pool = engine.synthesize_classes(list(range(card.num_classes)), args.per_class, seed=0)
    synth_seconds = time.perf_counter() - started
    split = load_digits_split(base.data.digits_size)
    mean, std = torch.tensor(card.mean).view(1, -1, 1, 1), torch.tensor(card.std).view(1, -1, 1, 1)
    x_test = (split.x_test - mean) / std
    out = {"bench": "dearkd_ablation", "teacher": card.arch, "synthetic_images": len(pool.labels),
           "synth_seconds": round(synth_seconds, 1), "torch": torch.__version__, "commit": git_commit(),
           "device": "cpu", "results": {}}
    for name in args.variants.split(","):
        change = VARIANTS[name]
        s = base.model_copy(update={
            "student": type(base.student).model_validate(base.student.model_dump() | change.get("student", {})),
            "dearkd": type(base.dearkd).model_validate(base.dearkd.model_dump() | change.get("dearkd", {})),
            "train": type(base.train).model_validate(base.train.model_dump() | (
                {"steps": args.steps} if args.steps else {}))})
        torch.manual_seed(0)
        trainer = DearKDTrainer(s.student.for_teacher(card), s.dearkd, s.train, teacher.model)
        batches = ImagePool(pool.images, pool.labels, card.mean, card.std, s.train.batch_size, s.train.crop_padding)
        t0 = time.perf_counter()
        for _ in range(s.train.steps):
            trainer.train_step(*next(batches))
        out["results"][name] = {"heldout_top1": round(trainer.evaluate(x_test, split.y_test), 4),
                                "seconds": round(time.perf_counter() - t0, 1)}
        print(name, out["results"][name], file=sys.stderr, flush=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
