"""Images by class at full quality for any request size, over real HTTP on the digits preset: class-balanced filling,
filler into the stream, and the warm per-class pool (`"fresh": false`)."""
from __future__ import annotations

import io
import statistics
import time
from collections import Counter

import httpx
import numpy as np
import pytest

from helpers import dfkd_serve, metric_values
from live_server import LiveServer
from synth_service.app import create_app

MAX_BATCH = 40  # engine batch of the stream and pool tests (the quality test runs the preset's own, 100)
SEED = 11


def service_settings(base, synth: dict | None = None, **service):
    """The shipped digits preset (150 iterations), one engine batch of MAX_BATCH images."""
    synth = type(base.synth).model_validate(base.synth.model_dump() | (synth or {}))
    svc = {"max_batch": MAX_BATCH, "max_wait_ms": 50, "sync_max_images": MAX_BATCH} | service
    return base.model_copy(update={"synth": synth,
                                   "service": type(base.service).model_validate(base.service.model_dump() | svc)})


def fetch(url: str, body: dict) -> tuple[httpx.Response, dict[str, np.ndarray]]:
    res = httpx.post(f"{url}/v1/images", json=body | {"format": "npz"}, timeout=300)
    assert res.status_code == 200, res.text
    with np.load(io.BytesIO(res.content)) as z:
        return res, {k: z[k] for k in z.files}


def figures(arrays: list[dict[str, np.ndarray]]) -> dict[str, float]:
    labels = np.concatenate([a["labels"] for a in arrays])
    hit = lambda key: float((np.concatenate([a[key] for a in arrays]) == labels).mean())  # noqa: E731
    return {"images": len(labels), "teacher_top1": hit("teacher_top1"), "verifier_top1": hit("verifier_top1"),
            "confidence": float(np.concatenate([a["teacher_confidence"] for a in arrays]).mean())}


@pytest.mark.usefixtures("all_cores")  # the service runs in this process alone
def test_a_lone_single_class_request_gets_full_batch_quality(digits_settings, digits_teacher, verifier_card):
    """As `dfkd serve --config digits` runs (engine batches of 100). Paired by seed: image k of class c starts from
    the same noise alone and inside the full-batch request."""
    preset = {"max_batch": None, "sync_max_images": 100}
    filled = service_settings(digits_settings, synth={"verifier": verifier_card}, **preset)
    batch = filled.synth.batch_size
    with LiveServer(create_app(filled, teacher=digits_teacher)) as live:
        t0 = time.perf_counter()
        res, full = fetch(live.url, {"class_ids": list(range(10)), "per_class": 6, "seed": SEED})
        full_s = time.perf_counter() - t0
        lone, lone_s = [], []
        for c in range(10):
            t0 = time.perf_counter()
            res, arrays = fetch(live.url, {"class_ids": [c], "per_class": 4, "seed": SEED})
            lone_s.append(time.perf_counter() - t0)
            assert res.headers["X-Source"] == "synthesis" and arrays["labels"].tolist() == [c] * 4
            assert set(arrays) >= {"teacher_margin", "verifier_top1"} and "age_s" not in arrays
            lone.append(arrays)
        metrics = metric_values(httpx.get(f"{live.url}/metrics").text)
    assert metrics["dfkd_synth_filler_images_total{destination=dropped}"] == (batch - 60) + 10 * (batch - 4)
    assert metrics["dfkd_synth_images_generated_total{destination=filler}"] == (batch - 60) + 10 * (batch - 4)

    # The same requests without filling are compared by bench/single_class_quality.py --no-fill.
    rows = {"full batch (10 classes x 6)": (figures([full]), full_s),
            "lone 4-image requests, filled": (figures(lone), statistics.median(lone_s))}
    for name, (f, seconds) in rows.items():
        print(f"{name}: {f['images']} images, teacher top-1 {f['teacher_top1']:.3f}, confidence "
              f"{f['confidence']:.3f}, verifier top-1 {f['verifier_top1']:.3f}, latency {seconds:.2f} s (median)")
    # Reported beside it: the lone images' twins in the full batch (same starting noise; their trajectories part
    # with the batch's statistics, so they are no closer than any other images of the class).
    twins = figures([{k: v[6 * c:6 * c + 4] for k, v in full.items()} for c in range(10)])
    print(f"their twins in the full batch: {twins}")
    full_f, lone_f = figures([full]), figures(lone)
    for c, arrays in enumerate(lone):
        assert (arrays["teacher_top1"] == c).mean() >= 0.95, (c, arrays["teacher_top1"])
    assert abs(lone_f["confidence"] - full_f["confidence"]) <= 0.05
    # The verifier agrees with about 40 % of synthetic digits, so on 40 and 60 images its figure has a standard
    # error near 10 points: measured differences of 0.8 and 8.3 points in two runs. Only a gap beyond 2.5 standard
    # errors is a failure here; the 5-point goal needs a larger sample (see docs/benchmarks.md).
    p = (lone_f["verifier_top1"] * 40 + full_f["verifier_top1"] * 60) / 100
    se = (p * (1 - p) * (1 / 40 + 1 / 60)) ** 0.5
    print(f"verifier top-1 difference {lone_f['verifier_top1'] - full_f['verifier_top1']:+.3f}, "
          f"standard error {se:.3f}")
    assert abs(lone_f["verifier_top1"] - full_f["verifier_top1"]) <= 2.5 * se


def test_filler_goes_to_the_stream_once_and_never_to_the_user(digits_settings, digits_teacher, redis_server,
                                                               redis_client):
    from shared.stream import StreamProducer
    from shared.wire import BatchCodec

    stream = digits_settings.stream.model_copy(update={"redis_url": redis_server.url, "run": "filler",
                                                       "max_backlog": 1000})
    settings = service_settings(digits_settings, synth={"iterations": 20}).model_copy(update={"stream": stream})
    with LiveServer(create_app(settings, teacher=digits_teacher)) as live:
        deadline = time.monotonic() + 30
        while not httpx.get(f"{live.url}/v1/production").json()["redis_ok"]:
            assert time.monotonic() < deadline, "the publisher never reached Redis"
            time.sleep(0.1)
        res, arrays = fetch(live.url, {"class_ids": [3], "per_class": 4})
        assert arrays["labels"].tolist() == [3] * 4 and len(arrays["images"]) == 4
        deadline = time.monotonic() + 30
        while (status := httpx.get(f"{live.url}/v1/production").json())["filler_published"] < MAX_BATCH - 4:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        time.sleep(0.5)
        status = httpx.get(f"{live.url}/v1/production").json()
        metrics = metric_values(httpx.get(f"{live.url}/metrics").text)
    codec = BatchCodec()
    batches = [codec.decode([fields]) for _, fields in redis_client.xrange(StreamProducer(redis_client, stream,
                                                                                         "reader").stream_key)]
    assert len(batches) == 1 and batches[0].synthesis.params["filler"] is True
    streamed = batches[0].labels
    assert len(streamed) == MAX_BATCH - 4 and Counter(streamed + [3] * 4) == {c: 4 for c in range(10)}
    assert status["filler_published"] == MAX_BATCH - 4 and status["images_produced"] == 0
    assert metrics["dfkd_synth_filler_images_total{destination=stream}"] == MAX_BATCH - 4
    assert metrics["dfkd_synth_images_generated_total{destination=filler}"] == MAX_BATCH - 4
    assert metrics["dfkd_synth_images_generated_total{destination=http}"] == 4


def wait_for_warm_pool(url: str, per_class: int, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while min((status := httpx.get(f"{url}/v1/pool").json())["images_per_class"]) < per_class:
        assert time.monotonic() < deadline, status
        time.sleep(0.25)
    return status


def test_fresh_false_is_served_from_the_warm_pool_in_milliseconds(digits_teacher, teacher_dir, verifier_card,
                                                                     tmp_path):
    """`dfkd serve --config digits` in its own process, as a user runs it, with a pool of 20 images per class."""
    env = {"DFKD_SERVICE__POOL__ENABLED": "true", "DFKD_SERVICE__POOL__PER_CLASS": "20",
           "DFKD_SYNTH__VERIFIER": str(verifier_card)}
    with dfkd_serve(teacher_dir / "digits_cnn.json", tmp_path, **env) as (url, _), \
            httpx.Client(base_url=url, timeout=300) as client:
        def fetch(body: dict) -> tuple[httpx.Response, dict[str, np.ndarray]]:
            res = client.post("/v1/images", json=body | {"format": "npz"})
            assert res.status_code == 200, res.text
            with np.load(io.BytesIO(res.content)) as z:
                return res, {k: z[k] for k in z.files}

        res, cold = fetch({"class_ids": [2], "per_class": 2, "fresh": False})  # just started: empty
        assert res.headers["X-Pool"] == "cold" and res.headers["X-Source"] == "synthesis"
        assert cold["labels"].tolist() == [2, 2] and "age_s" not in cold
        assert client.post("/v1/images", json={"class_ids": [2], "fresh": False, "seed": 1}).status_code == 422
        warm = wait_for_warm_pool(url, 20)
        served, latencies = [], []
        for i in range(50):
            t0 = time.perf_counter()
            res, arrays = fetch({"class_ids": [i % 10], "per_class": 2, "fresh": False})
            latencies.append(time.perf_counter() - t0)
            assert res.headers["X-Pool"] == "hit" and res.headers["X-Source"] == "pool"
            assert float(res.headers["X-Image-Age-Max-S"]) == pytest.approx(arrays["age_s"].max(), abs=1e-3)
            served.append(arrays)
        _, fresh = fetch({"class_ids": list(range(10)), "per_class": 6, "seed": SEED})
        metrics = metric_values(client.get("/metrics").text)
    p50, p90 = statistics.median(latencies), float(np.percentile(latencies, 90))
    pool_f, fresh_f = figures(served), figures([fresh])
    print(f"pool warm ({warm['images']} images) after start-up; 50 fresh:false requests of 2 images: p50 "
          f"{p50 * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms; pool images: {pool_f}; fresh full batch: {fresh_f}")
    assert p50 < 0.050
    pixels = [img.tobytes() for a in served for img in a["images"]]
    assert len(set(pixels)) == len(pixels) == 100  # each image served once
    assert all((a["age_s"] >= 0).all() for a in served)
    assert metrics["dfkd_synth_pool_requests_total{result=hit}"] == 50
    assert metrics["dfkd_synth_pool_requests_total{result=cold}"] == 1
    # The same quality as fresh synthesis (the verifier figure is reported: unpaired, 100 vs 60 images)
    assert pool_f["teacher_top1"] >= 0.95 and abs(pool_f["confidence"] - fresh_f["confidence"]) <= 0.05


def test_pool_byte_cap_holds_over_1000_requests(digits_settings, digits_teacher):
    """Counted from the arrays the pool really holds, not from its own tally."""
    max_bytes = 10 * 6 * (digits_teacher.card.image_size ** 2 + 256)  # six images per class
    settings = service_settings(digits_settings, synth={"iterations": 5},
                                pool={"enabled": True, "max_bytes": max_bytes})
    app = create_app(settings, teacher=digits_teacher)
    outcomes, peak = Counter(), 0
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=120) as client:
        pool = app.state.service.pool
        for i in range(1000):
            res = client.post("/v1/images", json={"class_ids": [i % 10], "per_class": 3, "fresh": False,
                                                   "format": "npz"})
            assert res.status_code == 200, res.text
            outcomes[res.headers["X-Pool"]] += 1
            with pool._lock:
                entries = [e for q in pool._classes for e in q]
            assert all(e.pixels.base is None for e in entries)  # own copies, not views into whole batches
            held = sum(e.pixels.nbytes + 256 for e in entries)
            peak = max(peak, held)
            assert held <= max_bytes
        status = client.get("/v1/pool").json()
    print(f"1000 fresh:false requests of 3 images: {dict(outcomes)}; pool peak {peak} of {max_bytes} bytes")
    assert status["bytes"] <= max_bytes and outcomes["hit"] > 0


def test_a_disk_pool_survives_a_restart(digits_settings, digits_teacher, tmp_path):
    settings = service_settings(digits_settings, synth={"iterations": 5},
                                pool={"enabled": True, "per_class": 4, "directory": str(tmp_path / "pool")})
    with LiveServer(create_app(settings, teacher=digits_teacher)) as live:
        wait_for_warm_pool(live.url, 4, timeout=120)
        time.sleep(1.0)  # refills in flight land
    on_disk = len(list((tmp_path / "pool").glob("*/*.npz")))
    restarted_at = time.time()
    with LiveServer(create_app(settings, teacher=digits_teacher)) as live:
        status = httpx.get(f"{live.url}/v1/pool").json()
        asked_at = time.time()
        res, arrays = fetch(live.url, {"class_ids": [7], "per_class": 2, "fresh": False})
    assert status["images"] == on_disk >= 40
    # made before the restart, so older than the time since it
    assert res.headers["X-Pool"] == "hit" and arrays["age_s"].min() >= asked_at - restarted_at


def test_the_generator_method_refills_the_pool(digits_settings, digits_teacher):
    small = {"width": 8, "embed_dim": 16, "noise_dim": 16, "steps": 3, "warmup_steps": 6}
    settings = service_settings(digits_settings, synth={
        "method": "generator", "generator": digits_settings.synth.generator.model_dump() | small},
        pool={"enabled": True, "per_class": 4})
    with LiveServer(create_app(settings, teacher=digits_teacher)) as live:
        wait_for_warm_pool(live.url, 4, timeout=120)
        res, arrays = fetch(live.url, {"class_ids": [5], "per_class": 3, "fresh": False})
        method = httpx.get(f"{live.url}/v1/info").json()["method"]
    assert method["method"] == "generator" and method["loops"] >= 1
    assert res.headers["X-Pool"] == "hit" and arrays["labels"].tolist() == [5] * 3
