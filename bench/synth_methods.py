"""Synthesis methods side by side on one teacher: images/s, teacher and verifier top-1, intra-class diversity in the
verifier's features (a space no loss optimises), and the real top-1 of the same CNN student distilled by logit KD
on each pool. Pools: DI with `--images` images; the generator with the same number of images (equal images) and
with everything it makes in DI's wall time (equal time). The last line printed is one JSON object.

    python bench/synth_methods.py                       # digits: the preset's DI against its generator settings
    python bench/synth_methods.py --images 500 --split val
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the logit-KD baseline the tests use

from bench.bench_teacher import HELP as TEACHER_HELP, bench_teacher  # noqa: E402
from bench.synth_throughput import git_commit  # noqa: E402
from logit_kd import distill_logits  # noqa: E402
from shared.config import Settings, TeacherRecipe  # noqa: E402
from shared.data.digits import load_digits_split  # noqa: E402
from shared.models import create_model  # noqa: E402
from shared.teacher import load_teacher  # noqa: E402
from synth_service.report import diversity_by_space  # noqa: E402
from synth_service.result import SynthResult  # noqa: E402
from synth_service.synthesizer import create_synthesizer  # noqa: E402
from trainer.teacher_train import evaluate, train_teacher  # noqa: E402


def digits_verifier(s: Settings) -> Path:
    """An independent digits classifier (another architecture, no BatchNorm), trained once and cached."""
    card = s.runs_dir / "teachers" / "digits_lenet.json"
    if not card.is_file():
        train_teacher(TeacherRecipe(dataset="digits", arch="digits_lenet"), s.data, card.parent, name=card.stem,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    return card


def pool_figures(result: SynthResult, seconds: float) -> dict:
    diversity = diversity_by_space(result)
    return {"images": len(result.labels), "seconds": round(seconds, 2),
            "images_per_s": round(len(result.labels) / seconds, 2),
            "teacher_top1": round(float((result.teacher_top1 == result.labels).float().mean()), 4),
            "verifier_top1": round(float((result.verifier_top1 == result.labels).float().mean()), 4)
            if result.verifier_top1 is not None else None,
            "diversity": {k: round(v, 4) if v is not None else None for k, v in diversity.items()}}


def run_until(engine, labels: list[int], *, images: int | None = None, seconds: float | None = None,
              seed: int = 0) -> tuple[SynthResult, float]:
    """Batches of `labels` until `images` images were made, or until `seconds` of synthesis passed."""
    results, spent, b = [], 0.0, 0
    while (images is not None and sum(len(r.labels) for r in results) < images) or \
            (seconds is not None and spent < seconds):
        t0 = time.perf_counter()
        results.append(engine.synthesize(labels, seed=seed + b))
        spent += time.perf_counter() - t0
        b += 1
    pool = SynthResult.concat(results)
    if images is not None:
        pool = pool.select(0, images)
    return pool, spent


def student_top1(teacher, pool: SynthResult, x, y, epochs: int) -> float:
    card = teacher.card
    student = create_model("digits_cnn_small", num_classes=card.num_classes, in_chans=card.in_chans)
    distill_logits(student, teacher.model, pool.images, card.mean, card.std, epochs=epochs)
    mean, std = torch.tensor(card.mean).view(1, -1, 1, 1), torch.tensor(card.std).view(1, -1, 1, 1)
    return round(evaluate(student, x, y, mean, std), 4)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", help=TEACHER_HELP)
    p.add_argument("--images", type=int, default=500, help="DI pool size; the generator's equal-images pool too")
    p.add_argument("--split", choices=["val", "test"], default="test",
                   help="real digits the students are scored on: val when choosing settings, test to report")
    p.add_argument("--epochs", type=int, default=60, help="logit-KD epochs over each pool")
    p.add_argument("--batch", type=int, help="images per batch (default: the preset's)")
    p.add_argument("--iterations", type=int, help="DI steps per batch (default: the preset's)")
    p.add_argument("--warmup-steps", type=int, help="generator warm-up steps (default: the preset's)")
    args = p.parse_args(argv)
    synth = {k: v for k, v in (("batch_size", args.batch), ("iterations", args.iterations)) if v is not None}
    if args.warmup_steps is not None:
        synth["generator"] = {"warmup_steps": args.warmup_steps}
    s = Settings.load("digits", device="cpu", synth=synth)
    teacher = bench_teacher(args.teacher)
    card = teacher.card
    if card.recipe.get("dataset") != "digits":
        raise SystemExit(f"{card.name} was not trained on digits; this bench scores students on real digits")
    verifier = digits_verifier(s)
    labels = [i % card.num_classes for i in range(s.synth.batch_size)]
    x, y = load_digits_split(card.image_size).images(args.split)
    out = {"bench": "synth_methods", "teacher": card.name, "verifier": load_teacher(verifier).card.arch,
           "split": args.split, "images": args.images, "batch": s.synth.batch_size, "device": "cpu",
           "commit": git_commit(), "torch": torch.__version__, "pools": {}}

    di_cfg = s.synth.model_copy(update={"method": "di", "verifier": verifier})
    with create_synthesizer(teacher, di_cfg) as engine:
        di_pool, di_seconds = run_until(engine, labels, images=args.images)
    out["pools"]["di"] = pool_figures(di_pool, di_seconds) | {"iterations": s.synth.iterations}
    print("di", out["pools"]["di"], file=sys.stderr, flush=True)

    gen_cfg = s.synth.model_copy(update={"method": "generator", "verifier": verifier})
    with create_synthesizer(teacher, gen_cfg, log=lambda m: print(m, file=sys.stderr, flush=True)) as engine:
        out["generator_warmup_seconds"] = round(engine.warm_up(), 1)
        out["generator"] = engine.describe()
        equal_images, gen_seconds = run_until(engine, labels, images=args.images, seed=10_000)
        equal_time, time_seconds = run_until(engine, labels, seconds=di_seconds, seed=20_000)
    out["pools"]["generator_equal_images"] = pool_figures(equal_images, gen_seconds)
    out["pools"]["generator_equal_time"] = pool_figures(equal_time, time_seconds)
    out["speedup_images_per_s"] = round(out["pools"]["generator_equal_images"]["images_per_s"]
                                        / out["pools"]["di"]["images_per_s"], 2)
    print("generator", out["pools"]["generator_equal_images"], file=sys.stderr, flush=True)

    for name, pool in (("di", di_pool), ("generator_equal_images", equal_images),
                       ("generator_equal_time", equal_time)):
        out["pools"][name][f"student_{args.split}_top1"] = student_top1(teacher, pool, x, y, args.epochs)
        print(name, "student", out["pools"][name][f"student_{args.split}_top1"], file=sys.stderr, flush=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
