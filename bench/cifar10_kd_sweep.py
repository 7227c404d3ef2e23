"""Choosing the ResNet-8 KD recipe of bench/cifar10_cpu.py on the validation split: one DI pool made with that
bench's settings (no verifier needed), then one KD student per feature-mimicking weight, and optionally the
real-data bound at one weight. Each result is one JSON line appended to --out; the choice is by `val_top1`, and
`test_top1` is printed for reporting only.

    DFKD_DATA__CIFAR10_DIR=/path/to/cifar10 python bench/cifar10_kd_sweep.py --features 0,1,3,10,30,100
    DFKD_DATA__CIFAR10_DIR=/path/to/cifar10 python bench/cifar10_kd_sweep.py --features 30 --real
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import cifar10_cpu as c10  # noqa: E402
from shared.teacher import load_teacher  # noqa: E402


def di_pool(run: c10.Run) -> torch.Tensor:
    """The bench's DI pool, made by its own pool code (resumable, refused when made with other settings) without
    the verifier's figures, which this choice does not use."""
    meta = run.work / "pools" / "di.json"
    if not (meta.is_file() and json.loads(meta.read_text())["done"]):
        c10.log(f"di pool: {run.budget.pool_seconds:.0f}s of synthesis")
    c10.make_pool(run, "di", None)
    return c10.pool_images(run, "di")[0]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", default="0,30", help="comma-separated feature-mimicking weights, one student each")
    p.add_argument("--real", action="store_true", help="train on as many real training images instead (the bound)")
    p.add_argument("--budget-min", type=float, default=15.0, help="synthesis wall time of the pool")
    p.add_argument("--kd-steps", type=int, default=3000)
    p.add_argument("--quick", action="store_true", help="tiny budgets: the plumbing")
    p.add_argument("--work", default="runs/cifar10_kd_sweep", help="where the pool is kept")
    p.add_argument("--out", help="JSON lines appended here (default: <work>/results.jsonl)")
    args = p.parse_args(argv)
    try:
        weights = [float(w) for w in args.features.split(",")]
    except ValueError:
        raise SystemExit(f"--features takes comma-separated numbers, got {args.features!r}")
    if any(w < 0 for w in weights):
        raise SystemExit("--features weights must be >= 0")
    bench_args = c10.parser().parse_args(["--budget-min", str(args.budget_min), "--kd-steps", str(args.kd_steps),
                                          "--work", args.work] + (["--quick"] if args.quick else []))
    try:
        run = c10.Run(bench_args)
    except OSError as e:
        raise SystemExit(f"cifar10_kd_sweep: {e}")
    work = Path(args.work)
    pool = di_pool(run)
    images = c10.real_images(run, len(pool))[0] if args.real else pool
    b, results = run.budget, []
    for weight in weights:
        t0 = time.perf_counter()
        learner = c10.KDLearner("resnet8", load_teacher(run.teacher_card).model, run, steps=b.kd_steps, mix=b.kd_mix,
                                features=weight)
        loss = learner.train(images, b.kd_steps, b.kd_batch)
        result = {"bench": "cifar10_kd_sweep", "data": "real" if args.real else "di", "images": len(images),
                  "features": weight, "mix": b.kd_mix, "steps": b.kd_steps, "final_loss": round(loss, 4),
                  "seconds": round(time.perf_counter() - t0, 1), "commit": c10.git_commit()}
        result |= run.score(learner.student)
        print(json.dumps(result), flush=True)
        out = Path(args.out) if args.out else work / "results.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        results.append(result)
    return results


if __name__ == "__main__":
    main()
