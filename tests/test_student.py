"""The DearKD student (DeiT + MHCA), its one-pass block outputs, and the teacher-stage <-> block aligners."""
from __future__ import annotations

import math
from functools import cache

import pytest
import torch
import torch.nn as nn

from shared.config import StudentConfig
from shared.models import create_model
from shared.models.dearkd_student import block_outputs, create_student, mhca_blocks
from shared.models.mhca import WINDOW_3X3, MHCAttention
from trainer.aligner import (build_aligners, feature_loss, normalize_teacher_map, stage_channels, stage_modules,
                             teacher_stage_outputs)

PAIRS = [(1, 1), (2, 2), (3, 4)]


def small_student(**kw) -> StudentConfig:
    base = dict(img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=4, num_heads=4,
                mlp_ratio=2.0, mhca_blocks=2, mhca_dropout=0.1, drop_path=0.0)
    return StudentConfig(**{**base, **kw})


@cache
def teacher(name: str, in_chans: int) -> nn.Module:
    return create_model(name, num_classes=10, in_chans=in_chans).eval()


# --- MHCA ---------------------------------------------------------------------------------------------------------

def conv_tap_attention(num_prefix_tokens: int, grid=(5, 6)) -> MHCAttention:
    """Nine heads (the whole 3x3 window), content off, sharpness 50, identity value and output projections."""
    heads, head_dim = 9, 2
    dim = heads * head_dim
    attn = MHCAttention(dim, heads, grid, num_prefix_tokens, attn_drop=0.0, init_sharpness=50.0, use_content=False)
    with torch.no_grad():
        attn.qkv.weight[2 * dim:].copy_(torch.eye(dim))  # v = x; q and k stay random (unused without content)
        attn.qkv.bias.zero_()
        attn.proj.weight.copy_(torch.eye(dim))
        attn.proj.bias.zero_()
    return attn.eval()


def shifted_pairs(grid, offset):
    """(query patch, key patch) indexes, row-major, for every query whose tap at `offset` lies inside the grid."""
    h, w = grid
    dy, dx = offset
    return [(i * w + j, (i + dy) * w + (j + dx))
            for i in range(h) for j in range(w) if 0 <= i + dy < h and 0 <= j + dx < w]


def test_mhca_init_offsets_cover_the_3x3_window_centre_first_and_sharpness_is_local():
    attn = MHCAttention(48, 12, (4, 4), 2)
    assert [tuple(o) for o in attn.offsets.tolist()] == [tuple(map(float, o)) for o in WINDOW_3X3 + WINDOW_3X3[:3]]
    assert torch.allclose(attn.sharpness(), torch.ones(12))
    # Relative weight of a 4-neighbour of the target patch: e^-1 (local, not one-hot).
    bias = attn.positional_bias()[0].detach()
    centre = 2 + 1 * 4 + 1  # prefix + grid (1, 1)
    assert math.isclose(float(bias[centre, centre + 1] - bias[centre, centre]), -1.0, abs_tol=1e-6)


def test_mhca_positional_bias_is_zero_on_prefix_rows_and_columns():
    attn = MHCAttention(32, 4, (3, 5), 2)
    bias = attn.positional_bias()
    assert bias.shape == (4, 17, 17)
    assert not bias[:, :2].any() and not bias[:, :, :2].any()
    assert (bias[:, 2:, 2:] <= 0).all() and bias[:, 2:, 2:].min() < -1


@pytest.mark.parametrize("grid", [(5, 6), (4, 4)])
def test_sharp_content_free_mhca_head_is_a_shifted_identity(grid):
    """Cordonnier Thm. 1: each head copies the patch at its offset (one tap of a 3x3 convolution)."""
    attn = conv_tap_attention(num_prefix_tokens=0, grid=grid)
    x = torch.randn(2, grid[0] * grid[1], attn.num_heads * attn.head_dim)
    with torch.no_grad():
        out, probs = attn(x), attn.positional_bias().softmax(-1)
    for h, offset in enumerate(attn.offsets.round().long().tolist()):
        cols = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
        pairs = shifted_pairs(grid, offset)
        assert len(pairs) >= (grid[0] - 1) * (grid[1] - 1)
        q, k = map(list, zip(*pairs))
        one_hot = torch.zeros(len(q), x.shape[1])
        one_hot[range(len(q)), k] = 1.0
        assert torch.allclose(probs[h, q], one_hot, atol=1e-6)
        assert torch.allclose(out[:, q, cols], x[:, k, cols], atol=1e-5)


def test_sharp_mhca_with_prefix_tokens_taps_one_patch_and_leaves_prefix_logits_neutral():
    """With cls + dist tokens, b = 0 on their columns, the same logit as the tap, so a patch query splits its
    attention equally between the tap and the two prefix tokens; among patches it is still one-hot on the tap.
    Prefix queries get no positional preference at all (uniform without content)."""
    n, grid = 2, (5, 6)
    attn = conv_tap_attention(num_prefix_tokens=n, grid=grid)
    tokens = n + grid[0] * grid[1]
    x = torch.randn(2, tokens, attn.num_heads * attn.head_dim)
    with torch.no_grad():
        out, probs = attn(x), attn.positional_bias().softmax(-1)
    assert torch.allclose(probs[:, :n], torch.full((attn.num_heads, n, tokens), 1 / tokens), atol=1e-6)
    assert torch.allclose(out[:, :n], x.mean(dim=1, keepdim=True).expand(-1, n, -1), atol=1e-5)
    for h, offset in enumerate(attn.offsets.round().long().tolist()):
        cols = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
        q, k = (torch.tensor(v) + n for v in zip(*shifted_pairs(grid, offset)))
        patch_probs = probs[h, q, n:] / probs[h, q, n:].sum(-1, keepdim=True)
        assert torch.allclose(patch_probs[range(len(q)), k - n], torch.ones(len(q)), atol=1e-6)
        assert torch.allclose(probs[h, q, :n], torch.full((len(q), n), 1 / (n + 1)), atol=1e-6)
        expected = (x[:, k, cols] + x[:, :n, cols].sum(dim=1, keepdim=True)) / (n + 1)
        assert torch.allclose(out[:, q, cols], expected, atol=1e-5)


def test_mhca_rejects_a_sequence_of_the_wrong_length():
    with pytest.raises(ValueError, match="prefix tokens"):
        MHCAttention(16, 2, (4, 4), 2)(torch.randn(1, 16, 16))


# --- student --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 2, 4])
def test_only_the_first_k_blocks_are_mhca(k):
    model = create_student(small_student(mhca_blocks=k))
    assert mhca_blocks(model) == list(range(1, k + 1))
    assert model.distilled_training and model.num_prefix_tokens == 2


@pytest.mark.parametrize("k", [0, 2])
def test_student_heads_and_block_outputs_match_the_timm_forward(k):
    cfg = small_student(mhca_blocks=k)
    model = create_student(cfg)
    x = torch.randn(3, 1, 16, 16)
    tokens = 2 + (16 // 2) ** 2

    model.train()  # attention dropout is on: the same seed must give the same forward
    torch.manual_seed(0)
    cls_logits, dist_logits = model(x)
    torch.manual_seed(0)
    blocks, (c, d) = block_outputs(model, x, [1, 4])
    assert cls_logits.shape == dist_logits.shape == (3, 10)
    assert torch.equal(c, cls_logits) and torch.equal(d, dist_logits)
    assert sorted(blocks) == [1, 4] and all(b.shape == (3, tokens, cfg.embed_dim) for b in blocks.values())

    model.eval()  # timm averages the heads in eval; block_outputs keeps both
    with torch.no_grad():
        mean_logits = model(x)
        blocks, (c, d) = block_outputs(model, x, [2])
        again = block_outputs(model, x, [2])[0][2]
    assert mean_logits.shape == (3, 10)
    assert torch.allclose((c + d) / 2, mean_logits, atol=1e-6)
    assert torch.equal(blocks[2], again)


def test_block_outputs_rejects_blocks_outside_the_student():
    model = create_student(small_student())
    with pytest.raises(ValueError, match=r"student blocks \[5\] out of range"):
        block_outputs(model, torch.randn(1, 1, 16, 16), [1, 5])


# --- aligners -------------------------------------------------------------------------------------------------------

TEACHERS = [("digits_cnn", 1, 16), ("resnet18_cifar", 3, 32), ("wrn_16_2", 3, 32), ("resnet18", 3, 32)]


@pytest.mark.parametrize("name,in_chans,size", TEACHERS)
@pytest.mark.parametrize("grid", [8, 4], ids=["grid8", "grid4"])
def test_aligned_student_blocks_match_the_normalised_teacher_stages(name, in_chans, size, grid):
    t = teacher(name, in_chans)
    cfg = small_student(img_size=size, patch_size=size // grid, in_chans=in_chans)
    student = create_student(cfg).train()
    aligners = build_aligners(t, cfg, PAIRS, in_chans, size)
    assert sorted(aligners) == ["s1_b1", "s2_b2", "s3_b4"]

    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        maps, logits = teacher_stage_outputs(t, x, [1, 2, 3])
        assert torch.allclose(logits, t(x), atol=1e-5)
    blocks, _ = block_outputs(student, x, [1, 2, 4])
    for s, b in PAIRS:
        aligned = aligners[f"s{s}_b{b}"](blocks[b])
        target = normalize_teacher_map(maps[s], (grid, grid))
        channels = maps[s].shape[1]
        assert aligned.shape == target.shape == (2, channels, grid, grid)
        assert torch.allclose(target.mean(dim=(0, 2, 3)), torch.zeros(channels), atol=1e-4)
        assert torch.isfinite(feature_loss(aligned, target))


@pytest.mark.parametrize("size", [16, 8, 3], ids=["pool", "identity", "upsample"])
def test_teacher_maps_are_resampled_to_the_grid_and_standardised_per_channel(size):
    scale = torch.tensor([1e-2, 1.0, 1e3])[None, :, None, None]  # channel scales that would swamp an MSE
    t_map = (torch.randn(2, 3, size, size) + 2.0) * scale
    target = normalize_teacher_map(t_map, (8, 8))
    assert target.shape == (2, 3, 8, 8)
    assert torch.allclose(target.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(target.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
    if size == 16:  # a 2x2 area average, then the batch statistics of each channel
        pooled = t_map.reshape(2, 3, 8, 2, 8, 2).mean(dim=(3, 5))
        mean, std = pooled.mean(dim=(0, 2, 3), keepdim=True), pooled.std(dim=(0, 2, 3), unbiased=False, keepdim=True)
        assert torch.allclose(target, (pooled - mean) / std, atol=1e-3)


def test_constant_and_dead_teacher_channels_normalise_to_zero():
    t_map = torch.cat([torch.full((2, 1, 4, 4), 3.7), torch.zeros(2, 1, 4, 4), torch.randn(2, 1, 4, 4)], dim=1)
    target = normalize_teacher_map(t_map, (4, 4))
    assert target[:, :2].abs().max() < 1e-2
    assert torch.allclose(target[:, 2].std(unbiased=False), torch.tensor(1.0), atol=1e-3)


def test_timm_stages_skip_the_stem_level():
    t = teacher("resnet18", 3)
    assert stage_modules(t) == [t.layer1, t.layer2, t.layer3, t.layer4]


@pytest.mark.parametrize("name,in_chans,size,stage", [("digits_cnn", 1, 16, 4), ("wrn_16_2", 3, 32, 4),
                                                      ("resnet18", 3, 32, 5), ("resnet18_cifar", 3, 32, 0)])
def test_a_stage_the_teacher_does_not_have_is_a_clear_error(name, in_chans, size, stage):
    t = teacher(name, in_chans)
    n = len(stage_modules(t))
    with pytest.raises(ValueError, match=rf"teacher stages \[{stage}\] out of range: .* has {n} stages \(1\.\.{n}\)"):
        build_aligners(t, small_student(img_size=size, patch_size=4, in_chans=in_chans), [(1, 1), (stage, 2)],
                       in_chans, size)


def test_a_block_the_student_does_not_have_is_a_clear_error():
    with pytest.raises(ValueError, match=r"student blocks \[7\] out of range"):
        build_aligners(teacher("digits_cnn", 1), small_student(), [(1, 7)], 1, 16)


def test_the_dry_run_leaves_the_teacher_mode_and_bn_statistics_alone():
    t = create_model("digits_cnn", num_classes=10, in_chans=1).train()
    before = {k: v.clone() for k, v in t.state_dict().items()}
    assert stage_channels(t, [1, 3], 1, 16) == {1: 32, 3: 128}
    assert t.training
    assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())


class InplaceNextStage(nn.Module):
    """A real (tiny) net whose second stage rectifies its input in place, overwriting stage 1's output."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x.mean(dim=(2, 3))


def test_a_stage_map_overwritten_in_place_is_refused():
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"stages \[1\] were modified in place"):
        teacher_stage_outputs(InplaceNextStage(), torch.randn(2, 1, 8, 8), [1])


def test_feature_loss_trains_student_and_aligners_but_never_the_teacher():
    t = create_model("digits_cnn", num_classes=10, in_chans=1).eval()  # parameters still require grad
    cfg = small_student()
    student = create_student(cfg).train()
    aligners = build_aligners(t, cfg, PAIRS, 1, 16).train()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        maps, _ = teacher_stage_outputs(t, x, [1, 2, 3])
    blocks, _ = block_outputs(student, x, [1, 2, 4])
    loss = sum(feature_loss(aligners[f"s{s}_b{b}"](blocks[b]), normalize_teacher_map(maps[s], (8, 8)))
               for s, b in PAIRS)
    loss.backward()
    assert all(p.grad is None for p in t.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aligners.parameters())
    for i in (1, 2, 4):  # MHCA (sharpness, offsets) and plain blocks alike
        assert all(p.grad is not None for p in student.blocks[i - 1].parameters())
    assert student.blocks[0].attn.alpha.grad.abs().sum() > 0 and student.blocks[0].attn.offsets.grad.abs().sum() > 0
    assert student.patch_embed.proj.weight.grad.abs().sum() > 0
    assert student.head.weight.grad is None  # the feature loss alone does not reach the heads
