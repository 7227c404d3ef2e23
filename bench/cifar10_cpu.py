"""CIFAR-10 at CPU scale: every synthesis method from the ResNet-20 teacher at an equal wall-time budget, the same
ResNet-8 distilled on each pool and on as many real images, and DearKD vs DeiT-style ViTs on the best pool.

Stages run in order and cache their results under --work, so an interrupted run resumes (a pool resumes from its
last saved images) and `--stages` runs some of them:

    verifier   VGG-7 with GroupNorm (no BatchNorm statistics to fit, no residuals) trained on the real training split
    pools      di, bpid, adi (a ResNet-8 student in the loop, its KD rounds inside the budget), generator, and
               generator_adi (the generator with ADI's competition term against a ResNet-8 in the loop):
               --budget-min minutes of synthesis each; figures by the teacher and by the verifier; a grid PNG each
    kd         ResNet-8 by KD on the teacher's logits and stage features (--kd-features), --kd-steps steps on each
               pool (crop, flip and --kd-mix), and on the real bound: as many real training images as the best pool,
               the same steps and recipe
    vit        on the best pool (by the ResNet-8's validation top-1): DearKD and DeiT-style logit distillation into
               one ViT; DearKD on as many real images as its bound
    table      one JSON line in --out, and a markdown table on stderr

    DFKD_DATA__CIFAR10_DIR=/path/to/cifar10 python bench/cifar10_cpu.py           # everything, about 4 h on 2 cores
    DFKD_DATA__CIFAR10_DIR=/path/to/cifar10 python bench/cifar10_cpu.py --quick   # tiny budgets: the plumbing

Choices are made on the validation split (the best pool, and every setting here); the test split is reported only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the in-memory image pool the tests use

from bench.dearkd_ablation import VARIANTS  # noqa: E402
from bench.synth_throughput import git_commit  # noqa: E402
from image_pool import ImagePool  # noqa: E402
from shared.atomic_file import atomic_write  # noqa: E402
from shared.config import Settings, SynthConfig, TeacherRecipe  # noqa: E402
from shared.data.cifar10 import load_cifar10_split  # noqa: E402
from shared.data.splits import ImageSplit, stratified_subset, unit_to_uint8  # noqa: E402
from shared.errors import DfkdError  # noqa: E402
from shared.models import create_model  # noqa: E402
from shared.teacher import load_teacher  # noqa: E402
from shared.weights import load_weights, save_safetensors, save_weights  # noqa: E402
from synth_service.report import grid_image, mean_diversity, pixel_diversity  # noqa: E402
from synth_service.result import SynthResult  # noqa: E402
from synth_service.synthesizer import create_synthesizer  # noqa: E402
from trainer.engine import DearKDTrainer  # noqa: E402
from trainer.teacher_train import evaluate, random_crop_flip, train_teacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESNET20_TEACHER = ROOT / "teachers" / "cifar10_resnet20.json"
CIFAR10_MISSING = ("CIFAR-10 is needed: set DFKD_DATA__CIFAR10_DIR to a cifar-10-batches-py folder, an ImageFolder "
                   "(train/<class>/*.png, test/...) or the npz copy")
STAGES = ("verifier", "pools", "kd", "vit", "table")
# The budget fields each stage's results depend on (besides the teacher and the real images read).
STAGE_BUDGET = {"verifier": ("verifier_epochs",),
                "pools": ("pool_seconds", "batch", "iterations", "competition", "adi_steps", "generator_warmup",
                          "generator_steps"),
                "kd": ("kd_steps", "kd_batch", "kd_mix", "kd_features"), "vit": ("vit_steps", "vit_batch")}
METHODS = ("di", "bpid", "adi", "generator", "generator_adi")
# Methods with a ResNet-8 trained between batches inside the budget, whose disagreement with the teacher they raise.
STUDENT_IN_LOOP = ("adi", "generator_adi")
KD_MIXES = ("none", "mixup", "cutmix")
DEFAULT_KD_MIX = "cutmix"  # chosen on the validation split (docs/benchmarks.md)
DEFAULT_KD_FEATURES = 30.0  # chosen on the validation split of the di pool (docs/benchmarks.md)
# What each method changes in the synthesis settings below: DI has no BPID or competition term, ADI competes.
METHOD_CHANGES: dict[str, dict[str, Any]] = {
    "di": dict(diversity=0.0, boundary=0.0, competition=0.0),
    "bpid": dict(competition=0.0),
    "adi": dict(diversity=0.0, boundary=0.0),
    "generator": dict(method="generator", competition=0.0),
    "generator_adi": dict(method="generator"),
}


@dataclass
class Budget:
    """Everything that sets how long a stage takes; `quick` shrinks it to seconds for the tests."""

    pool_seconds: float
    batch: int                # images per synthesis batch (a tenth per class)
    iterations: int           # DI steps per batch
    competition: float        # ADI a_c
    adi_steps: int            # student KD steps after each ADI batch
    generator_warmup: int
    generator_steps: int
    kd_steps: int
    kd_batch: int
    kd_mix: str               # mixes two images of a KD batch (p 0.8); the teacher labels the mixed view
    kd_features: float        # weight of the stage-feature mimicking term in KD (0: logits only)
    vit_steps: int
    vit_batch: int
    verifier_epochs: int | None
    train_limit: int | None   # real training images read (None: all 45,000)
    eval_limit: int | None    # validation and test images scored (None: all)


def budget_for(args: argparse.Namespace) -> Budget:
    if args.quick:
        return Budget(pool_seconds=4, batch=20, iterations=4, competition=1.0, adi_steps=2, generator_warmup=2,
                      generator_steps=1, kd_steps=6, kd_batch=32, kd_mix=args.kd_mix,
                      kd_features=args.kd_features, vit_steps=4, vit_batch=16,
                      verifier_epochs=1, train_limit=2000, eval_limit=300)
    return Budget(pool_seconds=60 * args.budget_min, batch=100, iterations=args.iterations,
                  competition=args.competition, adi_steps=args.adi_steps, generator_warmup=300,
                  generator_steps=10, kd_steps=args.kd_steps, kd_batch=128, kd_mix=args.kd_mix,
                  kd_features=args.kd_features,
                  vit_steps=args.vit_steps, vit_batch=64, verifier_epochs=None, train_limit=None, eval_limit=None)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


class Run:
    """The bench's inputs, loaded once: settings, teacher, the real split, the work folder."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.budget = args, budget_for(args)
        self.work = Path(args.work or ("runs/cifar10_cpu_quick" if args.quick else "runs/cifar10_cpu"))
        self.settings = Settings.load("cifar10")
        if self.settings.data.cifar10_dir is None:
            raise SystemExit(CIFAR10_MISSING)
        self.teacher_card = Path(args.teacher)
        self.teacher = load_teacher(self.teacher_card)
        card = self.teacher.card
        self.mean = torch.tensor(card.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(card.std).view(1, -1, 1, 1)
        t0 = time.perf_counter()
        b = self.budget
        self.split: ImageSplit = load_cifar10_split(self.settings.data.cifar10_dir, b.train_limit, b.eval_limit)
        self.split.x_val, self.split.y_val = self.split.x_val[:b.eval_limit], self.split.y_val[:b.eval_limit]
        log(f"CIFAR-10: {len(self.split.y_train)} train, {len(self.split.y_val)} val, {len(self.split.y_test)} test "
            f"images read in {time.perf_counter() - t0:.0f}s")

    def stage_settings(self, name: str) -> dict:
        """What a cached result named `name` was made with: the teacher, the real images, its stage's budget."""
        stage = "verifier" if name == "verifier" else {"pool": "pools", "kd": "kd", "vit": "vit"}[name.split("_")[0]]
        b = asdict(self.budget)
        return {"teacher": self.teacher.card.fingerprint, "train_limit": b["train_limit"],
                "eval_limit": b["eval_limit"]} | {k: b[k] for k in STAGE_BUDGET[stage]}

    def score(self, model: nn.Module) -> dict[str, float]:
        return {"val_top1": round(evaluate(model, self.split.x_val, self.split.y_val, self.mean, self.std), 4),
                "test_top1": round(evaluate(model, self.split.x_test, self.split.y_test, self.mean, self.std), 4)}

    def cached(self, name: str) -> dict | None:
        """A stage's saved result; one made with other settings is refused, never mixed with this run's."""
        path = self.work / f"{name}.json"
        if not path.is_file():
            return None
        done = json.loads(path.read_text())
        self.check_settings(path, done.get("settings"), name)
        return done

    def check_settings(self, path: Path, theirs: dict | None, name: str) -> None:
        mine = self.stage_settings(name)
        if theirs != mine:
            changed = sorted(k for k in mine.keys() | (theirs or {}).keys() if mine.get(k) != (theirs or {}).get(k))
            raise SystemExit(f"{path} was made with other settings ({', '.join(changed)} differ): pass another "
                             f"--work, or delete it to make it again")

    def require(self, name: str, stage: str) -> dict:
        if (done := self.cached(name)) is None:
            raise SystemExit(f"{self.work / name}.json is missing: run the {stage!r} stage first")
        return done

    def save(self, name: str, result: dict) -> dict:
        result = result | {"settings": self.stage_settings(name)}
        write_json(self.work / f"{name}.json", result)
        log(f"{name}: {json.dumps(result)[:400]}")
        return result


# ---- verifier -----------------------------------------------------------------------------------------------------

def stage_verifier(run: Run) -> dict:
    if (done := run.cached("verifier")) is not None:
        return done
    b = run.budget
    recipe = TeacherRecipe(dataset="cifar10", arch="vgg7_gn", epochs=b.verifier_epochs, train_limit=b.train_limit,
                           test_limit=b.eval_limit)
    t0 = time.perf_counter()
    _, card_path = train_teacher(recipe, run.settings.data, run.work / "verifier", name="cifar10_vgg7_gn", log=log)
    card = json.loads(card_path.read_text())
    return run.save("verifier", {"card": str(card_path), "arch": "vgg7_gn", "seconds": round(time.perf_counter() - t0),
                                 "val_top1": card["metrics"]["val_top1"], "test_top1": card["metrics"]["test_top1"],
                                 "recipe": card["recipe"]})


# ---- pools --------------------------------------------------------------------------------------------------------

def synth_settings(run: Run, method: str, verifier: Path) -> SynthConfig:
    b = run.budget
    base = run.settings.synth.model_dump()
    change = METHOD_CHANGES[method] | {"batch_size": b.batch, "iterations": b.iterations, "log_every": 10**6,
                                       "verifier": verifier}
    if method in STUDENT_IN_LOOP:
        change["competition"] = b.competition
    cfg = SynthConfig.model_validate(base | change)
    cfg.generator = cfg.generator.model_copy(update={
        "warmup_steps": b.generator_warmup, "steps": b.generator_steps, "memory": 500, "memory_weight": 30.0,
        "checkpoint": run.work / "pools" / f"{method}_state.safetensors", "checkpoint_every": 5})
    return cfg


class PoolFile:
    """A pool being made: images, labels and per-image figures, saved whole every minute and at the end."""

    KEYS = ("images", "labels", "teacher_top1", "teacher_features", "verifier_top1", "verifier_features")

    def __init__(self, path: Path):
        self.path, self.meta_path = path, path.with_suffix(".json")
        self.parts: dict[str, list[torch.Tensor]] = {k: [] for k in self.KEYS}
        self.meta: dict[str, Any] = {"seconds": 0.0, "batches": 0, "done": False}
        if self.path.is_file() and self.meta_path.is_file():
            tensors = load_file(self.path)
            self.parts = {k: [tensors[k]] if k in tensors else [] for k in self.KEYS}
            self.meta = json.loads(self.meta_path.read_text())

    def add(self, r: SynthResult) -> None:
        """A batch's images and figures; the verifier's only when one scored them (the KD sweep runs without)."""
        for key, value in (("images", r.images), ("labels", r.labels), ("teacher_top1", r.teacher_top1),
                           ("teacher_features", r.features.half()), ("verifier_top1", r.verifier_top1),
                           ("verifier_features", None if r.verifier_features is None else r.verifier_features.half())):
            if value is not None:
                self.parts[key].append(value.contiguous())
        self.meta["batches"] += 1

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.cat(v) for k, v in self.parts.items() if v}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(self.path, self.tensors())
        write_json(self.meta_path, self.meta)

    @property
    def count(self) -> int:
        return sum(len(x) for x in self.parts["labels"])


class KDLearner:
    """A student distilled from the teacher's logits on augmented views of uint8 images (crop + flip, T = 4), two
    of them mixed (mixup, or CutMix's pasted box) in 80 % of the batches: the teacher labels every view it sees, so
    mixing makes new inputs out of a small pool.

    With `features` > 0 the student also mimics the teacher's stage outputs (FitNets-style, through a 1x1 conv + BN
    per stage, the MSE scaled by the teacher map's energy): a map carries far more of the teacher's answer per image
    than ten logits, which matters most when the images are few."""

    def __init__(self, arch: str, teacher: nn.Module, run: Run, steps: int, lr: float = 0.05, seed: int = 0,
                 schedule: bool = True, mix: str = "none", features: float = 0.0):
        torch.manual_seed(seed)
        card = run.teacher.card
        self.student = create_model(arch, num_classes=card.num_classes, in_chans=card.in_chans)
        self.student = self.student.to(memory_format=torch.channels_last)
        self.teacher = teacher.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.mean, self.std, self.gen = run.mean, run.std, torch.Generator().manual_seed(seed)
        self.features = features
        self.connectors = nn.ModuleList()
        if features > 0:
            probe = torch.zeros(1, card.in_chans, card.image_size, card.image_size)
            with torch.no_grad():  # in eval mode: a probe must not move the new student's BN statistics
                s_maps = self.student.eval().forward_intermediates(probe, intermediates_only=True)
                t_maps = self.teacher.forward_intermediates(probe, intermediates_only=True)
            self.student.train()
            if [m.shape[-2:] for m in s_maps] != [m.shape[-2:] for m in t_maps]:
                raise ValueError(f"feature mimicking needs a student whose stages match the teacher's: {arch} gives "
                                 f"{[tuple(m.shape[1:]) for m in s_maps]}, the teacher "
                                 f"{[tuple(m.shape[1:]) for m in t_maps]}")
            widths = [(sm.shape[1], tm.shape[1]) for sm, tm in zip(s_maps, t_maps)]
            self.connectors = nn.ModuleList(
                nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct)) for cs, ct in widths)
        params = list(self.student.parameters()) + list(self.connectors.parameters())
        self.opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        self.sched = (torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=lr, total_steps=steps, pct_start=0.15)
                      if schedule else None)
        self.bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        self.mix = mix

    def mixed(self, x: torch.Tensor) -> torch.Tensor:
        if self.mix == "none" or float(torch.rand(1, generator=self.gen)) >= 0.8:
            return x
        other = x[torch.randperm(len(x), generator=self.gen)]
        lam = float(torch.rand(1, generator=self.gen))  # Beta(1, 1)
        if self.mix == "mixup":
            return lam * x + (1 - lam) * other
        h, w = x.shape[-2:]
        bh, bw = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        cy, cx = (int(torch.randint(n, (1,), generator=self.gen)) for n in (h, w))
        y0, y1, x0, x1 = max(cy - bh // 2, 0), min(cy + bh // 2, h), max(cx - bw // 2, 0), min(cx + bw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        return x

    def mimic(self, s_maps: list[torch.Tensor], t_maps: list[torch.Tensor]) -> torch.Tensor:
        """Mean over stages of the connector's MSE to the teacher map, relative to that map's energy."""
        return sum(F.mse_loss(c(sm).float(), tm.float()) / tm.float().pow(2).mean().clamp_min(1e-6)
                   for c, sm, tm in zip(self.connectors, s_maps, t_maps, strict=True)) / len(t_maps)

    @torch.no_grad()
    def feature_gap(self, images: torch.Tensor) -> float:
        """The mimicking term on uint8 `images` as they are (eval mode): how far the student's maps are."""
        x = ((images.float() / 255.0 - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        self.connectors.eval()
        return float(self.mimic(self.student.eval().forward_intermediates(x, intermediates_only=True),
                                self.teacher.forward_intermediates(x, intermediates_only=True)))

    def train(self, images: torch.Tensor, steps: int, batch: int, temperature: float = 4.0) -> float:
        self.student.requires_grad_(True).train()  # an ADI engine froze it between rounds
        self.connectors.train()
        total = 0.0
        for _ in range(steps):
            idx = torch.randint(0, len(images), (batch,), generator=self.gen)
            x = self.mixed(random_crop_flip(images[idx].float().div_(255.0), 4, True, self.gen))
            x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                if self.features > 0:
                    with torch.no_grad():
                        t_final, t_maps = self.teacher.forward_intermediates(x)
                        t = self.teacher.forward_head(t_final).float()
                    s_final, s_maps = self.student.forward_intermediates(x)
                    s = self.student.forward_head(s_final).float()
                    mimic = self.mimic(s_maps, t_maps)
                else:
                    with torch.no_grad():
                        t = self.teacher(x).float()
                    s = self.student(x).float()
                    mimic = 0.0
            loss = F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1),
                            reduction="batchmean") * temperature ** 2 + self.features * mimic
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if self.sched is not None:
                self.sched.step()
            total += loss.item()
        self.student.requires_grad_(False).eval()
        return total / max(1, steps)


def make_pool(run: Run, method: str, verifier: Path) -> dict:
    b, card = run.budget, run.teacher.card
    pool = PoolFile(run.work / "pools" / f"{method}.safetensors")
    if pool.count:
        run.check_settings(pool.meta_path, pool.meta.get("budget"), f"pool_{method}")
    pool.meta["budget"] = run.stage_settings(f"pool_{method}")
    if pool.meta["done"]:
        return pool.meta
    cfg = synth_settings(run, method, verifier)
    labels = [i % card.num_classes for i in range(b.batch)]
    adi = None
    if method in STUDENT_IN_LOOP:  # a second teacher instance: forwards through the engine's would feed its BN hooks
        adi = KDLearner("resnet8", load_teacher(run.teacher_card).model, run, steps=1, lr=0.01, schedule=False)
        adi_weights = pool.path.with_name(f"{method}_student.safetensors")
        if adi_weights.is_file() and pool.count:
            load_weights(adi.student, adi_weights)
    with create_synthesizer(run.teacher, cfg, student=adi.student if adi else None, log=log) as engine:
        t0 = time.perf_counter()
        if cfg.method == "generator":  # a resumed generator is warm already: keep the first warm-up's figure
            pool.meta.setdefault("warmup_seconds", round(engine.warm_up(), 1))
        pool.meta["seconds"] += time.perf_counter() - t0
        last_save = time.perf_counter()
        while pool.meta["seconds"] < b.pool_seconds or not pool.count:  # a warm-up may spend the whole budget
            t0 = time.perf_counter()
            pool.add(engine.synthesize(labels, seed=1000 * METHODS.index(method) + pool.meta["batches"]))
            if adi is not None:
                adi.train(torch.cat(pool.parts["images"]), b.adi_steps, min(128, b.batch))
            pool.meta["seconds"] += time.perf_counter() - t0
            if time.perf_counter() - last_save > 60:
                if adi is not None:
                    save_weights(adi.student, adi_weights)
                pool.save()
                last_save = time.perf_counter()
                log(f"{method}: {pool.count} images in {pool.meta['seconds']:.0f}s")
        pool.meta |= {"done": True, "settings": {k: v for k, v in cfg.model_dump(mode="json").items()
                                                 if k not in ("generator", "verifier")}}
        if cfg.method == "generator":
            pool.meta["settings"]["generator"] = cfg.generator.model_dump(mode="json")
    pool.save()
    return pool.meta


def pool_figures(run: Run, method: str, meta: dict) -> dict:
    t = load_file(run.work / "pools" / f"{method}.safetensors")
    labels = t["labels"]
    per_class = 8
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(run.teacher.card.num_classes)])
    grid_dir = run.work / "grids" if run.args.quick else ROOT / "docs" / "img"
    grid_dir.mkdir(parents=True, exist_ok=True)
    grid = grid_dir / f"cifar10_{method}.png"
    grid_image(t["images"][keep], labels[keep], min_tile=32).save(grid)
    pixel = pixel_diversity(t["images"][:5000], labels[:5000])
    return {"method": method, "images": len(labels), "seconds": round(meta["seconds"], 1),
            "images_per_s": round(len(labels) / meta["seconds"], 2),
            "iterations": meta["settings"]["iterations"] if meta["settings"]["method"] != "generator" else None,
            "warmup_seconds": meta.get("warmup_seconds"),
            "teacher_top1": round(float((t["teacher_top1"] == labels).float().mean()), 4),
            "verifier_top1": round(float((t["verifier_top1"] == labels).float().mean()), 4),
            "verifier_diversity": round(mean_diversity(t["verifier_features"].float(), labels), 4),
            "teacher_diversity": round(mean_diversity(t["teacher_features"].float(), labels), 4),
            "pixel_diversity": round(float(np.mean(list(pixel.values()))), 4),
            "grid": str(grid.relative_to(ROOT) if grid.is_relative_to(ROOT) else grid)}


def stage_pools(run: Run) -> dict:
    verifier = Path(run.require("verifier", "verifier")["card"])
    out = {}
    for method in run.args.methods.split(","):
        if (done := run.cached(f"pool_{method}")) is not None:
            out[method] = done
            continue
        log(f"pool {method}: {run.budget.pool_seconds:.0f}s of synthesis")
        meta = make_pool(run, method, verifier)
        out[method] = run.save(f"pool_{method}", pool_figures(run, method, meta))
    return out


# ---- students -----------------------------------------------------------------------------------------------------

def real_images(run: Run, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` real training images, stratified by class (never validation or test images)."""
    y = run.split.y_train.numpy()
    idx = stratified_subset(y, min(1.0, count / len(y)), seed=seed)[:count]
    return unit_to_uint8(run.split.x_train[idx]), run.split.y_train[idx]


def pool_images(run: Run, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    t = load_file(run.work / "pools" / f"{method}.safetensors")
    return t["images"], t["labels"]


def kd_student(run: Run, images: torch.Tensor) -> dict:
    b = run.budget
    t0 = time.perf_counter()
    learner = KDLearner("resnet8", load_teacher(run.teacher_card).model, run, steps=b.kd_steps, mix=b.kd_mix,
                        features=b.kd_features)
    loss = learner.train(images, b.kd_steps, b.kd_batch)
    return {"images": len(images), "steps": b.kd_steps, "batch": b.kd_batch, "mix": b.kd_mix,
            "features": b.kd_features,
            "final_loss": round(loss, 4), "seconds": round(time.perf_counter() - t0, 1)} | run.score(learner.student)


def kd_name(run: Run, source: str) -> str:
    """The KD result of a pool (or "real"): other recipes than the default keep their own files, to compare on val."""
    b = run.budget
    return f"kd_{source}" + ("" if b.kd_mix == DEFAULT_KD_MIX else f"_{b.kd_mix}") + \
        ("" if b.kd_features == DEFAULT_KD_FEATURES else f"_features{b.kd_features:g}")


def best_pool(kd: dict) -> str:
    """The pool whose ResNet-8 scores best on the validation split."""
    return max((m for m in kd if m != "real"), key=lambda m: kd[m]["val_top1"])


def stage_kd(run: Run) -> dict:
    out = {}
    for method in run.args.methods.split(","):
        if (done := run.cached(kd_name(run, method))) is None:
            run.require(f"pool_{method}", "pools")
            log(f"kd on {method}: {run.budget.kd_steps} steps")
            done = run.save(kd_name(run, method), kd_student(run, pool_images(run, method)[0]))
        out[method] = done
    if (done := run.cached(kd_name(run, "real"))) is None:
        best = best_pool(out)
        images, _ = real_images(run, out[best]["images"])
        log(f"kd on {len(images)} real images (as many as the best pool, {best})")
        done = run.save(kd_name(run, "real"), kd_student(run, images) | {"as_many_as": best})
    out["real"] = done
    return out


def bench_split(s: Settings, dataset: str, limit: int | None = None):
    """The train/val/test split of `dataset` for the benches that take `--dataset` (digits or cifar10, `limit` as
    `load_cifar10_split`'s); exits with one line when the CIFAR-10 data is not configured."""
    if dataset == "digits":
        from shared.data.digits import load_digits_split

        return load_digits_split(s.data.digits_size)
    if s.data.cifar10_dir is None:
        sys.exit(f"bench: {CIFAR10_MISSING}")
    return load_cifar10_split(s.data.cifar10_dir, limit, limit)


def vit_settings(run: Run, variant: str) -> Settings:
    b = run.budget
    return cpu_vit_settings(run.settings, b.vit_steps, b.vit_batch, 96 if not run.args.quick else 24,
                            VARIANTS[variant])


def cpu_vit_settings(s: Settings, steps: int, batch: int, width: int = 96, change: dict | None = None) -> Settings:
    """The CPU-scale DearKD ViT on CIFAR-10 (6 blocks, 3 heads, patch 4, 2 MHCA blocks; soft KD at T = 4), with a
    `bench/dearkd_ablation.py` variant's `change` applied."""
    change = change or {}
    student = s.student.model_dump() | dict(embed_dim=width, depth=6, num_heads=3, mlp_ratio=2.0, mhca_blocks=2) | \
        change.get("student", {})
    dearkd = s.dearkd.model_dump() | dict(kd="soft", soft_kd_reduction="deit", temperature=4.0, alpha=0.95) | \
        change.get("dearkd", {})
    train = s.train.model_dump() | dict(steps=steps, batch_size=batch, lr=1e-3, warmup_steps=min(100, steps // 10),
                                        crop_padding=4, flip=True, precision="bf16")
    return s.model_copy(update={"student": type(s.student).model_validate(student),
                                "dearkd": type(s.dearkd).model_validate(dearkd),
                                "train": type(s.train).model_validate(train)})


def vit_student(run: Run, variant: str, images: torch.Tensor, labels: torch.Tensor) -> dict:
    s, card = vit_settings(run, variant), run.teacher.card
    t0 = time.perf_counter()
    torch.manual_seed(0)
    trainer = DearKDTrainer(s.student.for_teacher(card), s.dearkd, s.train, load_teacher(run.teacher_card).model)
    batches = ImagePool(images, labels, card.mean, card.std, s.train.batch_size, s.train.crop_padding, flip=True)
    for step in range(s.train.steps):
        trainer.train_step(*next(batches))
        if (step + 1) % max(1, s.train.steps // 5) == 0:
            log(f"vit {variant}: step {step + 1}/{s.train.steps}")
    norm = lambda x: (x - run.mean) / run.std  # noqa: E731
    return {"variant": variant, "images": len(images), "steps": s.train.steps, "batch": s.train.batch_size,
            "seconds": round(time.perf_counter() - t0, 1),
            "val_top1": round(trainer.evaluate(norm(run.split.x_val), run.split.y_val), 4),
            "test_top1": round(trainer.evaluate(norm(run.split.x_test), run.split.y_test), 4),
            "student": s.student.model_dump(mode="json")}


def stage_vit(run: Run) -> dict:
    kd = {m: run.require(kd_name(run, m), "kd") for m in run.args.methods.split(",")}
    best = best_pool(kd)
    out = {"pool": best}
    count = kd[best]["images"]
    for name, variant, source in (("dearkd", "dearkd", best), ("deit", "deit_distillation", best),
                                  ("dearkd_real", "dearkd", "real")):
        if (done := run.cached(f"vit_{name}")) is not None and (done["pool"], done["images"]) != (source, count):
            raise SystemExit(f"{run.work / f'vit_{name}'}.json was trained on {done['images']} {done['pool']} images, "
                             f"but the best pool is now {best} ({count} images): delete it to train it again")
        if done is None:
            images, labels = pool_images(run, best)
            if source == "real":
                images, labels = real_images(run, len(images))
            log(f"vit {name} on {len(images)} {source} images")
            done = run.save(f"vit_{name}", vit_student(run, variant, images, labels) | {"pool": source})
        out[name] = done
    return out


# ---- report -------------------------------------------------------------------------------------------------------

def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def stage_table(run: Run) -> dict:
    methods = run.args.methods.split(",")
    pools = {m: run.require(f"pool_{m}", "pools") for m in methods}
    kd = {m: run.require(kd_name(run, m), "kd") for m in methods + ["real"]}
    vit = {n: run.require(f"vit_{n}", "vit") for n in ("dearkd", "deit", "dearkd_real")}
    verifier = run.require("verifier", "verifier")
    card = run.teacher.card
    stage_seconds = {"verifier": verifier["seconds"]} | {f"pool_{m}": pools[m]["seconds"] for m in methods} | \
        {f"kd_{m}": kd[m]["seconds"] for m in kd} | {f"vit_{n}": vit[n]["seconds"] for n in vit}
    result = {"bench": "cifar10_cpu", "quick": run.args.quick, "commit": git_commit(), "torch": torch.__version__,
              "device": "cpu", "threads": torch.get_num_threads(),
              "teacher": {"arch": card.arch, "val_top1": card.metrics.get("val_top1"),
                          "test_top1": card.metrics.get("test_top1")},
              "verifier": verifier, "pools": pools, "kd_resnet8": kd, "vit": vit, "stage_seconds": stage_seconds,
              "total_hours": round(sum(stage_seconds.values()) / 3600, 2)}
    lines = ["| pool | images | synthesis s | teacher top-1 % | verifier top-1 % | verifier diversity | "
             "ResNet-8 KD val % | ResNet-8 KD test % |", "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        p = pools[m]
        lines.append(f"| {m} | {p['images']} | {p['seconds']:.0f} | {pct(p['teacher_top1'])} | "
                     f"{pct(p['verifier_top1'])} | {p['verifier_diversity']:.3f} | {pct(kd[m]['val_top1'])} | "
                     f"{pct(kd[m]['test_top1'])} |")
    lines.append(f"| real ({kd['real']['images']} train images) | {kd['real']['images']} | — | — | — | — | "
                 f"{pct(kd['real']['val_top1'])} | {pct(kd['real']['test_top1'])} |")
    lines += ["", "| ViT | data | val % | test % | s |", "|---|---|---|---|---|"]
    for n, v in vit.items():
        lines.append(f"| {n} | {v['pool']} ({v['images']}) | {pct(v['val_top1'])} | {pct(v['test_top1'])} | "
                     f"{v['seconds']:.0f} |")
    result["table"] = "\n".join(lines)
    print(result["table"], file=sys.stderr)
    out = Path(run.args.out) if run.args.out else (run.work / "cifar10_cpu.json" if run.args.quick
                                                   else ROOT / "bench" / "results" / "cifar10_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result) + "\n")
    return result


STAGE_FUNCTIONS: dict[str, Callable[[Run], dict]] = {
    "verifier": stage_verifier, "pools": stage_pools, "kd": stage_kd, "vit": stage_vit, "table": stage_table}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=str(RESNET20_TEACHER), help="teacher card")
    p.add_argument("--work", help="cache folder of every stage (default: runs/cifar10_cpu, --quick: "
                                   "runs/cifar10_cpu_quick)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, in order: {','.join(STAGES)}")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budget-min", type=float, default=15.0, help="synthesis wall time per pool")
    p.add_argument("--iterations", type=int, default=200, help="DI steps per batch of 100 (di, bpid, adi)")
    p.add_argument("--competition", type=float, default=1.0, help="ADI a_c")
    p.add_argument("--adi-steps", type=int, default=20, help="student KD steps after each ADI batch")
    p.add_argument("--kd-steps", type=int, default=3000, help="ResNet-8 KD steps (batch 128) on every pool")
    p.add_argument("--kd-mix", choices=KD_MIXES, default=DEFAULT_KD_MIX,
                   help="how two images of a KD batch are mixed (p 0.8); other mixes than the default keep their own "
                        "result files, so they can be compared on the validation split")
    p.add_argument("--kd-features", type=float, default=DEFAULT_KD_FEATURES,
                   help="weight of the stage-feature mimicking term in KD (0: logits only); like --kd-mix, values "
                        "other than the default keep their own result files")
    p.add_argument("--vit-steps", type=int, default=3000, help="ViT steps (batch 64)")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the plumbing in a minute")
    p.add_argument("--out", help="result JSON (default: bench/results/cifar10_cpu.json; --quick: in --work)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES] + [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown stage or method: {', '.join(unknown)}; stages: {', '.join(STAGES)}; "
                         f"methods: {', '.join(METHODS)}")
    try:
        run = Run(args)
    except (DfkdError, OSError) as e:
        raise SystemExit(f"cifar10_cpu: {e}")
    out: dict = {}
    for stage in STAGES:
        if stage in stages:
            t0 = time.perf_counter()
            out[stage] = STAGE_FUNCTIONS[stage](run)
            log(f"stage {stage} done in {time.perf_counter() - t0:.0f}s")
    return out


if __name__ == "__main__":
    main()
