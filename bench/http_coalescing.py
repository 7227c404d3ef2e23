"""HTTP coalescing: latency of one full-batch request vs the same images as 64 concurrent 4-image requests.

Runs the real service (uvicorn on a loopback port) with the given teacher and reports latencies, engine batches
and batch fill. The last line printed is one JSON object.

    python bench/http_coalescing.py --iterations 50     # the digits teacher by default (trained on first use)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the live-server helper the tests use too

from bench.bench_teacher import HELP as TEACHER_HELP, bench_teacher  # noqa: E402
from bench.synth_throughput import git_commit  # noqa: E402
from shared.config import Settings, resolve_device  # noqa: E402
from synth_service.app import create_app  # noqa: E402
from live_server import LiveServer  # noqa: E402


def batches_run(url: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "dfkd_synth_batches_total":
                return sample.value
    return 0.0


async def timed_post(client: httpx.AsyncClient, body: dict) -> float:
    start = time.perf_counter()
    response = await client.post("/v1/images", json=body)
    response.raise_for_status()
    return time.perf_counter() - start


async def scenario(url: str, bodies: list[dict]) -> tuple[float, list[float]]:
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        start = time.perf_counter()
        latencies = await asyncio.gather(*(timed_post(client, b) for b in bodies))
        return time.perf_counter() - start, list(latencies)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", help=TEACHER_HELP)
    p.add_argument("--config", default="digits", help="preset or YAML for the synthesis settings")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--per-request", type=int, default=4)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--max-wait-ms", type=int, default=200)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    batch = args.requests * args.per_request
    settings = Settings.load(args.config, device=args.device,
                             synth={"batch_size": batch, "iterations": args.iterations},
                             service={"max_batch": batch, "sync_max_images": batch, "max_queue_images": 4 * batch,
                                      "max_wait_ms": args.max_wait_ms, "max_iterations": args.iterations})
    teacher = bench_teacher(args.teacher)
    k = teacher.card.num_classes
    full = [{"class_ids": list(range(k)) * (batch // k) + list(range(batch % k)), "per_class": 1, "seed": 0}]
    small = [{"class_ids": [(i + j) % k for j in range(args.per_request)], "per_class": 1, "seed": i}
             for i in range(args.requests)]
    out = {"bench": "http_coalescing", "teacher": teacher.card.arch, "resolution": teacher.card.image_size,
           "iterations": args.iterations, "max_batch": batch, "requests": args.requests,
           "per_request": args.per_request, "max_wait_ms": args.max_wait_ms,
           "device": str(resolve_device(args.device)), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "commit": git_commit()}
    def run(name: str, live: LiveServer, bodies: list[dict], max_batch: int) -> None:
        before = batches_run(live.url)
        wall, latencies = asyncio.run(scenario(live.url, bodies))
        used = batches_run(live.url) - before
        out[name] = {"wall_s": round(wall, 3), "engine_batches": int(used),
                     "batch_fill": round(batch / (used * max_batch), 3) if used else None,
                     "latency_p50_s": round(statistics.median(latencies), 3),
                     "latency_max_s": round(max(latencies), 3), "images_per_s": round(batch / wall, 2)}

    with LiveServer(create_app(settings, teacher=teacher)) as live:
        asyncio.run(scenario(live.url, full))  # warm-up at full size: allocator and thread pools, not measured
        run("one_full_batch", live, full, batch)
        run("concurrent_small", live, small, batch)
    # The same 64 requests when the engine may not coalesce: one batch per request.
    alone = settings.model_copy(update={"service": settings.service.model_copy(
        update={"max_batch": args.per_request, "max_wait_ms": 0})})
    with LiveServer(create_app(alone, teacher=teacher)) as live:
        run("uncoalesced_small", live, small, args.per_request)
    out["uncoalesced_over_coalesced_wall"] = round(out["uncoalesced_small"]["wall_s"]
                                                   / out["concurrent_small"]["wall_s"], 3)
    out["concurrent_over_full_wall"] = round(out["concurrent_small"]["wall_s"] / out["one_full_batch"]["wall_s"], 3)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
