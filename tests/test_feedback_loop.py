"""The feedback loop end to end, with real processes and a real Redis: the service streams generator batches, a
`dfkd train` process trains on them and publishes its student, the service loads it into its adversarial term (its
metrics show the student's step), a foreign student is refused, and the term measurably raises teacher-student
disagreement on the images."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import time

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from live_server import LiveServer
from shared.config import Settings, StudentConfig
from shared.student_channel import load_published_student, publish_student
from synth_service.app import create_app
from synth_service.synthesizer import create_synthesizer

STUDENT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "mhca_blocks": 1}
GENERATOR = {"width": 8, "embed_dim": 16, "noise_dim": 16, "steps": 3, "warmup_steps": 6}


def samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None and not condition():
            raise AssertionError(f"the trainer exited before {what}:\n{proc.stdout.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def disagreement(teacher: torch.nn.Module, student: torch.nn.Module, images: torch.Tensor, card) -> float:
    """Mean Jensen-Shannon divergence (nats) between the teacher's and the student's softmax on the images."""
    mean, std = torch.tensor(card.mean).view(1, -1, 1, 1), torch.tensor(card.std).view(1, -1, 1, 1)
    x = (images.float() / 255 - mean) / std
    with torch.no_grad():
        p, q = teacher(x).softmax(1), student(x).softmax(1)
    m = (p + q) / 2
    kl = lambda a, b: (a * (a.clamp_min(1e-12).log() - b.clamp_min(1e-12).log())).sum(1)  # noqa: E731
    return float((kl(p, m) + kl(q, m)).mean() / 2)


def test_trainer_student_feeds_the_adversarial_term(digits_teacher, digits_verifier, teacher_dir, redis_server,
                                                    redis_client, tmp_path):
    card = digits_teacher.card
    run = "feedback-it"
    settings = Settings.load("digits", device="cpu", teacher=teacher_dir / "digits_cnn.json", student=STUDENT,
                             stream={"redis_url": redis_server.url, "run": run},
                             feedback={"enabled": True, "publish_every": 50, "poll_s": 0.2},
                             synth={"method": "generator", "batch_size": 20, "competition": 1.0,
                                    "generator": GENERATOR},
                             service={"production_enabled": True, "production_per_class": 2, "access_log": False})
    key = settings.stream.key("student")
    env = os.environ | {
        "DFKD_STREAM__REDIS_URL": redis_server.url, "DFKD_STREAM__RUN": run, "DFKD_FEEDBACK__ENABLED": "true",
        "DFKD_FEEDBACK__PUBLISH_EVERY": "50", "DFKD_TRAIN__BATCH_SIZE": "16", "DFKD_TRAIN__EVAL_EVERY": "1000",
        "DFKD_TRAIN__LOG_EVERY": "10"} | {f"DFKD_STUDENT__{k.upper()}": str(v) for k, v in STUDENT.items()}
    cmd = [sys.executable, "-m", "dfkd", "train", "--config", "digits", "--teacher",
           str(teacher_dir / "digits_cnn.json"), "--steps", "150", "--out", str(tmp_path / "run"), "--store", str(tmp_path / "store"), "--device", "cpu"]

    with LiveServer(create_app(settings, digits_teacher)) as server:
        assert samples(server.url)[("dfkd_synth_student_step", ())] == -1  # no student yet
        info = httpx.get(f"{server.url}/v1/info", timeout=10).json()
        assert info["method"]["method"] == "generator"
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            wait_for(lambda: samples(server.url)[("dfkd_synth_student_step", ())] >= 50, "a fed-back student", proc)
            assert proc.wait(timeout=600) == 0, proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
        wait_for(lambda: samples(server.url)[("dfkd_synth_student_step", ())] == 150, "the final student")
        m = samples(server.url)
        assert m[("dfkd_synth_student_loads_total", ())] >= 2 and 0 <= m[("dfkd_synth_student_age_seconds", ())] < 600
        assert httpx.get(f"{server.url}/v1/info", timeout=10).json()["method"]["student_step"] == 150

        # A student made for another teacher (the verifier) is refused, once, and the loaded one stays.
        student, published = load_published_student(redis_client, key, card, settings.feedback.max_bytes)
        foreign = copy.deepcopy(student)
        with torch.no_grad():
            next(foreign.parameters()).add_(0.01)  # other weights, so it cannot pass as the student already held
        publish_student(redis_client, key, foreign, student=StudentConfig(**STUDENT), teacher_card=digits_verifier.card,
                        step=200, stage=2, max_bytes=settings.feedback.max_bytes)
        refused = ("dfkd_synth_student_refused_total", (("reason", "fingerprint"),))
        wait_for(lambda: samples(server.url).get(refused, 0) == 1, "the foreign student's refusal")
        time.sleep(1.0)  # several more polls
        m = samples(server.url)
        assert m[refused] == 1 and m[("dfkd_synth_student_step", ())] == 150

    # The adversarial term uses the student: the same seeds with and without it, disagreement rises.
    di = settings.synth.model_copy(update={"method": "di", "competition": 30.0, "iterations": 40})
    labels = list(range(10)) * 4
    with create_synthesizer(digits_teacher, di, student_optional=True) as engine:
        off = engine.synthesize(labels, seed=3)
        engine.set_student(student, published.model_dump())
        on = engine.synthesize(labels, seed=3)
    d_off, d_on = (disagreement(digits_teacher.model, student, r.images, card) for r in (off, on))
    print(f"teacher-student JS divergence: {d_off:.3f} without the fed-back student, {d_on:.3f} with it")
    assert d_on > 1.1 * d_off  # deterministic: same seeds, same pixels at the start; measured 0.395 -> 0.461
