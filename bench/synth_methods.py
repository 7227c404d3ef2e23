"""Synthesis methods side by side on one teacher: images/s, teacher and verifier top-1, intra-class diversity in the
verifier's features (a space no loss optimises), and the real top-1 of the same CNN student distilled by logit KD
on each pool. Pools: DI with `--images` images; the generator with the same number of images (equal images) and
with everything it makes in DI's wall time (equal time); and the generator's latency for a 4-image single-class
request. `--grid` compares settings and `--seeds` repeats each; the last line printed is one JSON object.

    python bench/synth_methods.py                       # digits: the preset's DI against its generator settings
    python bench/synth_methods.py --split val --seeds 3 --methods generator --grid synth.generator.memory=0,500
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the logit-KD baseline the tests use

from bench.bench_teacher import HELP as TEACHER_HELP, bench_teacher  # noqa: E402
from bench.synth_throughput import git_commit  # noqa: E402
from bench.tune_digits import parse_grid, settings_for  # noqa: E402
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


def student_top1(teacher, pool: SynthResult, x, y, epochs: int, seed: int = 0) -> float:
    card = teacher.card
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the student's initial weights
        student = create_model("digits_cnn_small", num_classes=card.num_classes, in_chans=card.in_chans)
        distill_logits(student, teacher.model, pool.images, card.mean, card.std, epochs=epochs, seed=seed)
    mean, std = torch.tensor(card.mean).view(1, -1, 1, 1), torch.tensor(card.std).view(1, -1, 1, 1)
    return round(evaluate(student, x, y, mean, std), 4)


def serving_latency(engine, card, steps: int, requests: int = 20) -> dict:
    """Wall time of a 4-image single-class request at `steps` generator steps (0: a forward), as HTTP serves it."""
    times = []
    for i in range(requests):
        t0 = time.perf_counter()
        engine.synthesize([i % card.num_classes] * 4, seed=30_000 + i, iterations=steps)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"steps": steps, "requests": requests, "p50_ms": round(1000 * times[len(times) // 2], 1),
            "p95_ms": round(1000 * times[int(0.95 * (len(times) - 1))], 1)}


def one_run(teacher, s: Settings, verifier: Path, images: int, seed: int, methods: list[str], x, y, epochs: int,
            split: str) -> dict:
    """Every method's pools for one setting and seed, each with the same student's top-1 on `split`."""
    card = teacher.card
    labels = [i % card.num_classes for i in range(s.synth.batch_size)]
    run: dict = {"seed": seed, "pools": {}}
    pools: dict[str, SynthResult] = {}
    di_seconds = None
    if "di" in methods:
        with create_synthesizer(teacher, s.synth.model_copy(update={"method": "di", "verifier": verifier})) as engine:
            pools["di"], di_seconds = run_until(engine, labels, images=images, seed=100_000 * seed)
        run["pools"]["di"] = pool_figures(pools["di"], di_seconds) | {"iterations": s.synth.iterations}
        print("di", run["pools"]["di"], file=sys.stderr, flush=True)
    if "generator" in methods:
        gen_cfg = s.synth.model_copy(update={"method": "generator", "verifier": verifier})
        gen_cfg.generator = gen_cfg.generator.model_copy(update={"seed": gen_cfg.generator.seed + seed})
        with create_synthesizer(teacher, gen_cfg, log=lambda m: print(m, file=sys.stderr, flush=True)) as engine:
            run["generator_warmup_seconds"] = round(engine.warm_up(), 1)
            run["generator"] = engine.describe()
            pools["generator_equal_images"], seconds = run_until(engine, labels, images=images,
                                                                 seed=100_000 * seed + 10_000)
            run["pools"]["generator_equal_images"] = pool_figures(pools["generator_equal_images"], seconds)
            if di_seconds is not None:
                pools["generator_equal_time"], seconds = run_until(engine, labels, seconds=di_seconds,
                                                                   seed=100_000 * seed + 20_000)
                run["pools"]["generator_equal_time"] = pool_figures(pools["generator_equal_time"], seconds)
            run["serving"] = [serving_latency(engine, card, 0), serving_latency(engine, card, engine.serve_steps)]
        print("generator", run["pools"]["generator_equal_images"], run["serving"], file=sys.stderr, flush=True)
    if "di" in run["pools"] and "generator_equal_images" in run["pools"]:
        run["speedup_images_per_s"] = round(run["pools"]["generator_equal_images"]["images_per_s"]
                                            / run["pools"]["di"]["images_per_s"], 2)
    for name, pool in pools.items():
        run["pools"][name][f"student_{split}_top1"] = student_top1(teacher, pool, x, y, epochs, seed)
        print(name, "student", run["pools"][name][f"student_{split}_top1"], file=sys.stderr, flush=True)
    return run


def summarise(runs: list[dict], split: str) -> dict:
    """Per pool over the seeds: the student's mean, min and max top-1, and the mean of the pool figures."""
    out = {}
    for name in runs[0]["pools"]:
        scores = [r["pools"][name][f"student_{split}_top1"] for r in runs]
        figures = [r["pools"][name] for r in runs]
        out[name] = {"student_mean": round(sum(scores) / len(scores), 4), "student_min": min(scores),
                     "student_max": max(scores), "images": figures[0]["images"],
                     "images_per_s": round(sum(f["images_per_s"] for f in figures) / len(figures), 2),
                     "teacher_top1": round(sum(f["teacher_top1"] for f in figures) / len(figures), 4),
                     "verifier_top1": round(sum(f["verifier_top1"] for f in figures) / len(figures), 4),
                     "diversity_verifier": round(sum(f["diversity"]["verifier"] for f in figures) / len(figures), 4)}
    return out


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
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                   help="settings to compare, e.g. synth.generator.steps=10,20 (repeat for a full grid)")
    p.add_argument("--seeds", type=int, default=1, help="runs per setting (seeds 0..N-1 for synthesis and student)")
    p.add_argument("--methods", default="di,generator", help="comma-separated: di, generator")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - {"di", "generator"}:
        raise SystemExit(f"--methods {args.methods!r}: expected di, generator or both")
    if args.seeds < 1:
        raise SystemExit("--seeds must be at least 1")
    grid = parse_grid(args.grid)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    base = {k: v for k, v in (("synth.batch_size", args.batch), ("synth.iterations", args.iterations),
                              ("synth.generator.warmup_steps", args.warmup_steps)) if v is not None}
    try:
        settings = [settings_for(base | combo) for combo in combos]
    except ValueError as exc:  # pydantic's message names the setting at fault
        raise SystemExit(f"--grid: {exc}") from None
    teacher = bench_teacher(args.teacher)
    card = teacher.card
    if card.recipe.get("dataset") != "digits":
        raise SystemExit(f"{card.name} was not trained on digits; this bench scores students on real digits")
    verifier = digits_verifier(settings[0])
    x, y = load_digits_split(card.image_size).images(args.split)
    out = {"bench": "synth_methods", "teacher": card.name, "verifier": load_teacher(verifier).card.arch,
           "split": args.split, "images": args.images, "batch": settings[0].synth.batch_size, "seeds": args.seeds,
           "device": "cpu", "commit": git_commit(), "torch": torch.__version__, "results": []}
    for combo, s in zip(combos, settings):
        print("settings", combo or "(the preset)", file=sys.stderr, flush=True)
        runs = [one_run(teacher, s, verifier, args.images, seed, methods, x, y, args.epochs, args.split)
                for seed in range(args.seeds)]
        out["results"].append({"settings": combo, "summary": summarise(runs, args.split), "runs": runs})
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
