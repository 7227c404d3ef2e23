"""Early-feature distillation: teacher stage maps, student token grids, and the aligners between them.

Teacher stages are 1-based:
- project CNNs (`PooledClassifier`): stage s is the output of `teacher.stages[s - 1]`;
- timm CNNs: stage s is the s-th `feature_info` level at reduction >= 4, i.e. the stem level (stride 2:
  ResNet `act1`, RegNet `stem`, EfficientNet `blocks.0`) is skipped, so that stage 1 is the stride-4 level
  (ResNet `layer1`, RegNet `s1`, ConvNeXt `stages.0`).
See docs/architecture.md §4.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.config import StudentConfig

STAGE_MIN_REDUCTION = 4


def aligner_key(stage: int, block: int) -> str:
    return f"s{stage}_b{block}"


def stage_modules(teacher: nn.Module) -> list[nn.Module]:
    """The teacher's stages in order (see the module docstring for the mapping)."""
    info = getattr(teacher, "feature_info", None)
    if info is not None:
        # timm models carry either a FeatureInfo or a plain list of dicts.
        levels = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        return [teacher.get_submodule(d["module"]) for d in levels if d["reduction"] >= STAGE_MIN_REDUCTION]
    if isinstance(getattr(teacher, "stages", None), nn.ModuleList):
        return list(teacher.stages)
    raise TypeError(f"{type(teacher).__name__} has neither timm `feature_info` nor a `stages` ModuleList")


def _check_stages(teacher: nn.Module, stages: list[int]) -> list[nn.Module]:
    modules = stage_modules(teacher)
    bad = [s for s in stages if not 1 <= s <= len(modules)]
    if bad:
        raise ValueError(f"teacher stages {bad} out of range: {type(teacher).__name__} has {len(modules)} "
                         f"stages (1..{len(modules)})")
    return modules


class _StopForward(Exception):
    """Raised by a hook once the last stage needed is recorded: the rest of the teacher is not run."""


def teacher_stage_outputs(teacher: nn.Module, x: torch.Tensor, stages: list[int], logits: bool = True,
                          ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """One teacher forward: ({stage: (B, C, H, W) map}, logits). The caller wraps it in torch.no_grad().

    Without `logits` (they come from elsewhere, e.g. shipped with the batch) the forward stops after the last stage
    in `stages`, and None is returned for them."""
    modules = _check_stages(teacher, stages)
    maps: dict[int, torch.Tensor] = {}
    versions: dict[int, int] = {}
    last = max(stages, default=0)

    def keep(stage: int):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            maps[stage] = output
            if not output.is_inference():
                versions[stage] = output._version
            if not logits and stage == last:
                raise _StopForward
        return hook

    if not logits and not stages:
        return maps, None
    handles = [modules[s - 1].register_forward_hook(keep(s)) for s in set(stages)]
    out = None
    try:
        out = teacher(x)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    # A later layer that writes into a stage output in place (an inplace ReLU on its input) would silently change
    # the map we hand back; refuse rather than distil from the wrong features.
    changed = [s for s, v in versions.items() if maps[s]._version != v]
    if changed:
        raise RuntimeError(f"teacher stages {changed} were modified in place after they were recorded")
    return maps, out


def stage_channels(teacher: nn.Module, stages: list[int], in_chans: int, image_size: int) -> dict[int, int]:
    """Channels of each stage's output, from a batch-1 dry run in eval mode (BN running stats untouched)."""
    _check_stages(teacher, stages)
    param = next(teacher.parameters())
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(1, in_chans, image_size, image_size, device=param.device, dtype=param.dtype)
            maps, _ = teacher_stage_outputs(teacher, x, stages)
    finally:
        teacher.train(was_training)
    return {s: maps[s].shape[1] for s in stages}


def tokens_to_grid(tokens: torch.Tensor, grid_size: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """(B, prefix + H*W, D) tokens -> (B, D, H, W) patch grid, prefix tokens dropped."""
    B, N, D = tokens.shape
    h, w = grid_size
    if N != num_prefix_tokens + h * w:
        raise ValueError(f"expected {num_prefix_tokens} prefix tokens + a {h}x{w} grid ({num_prefix_tokens + h * w} "
                         f"tokens), got {N}")
    return tokens[:, num_prefix_tokens:].transpose(1, 2).reshape(B, D, h, w)


class FeatureAligner(nn.Module):
    """Student block tokens -> the teacher's channel space on the student grid: 1x1 conv + BatchNorm.

    BatchNorm standardises each output channel over (B, H, W), the same population `normalize_teacher_map`
    standardises the target over; at init the MSE is then 2 * (1 - per-channel correlation), and neither side can
    lower the loss by shrinking its scale. The statistics pool B*H*W values per channel, so small batches are fine
    (batch 2 on an 8x8 grid: 128 values). Aligners only run in stage-1 training, so eval-mode stats never matter.
    """

    def __init__(self, embed_dim: int, out_chans: int, grid_size: tuple[int, int], num_prefix_tokens: int = 2):
        super().__init__()
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.num_prefix_tokens = num_prefix_tokens
        self.proj = nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False)  # BN's shift makes a bias redundant
        self.norm = nn.BatchNorm2d(out_chans)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(tokens_to_grid(tokens, self.grid_size, self.num_prefix_tokens)))


def normalize_teacher_map(t_map: torch.Tensor, grid_hw: tuple[int, int], eps: float = 1e-5) -> torch.Tensor:
    """N(Pool(T)): resample a (B, C, h, w) teacher map to the student grid, then standardise each channel over
    (B, H, W). Per channel, because CNN channels differ in scale by orders of magnitude and the largest would
    otherwise dominate the MSE; over the batch rather than per sample, because a per-sample, per-channel mean would
    erase which channels an image activates, the main thing the map says at a coarse grid."""
    grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
    if t_map.shape[-2] >= grid_hw[0] and t_map.shape[-1] >= grid_hw[1]:
        t_map = F.adaptive_avg_pool2d(t_map, grid_hw)  # area average: no aliasing when shrinking
    else:
        t_map = F.interpolate(t_map, size=grid_hw, mode="bilinear", align_corners=False)
    t_map = t_map.float()
    mean = t_map.mean(dim=(0, 2, 3), keepdim=True)
    var = t_map.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
    # The floor is relative to each channel's own mean, so a small-scale channel is still standardised (a fixed eps
    # would flatten it) while a constant or dead one, up to float rounding, maps to 0 instead of amplified noise.
    return (t_map - mean) * torch.rsqrt(var + eps * mean.square() + 1e-12)


def feature_loss(aligned: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Mean-squared error over all elements; the teacher side never carries a gradient."""
    if aligned.shape != teacher_map.shape:
        raise ValueError(f"aligned student map {tuple(aligned.shape)} != teacher map {tuple(teacher_map.shape)}")
    return F.mse_loss(aligned.float(), teacher_map.detach().float())


def build_aligners(teacher: nn.Module, student_cfg: StudentConfig, pairs: list[tuple[int, int]],
                   teacher_in_chans: int, image_size: int) -> nn.ModuleDict:
    """One FeatureAligner per (teacher stage, student block) pair, keyed `aligner_key(stage, block)`."""
    bad = [b for _, b in pairs if not 1 <= b <= student_cfg.depth]
    if bad:
        raise ValueError(f"student blocks {bad} out of range: the student has {student_cfg.depth} blocks "
                         f"(1..{student_cfg.depth})")
    channels = stage_channels(teacher, sorted({s for s, _ in pairs}), teacher_in_chans, image_size)
    grid = (student_cfg.img_size // student_cfg.patch_size,) * 2
    # Prefix tokens: the student is a distilled DeiT (the class token, then its distillation tokens).
    prefix = 1 + student_cfg.dist_tokens
    return nn.ModuleDict({aligner_key(s, b): FeatureAligner(student_cfg.embed_dim, channels[s], grid, prefix)
                          for s, b in pairs})
