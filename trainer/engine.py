"""DearKDTrainer: one optimisation step at a time, stage 1 (teacher logits + early features) then stage 2 (labels)."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from shared.config import DearKDConfig, StudentConfig, TrainConfig
from trainer.aligner import aligner_key, build_aligners, feature_loss, normalize_teacher_map, teacher_stage_outputs
from trainer.losses import stage1_loss, stage2_loss
from trainer.schedule import lr_at, stage1_steps, stage_at
from trainer.student import block_outputs, create_student


NO_DECAY = ("pos_embed", "cls_token", "dist_token", "alpha", "offsets")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: not biases, norms, embeddings or MHCA's sharpness and offsets (decay would pull the
    offsets to the centre)."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (rest if p.ndim <= 1 or name.split(".")[-1] in NO_DECAY else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class DearKDTrainer:
    def __init__(self, student_cfg: StudentConfig, dearkd: DearKDConfig, train: TrainConfig,
                 teacher: nn.Module | None, device: torch.device | str = "cpu",
                 sync_step: Callable[[nn.Module], None] | None = None):
        self.device = torch.device(device)
        self.student_cfg, self.dearkd, self.train_cfg = student_cfg, dearkd, train
        self.grid = (student_cfg.img_size // student_cfg.patch_size,) * 2
        self.student = create_student(student_cfg).to(self.device)
        self.pairs = [tuple(p) for p in dearkd.feature_pairs] if dearkd.beta > 0 else []
        needs_teacher = stage1_steps(train.steps, dearkd.stage1_fraction) > 0
        if needs_teacher and teacher is None:
            raise ValueError("stage 1 distils from a teacher: pass one, or set dearkd.stage1_fraction to 0")
        self.teacher = teacher.to(self.device).eval().requires_grad_(False) if teacher is not None else None
        aligners = (build_aligners(self.teacher, student_cfg, self.pairs, student_cfg.in_chans, student_cfg.img_size)
                    if self.pairs and self.teacher is not None else nn.ModuleDict())
        self.aligners = aligners.to(self.device)
        self.teacher_calls = 0  # counted from here on: the aligners' dry run above is not training
        if self.teacher is not None:
            self.teacher.register_forward_pre_hook(self._count_teacher_call)
        # One module so that one state dict (and one optimizer) covers everything that learns.
        self.model = nn.ModuleDict({"student": self.student, "aligners": self.aligners})
        self.optimizer = torch.optim.AdamW(param_groups(self.model, train.weight_decay), lr=train.lr)
        self.step = 0
        self.sync_step = sync_step  # data-parallel: make the ranks agree before clipping and stepping

    def _count_teacher_call(self, module: nn.Module, args: Any) -> None:
        self.teacher_calls += 1

    @property
    def stage(self) -> int:
        return stage_at(self.step, self.train_cfg.steps, self.dearkd.stage1_fraction)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float | torch.Tensor]:
        """One step on normalised images `x` and labels `y`; returns detached loss terms (no host sync)."""
        cfg = self.train_cfg
        stage = self.stage
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr)
        self.model.train()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if stage == 1:
            stages = sorted({s for s, _ in self.pairs})
            with torch.no_grad():
                teacher_maps, teacher_logits = teacher_stage_outputs(self.teacher, x, stages)
            blocks, (cls_logits, dist_logits) = block_outputs(self.student, x, sorted({b for _, b in self.pairs}))
            feats = [feature_loss(self.aligners[aligner_key(s, b)](blocks[b]),
                                  normalize_teacher_map(teacher_maps[s], self.grid)) for s, b in self.pairs]
            loss, terms = stage1_loss(cls_logits, dist_logits, y, teacher_logits, feats, self.dearkd)
        else:
            cls_logits, dist_logits = self.student(x)
            loss, terms = stage2_loss(cls_logits, dist_logits, y, self.dearkd)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.sync_step is not None:
            self.sync_step(self.model)
        nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.optimizer.step()
        self.step += 1
        return {"loss": loss.detach(), "stage": stage, **terms}

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Class probabilities: the average of the two heads' softmax."""
        self.model.eval()
        out = []
        for i in range(0, len(x), batch_size):
            _, (cls_logits, dist_logits) = block_outputs(self.student, x[i:i + batch_size].to(self.device), [])
            out.append(((cls_logits.softmax(1) + dist_logits.softmax(1)) / 2).cpu())
        return torch.cat(out)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.predict(x).argmax(1) == y).float().mean())
