"""Single-class requests against full-batch requests over real HTTP, at a sample size where the verifier's figure
means something: `--seeds` rounds, each one full request (every class, 10 images each: it fills the preset's engine
batch of 100 by itself) and one lone 4-image request per class, all with the same seed. The last line printed is one
JSON object.

The verifier agrees with well under half of the synthetic digits, so its top-1 is a coin of p near 0.4: on one
round (40 lone images, 100 full) its standard error is about 9 points. The difference is reported with its 90 %
confidence interval; "within 5 points" holds when the whole interval lies inside ±5 points (two one-sided tests).

    python bench/single_class_quality.py                    # 16 rounds: 640 lone images against 1,600 (~20 min)
    python bench/single_class_quality.py --seeds 2 --no-fill # also lone requests with filling switched off
"""
from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the in-thread uvicorn server

from bench.bench_teacher import HELP as TEACHER_HELP, bench_teacher  # noqa: E402
from bench.synth_methods import digits_verifier  # noqa: E402
from bench.synth_throughput import git_commit  # noqa: E402
from live_server import LiveServer  # noqa: E402
from shared.config import Settings  # noqa: E402
from synth_service.app import create_app  # noqa: E402

Z90 = 1.6449  # two-sided 90 %: the interval of two one-sided 5 % tests


def fetch(url: str, body: dict) -> dict[str, np.ndarray]:
    res = httpx.post(f"{url}/v1/images", json=body | {"format": "npz"}, timeout=600)
    if res.status_code != 200:
        sys.exit(f"bench: {res.status_code} {res.text}")
    with np.load(io.BytesIO(res.content)) as z:
        return {k: z[k] for k in z.files}


class Arm:
    """Every image one kind of request returned, and how long the requests took."""

    def __init__(self, name: str):
        self.name, self.parts, self.seconds = name, [], []

    def add(self, arrays: dict[str, np.ndarray], seconds: float) -> None:
        self.parts.append(arrays)
        self.seconds.append(seconds)

    def column(self, key: str) -> np.ndarray:
        return np.concatenate([p[key] for p in self.parts])

    def hits(self, key: str) -> np.ndarray:
        return (self.column(key) == self.column("labels")).astype(np.float64)

    def figures(self) -> dict:
        return {"images": len(self.column("labels")), "requests": len(self.parts),
                "teacher_top1": round(float(self.hits("teacher_top1").mean()), 4),
                "confidence": round(float(self.column("teacher_confidence").mean()), 4),
                "verifier_top1": round(float(self.hits("verifier_top1").mean()), 4),
                "latency_s_median": round(statistics.median(self.seconds), 2),
                "worst_lone_teacher_top1": round(min(float((p["teacher_top1"] == p["labels"]).mean())
                                                     for p in self.parts), 4)}


def difference(a: np.ndarray, b: np.ndarray) -> dict:
    """a - b for two independent Bernoulli samples, with its standard error and 90 % interval."""
    d = float(a.mean() - b.mean())
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return {"difference": round(d, 4), "standard_error": round(se, 4),
            "ci90": [round(d - Z90 * se, 4), round(d + Z90 * se, 4)]}


def service(s: Settings, teacher, verifier: Path, fill: bool) -> LiveServer:
    synth = s.synth.model_copy(update={"verifier": verifier})
    svc = s.service.model_copy(update={"sync_max_images": 10**4} | ({} if fill else {"min_batch_fill": 0}))
    return LiveServer(create_app(s.model_copy(update={"synth": synth, "service": svc}), teacher=teacher))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", help=TEACHER_HELP)
    p.add_argument("--seeds", type=int, default=16, help="rounds, seeds 11, 12, ...")
    p.add_argument("--per-class", type=int, default=4, help="images in a lone request")
    p.add_argument("--full-per-class", type=int, default=10, help="images per class in a full request")
    p.add_argument("--no-fill", action="store_true", help="also lone requests with min_batch_fill = 0")
    p.add_argument("--margin", type=float, default=0.05, help="the verifier's allowed difference")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.per_class < 1 or args.full_per_class < 1:
        sys.exit("bench: --seeds, --per-class and --full-per-class must be at least 1")
    s = Settings.load("digits")
    teacher, verifier = bench_teacher(args.teacher), digits_verifier(s)
    classes = list(range(teacher.card.num_classes))
    arms = {"full": Arm("full"), "lone": Arm("lone")}
    started = time.perf_counter()
    with service(s, teacher, verifier, fill=True) as live:
        for seed in range(11, 11 + args.seeds):
            t0 = time.perf_counter()
            arms["full"].add(fetch(live.url, {"class_ids": classes, "per_class": args.full_per_class,
                                              "seed": seed}),
                             time.perf_counter() - t0)
            for c in classes:
                t0 = time.perf_counter()
                arms["lone"].add(fetch(live.url, {"class_ids": [c], "per_class": args.per_class, "seed": seed}),
                                 time.perf_counter() - t0)
            print(f"seed {seed}: full {arms['full'].figures()}, lone {arms['lone'].figures()}", file=sys.stderr,
                  flush=True)
    if args.no_fill:
        arms["lone_unfilled"] = Arm("lone_unfilled")
        with service(s, teacher, verifier, fill=False) as live:
            for seed in range(11, 11 + args.seeds):
                for c in classes:
                    t0 = time.perf_counter()
                    arms["lone_unfilled"].add(fetch(live.url, {"class_ids": [c], "per_class": args.per_class,
                                                               "seed": seed}), time.perf_counter() - t0)
    verifier_diff = difference(arms["lone"].hits("verifier_top1"), arms["full"].hits("verifier_top1"))
    lo, hi = verifier_diff["ci90"]
    out = {"bench": "single_class_quality", "commit": git_commit(), "teacher": teacher.card.fingerprint[:12],
           "seeds": args.seeds, "seconds": round(time.perf_counter() - started, 1),
           "arms": {k: a.figures() for k, a in arms.items()},
           "confidence_difference": round(float(arms["lone"].column("teacher_confidence").mean()
                                                 - arms["full"].column("teacher_confidence").mean()), 4),
           "verifier_difference": verifier_diff,
           "verifier_within_margin": bool(-args.margin < lo and hi < args.margin)}
    for name, f in out["arms"].items():
        print(f"{name}: {f}", file=sys.stderr)
    print(f"verifier lone - full: {verifier_diff}; within ±{args.margin:.2f}: {out['verifier_within_margin']}",
          file=sys.stderr)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
