"""timm teachers through the real inversion engine: CNN families run, unusable teachers are refused cleanly.

Random weights at small sizes: these check that synthesis runs and hooks are managed, not image quality.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from shared.config import SynthConfig
from shared.errors import InvalidRequestError
from shared.models import create_model
from shared.teacher import Teacher, TeacherCard, data_config, teacher_from_arch
from synth_service.bn_hooks import BNStatsHooks
from synth_service.engine import InversionEngine

CFG = SynthConfig(batch_size=4, iterations=2, lr=0.1, jitter=2, flip=True, diversity=1.0, boundary=1.0, margin=3.0)
LABELS = [0, 0, 3, 3]

# family: (timm name, input px). Each is the smallest of its family; sizes are what the stride allows.
FAMILIES = {
    "resnet": ("resnet10t", 32),
    "efficientnet": ("efficientnet_b0", 32),
    "mobilenetv3": ("mobilenetv3_small_050", 32),
    "regnet": ("regnetx_002", 32),
    "densenet": ("densenet121", 32),
    "repvgg": ("repvgg_a0", 32),
    "dla": ("dla46_c", 32),  # 1x1-conv classifier: logits come from forward_head
    "dpn": ("dpn48b", 32),  # 1x1-conv classifier, as dpn68
    "inception": ("inception_v3", 75),  # 75 px is its minimum
}


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def sized_teacher(arch: str, size: int) -> Teacher:
    """A timm model whose layers are built for `size` (ViT, LeViT), with a card from its pretrained_cfg."""
    model = create_model(arch, num_classes=4, img_size=size)
    cfg = data_config(model)
    card = TeacherCard(name=arch, arch=arch, num_classes=4, in_chans=3, image_size=size, mean=cfg["mean"],
                       std=cfg["std"], class_names=[str(i) for i in range(4)])
    return Teacher(model, card)


def check_synthesis(teacher: Teacher, size: int) -> None:
    with InversionEngine(teacher, CFG) as engine:
        r = engine.synthesize(LABELS, seed=0)
        assert hooks_left(teacher.model) == len(engine.objective._bn.layers)
    assert hooks_left(teacher.model) == 0
    assert r.images.shape == (4, 3, size, size) and r.images.dtype == torch.uint8
    assert all(math.isfinite(v) for v in r.history["loss"]) and len(r.history["loss"]) == 2
    assert torch.allclose(r.features.norm(dim=1), torch.ones(4), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_timm_cnn_family_synthesizes(family):
    arch, size = FAMILIES[family]
    check_synthesis(teacher_from_arch(arch, num_classes=4, image_size=size), size)


def test_levit_with_two_heads_and_batchnorm1d_synthesizes():
    """get_classifier() is a (head, head_dist) pair: logits come from forward_head, features from pre_logits."""
    check_synthesis(sized_teacher("levit_128s", 64), 64)


def test_a_teacher_without_batchnorm_is_refused_and_left_without_hooks():
    teacher = sized_teacher("vit_tiny_patch16_224", 32)
    with pytest.raises(ValueError, match="no BatchNorm layers.*use a teacher with BatchNorm"):
        InversionEngine(teacher, CFG)
    assert hooks_left(teacher.model) == 0


class SharedBNNet(nn.Module):
    """timm head protocol; `bn` runs twice per forward (after two convs), `unused` never runs."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.bn, self.bn_out, self.unused = nn.BatchNorm2d(8), nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)
        gen = torch.Generator().manual_seed(0)
        for bn in (self.bn, self.bn_out):
            bn.running_mean.copy_(torch.randn(8, generator=gen))
            bn.running_var.copy_(torch.rand(8, generator=gen) + 0.5)

    def forward_features(self, x):
        x = self.bn(self.conv1(x)).relu()
        return self.bn_out(self.bn(self.conv2(x)).relu())

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class AuxOutputNet(SharedBNNet):
    def forward(self, x):  # (logits, aux logits), as timm's inception_v3 with aux_logits=True
        logits = super().forward(x)
        return logits, logits


def card_for(size: int = 16) -> TeacherCard:
    return TeacherCard(name="toy", arch="toy", num_classes=4, in_chans=3, image_size=size, mean=(0.5,) * 3,
                       std=(0.5,) * 3, class_names=list("abcd"))


def distance(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    values = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean, var = values.mean(1), values.var(1, unbiased=False)
    return (mean - bn.running_mean).norm() + (var - bn.running_var).norm()


def test_a_batchnorm_used_twice_gets_the_mean_of_its_per_call_distances():
    model = SharedBNNet().eval()
    hooks = BNStatsHooks(model, probe=torch.randn(2, 3, 16, 16))
    assert hooks.layers == [model.bn, model.bn_out] and hooks.calls == [2, 1]  # `unused` dropped
    assert hooks_left(model.unused) == 0
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        model(x)
        got = hooks.pop()
        a = model.conv1(x)
        b = model.conv2(model.bn(a).relu())
        expected = [(distance(a, model.bn) + distance(b, model.bn)) / 2, distance(model.bn(b).relu(), model.bn_out)]
    assert got.shape == (2,)
    assert torch.allclose(got, torch.stack(expected), rtol=1e-5)
    hooks.remove()
    assert hooks_left(model) == 0


def test_an_engine_runs_a_teacher_with_a_shared_batchnorm():
    check_synthesis(Teacher(SharedBNNet(), card_for(16)), 16)


def test_a_forward_returning_a_tuple_is_refused_before_any_hook():
    model = AuxOutputNet()
    with pytest.raises(InvalidRequestError, match="returns tuple from forward.*aux_logits=False"):
        InversionEngine(Teacher(model, card_for()), CFG)
    assert hooks_left(model) == 0


def test_failures_after_the_hooks_exist_remove_them():
    teacher = teacher_from_arch("mobilenetv3_small_050", num_classes=4, image_size=32)
    with pytest.raises(InvalidRequestError, match="bn_layer_weights has 1 entries"):
        InversionEngine(teacher, CFG.model_copy(update={"bn_layer_weights": [1.0]}))
    assert hooks_left(teacher.model) == 0
    model = SharedBNNet().eval()
    with pytest.raises(RuntimeError):  # the dry forward itself fails: 5 channels into a 3-channel conv
        BNStatsHooks(model, probe=torch.randn(2, 5, 16, 16))
    assert hooks_left(model) == 0


def test_teacher_from_arch_takes_timm_pretrained_cfg_unless_overridden():
    card = teacher_from_arch("inception_v3", num_classes=4).card
    assert (card.mean, card.std, card.image_size, card.interpolation) == ((0.5,) * 3, (0.5,) * 3, 299, "bicubic")
    card = teacher_from_arch("inception_v3", num_classes=4, image_size=96, mean=(0.1, 0.2, 0.3),
                             interpolation="bilinear").card
    assert (card.mean, card.std, card.image_size, card.interpolation) == ((0.1, 0.2, 0.3), (0.5,) * 3, 96,
                                                                          "bilinear")
    card = teacher_from_arch("resnet10t", num_classes=4).card  # ImageNet statistics, trained at 176 px
    assert card.mean == (0.485, 0.456, 0.406) and card.image_size == 176
    assert teacher_from_arch("digits_cnn", num_classes=10, in_chans=1, image_size=16).card.mean == (0.485,)
