"""The synthesis service over a real socket: coalescing, responses, validation, capacity, auth, jobs, metrics."""
from __future__ import annotations

import asyncio
import io
import json
import time
import zipfile

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers import metric_values
from live_server import LiveServer, free_port
from synth_service.app import create_app

FAST_SYNTH = {"iterations": 20, "batch_size": 64}


def settings_for(base, **service):
    svc = {"max_batch": 64, "max_wait_ms": 400, "sync_max_images": 16, "max_iterations": 200,
           "max_queue_images": 256} | service
    # model_validate, not model_copy: the overrides go through the same validation as a config file.
    return base.model_copy(update={"synth": type(base.synth).model_validate(base.synth.model_dump() | FAST_SYNTH),
                                   "service": type(base.service).model_validate(base.service.model_dump() | svc)})


@pytest.fixture(scope="module")
def server(digits_settings, digits_teacher):
    with LiveServer(create_app(settings_for(digits_settings), teacher=digits_teacher)) as live:
        yield live


def test_concurrent_small_requests_are_coalesced(server):
    rng = np.random.default_rng(0)
    requests = [{"class_ids": rng.choice(10, size=2, replace=False).tolist(), "per_class": int(rng.integers(1, 3)),
                 "format": "zip" if i % 2 else "png", "seed": i} for i in range(16)]
    before = metric_values(httpx.get(f"{server.url}/metrics").text)

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/images", json=r) for r in requests))

    responses = asyncio.run(fire())
    after = metric_values(httpx.get(f"{server.url}/metrics").text)
    batches = after["dfkd_synth_batches_total"] - before.get("dfkd_synth_batches_total", 0)
    print(f"16 concurrent requests ({sum(len(r['class_ids']) * r['per_class'] for r in requests)} images) "
          f"ran in {batches:.0f} engine batch(es)")
    assert batches <= 2

    for req, res in zip(requests, responses):
        assert res.status_code == 200, res.text
        expected = [c for c in req["class_ids"] for _ in range(req["per_class"])]
        assert int(res.headers["x-image-count"]) == len(expected)
        assert [int(c) for c in res.headers["x-labels"].split(",")] == expected
        if req["format"] == "zip":
            with zipfile.ZipFile(io.BytesIO(res.content)) as zf:
                manifest = json.loads(zf.read("manifest.json"))
                assert [m["class_id"] for m in manifest] == expected
                for m in manifest:
                    image = Image.open(io.BytesIO(zf.read(m["file"])))
                    image.load()
                    assert image.size == (16, 16)
        else:
            image = Image.open(io.BytesIO(res.content))
            image.load()
            assert image.format == "PNG"
            if len(expected) == 1:
                assert image.size == (16, 16)
            else:  # a grid with a row per class
                assert image.size[1] == 2 + len(req["class_ids"]) * 50


def test_generation_counter_equals_images_produced(server):
    before = metric_values(httpx.get(f"{server.url}/metrics").text)
    served = 0
    for n in (1, 3):
        res = httpx.post(f"{server.url}/v1/images", json={"class_ids": [4], "per_class": n, "format": "npz"},
                         timeout=120)
        assert res.status_code == 200
        data = np.load(io.BytesIO(res.content))
        assert data["images"].shape == (n, 1, 16, 16) and data["labels"].tolist() == [4] * n
        served += n
    after = metric_values(httpx.get(f"{server.url}/metrics").text)
    key = "dfkd_synth_images_generated_total{destination=http}"
    assert after[key] - before.get(key, 0) == served
    assert after["dfkd_synth_http_requests_total{code=200,method=POST,route=/v1/images}"] >= 2


@pytest.mark.parametrize("body,field", [
    ({"class_ids": [10], "per_class": 1}, "class_ids"),
    ({"class_ids": [-1], "per_class": 1}, "class_ids"),
    ({"class_ids": [1], "per_class": 0}, "per_class"),
    ({"class_ids": [1], "per_class": 17}, "per_class"),  # over sync_max_images: use a job
    ({"class_ids": [], "per_class": 1}, "class_ids"),
    ({"class_ids": [1], "iterations": 201}, "iterations"),
    ({"class_ids": [1], "format": "gif"}, "format"),
    ({"class_ids": [1], "colour": "red"}, "colour"),
    ({"per_class": 2}, "class_ids"),
])
def test_invalid_input_gets_422(server, body, field):
    res = httpx.post(f"{server.url}/v1/images", json=body, timeout=30)
    assert res.status_code == 422, res.text
    assert field in json.dumps(res.json()["detail"])


def test_metadata_and_health(server, digits_teacher):
    classes = httpx.get(f"{server.url}/v1/classes").json()["classes"]
    assert [c["id"] for c in classes] == list(range(10)) and classes[3]["name"] == "3"
    info = httpx.get(f"{server.url}/v1/info").json()
    assert info["teacher"]["fingerprint"] == digits_teacher.card.fingerprint
    assert info["teacher"]["image_size"] == 16 and info["limits"]["max_batch"] == 64
    assert info["synthesis_defaults"]["iterations"] == 20
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200 and ready.json()["redis"] == "not configured"
    assert httpx.get(f"{server.url}/v1/production").json()["paused_reason"] == "disabled"
    res = httpx.put(f"{server.url}/v1/production", json={"enabled": True})
    assert res.status_code == 409 and "redis" in res.text.lower()


def test_jobs_lifecycle(server):
    res = httpx.post(f"{server.url}/v1/jobs", json={"class_ids": list(range(10)), "per_class": 10, "format": "npz",
                                                     "seed": 1})
    assert res.status_code == 202, res.text
    job = res.json()
    assert job["images_total"] == 100 and job["state"] in ("queued", "running")
    early = httpx.get(f"{server.url}/v1/jobs/{job['job_id']}/result")
    assert early.status_code == 409
    deadline = time.monotonic() + 180
    while job["state"] not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(0.5)
        job = httpx.get(f"{server.url}/v1/jobs/{job['job_id']}").json()
    assert job["state"] == "done", job
    assert job["images_done"] == 100 and job["result_url"]
    data = np.load(io.BytesIO(httpx.get(server.url + job["result_url"]).content))
    assert data["images"].shape == (100, 1, 16, 16)
    assert sorted(data["labels"].tolist()) == sorted(c for c in range(10) for _ in range(10))
    assert httpx.delete(f"{server.url}/v1/jobs/{job['job_id']}").status_code == 200
    assert httpx.get(f"{server.url}/v1/jobs/{job['job_id']}").status_code == 404
    res = httpx.post(f"{server.url}/v1/jobs", json={"class_ids": [1], "per_class": 100_001})
    assert res.status_code == 422


def test_over_capacity_gets_429_with_retry_after(digits_settings, digits_teacher):
    settings = settings_for(digits_settings, max_queue_images=4, max_wait_ms=0)
    with LiveServer(create_app(settings, teacher=digits_teacher)) as live:
        body = {"class_ids": [1, 2], "per_class": 2, "iterations": 200}

        async def burst():
            async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
                return await asyncio.gather(*(client.post("/v1/images", json=body) for _ in range(8)))

        responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert 200 in codes and 429 in codes, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert "queue full" in r.json()["detail"]


def test_bearer_token_auth(digits_settings, digits_teacher):
    settings = settings_for(digits_settings, auth_token="s3cret-token", metrics_auth=True)
    with LiveServer(create_app(settings, teacher=digits_teacher)) as live:
        body = {"class_ids": [0], "per_class": 1}
        assert httpx.post(f"{live.url}/v1/images", json=body).status_code == 401
        wrong = httpx.post(f"{live.url}/v1/images", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        basic = httpx.get(f"{live.url}/v1/classes", headers={"Authorization": "Basic s3cret-token"})
        assert basic.status_code == 401
        ok = httpx.post(f"{live.url}/v1/images", json=body, headers={"Authorization": "Bearer s3cret-token"},
                        timeout=120)
        assert ok.status_code == 200
        assert httpx.get(f"{live.url}/healthz").status_code == 200  # always open
        assert httpx.get(f"{live.url}/metrics").status_code == 401
        assert httpx.get(f"{live.url}/metrics", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200


def test_redis_down_keeps_http_up_and_readyz_says_so(digits_settings, digits_teacher):
    stream = digits_settings.stream.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    settings = settings_for(digits_settings).model_copy(update={"stream": stream})
    with LiveServer(create_app(settings, teacher=digits_teacher)) as live:
        time.sleep(1.0)
        ready = httpx.get(f"{live.url}/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] == "unavailable"
        assert httpx.get(f"{live.url}/healthz").status_code == 200
        res = httpx.post(f"{live.url}/v1/images", json={"class_ids": [5], "per_class": 2}, timeout=120)
        assert res.status_code == 200
        status = httpx.put(f"{live.url}/v1/production", json={"enabled": True}).json()
        assert status["enabled"] and status["paused_reason"] == "redis unavailable"


def test_background_production_streams_every_batch(digits_settings, digits_teacher, redis_server, redis_client):
    """Production fills batches into the Redis stream, stops at its target, and every image arrives decodable."""
    from shared.stream import StreamProducer
    from shared.wire import BatchCodec

    stream = digits_settings.stream.model_copy(update={"redis_url": redis_server.url, "run": "http-test",
                                                       "max_backlog": 1000})
    settings = settings_for(digits_settings, max_batch=32).model_copy(update={"stream": stream})
    with LiveServer(create_app(settings, teacher=digits_teacher)) as live:
        deadline = time.monotonic() + 30
        while not httpx.get(f"{live.url}/readyz").json()["redis"] == "ok" and time.monotonic() < deadline:
            time.sleep(0.2)
        res = httpx.put(f"{live.url}/v1/production",
                        json={"enabled": True, "classes": [1, 2, 3], "per_class": 4, "target_images": 48})
        assert res.status_code == 200, res.text
        deadline = time.monotonic() + 120
        while httpx.get(f"{live.url}/v1/production").json()["images_produced"] < 48:
            assert time.monotonic() < deadline, "production did not reach its target"
            time.sleep(0.3)
        time.sleep(1.0)  # nothing more may be produced after the target
        status = httpx.get(f"{live.url}/v1/production").json()
        counters = metric_values(httpx.get(f"{live.url}/metrics").text)
    assert status["images_produced"] == 48 and status["paused_reason"] == "target reached"
    assert counters["dfkd_synth_images_generated_total{destination=stream}"] == 48
    key = StreamProducer(redis_client, stream, "reader").stream_key
    entries = redis_client.xrange(key)
    codec = BatchCodec()
    batches = [codec.decode([fields]) for _, fields in entries]
    labels = [c for b in batches for c in b.labels]
    assert len(labels) == 48 and set(labels) == {1, 2, 3}
    assert all(b.teacher_fingerprint == digits_teacher.card.fingerprint for b in batches)
    assert all(b.logits is not None and b.logits.shape == (1, 2, len(b.labels), 10) for b in batches)
    assert len({b.batch_id for b in batches}) == len(batches)
