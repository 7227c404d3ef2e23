"""LIB-KD on digits or CIFAR-10: the same DearKD ViT distilled data-free from the conv teacher alone, the involution
teacher alone, and the conv + involution ensemble (averaged soft targets through the one distillation token, or one
token per teacher), all on one synthetic pool that the conv teacher inverts. Logits are computed once per image and
view, as the service ships them (`stored`), or by the teachers on every augmented view (`online`). The last line
printed is one JSON object with the validation and held-out (test) real top-1 of every variant and seed.

    python bench/ensemble_kd.py                      # 5 variants x 2 seeds on the digits preset (about 30 min)
    python bench/ensemble_kd.py --variants conv,ensemble --seeds 1 --steps 300
    DFKD_DATA__CIFAR10_DIR=... python bench/ensemble_kd.py --dataset cifar10 \
        --pool runs/cifar10_cpu/pools/di.safetensors --seeds 1

On CIFAR-10 the teachers are the committed ResNet-20 and RedNet (`teachers/`; `--teacher` and `--involution` name
others), and the student is the CPU-scale ViT of `bench/cifar10_cpu.py`. `--pool` reuses a pool that bench made
(uint8 `images` and `labels`) instead of inverting one here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the in-memory image pool the tests use too

from bench.bench_teacher import HELP as TEACHER_HELP, bench_teacher, digits_teacher  # noqa: E402
from bench.synth_throughput import git_commit  # noqa: E402
from bench.cifar10_cpu import METHOD_CHANGES, RESNET20_TEACHER, bench_split, cpu_vit_settings  # noqa: E402
from image_pool import ImagePool  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.ensemble import Ensemble  # noqa: E402
from shared.teacher import Teacher  # noqa: E402
from shared.wire import LOGIT_VIEWS  # noqa: E402
from synth_service.synthesizer import create_synthesizer  # noqa: E402
from trainer.augment import Augment  # noqa: E402
from trainer.engine import DearKDTrainer  # noqa: E402

# name: (the teacher whose stages give the early features, the members whose logits are distilled, logits,
# dearkd.ensemble_tokens)
VARIANTS = {
    "conv": ("conv", ("conv",), "stored", "average"),
    "involution": ("involution", ("involution",), "stored", "average"),
    "ensemble": ("conv", ("conv", "involution"), "stored", "average"),
    "ensemble_per_teacher": ("conv", ("conv", "involution"), "stored", "per_teacher"),
    "ensemble_online": ("conv", ("conv", "involution"), "online", "average"),
}


def train_variant(s: Settings, teachers: dict[str, Teacher], name: str, pool, split, seed: int) -> dict:
    features_from, members, logits_mode, tokens = VARIANTS[name]
    s = s.model_copy(update={"dearkd": s.dearkd.model_copy(update={"ensemble_tokens": tokens})})
    primary = teachers[features_from]
    ensemble = Ensemble([primary] + [teachers[m] for m in members if m != features_from])
    ensemble.check()
    card = primary.card
    torch.manual_seed(seed)
    trainer = DearKDTrainer(s.student.for_teacher(card), s.dearkd, s.train, primary.model, ensemble=ensemble)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    if logits_mode == "stored":
        # Once per image and view, as the service does; the views drawn are those with logits (no crop).
        views = LOGIT_VIEWS if s.train.flip else ("identity",)
        stored = ensemble.logits(pool.images, views)
        augment = Augment(card.mean, card.std, 0, s.train.flip)
        logits_seconds = time.perf_counter() - t0
        for _ in range(s.train.steps):
            idx = torch.randint(0, len(pool.labels), (s.train.batch_size,), generator=gen)
            x, pick = augment.views(pool.images[idx], gen, views)
            trainer.train_step(x, pool.labels[idx], stored[:, pick, idx])
    else:
        logits_seconds = 0.0
        batches = ImagePool(pool.images, pool.labels, card.mean, card.std, s.train.batch_size, s.train.crop_padding,
                            flip=s.train.flip, seed=seed)
        for _ in range(s.train.steps):
            trainer.train_step(*next(batches))
    seconds = time.perf_counter() - t0
    mean, std = torch.tensor(card.mean).view(1, -1, 1, 1), torch.tensor(card.std).view(1, -1, 1, 1)
    return {"seed": seed, "val_top1": round(trainer.evaluate((split.x_val - mean) / std, split.y_val), 4),
            "heldout_top1": round(trainer.evaluate((split.x_test - mean) / std, split.y_test), 4),
            "seconds": round(seconds, 1), "logits_seconds": round(logits_seconds, 2),
            "online_logit_rows": trainer.online_logit_rows, "members": ensemble.names}


def load_teachers(args: argparse.Namespace) -> dict[str, Teacher]:
    if args.dataset == "digits":
        return {"conv": bench_teacher(args.teacher), "involution": digits_teacher("rednet_digits", args.involution)}
    return {"conv": bench_teacher(args.teacher or str(RESNET20_TEACHER)),
            "involution": bench_teacher(args.involution or str(RESNET20_TEACHER.parent / "cifar10_rednet_cifar.json"))}


def load_split(s: Settings, args: argparse.Namespace):
    split = bench_split(s, args.dataset, args.limit)
    if args.limit is not None:
        split.x_val, split.y_val = split.x_val[:args.limit], split.y_val[:args.limit]
    return split


def read_pool(path: str, card) -> SimpleNamespace:
    """A pool file's uint8 `images` and `labels`, checked against the conv teacher's input and classes."""
    try:
        t = load_file(path)
        images, labels = t["images"], t["labels"].long()
    except (OSError, KeyError, ValueError) as exc:
        sys.exit(f"bench: --pool {path!r} is not a safetensors file with `images` and `labels`: {exc}")
    want = (card.in_chans, card.image_size, card.image_size)
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != want or len(labels) != len(images) or \
            not len(labels) or int(labels.min()) < 0 or int(labels.max()) >= card.num_classes:
        sys.exit(f"bench: --pool {path!r} holds {tuple(images.shape)} {images.dtype} images and {len(labels)} labels; "
                 f"the teacher needs uint8 images of {want} and labels below {card.num_classes}")
    return SimpleNamespace(images=images, labels=labels)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=("digits", "cifar10"), default="digits")
    p.add_argument("--teacher", help=TEACHER_HELP + "; on cifar10 the committed ResNet-20")
    p.add_argument("--involution", help="involution teacher card (default on digits: rednet_digits, trained on first "
                                        "use; on cifar10 the committed RedNet)")
    p.add_argument("--pool", help="distil on this pool file (uint8 `images`, `labels`) instead of inverting one")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--iterations", type=int, help="inversion steps per batch (default: the preset's on digits, "
                                                  "200 on cifar10 as in bench/cifar10_cpu.py)")
    p.add_argument("--steps", type=int, help="student steps (default: the digits preset's; 3000 on cifar10)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--limit", type=int, help="cifar10: read only this many training images (validation is carved "
                                             "from them) and test images, for a quick run")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown or args.seeds < 1:
        sys.exit(f"bench: unknown variant(s) {unknown} (known: {', '.join(VARIANTS)}), or --seeds below 1")
    if args.limit is not None and (args.dataset != "cifar10" or args.limit < 100):
        sys.exit("bench: --limit is for --dataset cifar10, and at least 100 images")
    s = Settings.load(args.dataset)
    if args.dataset == "cifar10":  # the CPU-scale ViT, its recipe and the DI pool, as in bench/cifar10_cpu.py
        s = cpu_vit_settings(s, args.steps or 3000, 64)
        s = s.model_copy(update={"synth": s.synth.model_copy(update=METHOD_CHANGES["di"] | {
            "batch_size": 100, "iterations": args.iterations or 200, "log_every": 10**6})})
    elif args.steps or args.iterations:
        s = s.model_copy(update={"train": s.train.model_copy(update={"steps": args.steps or s.train.steps}),
                                 "synth": s.synth.model_copy(update={"iterations": args.iterations or
                                                                     s.synth.iterations})})
    teachers = load_teachers(args)
    split = load_split(s, args)  # before any synthesis: missing data is refused at once
    started = time.perf_counter()
    if args.pool:
        pool = read_pool(args.pool, teachers["conv"].card)
    else:
        with create_synthesizer(teachers["conv"], s.synth) as engine:
            pool = engine.synthesize_classes(list(range(teachers["conv"].card.num_classes)), args.per_class, seed=0)
    out = {"bench": "ensemble_kd", "dataset": args.dataset, "pool": args.pool,
           "teachers": {k: {"arch": t.card.arch, "test_top1": t.card.metrics.get("test_top1")}
                        for k, t in teachers.items()},
           "synthetic_images": len(pool.labels), "synth_seconds": round(time.perf_counter() - started, 1),
           "steps": s.train.steps, "batch": s.train.batch_size, "torch": torch.__version__, "commit": git_commit(),
           "device": "cpu", "results": {}}
    for name in args.variants.split(","):
        runs = [train_variant(s, teachers, name, pool, split, seed) for seed in range(args.seeds)]
        top1 = [r["heldout_top1"] for r in runs]
        out["results"][name] = {"runs": runs, "mean_top1": round(statistics.mean(top1), 4),
                                "mean_val_top1": round(statistics.mean(r["val_top1"] for r in runs), 4)}
        print(name, out["results"][name], file=sys.stderr, flush=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
