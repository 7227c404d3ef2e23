"""Model registry, weight files (no unpickling), fingerprints and teacher cards."""
from __future__ import annotations

import pickle

import pytest
import torch

from shared.errors import UnknownModelError, WeightsError
from shared.models import create_model, is_model, list_models
from shared.teacher import TeacherCard, load_teacher, resolve_teacher
from shared.weights import fingerprint, load_weights, read_state_dict, save_weights

PROJECT_MODELS = list_models()


def test_the_registry_holds_the_project_models():
    assert {"digits_cnn", "digits_cnn_small", "digits_lenet", "resnet8", "resnet20", "resnet18_cifar",
            "resnet34_cifar", "wrn_40_2", "wrn_16_2", "vgg7_gn"} <= set(PROJECT_MODELS)


def test_the_cifar_verifier_has_no_batchnorm_for_an_inversion_to_fit():
    model = create_model("vgg7_gn", num_classes=10)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.GroupNorm in kinds and not any(issubclass(k, torch.nn.modules.batchnorm._BatchNorm) for k in kinds)


@pytest.mark.parametrize("name", PROJECT_MODELS)
def test_every_project_model_follows_the_head_protocol(name):
    in_chans, size = (1, 16) if name.startswith("digits") or name.endswith("_16") else (3, 32)
    model = create_model(name, num_classes=7, in_chans=in_chans).eval()
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        logits = model(x)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.allclose(model.get_classifier()(pre), logits, atol=1e-5)
        # timm's intermediates protocol (what ScaleKD reads): two NCHW maps, and final features for the head.
        final, maps = model.forward_intermediates(x, indices=2)
        assert torch.allclose(model.forward_head(final), logits, atol=1e-5)
    assert logits.shape == (2, 7) and pre.shape == (2, model.num_features)
    assert len(maps) == 2 and all(m.ndim == 4 and len(m) == 2 for m in maps)


@pytest.mark.parametrize("name,params", [("resnet18_cifar", 11_173_962), ("wrn_40_2", 2_243_546),
                                         ("wrn_16_2", 691_674), ("resnet34_cifar", 21_282_122),
                                         ("resnet20", 272_474), ("resnet8", 78_042)])
def test_cifar_nets_have_the_standard_sizes(name, params):
    assert sum(p.numel() for p in create_model(name, num_classes=10).parameters()) == params


def test_cifar_resnet_depth_must_be_6n_plus_2():
    from shared.models.cifar_resnet import _thin_resnet
    assert len(_thin_resnet(32, 10, 3).stages[0]) == 5
    for depth in (21, 2):
        with pytest.raises(ValueError, match="6n\\+2"):
            _thin_resnet(depth, 10, 3)


def test_timm_models_by_name():
    assert is_model("resnet50") and is_model("wrn_40_2") and not is_model("resnet_5000")
    model = create_model("resnet18", num_classes=3).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(UnknownModelError, match=r"unknown model 'wrn_40_3'.*Did you mean.*wrn_40_2"):
        create_model("wrn_40_3", num_classes=10)


def test_weights_round_trip_and_fingerprint_is_format_independent(tmp_path):
    model = create_model("digits_cnn_small", num_classes=10, in_chans=1)
    save_weights(model, tmp_path / "w.safetensors")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "ddp.pth")
    prints = set()
    for f in ("w.safetensors", "w.pt", "ddp.pth"):
        other = create_model("digits_cnn_small", num_classes=10, in_chans=1)
        prints.add(fingerprint(load_weights(other, tmp_path / f)))
        assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    assert prints == {fingerprint(model.state_dict())}
    assert fingerprint(create_model("digits_cnn_small", 10, 1).state_dict()) not in prints


class _Payload:
    def __reduce__(self):
        return (print, ("code ran during unpickling",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"weight": _Payload()}, fh)
    with pytest.raises(WeightsError, match="cannot read weights"):
        read_state_dict(path)


def test_missing_file_and_mismatched_weights_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found"):
        read_state_dict(tmp_path / "nope.safetensors")
    save_weights(create_model("digits_cnn_small", num_classes=10, in_chans=1), tmp_path / "small.safetensors")
    with pytest.raises(WeightsError, match=r"do not fit DigitsCNN: shape mismatch: fc\.weight: file \(10, 48\) vs model \(10, 128\)"):
        load_weights(create_model("digits_cnn", num_classes=10, in_chans=1), tmp_path / "small.safetensors")
    with pytest.raises(WeightsError, match=r"missing: .*unexpected: "):
        load_weights(create_model("digits_lenet", num_classes=10, in_chans=1), tmp_path / "small.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(WeightsError, match="cannot read weights"):
        read_state_dict(tmp_path / "junk.safetensors")


def test_teacher_card_validation_and_fingerprint_check(digits_teacher, teacher_dir, tmp_path):
    card = digits_teacher.card
    assert card.metrics["test_top1"] > 0 and len(card.fingerprint) == 64
    with pytest.raises(ValueError, match="mean/std need 1 values"):
        TeacherCard(**(card.model_dump() | {"mean": (0.1, 0.2)}))
    with pytest.raises(ValueError, match="class names"):
        TeacherCard(**(card.model_dump() | {"class_names": ["a"]}))
    tampered = card.model_copy(update={"fingerprint": "0" * 64, "weights": str(teacher_dir / card.weights)})
    tampered.write(tmp_path / "tampered.json")
    with pytest.raises(WeightsError, match="fingerprint"):
        load_teacher(tmp_path / "tampered.json")
    with pytest.raises(WeightsError, match="teacher card not found"):
        resolve_teacher(tmp_path / "missing.json")
    with pytest.raises(UnknownModelError):
        resolve_teacher("no_such_teacher_net")
