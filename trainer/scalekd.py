"""ScaleKDTrainer: a student of any architecture (CNN, MLP-Mixer, ViT) distilled from a frozen ViT teacher with
ScaleKD's three parts, each of which can be switched off:

- cross-attention projectors (CAP) map two student stages onto the teacher's token grid and width;
- dual-view feature mimicking (DFM) matches them to the teacher's middle and final tokens in a spatial view and in a
  frequency view without the direct component;
- teacher parameter perception (TPP) runs the projected middle features through the teacher's frozen tail, matches
  the result to its final tokens, and uses it as the final projectors' queries;

plus KL to the teacher's logits and cross-entropy on the labels. Same step interface as DearKDTrainer, so
`dfkd train`, checkpoints, the store and the metrics serve both recipes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.config import ScaleKDConfig, TrainConfig
from shared.models import create_model
from shared.teacher import TeacherCard
from trainer.cross_attention_projector import CrossAttentionProjector, LinearProjector
from trainer.engine import autocast_dtype, in_batches, param_groups, renormalisation
from trainer.scalekd_losses import frequency_view, spatial_view
from trainer.schedule import student_lr
from trainer.vit_teacher import ViTTeacherStages

VIEWS: dict[str, Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]] = {
    "spatial": spatial_view, "frequency": frequency_view}


class ScaleKDModel(nn.Module):
    """The student and its projectors (one per distilled point and view): everything that learns, so one state dict,
    one optimizer and one checkpoint cover it."""

    def __init__(self, student: nn.Module, middle: nn.ModuleDict, final: nn.ModuleDict, stages: tuple[int, int]):
        super().__init__()
        self.student, self.middle, self.final, self.stages = student, middle, final, list(stages)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Student logits and its two NCHW maps."""
        features, maps = self.student.forward_intermediates(x, indices=self.stages)
        return self.student.forward_head(features), maps


def student_maps(student: nn.Module, stages: tuple[int, int], card: TeacherCard) -> list[torch.Size]:
    """Shapes of the student's two maps, from one forward on a dummy batch."""
    if not hasattr(student, "forward_intermediates"):
        raise ValueError(f"scalekd.student {type(student).__name__} has no forward_intermediates: pick a timm model or "
                         "a project CNN")
    was_training = student.training
    student.eval()
    with torch.no_grad():
        x = torch.zeros(2, card.in_chans, card.image_size, card.image_size, device=next(student.parameters()).device)
        _, maps = student.forward_intermediates(x, indices=list(stages))
    student.train(was_training)
    if len(maps) != 2 or any(m.ndim != 4 for m in maps):
        raise ValueError(f"scalekd.student_stages {stages} gave {[tuple(m.shape) for m in maps]}; expected two NCHW "
                         "maps")
    return [m.shape for m in maps]


class ScaleKDTrainer:
    def __init__(self, cfg: ScaleKDConfig, train: TrainConfig, teacher: nn.Module, teacher_card: TeacherCard,
                 card: TeacherCard, device: torch.device | str = "cpu"):
        """`teacher`/`teacher_card`: the ViT teacher. `card`: the images' card (the synthesising teacher's, or the
        ViT's own): its size, classes and normalisation, which the ViT's inputs are converted from."""
        self.device = torch.device(device)
        self.cfg, self.train_cfg, self.card = cfg, train, card
        if (teacher_card.image_size, teacher_card.num_classes, teacher_card.in_chans) != \
                (card.image_size, card.num_classes, card.in_chans):
            raise ValueError(f"the ScaleKD teacher {teacher_card.name!r} takes {teacher_card.image_size} px, "
                             f"{teacher_card.in_chans} channel(s), {teacher_card.num_classes} classes; the images are "
                             f"{card.image_size} px, {card.in_chans}, {card.num_classes}")
        self.teacher = ViTTeacherStages(teacher, cfg.teacher_tail_blocks).to(self.device)
        self.scale, self.shift = renormalisation(card, teacher_card, self.device)
        self.student = create_model(cfg.student, num_classes=card.num_classes, in_chans=card.in_chans).to(self.device)
        shapes = student_maps(self.student, cfg.student_stages, card)
        self.views = ("spatial", "frequency") if cfg.dfm else ("spatial",)
        grid, dim = self.teacher.grid, self.teacher.dim

        def projector(shape: torch.Size) -> nn.Module:
            if cfg.cap:
                return CrossAttentionProjector(shape[1], tuple(shape[2:]), dim, grid, heads=cfg.heads)
            return LinearProjector(shape[1], dim, grid)

        middle = nn.ModuleDict({v: projector(shapes[0]) for v in self.views})
        final = nn.ModuleDict({v: projector(shapes[1]) for v in self.views})
        self.model = ScaleKDModel(self.student, middle, final, cfg.student_stages).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, train.weight_decay), lr=train.lr)
        self.amp_dtype = autocast_dtype(train.precision, self.device)
        self.step = 0
        self.teacher_calls = 0
        self.online_logit_rows = 0  # every image's logits come from a teacher forward here

    @property
    def stage(self) -> int:
        return 1  # one stage: distillation throughout

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                   online_rows: torch.Tensor | None = None) -> dict[str, int | torch.Tensor]:
        """One step on normalised images `x` and labels `y`. Shipped logits (`teacher_logits`) are not used: they
        come from the synthesising CNN, and ScaleKD needs the ViT teacher's tokens anyway."""
        for group in self.optimizer.param_groups:
            group["lr"] = student_lr(self.step, self.train_cfg.steps, self.train_cfg.lr, self.train_cfg.warmup_steps,
                                     self.train_cfg.min_lr)
        self.model.train()
        terms = self.losses(x, y)
        loss = torch.stack(list(terms.values())).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.train_cfg.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.clip_grad_norm)
        self.optimizer.step()
        self.step += 1
        return {"loss": loss.detach(), "stage": 1, **{k: v.detach() for k, v in terms.items()}}

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every weighted loss term on one batch, with its graph (fp32 scalars)."""
        cfg, t = self.cfg, self.teacher
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        weights = {"spatial": cfg.spatial_weight, "frequency": cfg.frequency_weight}
        terms: dict[str, torch.Tensor] = {}
        with self._autocast():
            target = t(x * self.scale + self.shift)
            self.teacher_calls += 1
            self.online_logit_rows += len(x)
            logits, (middle_map, final_map) = self.model(x)
            mid_t, final_t = t.patches(target.middle), t.patches(target.final)
            for view in self.views:
                mimic, w = VIEWS[view], weights[view]
                projected = self.model.middle[view](middle_map)
                terms[f"{view}_middle"] = w * mimic(projected, mid_t, t.grid)
                queries = None
                if cfg.tpp:
                    perceived = t.patches(t.tail(torch.cat([target.middle[:, :t.prefix], projected.to(
                        target.middle.dtype)], 1)))
                    terms[f"{view}_tpp"] = w * mimic(perceived, final_t, t.grid)
                    queries = perceived.to(projected.dtype)
                terms[f"{view}_final"] = w * mimic(self.model.final[view](final_map, queries), final_t, t.grid)
        logits, temp = logits.float(), cfg.temperature
        soft = F.softmax(target.logits.float() / temp, 1)
        kl = F.kl_div(F.log_softmax(logits / temp, 1), soft, reduction="batchmean")
        terms["kd"] = cfg.logit_weight * kl * temp ** 2
        terms["ce"] = cfg.label_weight * F.cross_entropy(logits, y)
        return terms

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        self.model.eval()

        def probs(xb: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                return self.student(xb.to(self.device)).float().softmax(-1)

        return in_batches(probs, x, batch_size)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.predict(x).argmax(1) == y).float().mean())
