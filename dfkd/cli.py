"""`dfkd`: one entry point with subcommands. Flags are a thin layer over the typed `Settings`."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from shared.errors import DfkdError


def _settings(args: argparse.Namespace, **overrides: Any):
    from shared.config import Settings

    overrides = {k: v for k, v in overrides.items() if v is not None}
    if getattr(args, "device", None):
        overrides["device"] = args.device
    return Settings.load(args.config, **overrides)


def _parse_classes(text: str, num_classes: int) -> list[int]:
    if text == "all":
        return list(range(num_classes))
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise DfkdError(f"--classes must be 'all' or comma-separated class ids, got {text!r}") from None
    if not classes:
        raise DfkdError("--classes is empty")
    return classes


def cmd_teacher_train(args: argparse.Namespace) -> int:
    from shared.config import resolve_device
    from trainer.teacher_train import train_teacher

    recipe = {"dataset": args.dataset, "arch": args.arch, "epochs": args.epochs, "train_limit": args.train_limit,
              "test_limit": args.test_limit}
    s = _settings(args, teacher_train={k: v for k, v in recipe.items() if v is not None})
    out = Path(args.out) if args.out else s.runs_dir / "teachers"
    _, card_path = train_teacher(s.teacher_train, s.data, out, name=args.name, device=resolve_device(s.device))
    print(f"teacher card: {card_path}")
    return 0


def cmd_teacher_half(args: argparse.Namespace) -> int:
    from shared.config import resolve_device
    from trainer.teacher_half import write_half_teacher

    s = _settings(args)
    card = write_half_teacher(Path(args.card), s.data, Path(args.out), name=args.name, device=resolve_device(s.device))
    print(f"teacher card: {card}")
    return 0


def cmd_teacher_import(args: argparse.Namespace) -> int:
    from shared.teacher_import import import_teacher

    names = None
    if args.class_names:
        names = [line.strip() for line in Path(args.class_names).read_text().splitlines() if line.strip()]
    card = import_teacher(args.arch, Path(args.out), args.name or args.arch,
                          weights=Path(args.weights) if args.weights else None, pretrained=args.pretrained,
                          num_classes=args.num_classes, in_chans=args.in_chans, image_size=args.image_size,
                          class_names=names)
    print(f"teacher card: {card}")
    return 0


def run_synthesis(s, teacher, classes: list[int], per_class: int, out_dir: Path, iterations: int | None = None,
                  return_logits: bool = False, student=None, quiet: bool = False) -> dict[str, Any]:
    """Invert `per_class` images of each class and write grid/npz/report (`dfkd synth`)."""
    from tqdm import tqdm

    from shared.config import resolve_device
    from synth_service.report import write_outputs
    from synth_service.synthesizer import create_synthesizer

    device = resolve_device(s.device)
    log = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    with create_synthesizer(teacher, s.synth, device=device, student=student, log=log) as engine:
        with tqdm(total=1, unit="it", desc="synth", disable=quiet, file=sys.stderr) as bar:
            def progress(step: int, total: int, terms: dict[str, float]) -> None:
                bar.total = total
                bar.update(step - bar.n)
                bar.set_postfix(ce=f"{terms['ce']:.3f}", bn=f"{terms['bn']:.3f}")

            result = engine.synthesize_classes(classes, per_class, seed=s.seed, iterations=iterations,
                                               return_logits=return_logits, progress=progress)
    settings = {"synth": s.synth.model_dump(mode="json"), "seed": s.seed, "device": str(device),
                "classes": classes, "per_class": per_class}
    return write_outputs(result, teacher.card, out_dir, settings)


def cmd_synth(args: argparse.Namespace) -> int:
    from shared.teacher import resolve_teacher

    synth = {"batch_size": args.batch_size}
    s = _settings(args, seed=args.seed, synth={k: v for k, v in synth.items() if v is not None})
    ref = args.teacher or s.teacher
    if ref is None:
        raise DfkdError("no teacher: pass --teacher CARD.json (or a model name) or set `teacher` in the config")
    teacher = resolve_teacher(ref, Path(args.weights) if args.weights else None)
    student = resolve_teacher(args.student).model if args.student else None
    classes = _parse_classes(args.classes, teacher.card.num_classes)
    out = Path(args.out) if args.out else s.runs_dir / "synth" / time.strftime("%Y%m%d-%H%M%S")
    report = run_synthesis(s, teacher, classes, args.per_class, out, iterations=args.iterations,
                           return_logits=args.logits, student=student, quiet=args.quiet)
    # intra_class_diversity is by space (teacher, pixel, verifier); verifier_top1 only with synth.verifier set
    summary = {k: report[k] for k in ("images", "seconds", "images_per_second", "teacher_top1", "verifier_top1",
                                      "teacher_confidence", "intra_class_diversity", "bn_distance_fall")
               if k in report}
    print(json.dumps(summary | {"out": str(out)}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from synth_service.app import create_app

    service = {"host": args.host, "port": args.port}
    s = _settings(args, teacher=args.teacher, service={k: v for k, v in service.items() if v is not None})
    if s.teacher is None:
        raise DfkdError("no teacher: pass --teacher CARD.json or set `teacher` in the config (DFKD_TEACHER)")
    uvicorn.run(create_app(s), host=s.service.host, port=s.service.port, log_level="info",
                access_log=s.service.access_log)
    return 0


def heldout_set(card, settings):
    """Real held-out images (`train.eval_split`: val or test) of the dataset the teacher was trained on."""
    dataset, split = card.recipe.get("dataset"), settings.train.eval_split
    if dataset == "digits":
        from shared.data.digits import load_digits_split

        return load_digits_split(card.image_size).images(split)
    if dataset == "cifar10":
        from shared.data.cifar10 import load_cifar10_images

        return load_cifar10_images(settings.data.cifar10_dir, split)
    return None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def cmd_train(args: argparse.Namespace) -> int:
    from shared.teacher import load_teacher
    from trainer.training import run_training

    train = {"steps": args.steps, "out_dir": args.out, "store_dir": args.store, "real_dir": args.real_dir,
             "real_fraction": args.real_fraction, "metrics_port": args.metrics_port}
    s = _settings(args, teacher=args.teacher, train={k: v for k, v in train.items() if v is not None})
    if s.teacher is None:
        raise DfkdError("no teacher: pass --teacher CARD.json or set `teacher` in the config (DFKD_TEACHER)")
    teacher = load_teacher(s.teacher)
    # SIGTERM (docker stop, `dfkd up`) takes the same path as Ctrl-C: checkpoint, then exit.
    signal.signal(signal.SIGTERM, _interrupt)
    summary = run_training(s, teacher, eval_set=heldout_set(teacher.card, s), log=lambda m: print(m, flush=True))
    print(json.dumps(summary))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.what == "store":
        from trainer.store import SyntheticStore

        names = None
        if args.teacher:
            from shared.teacher import TeacherCard

            names = TeacherCard.read(Path(args.teacher)).class_names
        n = SyntheticStore(Path(args.source)).export_imagefolder(Path(args.out), class_names=names)
    elif args.what == "digits":
        from trainer.imagefolder_export import export_digits

        n = sum(export_digits(Path(args.out), args.image_size, args.split, partial_fraction=args.fraction).values())
    else:
        from shared.config import Settings
        from shared.data.cifar10_formats import missing_data_error
        from trainer.imagefolder_export import export_cifar10

        root = Path(args.source) if args.source else Settings.load().data.cifar10_dir
        if root is None:
            raise missing_data_error(None)
        n = sum(export_cifar10(root, Path(args.out), args.split, partial_fraction=args.fraction).values())
    print(f"wrote {n} images to {args.out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from shared.models import list_models

    print("\n".join(list_models()))
    print("(plus any timm model name, e.g. resnet50)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        from shared.config_reference import render

        print(render(), end="")
        return 0
    import yaml

    print(yaml.safe_dump(_settings(args).model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from dfkd.up import run_up

    args.config = args.config or os.environ.get("DFKD_CONFIG") or "digits"
    s = _settings(args, train={"steps": args.steps} if args.steps else None)
    run_up(s, args.config, run_dir=Path(args.run_dir) if args.run_dir else None, keep_serving=args.keep_serving)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfkd", description="Data-free ViT distillation: synthesis and training.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config",
                       help="YAML config file or preset (digits, cifar10, imagenet); env DFKD_* overrides it")
        p.add_argument("--device", help="auto, cpu, cuda, cuda:N")

    teacher = sub.add_parser("teacher", help="teacher networks").add_subparsers(dest="action", required=True)
    p = teacher.add_parser("train", help="train a teacher on real data; writes safetensors + a JSON card")
    common(p)
    p.add_argument("--dataset", choices=["digits", "cifar10"])
    p.add_argument("--arch", help="model name (see `dfkd models`)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--train-limit", type=int, help="use only N training images, the same share of each class")
    p.add_argument("--test-limit", type=int, help="evaluate on only N test images, the same share of each class")
    p.add_argument("--name", help="file stem for the weights and card")
    p.add_argument("--out", help="output folder (default: <runs_dir>/teachers)")
    p.set_defaults(func=cmd_teacher_train)
    p = teacher.add_parser("half", help="an fp16 copy of a trained teacher (half the bytes), its accuracies "
                                        "measured again with the rounded weights")
    common(p)
    p.add_argument("card", help="the trained teacher's JSON card")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", help="file stem (default: the card's name; needed when --out is the card's folder)")
    p.set_defaults(func=cmd_teacher_half)
    p = teacher.add_parser("import", help="make a teacher card + safetensors from local weights or timm's "
                                          "pretrained weights (the one command that may download)")
    p.add_argument("arch", help="model name (see `dfkd models`), e.g. resnet50")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="local weights (.safetensors, or a .pt state dict loaded weights_only)")
    source.add_argument("--pretrained", action="store_true", help="fetch timm's pretrained weights once")
    p.add_argument("--out", required=True, help="output folder, e.g. the teachers volume")
    p.add_argument("--name", help="file stem for the weights and card (default: the model name)")
    p.add_argument("--num-classes", type=int, default=1000, help="with --weights (default 1000)")
    p.add_argument("--in-chans", type=int, default=3, help="with --weights (default 3)")
    p.add_argument("--image-size", type=int, help="input size in px (default: the pretrained config, else 224)")
    p.add_argument("--class-names", help="text file, one class name per line")
    p.set_defaults(func=cmd_teacher_import)

    p = sub.add_parser("synth", help="synthesize images of given classes from a teacher")
    common(p)
    p.add_argument("--teacher", help="teacher card (JSON) or model name")
    p.add_argument("--weights", help="local weights for a model-name teacher (.safetensors, .pt)")
    p.add_argument("--student", help="student card for Adaptive-DI competition (needs synth.competition > 0)")
    p.add_argument("--classes", default="all", help="'all' or comma-separated class ids")
    p.add_argument("--per-class", type=int, default=8, help="images per class")
    p.add_argument("--iterations", type=int, help="total optimisation steps (scales the schedule)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--logits", action="store_true", help="also store the teacher's logits")
    p.add_argument("--out", help="output folder (default: <runs_dir>/synth/<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("serve", help="run the HTTP synthesis service (and stream production when configured)")
    common(p)
    p.add_argument("--teacher", help="teacher card (JSON)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="train a ViT student with two-stage DearKD (stream, store, DALI mix-in)")
    common(p)
    p.add_argument("--teacher", help="teacher card (JSON)")
    p.add_argument("--steps", type=int)
    p.add_argument("--out", help="checkpoints and the final student (default: train.out_dir)")
    p.add_argument("--store", help="durable store of synthetic batches (default: train.store_dir)")
    p.add_argument("--real-dir", help="ImageFolder of real images (DALI) for mix-in or the partial-data setting")
    p.add_argument("--real-fraction", type=float, help="share of real images per batch; 1.0 = no synthetic data")
    p.add_argument("--metrics-port", type=int)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write an ImageFolder of PNGs/JPEGs: the synthetic store, digits or CIFAR-10")
    p.add_argument("what", choices=["store", "digits", "cifar10"])
    p.add_argument("--out", required=True)
    p.add_argument("--source", help="the store folder (store) or the CIFAR-10 folder (cifar10)")
    p.add_argument("--teacher", help="teacher card, for class names (store)")
    p.add_argument("--split", choices=["train", "val", "test"], default="train")
    p.add_argument("--fraction", type=float, default=1.0, help="stratified share of the split (partial data)")
    p.add_argument("--image-size", type=int, default=16, help="digits only")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("config", help="print the settings a command would use (secrets hidden), or the reference")
    common(p)
    p.add_argument("--reference", action="store_true", help="every setting with its env var, default and meaning "
                                                             "(markdown)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("models", help="list the project's model names")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("up", help="run the stack natively (Redis, synth service, trainer) until the student is "
                                  "trained; the default config is the CPU demo on digits")
    common(p)
    p.add_argument("--steps", type=int, help="trainer steps (default: train.steps)")
    p.add_argument("--run-dir", help="folder for the store, checkpoints and summary (default: <runs_dir>/up/<time>); "
                                     "an existing one resumes")
    p.add_argument("--keep-serving", action="store_true",
                   help="after training, keep the synth service and Redis running until Ctrl-C")
    p.set_defaults(func=cmd_up)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DfkdError, FileNotFoundError, FileExistsError) as exc:
        print(f"dfkd: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # pydantic validation of config values
        print(f"dfkd: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfkd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
