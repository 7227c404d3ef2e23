"""Choose digits settings on the validation split: a grid of config overrides, each scored by the data-free
student's top-1 on the 201 validation digits. The test split is never read. Pools and scores are cached under
`runs/tune/`, so an interrupted grid resumes where it stopped; the last line printed is one JSON object.

    python bench/tune_digits.py --grid synth.diversity=0,1.5,3,6 --seeds 2
    python bench/tune_digits.py --grid dearkd.alpha=0.8,0.91,0.95 --grid dearkd.temperature=4,6
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the in-memory image pool the tests use too

from bench.bench_teacher import HELP as TEACHER_HELP, bench_teacher  # noqa: E402
from bench.synth_throughput import git_commit  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.data.digits import load_digits_split  # noqa: E402
from synth_service.synthesizer import create_synthesizer  # noqa: E402
from image_pool import ImagePool  # noqa: E402
from trainer.engine import DearKDTrainer  # noqa: E402

SECTIONS = ("synth", "student", "dearkd", "train")


def parse_grid(items: list[str], flag: str = "--grid") -> dict[str, list[Any]]:
    """`section.key=v1,v2` (or `section.sub.key=...`) → {"section.key": [v1, v2]}; values are read as JSON where they
    parse (numbers, bools)."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or "." not in key or key.split(".")[0] not in SECTIONS or not values:
            raise SystemExit(f"{flag} {item!r}: expected SECTION.KEY=V1,V2 with SECTION one of {', '.join(SECTIONS)}")

        def parse(v: str) -> Any:
            try:
                return json.loads(v)
            except json.JSONDecodeError:
                return v
        grid[key] = [parse(v) for v in values.split(",")]
    return grid


def nested_overrides(combo: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{"synth.generator.steps": 5} → {"synth": {"generator": {"steps": 5}}}."""
    nested: dict[str, Any] = {}
    for key, value in combo.items():
        *parents, name = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = value
    return nested


def settings_for(combo: dict[str, Any]) -> Settings:
    return Settings.load("digits", device="cpu", **nested_overrides(combo))  # invalid values fail here, before work


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def synthetic_pool(teacher, s: Settings, per_class: int, seed: int, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    path = cache / "pools" / f"{digest([teacher.card.fingerprint, s.synth.model_dump(mode='json'), per_class, seed])}"\
                              ".safetensors"
    if path.is_file():
        pool = load_file(path)
        return pool["images"], pool["labels"]
    with create_synthesizer(teacher, s.synth) as engine:
        result = engine.synthesize_classes(list(range(teacher.card.num_classes)), per_class, seed=seed * 1000)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": result.images.contiguous(), "labels": result.labels.contiguous()}, str(path))
    return result.images, result.labels


def score(teacher, s: Settings, per_class: int, seed: int, cache: Path, x_val, y_val) -> dict[str, float]:
    card = teacher.card
    key = digest([card.fingerprint, s.model_dump(mode="json", include=set(SECTIONS)), per_class, seed])
    path = cache / "scores" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    images, labels = synthetic_pool(teacher, s, per_class, seed, cache)
    synth_seconds = time.perf_counter() - t0
    torch.manual_seed(seed)
    trainer = DearKDTrainer(s.student.for_teacher(card), s.dearkd, s.train, teacher.model)
    batches = ImagePool(images, labels, card.mean, card.std, s.train.batch_size, s.train.crop_padding)
    t0 = time.perf_counter()
    for _ in range(s.train.steps):
        trainer.train_step(*next(batches))
    mean, std = torch.tensor(card.mean).view(1, -1, 1, 1), torch.tensor(card.std).view(1, -1, 1, 1)
    result = {"val_top1": round(trainer.evaluate((x_val - mean) / std, y_val), 4),
              "synth_seconds": round(synth_seconds, 1), "train_seconds": round(time.perf_counter() - t0, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                   help="values to try for one setting (repeat for a full grid); none: score the preset alone")
    p.add_argument("--seeds", type=int, default=2, help="seeds per setting: each seed synthesises its own pool")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--teacher", help=TEACHER_HELP)
    p.add_argument("--cache", type=Path, default=Path("runs/tune"))
    args = p.parse_args(argv)
    grid = parse_grid(args.grid)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    try:
        settings = [settings_for(c) for c in combos]
    except ValueError as exc:  # pydantic's ValidationError: name the bad setting, no traceback
        raise SystemExit(f"--grid: {exc}") from None
    teacher = bench_teacher(args.teacher)
    if teacher.card.recipe.get("dataset") != "digits":
        raise SystemExit(f"{teacher.card.name} was not trained on digits; this bench scores on the digits validation "
                         f"split")
    x_val, y_val = load_digits_split(teacher.card.image_size).images("val")
    rows = []
    for combo, s in zip(combos, settings):
        runs = []
        for seed in range(args.seeds):
            runs.append(score(teacher, s, args.per_class, seed, args.cache, x_val, y_val))
            print(combo, f"seed {seed}", runs[-1], file=sys.stderr, flush=True)
        top1 = [r["val_top1"] for r in runs]
        rows.append({"settings": combo, "val_top1_mean": round(statistics.fmean(top1), 4), "val_top1": top1,
                     "val_top1_std": round(statistics.pstdev(top1), 4)})
    rows.sort(key=lambda r: -r["val_top1_mean"])
    out = {"bench": "tune_digits", "split": "val", "val_images": len(y_val), "teacher": teacher.card.name,
           "teacher_fingerprint": teacher.card.fingerprint[:16], "per_class": args.per_class, "seeds": args.seeds,
           "commit": git_commit(), "torch": torch.__version__, "device": "cpu", "best": rows[0]["settings"],
           "results": rows}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
