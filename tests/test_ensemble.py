"""Teacher ensembles (LIB-KD): members checked at load, their logits computed once per view, and the trainer's
stored-logit path: the logits it distils are those of a fresh forward on the very view it trains on, and no teacher
runs for them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from safetensors.torch import load_file

from shared.config import DearKDConfig, StudentConfig, TrainConfig
from shared.data.digits import load_digits_split
from shared.data.splits import unit_to_uint8
from shared.ensemble import Ensemble, EnsembleError
from shared.teacher import Teacher
from shared.wire import LOGIT_VIEWS, SynthesisRecord, WireBatch
from trainer.augment import Augment
from trainer.engine import DearKDTrainer
from shared.models.dearkd_student import block_outputs, create_student
from trainer.losses import distillation_token_loss, ensemble_target
from trainer.metrics import TrainerMetrics
from trainer.store import FreshFirstSampler, SyntheticStore
from trainer.training import _synthetic_source

TINY = StudentConfig(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2,
                     mlp_ratio=1.0, mhca_blocks=1)


@pytest.fixture(scope="module")
def pair(digits_teacher, digits_verifier) -> Ensemble:
    """The conv teacher and an independent LeNet: two architectures, two normalisations, the same classes."""
    ensemble = Ensemble([digits_teacher, digits_verifier])
    ensemble.check()
    return ensemble


@pytest.fixture(scope="module")
def digit_pixels() -> torch.Tensor:
    return unit_to_uint8(load_digits_split(16).x_val[:48])


def renamed(teacher: Teacher, **card) -> Teacher:
    return Teacher(teacher.model, teacher.card.model_copy(update=card))


def test_members_must_classify_the_same_images(digits_teacher, digits_verifier, tmp_path):
    for change, message in (({"image_size": 8}, "input size 8"), ({"num_classes": 9}, "classes 9"),
                            ({"in_chans": 3}, "channels 3")):
        with pytest.raises(EnsembleError, match=message):
            Ensemble([digits_teacher, Teacher(digits_verifier.model, digits_verifier.card.model_construct(
                **(digits_verifier.card.model_dump() | change)))]).check()
    names = list(reversed(digits_verifier.card.class_names))
    with pytest.raises(EnsembleError, match="names its classes differently"):
        Ensemble([digits_teacher, renamed(digits_verifier, class_names=names)]).check()
    with pytest.raises(EnsembleError, match="same weights as"):
        Ensemble([digits_teacher, renamed(digits_teacher, name="again")]).check()
    with pytest.raises(EnsembleError, match="cannot be loaded"):
        Ensemble.load(digits_teacher, [tmp_path / "missing.json"])


def test_member_logits_are_each_members_own_forward_on_each_view(pair, digit_pixels):
    logits = pair.logits(digit_pixels)
    assert logits.shape == (2, 2, 48, 10)
    for m, member in enumerate(pair.members):
        mean = torch.tensor(member.card.mean).view(1, -1, 1, 1)
        std = torch.tensor(member.card.std).view(1, -1, 1, 1)
        for v, pixels in enumerate((digit_pixels, digit_pixels.flip(3))):
            with torch.no_grad():
                want = member.model((pixels.float() / 255 - mean) / std)
            torch.testing.assert_close(logits[m, v], want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits[:, 0], logits[:, 1], atol=0.1)  # the views differ, so a mix-up shows


def test_averaged_soft_targets():
    logits = torch.randn(3, 5, 10)
    for t in (1.0, 4.0):
        target = ensemble_target(logits, t)
        torch.testing.assert_close(torch.softmax(target / t, 1), torch.softmax(logits / t, 2).mean(0))
    assert ensemble_target(logits[:1], 4.0) is not None and torch.equal(ensemble_target(logits[:1], 4.0), logits[0])


def stored_sample(pair: Ensemble, pixels: torch.Tensor, tmp_path, flip: bool = True):
    """The trainer's synthetic source over a store holding one batch with the ensemble's logits."""
    card = pair.members[0].card
    labels = pair.logits(pixels, ("identity",))[0, 0].argmax(1)
    store = SyntheticStore(tmp_path)
    store.put(WireBatch(batch_id="b-0", sequence=0, producer_id="p", teacher_fingerprint=card.fingerprint,
                        mean=tuple(card.mean), std=tuple(card.std), labels=labels.tolist(), images=pixels.numpy(),
                        synthesis=SynthesisRecord(seed=0), logits=pair.logits(pixels).half().numpy(),
                        logit_members=pair.fingerprints, logit_views=LOGIT_VIEWS))
    augment = Augment(card.mean, card.std, crop_padding=2, flip=flip)
    return _synthetic_source(store, FreshFirstSampler(store, 48), augment, TrainerMetrics(), print, 0,
                             pair.fingerprints)


def test_the_logits_used_match_a_fresh_forward_on_the_same_view(pair, digit_pixels, tmp_path):
    x, y, stored = stored_sample(pair, digit_pixels, tmp_path)(48)
    trainer = DearKDTrainer(TINY, DearKDConfig(), TrainConfig(steps=4), pair.members[0].model, ensemble=pair)
    fresh = trainer.online_logits(x)
    assert stored.shape == fresh.shape == (2, 48, 10)
    torch.testing.assert_close(stored, fresh, rtol=2e-3, atol=2e-2)  # fp16 on the wire
    # Both views were drawn, uncropped, and each image's logits are its own view's, not the other's.
    card = pair.members[0].card
    normalised = (digit_pixels.float() / 255 - torch.tensor(card.mean).view(1, -1, 1, 1)) / \
        torch.tensor(card.std).view(1, -1, 1, 1)
    is_flip = torch.tensor([not torch.allclose(x[i], normalised[i]) for i in range(48)])
    assert 0 < int(is_flip.sum()) < 48
    torch.testing.assert_close(x[is_flip], normalised[is_flip].flip(3))
    torch.testing.assert_close(x[~is_flip], normalised[~is_flip])
    assert not torch.allclose(stored[:, is_flip], trainer.online_logits(normalised[is_flip]), atol=0.1)


def test_no_teacher_runs_for_stored_logits(pair, digit_pixels, tmp_path):
    sample = stored_sample(pair, digit_pixels, tmp_path)
    trainer = DearKDTrainer(TINY, DearKDConfig(beta=0.0), TrainConfig(steps=3), pair.members[0].model,
                            ensemble=pair)
    calls = trainer.teacher_calls
    x, y, logits = sample(48)
    trainer.train_step(x, y, logits)
    assert trainer.teacher_calls == calls and trainer.online_logit_rows == 0
    # Early features stop the teacher after their last stage; real rows (no shipped logits) run every member.
    with_features = DearKDTrainer(TINY, DearKDConfig(beta=1.0, feature_pairs=[(1, 1)]), TrainConfig(steps=3),
                                  pair.members[0].model, ensemble=pair)
    real = torch.zeros(48, dtype=torch.bool)
    real[:5] = True
    terms = with_features.train_step(x, y, logits, real)
    assert float(terms["feature"]) > 0 and with_features.online_logit_rows == 5
    with pytest.raises(ValueError, match=r"expected \[2, 48, K\]"):
        with_features.train_step(x, y, logits[:1])


def test_online_and_stored_paths_reach_the_same_loss(pair, digit_pixels, tmp_path):
    """Stored logits are the online ones on the same view: the first step's KD term agrees."""
    x, y, logits = stored_sample(pair, digit_pixels, tmp_path)(48)
    losses = []
    for stored in (logits, None):
        torch.manual_seed(0)
        trainer = DearKDTrainer(TINY, DearKDConfig(kd="soft", temperature=4.0), TrainConfig(steps=3),
                                pair.members[0].model, ensemble=pair)
        losses.append(float(trainer.train_step(x, y, stored)["kd"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    np.testing.assert_array_less(0, losses)


def test_the_service_ships_every_members_logits_on_the_delivered_images(digits_settings, digits_teacher,
                                                                        verifier_card, redis_server, redis_client,
                                                                        digits_verifier):
    """Production with `ensemble: [verifier]`: each stream batch carries [2 members, 2 views, N, 10] fp16 logits,
    equal to each member's own forward on the uint8 images it carries."""
    import time

    import httpx

    from live_server import LiveServer
    from shared.stream import StreamProducer
    from shared.wire import BatchCodec
    from synth_service.app import create_app

    stream = digits_settings.stream.model_copy(update={"redis_url": redis_server.url, "run": "ensemble-test",
                                                       "max_backlog": 1000})
    service = digits_settings.service.model_copy(update={"max_batch": 20, "max_wait_ms": 50})
    synth = digits_settings.synth.model_copy(update={"iterations": 20})
    settings = digits_settings.model_copy(update={"stream": stream, "service": service, "synth": synth,
                                                  "ensemble": [verifier_card]})
    with LiveServer(create_app(settings, teacher=digits_teacher)) as live:
        deadline = time.monotonic() + 30
        while httpx.get(f"{live.url}/readyz").json()["redis"] != "ok":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        res = httpx.put(f"{live.url}/v1/production", json={"enabled": True, "per_class": 2, "target_images": 40})
        assert res.status_code == 200, res.text
        deadline = time.monotonic() + 180
        while httpx.get(f"{live.url}/v1/production").json()["images_produced"] < 40:
            assert time.monotonic() < deadline, "production did not reach its target"
            time.sleep(0.3)
    entries = redis_client.xrange(StreamProducer(redis_client, stream, "reader").stream_key)
    batches = [BatchCodec().decode([fields]) for _, fields in entries]
    assert sum(len(b.labels) for b in batches) == 40
    pair = Ensemble([digits_teacher, digits_verifier])
    for b in batches:
        assert b.logit_members == pair.fingerprints and b.logit_views == LOGIT_VIEWS
        assert b.synthesis.params["ensemble"] == pair.names and b.stats["logits_seconds"] > 0
        fresh = pair.logits(torch.from_numpy(b.images.copy()))
        torch.testing.assert_close(torch.from_numpy(b.logits.astype(np.float32)), fresh, rtol=2e-3, atol=2e-2)


def test_a_bad_ensemble_stops_the_service_at_start(digits_settings, digits_teacher, tmp_path):
    from synth_service.lifespan import stream_ensemble

    settings = digits_settings.model_copy(update={"ensemble": [tmp_path / "nowhere.json"]})
    with pytest.raises(EnsembleError, match="nowhere.json"):
        stream_ensemble(settings, digits_teacher, torch.device("cpu"))


@pytest.mark.parametrize("tokens", ["average", "per_teacher"])
def test_dfkd_train_distils_the_ensemble_without_running_it(digits_settings, digits_teacher, digits_verifier,
                                                            verifier_card, digit_pixels, tmp_path, tokens):
    """`run_training` with `ensemble` set (teacher_logits: auto -> stored) on a store of the ensemble's batches,
    stopped and resumed: no member runs for logits in either run; per_teacher gives the student two tokens."""
    from trainer.training import run_training

    pair = Ensemble([digits_teacher, digits_verifier])
    store = SyntheticStore(tmp_path / "store")
    card = digits_teacher.card
    for i in range(2):
        pixels = digit_pixels.roll(i, 0)
        store.put(WireBatch(batch_id=f"b-{i}", sequence=i, producer_id="p", teacher_fingerprint=card.fingerprint,
                            mean=tuple(card.mean), std=tuple(card.std),
                            labels=pair.logits(pixels, ("identity",))[0, 0].argmax(1).tolist(),
                            images=pixels.numpy(), synthesis=SynthesisRecord(seed=i),
                            logits=pair.logits(pixels).half().numpy(), logit_members=pair.fingerprints,
                            logit_views=LOGIT_VIEWS))
    train = digits_settings.train.model_copy(update=dict(steps=4, batch_size=16, warmup_steps=1, eval_every=100,
                                                         checkpoint_every=2, log_every=2, store_dir=tmp_path / "store",
                                                         out_dir=tmp_path / "out"))
    settings = digits_settings.model_copy(update={"ensemble": [verifier_card], "train": train,
                                                  "student": TINY.model_copy(update={"in_chans": None}),
                                                  "dearkd": digits_settings.dearkd.model_copy(
                                                      update={"ensemble_tokens": tokens})})
    first = run_training(settings.model_copy(update={"train": train.model_copy(update={"steps": 2})}),
                         digits_teacher, log=lambda m: None)
    assert first["step"] == 2 and first["online_logit_rows"] == 0 and first["ensemble"] == pair.names
    resumed = run_training(settings, digits_teacher, log=lambda m: None)
    assert resumed["step"] == 4 and resumed["online_logit_rows"] == 0
    weights = load_file(tmp_path / "out" / "student.safetensors")
    assert ("extra_dist_tokens" in weights) == (tokens == "per_teacher")


def test_one_distillation_token_per_teacher(pair, digit_pixels, tmp_path):
    """Co-advise: `per_teacher` builds a student with a token and head per member; each head distils its own
    member's logits, and every head votes at evaluation."""
    x, y, logits = stored_sample(pair, digit_pixels, tmp_path)(48)
    dearkd = DearKDConfig(kd="soft", temperature=4.0, ensemble_tokens="per_teacher", beta=0.0)
    torch.manual_seed(0)
    no_dropout = TINY.model_copy(update={"drop_path": 0.0, "mhca_dropout": 0.0})  # train mode = eval mode
    trainer = DearKDTrainer(no_dropout, dearkd, TrainConfig(steps=4), pair.members[0].model, ensemble=pair)
    assert trainer.student_cfg.dist_tokens == 2 and trainer.student.num_prefix_tokens == 3

    def forward():
        with torch.no_grad():
            return block_outputs(trainer.student.eval(), x, [])[1]

    cls_logits, dist_logits = forward()
    assert dist_logits.shape == (2, 48, 10)
    want = sum(distillation_token_loss(dist_logits[m], logits[m], "soft", 4.0) for m in range(2)) / 2
    assert float(trainer.train_step(x, y, logits)["kd"]) == pytest.approx(float(want), rel=1e-4)
    probs = trainer.predict(x[:4])
    cls_logits, dist_logits = forward()
    heads = torch.cat((cls_logits[None, :4], dist_logits[:, :4])).softmax(-1).mean(0)
    torch.testing.assert_close(probs, heads, rtol=1e-4, atol=1e-5)
    trainer.step = 3  # stage 2: every head learns the labels
    assert trainer.train_step(x, y)["stage"] == 2
    # A student built for another token count is refused, and one token stays the default.
    with pytest.raises(ValueError, match="dist_tokens is 3"):
        DearKDTrainer(TINY.model_copy(update={"dist_tokens": 3}), dearkd, TrainConfig(steps=4),
                      pair.members[0].model, ensemble=pair)
    assert DearKDTrainer(TINY, DearKDConfig(), TrainConfig(steps=4), pair.members[0].model,
                         ensemble=pair).student_cfg.dist_tokens == 1
    model = create_student(TINY.model_copy(update={"dist_tokens": 2})).eval()
    assert model(x[:3]).shape == (3, 10)
