"""`dfkd teacher train` resumes an interrupted run from its epoch checkpoint and ends with the very weights of an
uninterrupted run; a checkpoint of another recipe is ignored. Also the per-architecture recipe of the CPU teacher."""
import pytest
import torch
from safetensors import safe_open

from shared.config import DataConfig, TeacherRecipe
from shared.weights import read_state_dict
from trainer.teacher_train import train_teacher

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
    messages = []
    train_teacher(RECIPE.model_copy(update={"lr": 1e-3}), data, tmp_path, name="t", log=messages.append)
    assert not any(m.startswith("resuming") for m in messages)


def test_resnet20_has_its_cpu_recipe_on_cifar10():
    r = TeacherRecipe(dataset="cifar10", arch="resnet20").resolved()
    assert (r.epochs, r.label_smoothing, r.optimizer, r.channels_last) == (32, 0.1, "sgd", True)
    assert TeacherRecipe(dataset="cifar10", arch="resnet20", epochs=2).resolved().epochs == 2  # flags still win
    assert TeacherRecipe(dataset="cifar10").resolved().arch == "wrn_40_2"
