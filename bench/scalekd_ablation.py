"""ScaleKD on digits or CIFAR-10: the same ViT teacher, data and steps for every row; a CNN and an MLP-Mixer student
(a ViT too with --students), each by plain logit KD and by ScaleKD with all parts, then with CAP, DFM and TPP
switched off one at a time. The last line printed is one JSON object with every row's validation and test top-1.

    python bench/scalekd_ablation.py                       # 2 students x 5 rows x 2 seeds (about 20 min on 2 cores)
    python bench/scalekd_ablation.py --students resnet8 --rows kd,scalekd --seeds 1
    DFKD_DATA__CIFAR10_DIR=... python bench/scalekd_ablation.py --dataset cifar10 --seeds 1

Data: `--data real` takes a stratified `--fraction` of the real training images (the partial-data setting);
`--data synthetic` a pool a CNN teacher inverts, which the ViT teacher then labels and teaches on. On digits the ViT
teacher is trained on first use; on CIFAR-10 it is the committed `teachers/cifar10_vit_nano_patch4_32.json`
(`dfkd teacher train --dataset cifar10 --arch vit_nano_patch4_32`, about an hour on 2 cores). Rows are compared on
the validation split; the test split is reported beside it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the in-memory image pool the tests use too

from bench.bench_teacher import bench_teacher, digits_teacher  # noqa: E402
from bench.cifar10_cpu import RESNET20_TEACHER, bench_split  # noqa: E402
from bench.synth_throughput import git_commit  # noqa: E402
from image_pool import ImagePool  # noqa: E402
from shared.config import ScaleKDConfig, Settings, TrainConfig  # noqa: E402
from shared.data.splits import stratified_subset, unit_to_uint8  # noqa: E402
from shared.teacher import Teacher  # noqa: E402
from synth_service.synthesizer import create_synthesizer  # noqa: E402
from trainer.scalekd import ScaleKDTrainer  # noqa: E402

DATASETS = ("digits", "cifar10")
VIT_TEACHER = {"digits": "vit_nano_patch2_16", "cifar10": "vit_nano_patch4_32"}
# The CNN that inverts for --data synthetic (None: the digits demo's teacher).
CNN_TEACHER = {"digits": None, "cifar10": str(RESNET20_TEACHER)}
# What each row changes in the ScaleKD settings: plain KD keeps only the logit and label terms.
ROWS = {
    "kd": dict(spatial_weight=0.0, frequency_weight=0.0, tpp=False),
    "scalekd": {},
    "no_cap": dict(cap=False),
    "no_dfm": dict(dfm=False),
    "no_tpp": dict(tpp=False),
}
STUDENTS = {"digits": ("resnet8", "mixer_nano_patch2_16", "vit_nano_patch2_16"),
            "cifar10": ("resnet8", "mixer_nano_patch4_32", "vit_nano_patch4_32")}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def training_images(s: Settings, args: argparse.Namespace, split) -> tuple[torch.Tensor, torch.Tensor]:
    if args.data == "real":
        idx = stratified_subset(split.y_train.numpy(), args.fraction, seed=0)
        return unit_to_uint8(split.x_train[idx]), split.y_train[idx]
    cnn = bench_teacher(args.synth_teacher or CNN_TEACHER[args.dataset])
    with create_synthesizer(cnn, s.synth) as engine:
        pool = engine.synthesize_classes(list(range(cnn.card.num_classes)), args.per_class, seed=0)
    return pool.images, pool.labels


def vit_teacher(args: argparse.Namespace) -> Teacher:
    if args.dataset == "digits":
        return digits_teacher(VIT_TEACHER["digits"], args.teacher)
    return bench_teacher(args.teacher or str(RESNET20_TEACHER.parent / f"cifar10_{VIT_TEACHER['cifar10']}.json"))


def train_row(teacher: Teacher, student: str, row: str, train: TrainConfig, images, labels, split, seed: int) -> dict:
    card = teacher.card
    torch.manual_seed(seed)
    trainer = ScaleKDTrainer(ScaleKDConfig(student=student, **ROWS[row]), train, teacher.model, card, card)
    batches = ImagePool(images, labels, card.mean, card.std, train.batch_size, train.crop_padding, flip=train.flip,
                        seed=seed)
    t0 = time.perf_counter()
    for _ in range(train.steps):
        trainer.train_step(*next(batches))
    seconds = time.perf_counter() - t0
    mean, std = torch.tensor(card.mean).view(1, -1, 1, 1), torch.tensor(card.std).view(1, -1, 1, 1)
    return {"seed": seed, "val_top1": round(trainer.evaluate((split.x_val - mean) / std, split.y_val), 4),
            "test_top1": round(trainer.evaluate((split.x_test - mean) / std, split.y_test), 4),
            "seconds": round(seconds, 1), "images_per_s": round(train.steps * train.batch_size / seconds, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--teacher", help=f"ViT teacher card (default on digits: {VIT_TEACHER['digits']}, trained on first "
                                     "use; on cifar10 the committed one in teachers/)")
    p.add_argument("--students", help="comma-separated (default: resnet8 and the dataset's MLP-Mixer)")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--data", choices=("real", "synthetic"), default="real")
    p.add_argument("--fraction", type=float, default=0.2, help="--data real: share of the training images")
    p.add_argument("--synth-teacher", help="--data synthetic: the CNN teacher that inverts (default: the "
                   "dataset's demo teacher)")
    p.add_argument("--per-class", type=int, default=50, help="--data synthetic: images per class")
    p.add_argument("--limit", type=int, help="cifar10: read only this many training images (validation is carved "
                                             "from them) and test images, for a quick run")
    args = p.parse_args(argv)
    known = STUDENTS[args.dataset]
    rows, students = args.rows.split(","), (args.students or f"{known[0]},{known[1]}").split(",")
    unknown = [r for r in rows if r not in ROWS] + [m for m in students if m not in known]
    if args.limit is not None and (args.dataset != "cifar10" or args.limit < 100):
        sys.exit("bench: --limit is for --dataset cifar10, and at least 100 images")
    if unknown or args.seeds < 1 or not 0 < args.fraction <= 1:
        sys.exit(f"bench: unknown row or student {unknown} (rows: {', '.join(ROWS)}; students on {args.dataset}: "
                 f"{', '.join(known)}), --seeds below 1, or --fraction outside (0, 1]")
    s = Settings.load(args.dataset)
    teacher, split = vit_teacher(args), bench_split(s, args.dataset, args.limit)
    if (teacher.card.num_classes, teacher.card.image_size) != (int(split.y_train.max()) + 1, split.x_train.shape[-1]):
        sys.exit(f"bench: the teacher {teacher.card.name!r} classifies {teacher.card.num_classes} classes at "
                 f"{teacher.card.image_size} px; {args.dataset} has {int(split.y_train.max()) + 1} at "
                 f"{split.x_train.shape[-1]} px")
    images, labels = training_images(s, args, split)
    train = s.train.model_copy(update={"steps": args.steps, "batch_size": args.batch, "lr": args.lr,
                                       "warmup_steps": args.steps // 10, "precision": "fp32"})
    out = {"bench": "scalekd_ablation", "dataset": args.dataset,
           "teacher": {"arch": teacher.card.arch, **teacher.card.metrics},
           "data": args.data, "images": len(labels), "steps": args.steps, "batch": args.batch, "lr": args.lr,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": git_commit(), "device": "cpu",
           "results": {}}
    for student in students:
        for row in rows:
            runs = [train_row(teacher, student, row, train, images, labels, split, seed) for seed in range(args.seeds)]
            result = {"runs": runs, "mean_val_top1": round(statistics.mean(r["val_top1"] for r in runs), 4),
                      "mean_test_top1": round(statistics.mean(r["test_top1"] for r in runs), 4)}
            out["results"][f"{student}/{row}"] = result
            log(f"{student} {row}: val {result['mean_val_top1']:.4f} test {result['mean_test_top1']:.4f} "
                f"({runs[0]['images_per_s']} img/s)")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
