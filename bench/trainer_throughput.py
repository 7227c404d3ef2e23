"""Trainer throughput: DearKD stage-1 and stage-2 steps in fp32 and under bf16 autocast, against a bare timm training
loop (same student size, no MHCA, plain CE and AdamW) at the same batch; and the cost of reading the losses to the
host every step (as the trainer once did) against every `log_every` steps. Synthetic random inputs, so only compute
is measured. Beside them, stage 1 with the teachers' logits shipped with the batch (`train.teacher_logits:
stored`: no teacher forward for logits, the teacher run only up to its last feature stage) against computing them
online, for the teacher alone and with `--ensemble` members; with and without the early-feature term. With
`--scalekd-teacher`, the ScaleKD recipe's images/s against plain logit KD (the same trainer without its feature
terms) for each `--scalekd-students` model. The last line printed is one JSON object.

    python bench/trainer_throughput.py --config digits --steps 30      # the digits teacher by default
    python bench/trainer_throughput.py --ensemble runs/teachers/digits_rednet_digits.json
    python bench/trainer_throughput.py --scalekd-teacher runs/teachers/digits_vit_nano_patch2_16.json
    python bench/trainer_throughput.py --config cifar10 --cpu-vit --teacher teachers/cifar10_resnet20.json \
        --ensemble teachers/cifar10_rednet_cifar.json                  # the CIFAR-10 CPU bench's student
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_teacher import HELP as TEACHER_HELP, bench_teacher  # noqa: E402
from bench.cifar10_cpu import cpu_vit_settings  # noqa: E402
from bench.synth_throughput import git_commit  # noqa: E402
from shared.config import ScaleKDConfig, Settings, resolve_device  # noqa: E402
from shared.ensemble import Ensemble  # noqa: E402
from shared.teacher import load_teacher  # noqa: E402
from shared.models.dearkd_student import create_student  # noqa: E402
from trainer.engine import DearKDTrainer, autocast_dtype  # noqa: E402
from trainer.metrics import TrainerMetrics  # noqa: E402
from trainer.scalekd import ScaleKDTrainer  # noqa: E402

FAR = 10**9  # a run this long stays in stage 1; step FAR - 1 is in stage 2


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


def make_trainer(s: Settings, cfg, teacher, device: torch.device, precision: str,
                 ensemble: Ensemble | None = None, dearkd=None) -> DearKDTrainer:
    torch.manual_seed(0)
    return DearKDTrainer(cfg, dearkd or s.dearkd, s.train.model_copy(update={"steps": FAR, "precision": precision}),
                         teacher.model, device, ensemble=ensemble)


def logit_paths(s: Settings, cfg, teacher, ensemble: Ensemble, x, y, args, device, precision: str) -> dict:
    """Stage-1 images/s with logits computed online against shipped ones, with and without early features."""
    out = {}
    for features, beta in (("with_features", s.dearkd.beta), ("logits_only", 0.0)):
        dearkd = s.dearkd.model_copy(update={"beta": beta})
        trainer = make_trainer(s, cfg, teacher, device, precision, ensemble, dearkd)
        stored = trainer.online_logits(x)
        online = timed(lambda: trainer.train_step(x, y), args.steps, args.warmup, device)
        rows = trainer.online_logit_rows
        shipped = timed(lambda: trainer.train_step(x, y, stored), args.steps, args.warmup, device)
        assert trainer.online_logit_rows == rows, "the stored path ran a teacher for logits"
        images = len(y) * args.steps
        out[features] = {"beta": beta, "online_images_per_s": round(images / online, 1),
                         "stored_images_per_s": round(images / shipped, 1), "speedup": round(online / shipped, 3)}
    return out


def scalekd_rates(s: Settings, card_path: str, students: list[str], batch: int, args, device, precision: str) -> dict:
    """Images/s of ScaleKD with every part against plain logit KD (no feature terms, no TPP), per student."""
    vit = load_teacher(card_path)
    c = vit.card
    x = torch.randn(batch, c.in_chans, c.image_size, c.image_size, device=device)
    y = torch.randint(0, c.num_classes, (batch,), device=device)
    train = s.train.model_copy(update={"steps": FAR, "precision": precision})
    out = {"teacher": c.arch}
    for student in students:
        rates = {}
        for row, change in (("scalekd", {}), ("plain_kd", dict(spatial_weight=0.0, frequency_weight=0.0,
                                                                tpp=False))):
            torch.manual_seed(0)
            trainer = ScaleKDTrainer(ScaleKDConfig(student=student, **change), train, vit.model, c, c, device)
            rates[row] = round(batch * args.steps / timed(lambda: trainer.train_step(x, y), args.steps, args.warmup,
                                                          device), 1)
        out[student] = rates | {"scalekd_over_plain_kd": round(rates["scalekd"] / rates["plain_kd"], 3)}
    return out


def stage_seconds(trainer: DearKDTrainer, x, y, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    stage1 = timed(lambda: trainer.train_step(x, y), steps, warmup, device)
    trainer.step = FAR - 1  # the stage-2 side of the switch

    def stage2_step() -> None:
        trainer.train_step(x, y)
        trainer.step = FAR - 1

    return stage1, timed(stage2_step, steps, warmup, device)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", help=TEACHER_HELP)
    p.add_argument("--config", default="digits", help="preset or YAML with the student/dearkd/train settings")
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--log-every", type=int, default=50, help="loss reads in the sync comparison (train.log_every)")
    p.add_argument("--device", default="auto")
    p.add_argument("--ensemble", action="append", default=[], help="a further teacher card (repeatable)")
    p.add_argument("--scalekd-teacher", help="a ViT teacher card: adds ScaleKD against plain logit KD")
    p.add_argument("--scalekd-students", default="resnet8,mixer_nano_patch2_16")
    p.add_argument("--cpu-vit", action="store_true", help="the CPU-scale DearKD ViT and recipe of "
                                                          "bench/cifar10_cpu.py (96 wide, 6 blocks) as the student")
    args = p.parse_args(argv)
    s = Settings.load(args.config)
    if args.cpu_vit:
        s = cpu_vit_settings(s, s.train.steps, args.batch or 64)
    device = resolve_device(args.device)
    teacher = bench_teacher(args.teacher)
    batch = args.batch or s.train.batch_size
    cfg = s.student.for_teacher(teacher.card)
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    images = batch * args.steps

    seconds = {precision: stage_seconds(make_trainer(s, cfg, teacher, device, precision), x, y, args.steps,
                                        args.warmup, device) for precision in ("fp32", "bf16")}
    default = "bf16" if autocast_dtype(s.train.precision, device) is not None else "fp32"
    stage1, stage2 = seconds[default]

    # Host reads: every loss term to a Python float each step (the trainer's old metrics update) against one
    # stacked read every `log_every` steps. On the CPU there is no device to wait for, so expect little difference.
    trainer = make_trainer(s, cfg, teacher, device, s.train.precision)
    metrics, count = TrainerMetrics(), itertools.count(1)

    def read_every_step() -> None:
        terms = trainer.train_step(x, y)
        for k, v in terms.items():
            if k != "stage":
                float(v)

    def read_when_logging() -> None:
        terms = trainer.train_step(x, y)
        if next(count) % args.log_every == 0:
            metrics.losses(terms)

    per_step = timed(read_every_step, args.steps, args.warmup, device)
    logged = timed(read_when_logging, args.steps, args.warmup, device)

    bare = create_student(cfg.model_copy(update={"mhca_blocks": 0})).to(device)
    opt = torch.optim.AdamW(bare.parameters(), lr=1e-3)

    def bare_step() -> None:
        cls_logits, dist_logits = bare(x)
        loss = 0.5 * F.cross_entropy(cls_logits, y) + 0.5 * F.cross_entropy(dist_logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    bare_s = timed(bare_step, args.steps, args.warmup, device)

    alone = Ensemble([teacher])
    ensembles = {"teacher": alone} | ({"ensemble": Ensemble.load(teacher, args.ensemble).to(device)}
                                      if args.ensemble else {})
    logits = {name: {"members": e.names} | logit_paths(s, cfg, teacher, e, x, y, args, device, default)
              for name, e in ensembles.items()}

    def rate(sec: float) -> float:
        return round(args.steps / sec, 2)

    out = {"bench": "trainer_throughput", "student": cfg.model_dump(), "teacher": teacher.card.arch, "batch": batch,
           "steps": args.steps, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": git_commit(),
           "precision": default,
           "stage1_images_per_s": round(images / stage1, 1), "stage2_images_per_s": round(images / stage2, 1),
           "bare_timm_images_per_s": round(images / bare_s, 1),
           "stage1_over_bare": round(bare_s / stage1, 3), "stage2_over_bare": round(bare_s / stage2, 3),
           "steps_per_s": {precision: {"stage1": rate(s1), "stage2": rate(s2)} for precision, (s1, s2) in
                           seconds.items()},
           "bf16_over_fp32": {"stage1": round(seconds["fp32"][0] / seconds["bf16"][0], 3),
                              "stage2": round(seconds["fp32"][1] / seconds["bf16"][1], 3)},
           "host_reads": {"log_every": args.log_every, "every_step_steps_per_s": rate(per_step),
                          "when_logging_steps_per_s": rate(logged), "gain": round(per_step / logged, 3)},
           "stored_logits": logits}
    if args.scalekd_teacher:
        out["scalekd"] = scalekd_rates(s, args.scalekd_teacher, args.scalekd_students.split(","), batch, args, device,
                                       default)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
