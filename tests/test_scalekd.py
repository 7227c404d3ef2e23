"""ScaleKD's parts on real timm and project models: the DCT, DC removal, the projectors' shapes for CNN, MLP-Mixer and
ViT students, TPP's gradient path, the switches, and clear refusals."""
from __future__ import annotations

import pytest
import torch

from shared.config import ScaleKDConfig, TrainConfig
from shared.models import create_model
from shared.teacher import TeacherCard
from trainer.cross_attention_projector import CrossAttentionProjector
from trainer.dct import dct2, dct_matrix, idct2, remove_dc
from trainer.scalekd import ScaleKDTrainer
from trainer.scalekd_losses import frequency_view, spatial_view

STUDENTS = ("resnet8", "mixer_nano_patch2_16", "vit_nano_patch2_16")


def card(name: str = "vit_nano_patch2_16", mean: float = 0.5, std: float = 0.25, size: int = 16) -> TeacherCard:
    return TeacherCard(name=name, arch=name, num_classes=10, in_chans=1, image_size=size, mean=(mean,), std=(std,),
                       class_names=[str(i) for i in range(10)])


def vit_teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("vit_nano_patch2_16", num_classes=10, in_chans=1)


def trainer(student: str = "resnet8", **change) -> ScaleKDTrainer:
    torch.manual_seed(1)
    return ScaleKDTrainer(ScaleKDConfig(student=student, **change), TrainConfig(steps=10, warmup_steps=0),
                          vit_teacher(), card(), card())


def test_the_dct_is_orthonormal_and_round_trips():
    d = dct_matrix(7, dtype=torch.float64)
    assert torch.allclose(d @ d.T, torch.eye(7, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 5, 8, 6, dtype=torch.float64)
    assert torch.allclose(idct2(dct2(x)), x, atol=1e-12)
    # The DC coefficient of an orthonormal DCT is the mean times sqrt(H W).
    assert torch.allclose(dct2(x)[..., 0, 0], x.mean((-2, -1)) * (8 * 6) ** 0.5, atol=1e-12)


def test_removing_the_dc_component_removes_exactly_each_channels_mean():
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64) + torch.arange(4, dtype=torch.float64).view(1, 4, 1, 1) * 10
    out = remove_dc(x)
    assert torch.allclose(out, x - x.mean((-2, -1), keepdim=True), atol=1e-10)
    coefficients = dct2(out)
    assert torch.allclose(coefficients[..., 0, 0], torch.zeros(2, 4, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(coefficients[..., 1:, :], dct2(x)[..., 1:, :], atol=1e-10)  # nothing else is touched


def test_the_frequency_view_ignores_a_constant_offset_and_the_spatial_view_does_not():
    teacher = torch.randn(2, 64, 16)
    shifted = teacher + 3.0  # the same map plus a direct component on every channel
    assert float(frequency_view(shifted, teacher, (8, 8))) < 1e-8
    assert float(spatial_view(shifted, teacher, (8, 8))) > 1.0
    assert float(spatial_view(teacher, teacher, (8, 8))) < 1e-8


@pytest.mark.parametrize("student", STUDENTS)
def test_projectors_put_every_student_on_the_teachers_grid(student):
    t = trainer(student)
    x = torch.randn(3, 1, 16, 16)
    logits, maps = t.model(x)
    assert logits.shape == (3, 10) and len(maps) == 2 and all(m.ndim == 4 for m in maps)
    for view in ("spatial", "frequency"):
        assert isinstance(t.model.middle[view], CrossAttentionProjector)
        assert t.model.middle[view](maps[0]).shape == (3, 64, 96)  # the teacher's 8x8 grid, 96 wide
        assert t.model.final[view](maps[1]).shape == (3, 64, 96)
    terms = t.train_step(x, torch.randint(0, 10, (3,)))
    assert {"spatial_middle", "spatial_tpp", "spatial_final", "frequency_middle", "frequency_tpp", "frequency_final",
            "kd", "ce"} <= set(terms) and torch.isfinite(terms["loss"])


def test_a_projector_with_given_queries_answers_one_token_per_query():
    cap = CrossAttentionProjector(32, (4, 4), 96, (8, 8), heads=4)
    assert cap(torch.randn(2, 32, 4, 4), queries=torch.randn(2, 64, 96)).shape == (2, 64, 96)
    with pytest.raises(ValueError, match="built for 16"):
        cap(torch.randn(2, 32, 8, 8))


def test_tpp_gradients_reach_the_student_and_never_the_frozen_teacher():
    t = trainer("resnet8")
    before = {k: v.clone() for k, v in t.teacher.state_dict().items()}
    terms = t.losses(torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,)))
    terms["spatial_tpp"].backward()
    # The middle stage and its projector learn from TPP; the final projector plays no part in it.
    middle_stage = t.student.stages[-2]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in middle_stage.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.model.middle["spatial"].parameters())
    assert all(p.grad is None for p in t.model.final["spatial"].parameters())
    assert all(not p.requires_grad and p.grad is None for p in t.teacher.parameters())
    for _ in range(2):
        t.train_step(torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,)))
    assert all(torch.equal(before[k], v) for k, v in t.teacher.state_dict().items())


def test_each_part_switches_off():
    assert set(trainer(dfm=False).losses(torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))) == \
        {"spatial_middle", "spatial_tpp", "spatial_final", "kd", "ce"}
    no_tpp = trainer(tpp=False).losses(torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))
    assert not any(k.endswith("_tpp") for k in no_tpp)
    no_cap = trainer(cap=False)
    assert not any(isinstance(m, CrossAttentionProjector) for m in no_cap.model.modules())
    assert torch.isfinite(no_cap.train_step(torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))["loss"])


def test_the_teacher_sees_its_own_normalisation():
    """Images normalised for another card reach the ViT as the same pixels in its normalisation."""
    images = card(mean=0.1, std=0.3)
    t = ScaleKDTrainer(ScaleKDConfig(), TrainConfig(steps=2), vit_teacher(), card(), images)
    pixels = torch.rand(2, 1, 16, 16)
    x = (pixels - 0.1) / 0.3
    assert torch.allclose(x * t.scale + t.shift, (pixels - 0.5) / 0.25, atol=1e-5)


def test_unusable_teachers_students_and_cards_are_refused_clearly():
    with pytest.raises(ValueError, match="must be a timm VisionTransformer"):
        ScaleKDTrainer(ScaleKDConfig(), TrainConfig(), create_model("resnet8", num_classes=10, in_chans=1),
                       card("resnet8"), card())
    with pytest.raises(ValueError, match="teacher_tail_blocks must be between 1 and 5"):
        ScaleKDTrainer(ScaleKDConfig(teacher_tail_blocks=6), TrainConfig(), vit_teacher(), card(), card())
    with pytest.raises(ValueError, match="takes 16 px"):
        ScaleKDTrainer(ScaleKDConfig(), TrainConfig(), vit_teacher(), card(), card(size=32))
    with pytest.raises(ValueError, match="not a multiple of 5 projector heads"):
        ScaleKDTrainer(ScaleKDConfig(heads=5), TrainConfig(), vit_teacher(), card(), card())
