"""`dfkd teacher train` resumes an interrupted run from its epoch checkpoint and ends with the very weights of an
uninterrupted run; a checkpoint of another recipe is kept aside, not resumed. Also the per-architecture recipes of
the CPU teacher and verifier, and bf16 autocast on the CPU."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.config import DataConfig, TeacherRecipe
from shared.weights import read_state_dict
from shared.teacher import TeacherCard
from trainer.teacher_resume import load_progress, save_progress
from trainer.teacher_train import bf16_autocast, train_teacher

RECIPE = TeacherRecipe(dataset="digits", arch="digits_cnn_small", epochs=3, batch_size=128)


class Interrupt(Exception):
    pass


def stop_at(epoch: int):
    def log(message: str) -> None:
        if message.startswith(f"epoch {epoch}/"):
            raise Interrupt
    return log


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    data = DataConfig()
    train_teacher(RECIPE, data, tmp_path / "whole", name="t", log=lambda m: None)

    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        train_teacher(RECIPE, data, out, name="t", log=stop_at(3))  # after epoch 2's checkpoint, inside epoch 3
    progress = out / "t.progress.safetensors"
    with safe_open(str(progress), framework="pt") as f:
        assert f.metadata()["epoch"] == "2"
    messages = []
    train_teacher(RECIPE, data, out, name="t", log=messages.append)
    assert any(m.startswith("resuming after epoch 2/3") for m in messages)
    assert not progress.exists()  # removed once the teacher is written
    whole, resumed = (read_state_dict(d / "t.safetensors") for d in (tmp_path / "whole", out))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_checkpoint_of_another_recipe_is_not_resumed(tmp_path):
    data = DataConfig()
    with pytest.raises(Interrupt):
        train_teacher(RECIPE, data, tmp_path, name="t", log=stop_at(2))
    progress = tmp_path / "t.progress.safetensors"
    assert progress.is_file()
    old = progress.read_bytes()
    messages = []
    train_teacher(RECIPE.model_copy(update={"lr": 1e-3}), data, tmp_path, name="t", log=messages.append)
    assert not any(m.startswith("resuming") for m in messages)
    aside = tmp_path / "t.progress.previous.safetensors"
    assert aside.read_bytes() == old  # kept whole, not overwritten by the new run's epochs
    assert any("lr 0.003 -> 0.001" in m and str(aside) in m for m in messages), messages


def test_resnet20_has_its_cpu_recipe_on_cifar10():
    r = TeacherRecipe(dataset="cifar10", arch="resnet20").resolved()
    assert (r.epochs, r.label_smoothing, r.optimizer, r.channels_last, r.amp, r.refit) == \
        (52, 0.1, "sgd", True, "bf16", True)
    assert TeacherRecipe(dataset="cifar10", arch="vgg7_gn").resolved().amp == "bf16"
    assert TeacherRecipe(dataset="digits").resolved().amp == "auto"
    assert not TeacherRecipe(dataset="digits").resolved().refit
    assert TeacherRecipe(dataset="cifar10", arch="resnet20", epochs=2).resolved().epochs == 2  # flags still win
    assert TeacherRecipe(dataset="cifar10").resolved().arch == "wrn_40_2"


def test_bf16_autocast_on_the_cpu_only_when_asked_and_native(tmp_path, monkeypatch):
    messages = []
    cpu = torch.device("cpu")
    assert not bf16_autocast("auto", cpu, messages.append) and not bf16_autocast("off", cpu, messages.append)
    assert bf16_autocast("auto", torch.device("cuda"), messages.append)
    assert not bf16_autocast("off", torch.device("cuda"), messages.append)
    assert bf16_autocast("bf16", cpu, messages.append) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert not messages
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not bf16_autocast("bf16", cpu, messages.append)
    assert messages == ["amp=bf16: this CPU has no native bf16 (avx512_bf16 or AMX), so the teacher trains in fp32"]


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no native bf16")
def test_a_bf16_teacher_learns_as_well_as_fp32_and_its_card_says_so(tmp_path):
    scores = {}
    for amp in ("off", "bf16"):
        _, card_path = train_teacher(RECIPE.model_copy(update={"amp": amp, "epochs": 8}), DataConfig(),
                                     tmp_path / amp, name="t", log=lambda m: None)
        card = TeacherCard.read(card_path)
        assert card.recipe["amp"] == amp and card.recipe["autocast"] == ("bf16" if amp == "bf16" else "fp32")
        scores[amp] = card.metrics["val_top1"]
    assert scores["off"] > 0.8 and abs(scores["bf16"] - scores["off"]) < 0.05, scores


def test_the_test_limit_does_not_stop_a_resume(tmp_path):
    """It only changes the evaluation; an older progress file, whose key still holds it, resumes too."""
    data = DataConfig()
    with pytest.raises(Interrupt):
        train_teacher(RECIPE, data, tmp_path, name="t", log=stop_at(3))
    progress = tmp_path / "t.progress.safetensors"
    with safe_open(str(progress), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert "test_limit" not in json.loads(meta["recipe"])
    save_file(tensors, str(progress), metadata=meta | {
        "recipe": json.dumps(json.loads(meta["recipe"]) | {"test_limit": None}, sort_keys=True)})
    messages = []
    _, card_path = train_teacher(RECIPE.model_copy(update={"test_limit": 100}), data, tmp_path, name="t",
                                 log=messages.append)
    assert any(m.startswith("resuming after epoch 2/3") for m in messages), messages
    card = TeacherCard.read(card_path)
    assert card.metrics["test_images"] == 100 and card.recipe["test_limit"] == 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_resume_on_cuda_leaves_adamw_step_on_the_cpu(tmp_path):
    """load_state_dict moves each optimiser value to its parameter's device, but keeps AdamW's step on the CPU."""
    def objects():
        model = torch.nn.Linear(4, 3).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=10)

    model, opt, sched = objects()
    model(torch.randn(2, 4, device="cuda")).sum().backward()
    opt.step()
    sched.step()
    path, gen = tmp_path / "p.safetensors", torch.Generator().manual_seed(0)
    save_progress(path, model, opt, sched, gen, 1, {"k": 1}, 0.0)
    model, opt, sched = objects()
    assert load_progress(path, model, opt, sched, gen, {"k": 1}) == (1, 0.0)
    state = opt.state[model.weight]
    assert state["step"].device.type == "cpu" and state["exp_avg"].device.type == "cuda"
    model(torch.randn(2, 4, device="cuda")).sum().backward()
    opt.step()  # the resumed optimiser steps
    assert float(state["step"]) == 2.0
