"""`dfkd serve` against hostile or careless HTTP clients, over a real socket: body limits that answer before parsing,
bounded error bodies, a responsive /healthz, production settings that can never run, an idle worker that sleeps,
the token on every route, and job results within a byte budget."""
from __future__ import annotations

import gc
import math
import os
import threading
import time
import tracemalloc
from contextlib import contextmanager

import httpx
import pytest
import torch
from fastapi.routing import APIRoute

from synth_service.app import create_app
from helpers import dfkd_serve
from live_server import LiveServer
from test_service_http import settings_for

TOKEN = "hardening-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MB = 1 << 20


def cpu_seconds(stat_path: str) -> float:
    """User + system CPU time so far of a process (/proc/<pid>/stat) or a thread (/proc/self/task/<tid>/stat)."""
    fields = open(stat_path).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def serve(card_path, tmp_path, **env_settings: str):
    """`dfkd serve --config digits` in its own process, with the token set, until it answers /readyz."""
    with dfkd_serve(card_path, tmp_path, headers=AUTH, DFKD_SERVICE__AUTH_TOKEN=TOKEN, **env_settings) as served:
        yield served


@pytest.fixture(scope="module")
def card_path(digits_teacher, teacher_dir):
    return teacher_dir / "digits_cnn.json"


def long_list_body(nbytes: int) -> bytes:
    """A JSON request whose class_ids list alone is about `nbytes` long."""
    return b'{"class_ids": [' + b"1, " * (nbytes // 3) + b'1], "per_class": 1}'


def test_oversized_bodies_get_413_at_once_and_healthz_stays_responsive(card_path, tmp_path):
    with serve(card_path, tmp_path) as (url, _):
        headers = AUTH | {"content-type": "application/json"}
        big = long_list_body(20 * MB)
        started = time.monotonic()
        res = httpx.post(f"{url}/v1/images", content=big, headers=headers, timeout=30)
        took = time.monotonic() - started
        print(f"a {len(big) / MB:.0f} MB body got {res.status_code} in {took * 1000:.0f} ms")
        assert res.status_code == 413 and took < 1.0
        assert "limit is 1048576 bytes" in res.json()["detail"] and len(res.content) < 1000

        # Chunked, with no Content-Length to check up front: counted as it arrives.
        chunked = httpx.post(f"{url}/v1/images", content=iter([big[i:i + MB] for i in range(0, len(big), MB)]),
                             headers=headers, timeout=30)
        assert chunked.status_code == 413

        # Just under the limit: parsed, refused with a bounded error that does not echo the list back.
        near = long_list_body(MB - 1000)
        res = httpx.post(f"{url}/v1/images", content=near, headers=headers, timeout=30)
        assert res.status_code == 422 and len(res.content) < 2000, res.text[:300]
        assert "not echoed" in res.text

        latencies: list[float] = []
        stop = threading.Event()

        def flood() -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    for body in (big, near):
                        client.post(f"{url}/v1/images", content=body, headers=headers)

        senders = [threading.Thread(target=flood) for _ in range(2)]
        for sender in senders:
            sender.start()
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                started = time.monotonic()
                assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
                latencies.append(time.monotonic() - started)
                time.sleep(0.05)
        finally:
            stop.set()
            for sender in senders:
                sender.join()
        print(f"/healthz under the flood: {len(latencies)} probes, slowest {max(latencies) * 1000:.0f} ms")
        assert max(latencies) < 0.5


def test_production_that_can_never_fill_a_batch_is_refused_and_the_worker_sleeps(card_path, tmp_path, redis_server):
    with serve(card_path, tmp_path, DFKD_STREAM__REDIS_URL=redis_server.url, DFKD_STREAM__RUN="idle",
               DFKD_SERVICE__MAX_BATCH="16") as (url, proc):
        res = httpx.put(f"{url}/v1/production", json={"enabled": True, "per_class": 17}, headers=AUTH)
        assert res.status_code == 422, res.text
        assert "per_class 17 is larger than an engine batch (16 images)" in res.text
        status = httpx.get(f"{url}/v1/production", headers=AUTH).json()
        assert not status["enabled"] and status["per_class"] == 8
        time.sleep(1.0)
        before = cpu_seconds(f"/proc/{proc.pid}/stat")
        time.sleep(10.0)
        idle_cpu = cpu_seconds(f"/proc/{proc.pid}/stat") - before
        print(f"service CPU over 10 idle seconds: {idle_cpu:.3f} s")
        assert idle_cpu < 0.2


def test_every_route_but_healthz_needs_the_token(digits_settings, digits_teacher):
    """Over the app's whole route table, so a route added later cannot slip through; then what opens on purpose."""
    docs = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
    for opens in (set(), docs | {"/metrics"}):
        settings = settings_for(digits_settings, auth_token=TOKEN, docs_open=bool(opens), metrics_auth=not opens)
        app = create_app(settings, teacher=digits_teacher)
        with LiveServer(app) as live:
            checked = 0
            for route in app.routes:
                path = route.path.replace("{job_id}", "0123abcd")
                for method in sorted(route.methods):
                    res = httpx.request(method, f"{live.url}{path}", json={} if method in ("POST", "PUT") else None)
                    expected = 200 if path in {"/healthz"} | opens else 401
                    assert res.status_code == expected, (method, path, res.status_code)
                    checked += 1
            assert checked >= 15 and sum(isinstance(r, APIRoute) for r in app.routes) >= 12
            # Unknown paths do not tell whether they exist; the token opens everything.
            assert httpx.get(f"{live.url}/no/such/route").status_code == 401
            assert httpx.get(f"{live.url}/readyz", headers=AUTH).status_code == 200
            assert httpx.get(f"{live.url}/openapi.json", headers=AUTH).status_code == 200


def image_tensor_bytes(image_shape: tuple[int, ...]) -> int:
    """Bytes of every uint8 image batch alive in this process (torch tensors are tracked by the collector)."""
    gc.collect()
    return sum(o.nbytes for o in gc.get_objects()
               if issubclass(type(o), torch.Tensor) and o.dtype == torch.uint8 and tuple(o.shape[1:]) == image_shape)


@pytest.mark.usefixtures("all_cores")  # the service runs in this process alone
def test_job_results_stay_within_their_byte_budget(digits_settings, digits_teacher):
    """12 jobs, each fetched as a zip (kept for later fetches): beyond the budget the oldest are evicted (410).

    Counted from what the service really holds, not from its tally: the zips are Python bytes, which tracemalloc
    traces exactly, and the raw results are uint8 tensors, which the collector lists. (The process RSS swings by
    tens of MB with the allocator: as much as retained results would add.)"""
    jobs, images_per_job, budget = 12, 2000, 2 * MB
    settings = settings_for(digits_settings, max_batch=250, job_retention_bytes=budget, max_queue_images=2000)
    card = digits_teacher.card
    image_shape = (card.in_chans, card.image_size, card.image_size)
    body = {"class_ids": list(range(10)), "per_class": images_per_job // 10, "iterations": 1, "format": "zip"}
    with LiveServer(create_app(settings, teacher=digits_teacher)) as live:
        ids, traced, zip_bytes = [], [], 0
        tracemalloc.start()
        try:
            for i in range(jobs):
                res = httpx.post(f"{live.url}/v1/jobs", json=body)
                assert res.status_code == 202, res.text
                ids.append(res.json()["job_id"])
                deadline = time.monotonic() + 120
                while httpx.get(f"{live.url}/v1/jobs/{ids[-1]}").json()["state"] != "done":
                    assert time.monotonic() < deadline, "job did not finish"
                    time.sleep(0.05)
                result = httpx.get(f"{live.url}/v1/jobs/{ids[-1]}/result", timeout=60)
                assert result.status_code == 200 and result.content[:2] == b"PK"
                zip_bytes = len(result.content)
                del result
                traced.append(tracemalloc.get_traced_memory()[0])
        finally:
            tracemalloc.stop()
        images_alive = image_tensor_bytes(image_shape)
        statuses = [httpx.get(f"{live.url}/v1/jobs/{job_id}") for job_id in ids]
        codes = [s.status_code for s in statuses]
        assert codes[-1] == 200 and set(codes[:-2]) == {410}, codes
        assert "service.job_retention_bytes" in statuses[0].json()["detail"]
        too_big = httpx.post(f"{live.url}/v1/jobs", json=body | {"per_class": 2000})
        assert too_big.status_code == 422 and f"over the {budget}-byte job budget" in too_big.text

    # Holding every zip would add one per job: seven between jobs 3-5 and 10-12.
    growth = min(traced[-3:]) - min(traced[2:5])
    print(f"zip {zip_bytes / MB:.2f} MB; Python allocations after each job (MB): "
          f"{[round(b / MB, 2) for b in traced]}; growth from jobs 3-5 to 10-12: {growth / MB:.3f} MB; "
          f"image tensors alive after the last job: {images_alive} bytes")
    assert zip_bytes > MB / 2 and growth < zip_bytes / 2
    assert images_alive < images_per_job * math.prod(image_shape)  # not even one job's raw images are kept


def test_the_engine_worker_blocks_when_production_deals_nothing(digits_settings, digits_teacher, redis_server):
    """Whatever production deals (here a group that cannot fit, set behind the API's back), the worker sleeps."""
    from synth_service.batcher import Batcher
    from synth_service.engine import InversionEngine
    from synth_service.metrics import SynthMetrics
    from synth_service.production import ProductionController

    stream = digits_settings.stream.model_copy(update={"redis_url": redis_server.url, "run": "spin"})
    settings = digits_settings.model_copy(update={"stream": stream})
    metrics = SynthMetrics()
    production = ProductionController(settings, digits_teacher.card, metrics)
    with InversionEngine(digits_teacher, settings.synth) as engine:
        batcher = Batcher(engine, metrics, 16, 0.1, 64, fills=[production.fill_source()])
        production.start()
        batcher.start()
        try:
            production.enabled, production.per_class = True, 17
            deadline = time.monotonic() + 10
            while not production.active():
                assert time.monotonic() < deadline, production.paused_reason()
                time.sleep(0.1)
            batcher.wake()
            worker = f"/proc/self/task/{batcher._thread.native_id}/stat"
            before = cpu_seconds(worker)
            time.sleep(3.0)
            spent = cpu_seconds(worker) - before
        finally:
            batcher.stop()
            production.stop()
    print(f"engine worker CPU over 3 s with nothing dealt: {spent:.3f} s")
    assert spent < 0.1 and batcher.batches_run == 0
