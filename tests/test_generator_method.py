"""The `generator` synthesis method behind the `Synthesizer` interface: registry, loops, serving by a forward pass,
private copies for requests, the noisy layer, the BN-statistics blend, and a checkpoint a restart resumes from."""
import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from shared.config import Settings
from shared.errors import DfkdError, InvalidRequestError
from shared.teacher import Teacher
from synth_service.bn_hooks import BNStatsHooks
from synth_service.engine import InversionEngine
from synth_service.generator_method import GeneratorSynthesizer
from synth_service.generator_net import ClassConditionalGenerator, slot_of_each_label, upsampling_stages
from synth_service.synthesizer import create_synthesizer, synthesis_methods

SMALL = {"width": 8, "embed_dim": 16, "noise_dim": 16, "steps": 3, "warmup_steps": 6}


def generator_settings(**generator) -> Settings:
    return Settings.load("digits", device="cpu", synth={"method": "generator", "batch_size": 20,
                                                        "generator": SMALL | generator})


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_methods_are_registered_by_name(digits_teacher):
    assert synthesis_methods() == ["di", "generator"]
    di = Settings.load("digits", device="cpu")
    with create_synthesizer(digits_teacher, di.synth) as engine:
        assert isinstance(engine, InversionEngine) and engine.describe()["method"] == "di"
    rng = torch.get_rng_state()
    with create_synthesizer(digits_teacher, generator_settings().synth) as engine, \
            create_synthesizer(digits_teacher, generator_settings().synth) as twin:
        assert isinstance(engine, GeneratorSynthesizer) and engine.describe()["method"] == "generator"
        assert torch.equal(torch.get_rng_state(), rng)  # seeded from its own stream, not the process's RNG
        assert all(torch.equal(a, b) for a, b in zip(engine.generator.state_dict().values(),
                                                     twin.generator.state_dict().values()))
    with pytest.raises(ValueError, match="method"):
        Settings.load("digits", synth={"method": "gan"})


def test_the_seed_sets_the_initial_weights(digits_teacher):
    with create_synthesizer(digits_teacher, generator_settings(seed=0).synth) as a, \
            create_synthesizer(digits_teacher, generator_settings(seed=1).synth) as b:
        assert not torch.equal(a.generator.project.weight, b.generator.project.weight)


def test_memory_pushes_new_images_away_from_recent_ones(digits_teacher):
    with create_synthesizer(digits_teacher, generator_settings(memory=30, memory_weight=5.0).synth) as g:
        g.warm_up()  # two loops of 20: the memory holds the last 30 images' features
        features, labels = g._memory
        assert len(features) == len(labels) == 30
        result = g.synthesize(list(range(10)) * 2, seed=1)
        assert features.shape[1] == result.features.shape[1]
        assert all(v < 0 for v in result.history["memory"])  # a live term: minus a squared distance
        assert torch.equal(g._memory[0][-20:], result.features)  # the newest batch joined it, the oldest left
    with create_synthesizer(digits_teacher, generator_settings(memory=0).synth) as g:  # off
        result = g.synthesize(list(range(10)) * 2, seed=1)
        assert result.history["memory"] == [0.0] * 3 and len(g._memory[1]) == 0


def test_upsampling_stages_reach_every_input_size():
    assert upsampling_stages(16) == (2, 4) and upsampling_stages(32) == (2, 8)
    assert upsampling_stages(224) == (5, 7) and upsampling_stages(299) == (6, 5)
    cfg = generator_settings().synth.generator
    for size in (16, 32, 224):
        g = ClassConditionalGenerator(10, 3, size, cfg)
        g.redraw_noise(2, torch.Generator().manual_seed(0))
        assert g(torch.tensor([0, 1, 1])).shape == (3, 3, size, size)


def test_noisy_layer_gives_each_image_of_a_class_its_own_code():
    y = torch.tensor([3, 3, 1, 3, 1])
    assert slot_of_each_label(y).tolist() == [0, 1, 0, 2, 1]
    g = ClassConditionalGenerator(10, 1, 16, generator_settings().synth.generator)
    g.redraw_noise(3, torch.Generator().manual_seed(0))
    codes = g.code(y)
    assert not torch.allclose(codes[0], codes[1]) and not torch.allclose(codes[0], codes[3])
    with pytest.raises(ValueError, match="slots"):
        g.code(torch.tensor([2, 2, 2, 2]))


def test_a_loop_trains_the_shared_generator_and_emits_labelled_images(digits_teacher):
    with create_synthesizer(digits_teacher, generator_settings().synth) as g:
        assert not g.warm
        result = g.synthesize(list(range(10)) * 2, seed=1)
        assert g.warm and g.steps_trained == 6 + 3 and g.loops == 2 + 1  # warm-up loops, then this one
        assert result.images.shape == (20, 1, 16, 16) and result.images.dtype == torch.uint8
        assert result.labels.tolist() == list(range(10)) * 2 and result.iterations == 3
        assert len(result.history["loss"]) == 3 and result.phases == [(16, 3)]
        assert g.describe()["warm"] is True and g.describe()["warmup_seconds"] > 0


def test_requests_run_on_a_copy_and_zero_steps_is_a_forward(digits_teacher):
    with create_synthesizer(digits_teacher, generator_settings(serve_steps=0).synth) as g:
        g.warm_up()
        loops = g.loops
        before = {k: v.clone() for k, v in g.generator.state_dict().items()}
        assert g.request_iterations(None) == 0  # HTTP requests are served by a forward pass
        forward = g.synthesize([3, 3, 3, 3], seed=0, iterations=0)
        refined = g.synthesize([3, 3, 3, 3], seed=0, iterations=2)
        after = g.generator.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # requests never train the shared generator
        assert forward.iterations == 0 and forward.history["loss"] == [] and refined.iterations == 2
        assert g.loops == loops  # requests on copies are not loops of the shared generator
        with pytest.raises(InvalidRequestError, match=">= 0"):
            g.request_iterations(-1)
    di = Settings.load("digits", device="cpu")
    with create_synthesizer(digits_teacher, di.synth) as engine:
        with pytest.raises(InvalidRequestError, match=">= 1"):
            engine.request_iterations(0)


def test_checkpoint_resumes_warm_and_refuses_a_foreign_one(digits_teacher, tmp_path):
    path = tmp_path / "generator.safetensors"
    s = generator_settings(checkpoint=path, checkpoint_every=1)
    with create_synthesizer(digits_teacher, s.synth) as g:
        g.synthesize(list(range(10)) * 2, seed=0)
        state = {k: v.clone() for k, v in g.generator.state_dict().items()}
        loops, steps = g.loops, g.steps_trained
    assert path.is_file() and not path.with_name(path.name + ".tmp").exists()
    with create_synthesizer(digits_teacher, s.synth) as again:
        assert again.warm and (again.loops, again.steps_trained) == (loops, steps)
        assert all(torch.equal(state[k], v) for k, v in again.generator.state_dict().items())
        forward = again.synthesize(list(range(10)), seed=0, iterations=0)  # no warm-up: served at once
        assert again.loops == loops and forward.images.shape[0] == 10
    other = Teacher(digits_teacher.model, digits_teacher.card.model_copy(update={"fingerprint": "0" * 64}))
    with pytest.raises(DfkdError, match="another teacher"):
        create_synthesizer(other, s.synth)
    assert hooks_left(digits_teacher.model) == 0  # a refused checkpoint leaves no hooks behind
    with pytest.raises(DfkdError, match="generator shape"):
        create_synthesizer(digits_teacher, generator_settings(checkpoint=path, width=12).synth)
    assert hooks_left(digits_teacher.model) == 0
    path.write_bytes(b"not safetensors")
    with pytest.raises(DfkdError, match="not a readable safetensors"):
        create_synthesizer(digits_teacher, s.synth)


def test_the_checkpoint_keeps_the_memory_and_older_checkpoints_still_load(digits_teacher, tmp_path):
    path = tmp_path / "generator.safetensors"
    s = generator_settings(checkpoint=path, memory=30)
    with create_synthesizer(digits_teacher, s.synth) as g:
        g.synthesize(list(range(10)) * 2, seed=0)  # two warm-up loops and one more: 60 images, the last 30 kept
        features, labels = (t.clone() for t in g._memory)
        loops = g.loops
    assert len(labels) == 30
    with create_synthesizer(digits_teacher, s.synth) as again:  # the restarted service pushes away from them at once
        assert torch.equal(again._memory[0], features) and torch.equal(again._memory[1], labels)
    with create_synthesizer(digits_teacher, generator_settings(checkpoint=path, memory=10).synth) as fewer:
        assert torch.equal(fewer._memory[0], features[-10:]) and torch.equal(fewer._memory[1], labels[-10:])
    with create_synthesizer(digits_teacher, generator_settings(checkpoint=path, memory=0).synth) as off:
        assert len(off._memory[1]) == 0
    with safe_open(str(path), framework="pt") as f:  # a checkpoint written before the memory was saved
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if not k.startswith("memory.")}
    save_file(state, str(path), metadata=meta)
    with create_synthesizer(digits_teacher, s.synth) as old:
        assert old.loops == loops and old.warm and len(old._memory[1]) == 0


def test_bn_blend_mixes_running_statistics_of_earlier_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval()
    hooks = BNStatsHooks(model, torch.randn(2, 1, 4, 4), blend=0.5)
    a, b = torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4) + 3
    model(a)
    first = hooks.pop()
    model(b)
    second = hooks.pop()
    blend = hooks.frozen()
    model(b)
    unblended = hooks.pop()
    hooks.unfreeze(blend)
    assert blend == 0.5 and not torch.allclose(second, unblended)  # b alone is far from the running stats
    assert second < unblended  # half of a's statistics pull the blend back towards them
    hooks.reset_blend()
    model(b)
    assert torch.allclose(hooks.pop(), unblended)
    assert first.shape == (1,)
    hooks.remove()
    with pytest.raises(ValueError, match="blend"):
        BNStatsHooks(model, blend=1.0)


def test_competition_waits_for_a_fed_back_student(digits_teacher):
    s = generator_settings().synth.model_copy(update={"competition": 1.0})
    with pytest.raises(InvalidRequestError, match="needs a student"):
        create_synthesizer(digits_teacher, s)
    with create_synthesizer(digits_teacher, s, student_optional=True) as g:
        first = g.synthesize(list(range(10)) * 2, seed=0)
        assert set(first.history["competition"]) == {0.0}  # no student yet: no adversarial term
        student = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
        g.set_student(student, {"step": 7})
        second = g.synthesize(list(range(10)) * 2, seed=1)
        assert any(v != 0.0 for v in second.history["competition"]) and g.describe()["student_step"] == 7


def test_a_restarted_service_resumes_the_generator_warm(digits_teacher, tmp_path):
    """Real HTTP over a socket: the first service warms the generator up and saves it at shutdown; the second one
    loads it, serves at once, and reports the same loops instead of warming up again."""
    import httpx

    from live_server import LiveServer
    from synth_service.app import create_app

    path = tmp_path / "generator.safetensors"
    s = generator_settings(checkpoint=path).model_copy(update={"teacher": None})
    body = {"class_ids": [3, 7], "per_class": 2, "format": "npz"}
    with LiveServer(create_app(s, digits_teacher)) as first:
        assert httpx.post(f"{first.url}/v1/images", json=body, timeout=120).status_code == 200
        before = httpx.get(f"{first.url}/v1/info", timeout=10).json()["method"]
        assert before["warm"] and before["loops"] >= 2 and before["warmup_seconds"] > 0
    assert path.is_file()  # saved at shutdown
    with LiveServer(create_app(s, digits_teacher)) as second:
        after = httpx.get(f"{second.url}/v1/info", timeout=10).json()["method"]
        assert after["warm"] and after["loops"] == before["loops"]
        assert after["steps_trained"] == before["steps_trained"]
        assert httpx.post(f"{second.url}/v1/images", json=body, timeout=120).status_code == 200
        served = httpx.get(f"{second.url}/v1/info", timeout=10).json()["method"]
        # One loop of K = 3 steps for the request (serve_steps defaults to steps), no second warm-up.
        assert served["loops"] == before["loops"] + 1 and served["steps_trained"] == before["steps_trained"] + 3
