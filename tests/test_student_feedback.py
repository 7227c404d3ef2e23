"""The student feedback channel against a real redis-server: the trainer publishes its student, the synthesis
service validates and loads it, refuses what does not fit its teacher, and survives outages."""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from safetensors.torch import load as load_safetensors

from dfkd.redis_server import RedisServer, free_loopback_port
from shared.config import DearKDConfig, FeedbackConfig, Settings, StreamConfig, StudentConfig, TrainConfig
from shared.models.dearkd_student import create_student
from shared.stream import connect_redis
from shared.student_channel import (CARD_FIELD, WEIGHTS_FIELD, StudentCard, StudentChannelError,
                                    load_published_student, publish_student, read_student_card)
from shared.teacher import TeacherCard, teacher_from_arch
from shared.weights import load_weights
from shared.wire import SynthesisRecord, WireBatch
from synth_service.metrics import SynthMetrics
from synth_service.student_feedback import StudentFeedback
from trainer.metrics import TrainerMetrics
from trainer.store import SyntheticStore
from trainer.student_publisher import StudentPublisher
from trainer.training import run_training

KEY = "dfkd:fb:student"
MAX_BYTES = 4 * 2**20
TINY = StudentConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=1.0, mhca_blocks=1, drop_path=0.0)
LARGER = TINY.model_copy(update={"embed_dim": 96, "depth": 4})  # about 4x the bytes of TINY


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return teacher_from_arch("digits_cnn", num_classes=10, in_chans=1, image_size=16, mean=(0.5,), std=(0.25,))


def student(card: TeacherCard, seed: int, cfg: StudentConfig = TINY) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_student(cfg.for_teacher(card))


def publish(client, card: TeacherCard, model, step: int, cfg: StudentConfig = TINY, stage: int = 1,
            max_bytes: int = MAX_BYTES) -> StudentCard:
    return publish_student(client, KEY, model, student=cfg, teacher_card=card, step=step, stage=stage,
                           max_bytes=max_bytes)


def same_outputs(a: torch.nn.Module, b: torch.nn.Module, card: TeacherCard) -> bool:
    x = torch.randn(8, card.in_chans, card.image_size, card.image_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def settings_for(url: str | None, **feedback) -> Settings:
    return Settings(device="cpu", stream=StreamConfig(redis_url=url, run="fb"),
                    feedback=FeedbackConfig(enabled=True, **feedback))


class Recorder:
    """on_student and log for a StudentFeedback: what it handed on and what it said."""

    def __init__(self):
        self.students: list[tuple[torch.nn.Module, StudentCard]] = []
        self.lines: list[str] = []

    def on_student(self, model, card) -> None:
        self.students.append((model, card))

    def log(self, line: str) -> None:
        self.lines.append(line)


def feedback_for(url: str, card: TeacherCard, max_bytes: int = MAX_BYTES, **kw) -> tuple[StudentFeedback, Recorder,
                                                                                           SynthMetrics]:
    rec, metrics = Recorder(), SynthMetrics()
    fb = StudentFeedback(settings_for(url, max_bytes=max_bytes, **kw), card, metrics, rec.on_student, log=rec.log)
    return fb, rec, metrics


def refused(metrics: SynthMetrics, reason: str) -> float:
    return metrics.student_refused.labels(reason)._value.get()


# --- the wire --------------------------------------------------------------------------------------------------------

def test_round_trip_gives_the_same_outputs(redis_client, teacher):
    model = student(teacher.card, seed=1)
    card = publish(redis_client, teacher.card, model, step=10, stage=1)
    loaded, read = load_published_student(redis_client, KEY, teacher.card, MAX_BYTES)
    assert read == card == read_student_card(redis_client, KEY)
    assert (read.step, read.stage, read.teacher_fingerprint) == (10, 1, teacher.card.fingerprint)
    assert read.student == TINY.for_teacher(teacher.card) and read.student.resolved
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert same_outputs(model, loaded, teacher.card)
    assert not same_outputs(student(teacher.card, seed=2), loaded, teacher.card)  # the comparison can fail
    # One hash, overwritten: only the latest student is kept.
    publish(redis_client, teacher.card, student(teacher.card, seed=2), step=20)
    assert redis_client.keys("*") == [KEY.encode()] and read_student_card(redis_client, KEY).step == 20


def test_published_weights_are_fp32_safetensors(redis_client, teacher):
    model = student(teacher.card, seed=1)
    publish(redis_client, teacher.card, model.to(torch.bfloat16), step=3)
    state = load_safetensors(redis_client.hget(KEY, WEIGHTS_FIELD))  # plain safetensors: no pickle involved
    assert state and all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
    loaded, _ = load_published_student(redis_client, KEY, teacher.card, MAX_BYTES)
    assert same_outputs(model.float(), loaded, teacher.card)


def test_nothing_published_reads_as_none(redis_client, teacher):
    assert read_student_card(redis_client, KEY) is None
    with pytest.raises(StudentChannelError) as err:
        load_published_student(redis_client, KEY, teacher.card, MAX_BYTES)
    assert err.value.reason == "missing"


def test_a_student_over_max_bytes_is_not_published(redis_client, teacher):
    first = publish(redis_client, teacher.card, student(teacher.card, seed=1), step=10)
    with pytest.raises(StudentChannelError, match="over feedback.max_bytes") as err:
        publish(redis_client, teacher.card, student(teacher.card, seed=2), step=20, max_bytes=first.nbytes - 1)
    assert err.value.reason == "too_large"
    assert read_student_card(redis_client, KEY) == first  # the previous publication is untouched


# --- refusals: each bad publication lands at step 20, after a good one at step 10 ------------------------------------

def other_teacher(card: TeacherCard, **changes) -> TeacherCard:
    return card.model_copy(update=changes)


def flip_a_weights_byte(client, card, step):
    publish(client, card, student(card, seed=3), step)
    weights = bytearray(client.hget(KEY, WEIGHTS_FIELD))
    weights[len(weights) // 2] ^= 0xFF
    client.hset(KEY, WEIGHTS_FIELD, bytes(weights))


def card_lies_about_size(client, card, step):
    publish(client, card, student(card, seed=3, cfg=LARGER), step, cfg=LARGER)
    lie = read_student_card(client, KEY).model_copy(update={"nbytes": 100})
    client.hset(KEY, CARD_FIELD, lie.model_dump_json())


def card_with(raw: bytes) -> Callable:
    def corrupt(client, card, step):
        publish(client, card, student(card, seed=3), step)
        client.hset(KEY, CARD_FIELD, raw)
    return corrupt


def weights_of_another_architecture(client, card, step):
    # A valid checksum over weights that do not fit the card's config: a publisher bug, caught at the strict load.
    publish(client, card, student(card, seed=3, cfg=TINY.model_copy(update={"depth": 1, "mhca_blocks": 0})), step)


BAD_PUBLICATIONS = {
    "fingerprint": lambda c, card, step: publish(c, other_teacher(card, fingerprint="0" * 64),
                                                 student(card, seed=3), step),
    "classes": lambda c, card, step: publish(c, other := other_teacher(card, num_classes=12),
                                             student(other, seed=3), step),
    "channels": lambda c, card, step: publish(c, other := other_teacher(card, in_chans=3),
                                              student(other, seed=3), step),
    "input_size": lambda c, card, step: publish(c, other := other_teacher(card, image_size=32),
                                                student(other, seed=3), step),
    "checksum": flip_a_weights_byte,
    "too_large": lambda c, card, step: publish(c, card, student(card, seed=3, cfg=LARGER), step, cfg=LARGER),
    "too_large (card says small)": card_lies_about_size,
    "malformed (not JSON)": card_with(b"{not json"),
    "malformed (extra field)": card_with(b'{"step": 20, "pickle": "yes"}'),
    "weights": weights_of_another_architecture,
}


@pytest.mark.parametrize("case", list(BAD_PUBLICATIONS))
def test_a_refused_publication_is_counted_and_logged_once_and_the_old_student_stays(case, redis_client,
                                                                                     redis_server, teacher):
    reason = case.split(" ")[0]
    card = teacher.card
    good = student(card, seed=1)
    tiny_bytes = publish(redis_client, card, good, step=10).nbytes
    max_bytes = 2 * tiny_bytes  # TINY fits, LARGER does not
    fb, rec, metrics = feedback_for(redis_server.url, card, max_bytes=max_bytes)
    assert fb.poll_once().step == 10 and len(rec.students) == 1

    BAD_PUBLICATIONS[case](redis_client, card, 20)
    with pytest.raises(StudentChannelError) as err:
        load_published_student(redis_client, KEY, card, max_bytes)
    assert err.value.reason == reason, err.value
    assert str(err.value) and err.value.publication

    for _ in range(3):
        assert fb.poll_once() is None
    assert refused(metrics, reason) == 1
    assert sum(refused(metrics, r) for r in {c.split(" ")[0] for c in BAD_PUBLICATIONS}) == 1
    assert [line for line in rec.lines if "refused" in line or "validate" in line] == [rec.lines[-1]]
    # Nothing half-loaded: the step-10 student is still the one in use.
    assert len(rec.students) == 1 and fb.card.step == 10 and metrics.student.step._value.get() == 10

    publish(redis_client, card, student(card, seed=4), step=30)  # a good one after it still gets through
    assert fb.poll_once().step == 30 and len(rec.students) == 2 and refused(metrics, reason) == 1
    fb.stop()


# --- the service's poller --------------------------------------------------------------------------------------------

def test_poller_loads_each_newer_student_once(redis_client, redis_server, teacher):
    card = teacher.card
    fb, rec, metrics = feedback_for(redis_server.url, card)
    assert fb.poll_once() is None and rec.students == []  # nothing published yet
    assert metrics.student.step._value.get() == -1

    first = student(card, seed=1)
    publish(redis_client, card, first, step=10)
    assert fb.poll_once().step == 10
    assert len(rec.students) == 1 and same_outputs(first, rec.students[0][0], card)
    assert fb.poll_once() is None and fb.poll_once() is None and len(rec.students) == 1
    assert metrics.student.step._value.get() == 10 and metrics.student_loads._value.get() == 1

    # The same student published again (the trainer restarted at that step): nothing to swap.
    publish(redis_client, card, first, step=10)
    assert fb.poll_once() is None and len(rec.students) == 1

    second = student(card, seed=2)
    published = publish(redis_client, card, second, step=20, stage=2)
    assert fb.poll_once() == published and len(rec.students) == 2
    model, got = rec.students[1]
    assert got.step == 20 and got.stage == 2 and same_outputs(second, model, card)
    assert metrics.student.step._value.get() == 20 and metrics.student_loads._value.get() == 2
    assert metrics.student.published._value.get() == published.published_at
    assert 0 <= metrics.student.age.collect()[0].samples[0].value < 60
    assert sum(s.value for m in metrics.student_refused.collect() for s in m.samples
               if s.name.endswith("_total")) == 0
    fb.stop()


def test_poller_survives_a_redis_outage_and_logs_it_once(teacher):
    port = free_loopback_port()
    fb, rec, metrics = feedback_for(f"redis://127.0.0.1:{port}/0", teacher.card)
    for _ in range(3):
        assert fb.poll_once() is None
    assert len([line for line in rec.lines if "unreachable" in line]) == 1 and len(rec.lines) == 1
    assert sum(s.value for m in metrics.student_refused.collect() for s in m.samples
               if s.name.endswith("_total")) == 0
    with RedisServer(port=port) as server:  # Redis comes back: the next poll finds the student
        model = student(teacher.card, seed=1)
        client = connect_redis(server.url)
        publish(client, teacher.card, model, step=7)
        assert fb.poll_once().step == 7 and "reachable again" in rec.lines[1]
        assert same_outputs(model, rec.students[0][0], teacher.card)
        client.close()
        fb.stop()


def test_a_student_the_synthesizer_rejects_is_counted_once(redis_client, redis_server, teacher):
    rec, metrics = Recorder(), SynthMetrics()

    def reject(model, card):
        raise ValueError("not now")

    fb = StudentFeedback(settings_for(redis_server.url), teacher.card, metrics, reject, log=rec.log)
    publish(redis_client, teacher.card, student(teacher.card, seed=1), step=10)
    for _ in range(3):
        assert fb.poll_once() is None
    assert refused(metrics, "rejected") == 1 and len(rec.lines) == 1 and "not now" in rec.lines[0]
    assert fb.card is None and metrics.student.step._value.get() == -1
    fb.stop()


def test_the_thread_polls_and_stops_promptly(redis_client, redis_server, teacher):
    publish(redis_client, teacher.card, student(teacher.card, seed=1), step=10)
    fb, rec, metrics = feedback_for(redis_server.url, teacher.card, poll_s=60.0)
    fb.start()
    deadline = time.monotonic() + 10
    while not rec.students and time.monotonic() < deadline:  # the first poll runs at once
        time.sleep(0.02)
    assert [c.step for _, c in rec.students] == [10]
    started = time.perf_counter()
    fb.stop()
    assert time.perf_counter() - started < 2, "stop() waited for the 60 s poll interval"
    assert fb._thread is None


def test_the_service_side_builds_the_student_without_the_trainer():
    code = ("import sys, synth_service.student_feedback; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'trainer'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout


def test_feedback_without_redis_is_a_clear_error(teacher):
    with pytest.raises(Exception, match="stream.redis_url"):
        StudentFeedback(settings_for(None), teacher.card, SynthMetrics(), lambda m, c: None)


# --- the trainer's side ----------------------------------------------------------------------------------------------

def test_publisher_schedule_and_failures_do_not_stop_training(teacher):
    port = free_loopback_port()  # nothing listens: every publication fails
    metrics, lines = TrainerMetrics(), []
    settings = settings_for(f"redis://127.0.0.1:{port}/0", publish_every=8)
    pub = StudentPublisher.from_settings(settings, TINY.for_teacher(teacher.card), teacher.card, metrics,
                                         lines.append)
    assert [s for s in range(1, 21) if pub.due(s, stage_switch=s == 10)] == [8, 10, 16]
    model = student(teacher.card, seed=1)
    assert pub.publish(model, 8, 1) is None and pub.publish(model, 16, 1) is None
    assert len(lines) == 1 and "not published" in lines[0]  # one line per outage
    assert metrics.student_publish_failures._value.get() == 2 and pub.last_step is None
    assert metrics.student.step._value.get() == -1
    pub.close()
    disabled = settings.model_copy(update={"feedback": FeedbackConfig(enabled=False)})
    assert StudentPublisher.from_settings(disabled, TINY, teacher.card, metrics, lines.append) is None


def test_publisher_sets_its_metrics(redis_server, teacher):
    metrics = TrainerMetrics()
    pub = StudentPublisher.from_settings(settings_for(redis_server.url), TINY, teacher.card, metrics, print)
    card = pub.publish(student(teacher.card, seed=1), 12, 1)
    assert card.step == 12 and pub.last_step == 12
    assert metrics.student.step._value.get() == 12
    assert metrics.student.published._value.get() == card.published_at
    assert 0 <= metrics.student.age.collect()[0].samples[0].value < 60
    assert read_student_card(pub.client, "dfkd:fb:student") == card
    pub.close()


def training_settings(tmp_path, teacher, url: str, enabled: bool) -> Settings:
    card = teacher.card
    store = tmp_path / "store"
    rng = np.random.default_rng(0)
    SyntheticStore(store).put(WireBatch(
        batch_id="b-0", sequence=0, producer_id="test", teacher_fingerprint=card.fingerprint, mean=card.mean,
        std=card.std, labels=rng.integers(0, 10, 32).tolist(),
        images=rng.integers(0, 256, (32, 1, 16, 16), dtype=np.uint8), synthesis=SynthesisRecord(seed=0)))
    return Settings.load("digits", device="cpu").model_copy(update={
        "student": TINY,
        "stream": StreamConfig(redis_url=url, run="fb"),
        "feedback": FeedbackConfig(enabled=enabled, publish_every=8),
        "dearkd": DearKDConfig(stage1_fraction=0.5, feature_pairs=[(1, 1)]),
        "train": TrainConfig(steps=20, batch_size=8, warmup_steps=2, log_every=10, eval_every=1000,
                             checkpoint_every=1000, out_dir=tmp_path / "run", store_dir=store)})


def hset_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_hset", {}).get("calls", 0))


@pytest.mark.parametrize("enabled", [True, False])
def test_training_publishes_its_student(enabled, redis_client, redis_server, teacher, tmp_path):
    settings = training_settings(tmp_path, teacher, redis_server.url, enabled)
    redis_client.config_resetstat()
    lines: list[str] = []
    summary = run_training(settings, teacher, log=lines.append)
    assert summary["step"] == 20
    card = read_student_card(redis_client, KEY)
    if not enabled:
        assert card is None and hset_calls(redis_client) == 0
        return
    # Steps 8 and 16 (every 8), 10 (the stage switch), 20 (the end): four publications, the last one kept.
    assert hset_calls(redis_client) == 4
    assert (card.step, card.stage, card.teacher_fingerprint) == (20, 2, teacher.card.fingerprint)
    assert not [line for line in lines if "not published" in line]
    # The published student is the trained one: the same outputs as the final weights on disk.
    trained = create_student(TINY.for_teacher(teacher.card))
    load_weights(trained, tmp_path / "run" / "student.safetensors")
    loaded, _ = load_published_student(redis_client, KEY, teacher.card, MAX_BYTES)
    assert same_outputs(trained, loaded, teacher.card)
