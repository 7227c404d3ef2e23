"""The CPU demo: digits teacher (trained once, then cached) -> DeepInversion + BPID -> KD student -> accuracy."""
from __future__ import annotations

import time

import torch

from shared.config import Settings, resolve_device
from shared.data.digits import load_digits_split
from shared.models import create_model
from shared.teacher import load_teacher
from shared.weights import save_weights
from trainer.logit_kd import distill_logits
from trainer.teacher_train import evaluate, train_teacher


def run_demo(s: Settings, per_class: int = 30, student_arch: str = "digits_cnn_small") -> dict:
    started = time.perf_counter()
    device = resolve_device(s.device)
    card_path = s.teacher or s.runs_dir / "teachers" / "digits_cnn.json"
    if card_path.is_file():
        print(f"[demo] teacher: cached {card_path}")
    else:
        print(f"[demo] teacher: training {s.teacher_train.arch or 'default'} on digits -> {card_path}")
        train_teacher(s.teacher_train, s.data, card_path.parent, name=card_path.stem, device=device)
    teacher = load_teacher(card_path)
    print(f"[demo] teacher held-out top-1 {teacher.card.metrics.get('test_top1', float('nan')):.4f}")

    from dfkd.cli import run_synthesis

    out = s.runs_dir / "demo"
    classes = list(range(teacher.card.num_classes))
    print(f"[demo] synthesizing {per_class} images x {len(classes)} classes, {s.synth.iterations} iterations")
    report = run_synthesis(s, teacher, classes, per_class, out / "synth")
    print(f"[demo] {report['images']} images in {report['seconds']:.1f}s ({report['images_per_second']:.1f}/s); "
          f"teacher top-1 on them {report['teacher_top1']:.3f}, BN distance fell {report['bn_distance_fall']:.1f}x")

    import numpy as np

    images = torch.from_numpy(np.load(out / "synth" / "images.npz")["images"])
    torch.manual_seed(s.seed)  # the student's init must not depend on whether the teacher was trained just now
    student = create_model(student_arch, num_classes=teacher.card.num_classes, in_chans=teacher.card.in_chans)
    print(f"[demo] distilling {student_arch} from the teacher on the synthetic images only")
    distill_logits(student, teacher.model, images, teacher.card.mean, teacher.card.std, device=device,
                   log=lambda m: print(f"[demo] {m}"))
    split = load_digits_split(s.data.digits_size)
    mean = torch.tensor(teacher.card.mean).view(1, -1, 1, 1)
    std = torch.tensor(teacher.card.std).view(1, -1, 1, 1)
    accuracy = evaluate(student.cpu(), split.x_test, split.y_test, mean, std)
    save_weights(student, out / f"student_{student_arch}.safetensors")
    summary = {"student_heldout_top1": accuracy, "heldout_images": len(split.y_test),
               "synthetic_images": report["images"], "seconds": time.perf_counter() - started,
               "grid": str(out / "synth" / "grid.png"), "report": str(out / "synth" / "report.json")}
    print(f"[demo] student trained on synthetic digits only: {accuracy:.3f} top-1 on {len(split.y_test)} real "
          f"held-out digits (total {summary['seconds']:.0f}s)")
    print(f"[demo] grid: {summary['grid']}")
    return summary
