"""DearKDTrainer: one optimisation step at a time, stage 1 (teacher logits + early features) then stage 2 (labels)."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from shared.config import DearKDConfig, StudentConfig, TrainConfig
from shared.ensemble import Ensemble
from shared.teacher import TeacherCard
from trainer.aligner import aligner_key, build_aligners, feature_loss, normalize_teacher_map, teacher_stage_outputs
from trainer.losses import ensemble_target, stage1_loss, stage2_loss
from trainer.schedule import stage1_steps, stage_at, student_lr
from shared.models.dearkd_student import block_outputs, create_student


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


def student_for_ensemble(student: StudentConfig, dearkd: DearKDConfig, members: int) -> StudentConfig:
    """The student with one distillation token per ensemble member under `dearkd.ensemble_tokens: per_teacher`,
    one otherwise."""
    tokens = members if dearkd.ensemble_tokens == "per_teacher" else 1
    if student.dist_tokens not in (1, tokens):
        raise ValueError(f"student.dist_tokens is {student.dist_tokens}; with {members} teacher(s) and "
                         f"dearkd.ensemble_tokens {dearkd.ensemble_tokens!r} the student has {tokens}")
    return student.model_copy(update={"dist_tokens": tokens})


def renormalisation(source: TeacherCard, target: TeacherCard, device: torch.device,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift): x normalised for `source`, times scale plus shift, is the same pixels normalised for
    `target`."""
    mean_s, std_s = torch.tensor(source.mean), torch.tensor(source.std)
    mean_t, std_t = torch.tensor(target.mean), torch.tensor(target.std)
    return ((std_s / std_t).view(1, -1, 1, 1).to(device), ((mean_s - mean_t) / std_t).view(1, -1, 1, 1).to(device))


def in_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`fn` over `x` a batch at a time, the results concatenated on the host."""
    return torch.cat([fn(x[i:i + batch_size]).cpu() for i in range(0, len(x), batch_size)])


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.precision` on `device`; None: plain fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


class StudentAndAligners(nn.Module):
    """Everything that learns, as one module, so that one state dict, one optimizer and one DDP wrapper cover it.
    Its children keep the names of the ModuleDict it replaced, so checkpoint keys are unchanged."""

    def __init__(self, student: nn.Module, aligners: nn.ModuleDict, pairs: list[tuple[int, int]]):
        super().__init__()
        self.student, self.aligners = student, aligners
        self.pairs = pairs
        self.blocks = sorted({b for _, b in pairs})

    def forward(self, x: torch.Tensor, features: bool = True,
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(cls_logits, dist_logits, one aligned map per pair); stage 2 (`features` off) skips the aligners."""
        if not features:
            _, (cls_logits, dist_logits) = block_outputs(self.student, x, [])
            return cls_logits, dist_logits, []
        blocks, (cls_logits, dist_logits) = block_outputs(self.student, x, self.blocks)
        return cls_logits, dist_logits, [self.aligners[aligner_key(s, b)](blocks[b]) for s, b in self.pairs]


class DearKDTrainer:
    def __init__(self, student_cfg: StudentConfig, dearkd: DearKDConfig, train: TrainConfig,
                 teacher: nn.Module | None, device: torch.device | str = "cpu", distributed: bool = False,
                 ensemble: Ensemble | None = None):
        """`ensemble` (its member 0 is `teacher`): the further teachers whose logits are distilled with the
        teacher's, through one distillation token (their averaged soft targets). Stage 1 takes their logits from
        `train_step(teacher_logits=...)` when given, and runs them on the batch otherwise."""
        self.device = torch.device(device)
        student_cfg = student_for_ensemble(student_cfg, dearkd, len(ensemble.members) if ensemble else 1)
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
        self.online_logit_rows = 0  # images whose logits a teacher forward here computed (not shipped ones)
        self.members = self._member_inputs(ensemble) if ensemble is not None else []
        self.model = StudentAndAligners(self.student, self.aligners, self.pairs)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, train.weight_decay), lr=train.lr)
        self.step = 0
        self.amp_dtype = autocast_dtype(train.precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.distributed = distributed  # data-parallel under torchrun: the process group is already up
        self._ddp: DistributedDataParallel | None = None
        self._ddp_stage = 0

    def _count_teacher_call(self, module: nn.Module, args: Any) -> None:
        self.teacher_calls += 1

    def _member_inputs(self, ensemble: Ensemble) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
        """(model, scale, shift) of each further member: x in the teacher's normalisation, times scale plus shift,
        is the same pixels in the member's."""
        if self.teacher is None or ensemble.members[0].model is not self.teacher:
            raise ValueError("the ensemble's member 0 must be the trainer's teacher")
        first = ensemble.members[0].card
        return [(member.model.to(self.device).eval().requires_grad_(False),
                 *renormalisation(first, member.card, self.device)) for member in ensemble.members[1:]]

    @property
    def ensemble_size(self) -> int:
        return 1 + len(self.members)

    @torch.no_grad()
    def online_logits(self, x: torch.Tensor, primary: torch.Tensor | None = None) -> torch.Tensor:
        """[M, B, K] logits of every ensemble member on normalised `x` (`primary`: the teacher's, if known)."""
        if primary is None:
            primary = self.teacher(x)
        rows = [primary.float()] + [model(x * scale + shift).float() for model, scale, shift in self.members]
        self.online_logit_rows += len(x)
        return torch.stack(rows)

    @property
    def stage(self) -> int:
        return stage_at(self.step, self.train_cfg.steps, self.dearkd.stage1_fraction)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    def _forward_module(self, stage: int) -> nn.Module:
        """The model, or under data parallelism its DDP wrapper for this stage (built on the stage's first step,
        together on every rank, which start from rank 0's weights and buffers)."""
        if not self.distributed:
            return self.model
        if self._ddp_stage != stage:
            self._ddp = None  # the previous stage's gradient buckets go first
            # Stage 2 leaves the aligners without gradients, and DDP must be told to expect that.
            unused = stage == 2 and len(self.aligners) > 0
            self._ddp = DistributedDataParallel(self.model, find_unused_parameters=unused)
            self._ddp_stage = stage
        return self._ddp

    def train_step(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                   online_rows: torch.Tensor | None = None) -> dict[str, int | torch.Tensor]:
        """One step on normalised images `x` and labels `y`; returns the stage and detached loss tensors (no host
        sync: converting them is the caller's choice, and costs one).

        `teacher_logits` [M, B, K]: every ensemble member's logits on exactly these views, computed elsewhere (the
        service ships them); then no teacher runs for logits, except on `online_rows` (a bool mask of images that
        came without them, such as real ones). Early features still need the teacher up to their last stage."""
        cfg = self.train_cfg
        stage = self.stage
        for group in self.optimizer.param_groups:
            group["lr"] = student_lr(self.step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr)
        self.model.train()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        forward = self._forward_module(stage)
        with self._autocast():
            if stage == 1:
                with torch.no_grad():
                    teacher_maps, teacher_logits = self._stage1_targets(x, teacher_logits, online_rows)
            cls_logits, dist_logits, aligned = forward(x, stage == 1)
        # Losses in fp32: softmax, KL and MSE over bf16 values would round the small terms away.
        cls_logits, dist_logits = cls_logits.float(), dist_logits.float()
        if stage == 1:
            feats = [feature_loss(a, normalize_teacher_map(teacher_maps[s].float(), self.grid))
                     for a, (s, _) in zip(aligned, self.pairs)]
            target = (teacher_logits.float() if dist_logits.ndim == 3
                      else ensemble_target(teacher_logits.float(), self.dearkd.temperature))
            loss, terms = stage1_loss(cls_logits, dist_logits, y, target, feats, self.dearkd)
        else:
            loss, terms = stage2_loss(cls_logits, dist_logits, y, self.dearkd)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP, the gradients are averaged over the ranks here
        if cfg.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm)
        self.optimizer.step()
        self.step += 1
        return {"loss": loss.detach(), "stage": stage, **terms}

    def _stage1_targets(self, x: torch.Tensor, stored: torch.Tensor | None, online_rows: torch.Tensor | None,
                        ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Teacher maps and [M, B, K] logits: shipped logits where given, a teacher forward where not."""
        stages = sorted({s for s, _ in self.pairs})
        if stored is None:
            maps, primary = teacher_stage_outputs(self.teacher, x, stages)
            return maps, self.online_logits(x, primary)
        if stored.shape[:2] != (self.ensemble_size, len(x)):
            raise ValueError(f"teacher_logits are {list(stored.shape)}; expected [{self.ensemble_size}, {len(x)}, K] "
                             "(ensemble members, images, classes)")
        maps, _ = teacher_stage_outputs(self.teacher, x, stages, logits=False)
        logits = stored.to(self.device, non_blocking=True).float()
        if online_rows is not None and bool(online_rows.any()):
            logits = logits.clone()
            logits[:, online_rows] = self.online_logits(x[online_rows])
        return maps, logits

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Class probabilities: the average of every head's softmax (class token and distillation tokens)."""
        self.model.eval()

        def probs(xb: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                _, (cls_logits, dist_logits) = block_outputs(self.student, xb.to(self.device), [])
            dist = dist_logits if dist_logits.ndim == 3 else dist_logits[None]
            return torch.cat((cls_logits[None], dist)).float().softmax(-1).mean(0)

        return in_batches(probs, x, batch_size)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.predict(x).argmax(1) == y).float().mean())
