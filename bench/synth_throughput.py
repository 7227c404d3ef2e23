"""Inversion throughput: images/s and image-iterations/s for one teacher, resolution, batch and iteration count.

On CUDA it also reports FLOPs per image-iteration and the share of the device's dense bf16 peak.
The last line printed is one JSON object with everything measured.

    python bench/synth_throughput.py      # the digits teacher (trained on first use), batch 64, 200 iterations
    python bench/synth_throughput.py --teacher resnet50 --resolution 224 --batch 128 --iterations 200 --amp bf16
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_teacher import HELP as TEACHER_HELP, bench_teacher  # noqa: E402
from shared.config import SynthConfig, resolve_device  # noqa: E402
from synth_service.engine import InversionEngine  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched on the device name.
BF16_PEAK = {"H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 NVL": 835.5e12, "H100 PCIe": 756.5e12,
             "H200": 989.4e12, "A100": 312e12, "L40S": 362.1e12, "L4": 121e12, "A10": 125e12}


def bf16_peak(name: str) -> float | None:
    for key, peak in BF16_PEAK.items():
        if key in name:
            return peak
    return None


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def step_flops(engine: InversionEngine, batch: int, resolution: int) -> int:
    """FLOPs of one forward + input-gradient backward, counted by torch's FLOP counter (convs and matmuls)."""
    c = engine.card
    x = torch.randn(batch, c.in_chans, resolution, resolution, device=engine.device, requires_grad=True)
    y = torch.arange(batch, device=engine.device) % c.num_classes
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = engine.loss_terms(x, y)
        loss.backward()
    return counter.get_total_flops()


def timed_run(engine: InversionEngine, labels: list[int]):
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = engine.synthesize(labels, seed=0)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", help=TEACHER_HELP + "; a model name gets random weights")
    p.add_argument("--resolution", type=int, help="default: the teacher's image size")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--warmup-iterations", type=int, default=5, help="untimed run first (compile, cudnn autotune)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--with-weight-grads", action="store_true",
                   help="also time a run whose teacher computes weight gradients, as the reference code does")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    teacher = bench_teacher(args.teacher)
    if args.resolution:
        teacher.card.image_size = args.resolution
    card = teacher.card
    cfg = SynthConfig(batch_size=args.batch, iterations=args.iterations, amp=args.amp, compile=args.compile,
                      channels_last={"auto": None, "on": True, "off": False}[args.channels_last],
                      jitter=max(1, card.image_size // 8), log_every=10**6)
    labels = [i % card.num_classes for i in range(args.batch)]
    with InversionEngine(teacher, cfg, device=device) as engine:
        if args.warmup_iterations:
            engine.synthesize(labels, seed=1, iterations=args.warmup_iterations)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds, result = timed_run(engine, labels)
        flops = step_flops(engine, args.batch, card.image_size)
        if args.with_weight_grads:
            engine.teacher.requires_grad_(True)
            unfrozen_seconds, _ = timed_run(engine, labels)

    image_iters = args.batch * args.iterations
    out = {
        "bench": "synth_throughput",
        "teacher": card.arch, "resolution": card.image_size, "batch": args.batch, "iterations": args.iterations,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "amp": "bf16" if engine.use_bf16 else "fp32", "compile": args.compile, "channels_last": engine.channels_last,
        "torch": torch.__version__, "commit": git_commit(),
        "seconds": round(seconds, 3),
        "images_per_s": round(args.batch / seconds, 3),
        "image_iterations_per_s": round(image_iters / seconds, 1),
        "flops_per_image_iteration": flops / args.batch,
        "achieved_tflops": round(flops * args.iterations / seconds / 1e12, 3),
        "teacher_top1_on_images": float((result.teacher_top1 == result.labels).float().mean()),
    }
    if args.with_weight_grads:
        out["seconds_with_weight_grads"] = round(unfrozen_seconds, 3)
        out["speedup_from_frozen_teacher"] = round(unfrozen_seconds / seconds, 3)
    if device.type == "cuda":
        peak = bf16_peak(out["device"])
        out["bf16_peak_tflops"] = peak / 1e12 if peak else None
        out["percent_of_bf16_peak"] = round(100 * flops * args.iterations / seconds / peak, 2) if peak else None
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
