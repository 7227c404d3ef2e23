"""TeacherObjective: the frozen teacher's side of every synthesis method. Pure torch, no web code.

It owns the teacher (with its BatchNorm hooks), the optional independent verifier and the optional student of the
adversarial terms, and turns an image batch into the synthesis loss terms (docs/architecture.md §3). Methods differ
only in what they optimise against it: pixels (`di`) or a generator's weights (`generator`).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.config import SynthConfig
from shared.errors import DfkdError, InvalidRequestError
from shared.teacher import Teacher, TeacherCard, load_teacher
from synth_service.bn_hooks import BNStatsHooks, batchnorm_layers
from synth_service.losses import (
    boundary_margin,
    intra_class_divergence,
    js_competition,
    l2_prior,
    memory_repulsion,
    target_lead,
    total_variation,
)
from synth_service.result import SynthResult
from synth_service.teacher_features import TeacherHead

# Order of the per-iteration loss history columns.
LOSS_TERMS = ("loss", "ce", "bn", "tv_l1", "tv_l2", "l2", "competition", "diversity", "boundary", "memory")


class TeacherObjective:
    """Use as a context manager, or call `close()`: that removes the BN hooks from the teacher."""

    def __init__(self, teacher: Teacher, config: SynthConfig, device: torch.device | str = "cpu",
                 student: nn.Module | None = None, bn_blend: float = 0.0):
        self.card = teacher.card
        self.config = config
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.use_bf16 = config.amp == "bf16" or (config.amp == "auto" and on_cuda)
        self.channels_last = config.channels_last if config.channels_last is not None else on_cuda

        self.teacher = self._freeze(teacher.model)
        self.student = self._freeze(student) if student is not None else None
        c = self.card
        probe = torch.randn(2, c.in_chans, c.image_size, c.image_size, device=self.device,
                            generator=torch.Generator(self.device).manual_seed(0))
        batchnorm_layers(self.teacher)  # refuse a teacher without BatchNorm before anything runs on it
        self._head = TeacherHead(self.teacher, probe, c.arch)  # refuses unreadable heads before any hook exists
        self.verifier_card, self._verifier = self._load_verifier(config.verifier, probe)
        self._bn = BNStatsHooks(self.teacher, probe, blend=bn_blend)
        try:  # a failed objective leaves no hooks on the teacher
            n_bn = len(self._bn.layers)
            weights = config.bn_layer_weights or [1.0] * n_bn
            if len(weights) != n_bn:
                raise InvalidRequestError(
                    f"bn_layer_weights has {len(weights)} entries; the teacher has {n_bn} BN layers")
            w = torch.tensor(weights, dtype=torch.float32)
            w[0] *= config.first_bn_multiplier
            self._bn_weights = w.to(self.device)

            self.mean = torch.tensor(c.mean, device=self.device).view(1, -1, 1, 1)
            self.std = torch.tensor(c.std, device=self.device).view(1, -1, 1, 1)
            self.lo, self.hi = -self.mean / self.std, (1 - self.mean) / self.std
            self._forward = torch.compile(self._teacher_forward) if config.compile else self._teacher_forward
        except BaseException:
            self._bn.remove()
            raise

    # -- setup ------------------------------------------------------------------------------------------------------
    def _freeze(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device).eval()
        model.requires_grad_(False)  # the backward then computes only the input gradient
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def set_student(self, student: nn.Module | None) -> None:
        """Swap the student of the adversarial terms; a batch in flight keeps the one it started with."""
        self.student = self._freeze(student) if student is not None else None

    def _load_verifier(self, path: Path | None, probe: torch.Tensor) -> tuple[TeacherCard | None, TeacherHead | None]:
        """The optional independent classifier: its own model object and a hook-free head reader."""
        if path is None:
            return None, None
        try:
            verifier = load_teacher(path)
        except DfkdError as exc:  # its messages say "teacher"; name the setting at fault
            raise type(exc)(f"synth.verifier: {exc}") from exc
        v, c = verifier.card, self.card
        for what, theirs, ours in (("classes", v.num_classes, c.num_classes), ("channels", v.in_chans, c.in_chans),
                                   ("input size", v.image_size, c.image_size)):
            if theirs != ours:
                raise InvalidRequestError(f"synth.verifier {str(path)!r} ({v.arch}) has {what} {theirs}; the teacher "
                                          f"{c.name!r} has {ours}: the verifier must classify the teacher's images")
        if v.fingerprint == c.fingerprint:
            raise InvalidRequestError(f"synth.verifier {str(path)!r} has the teacher's own weights; it must be an "
                                      "independent model")
        if v.class_names != c.class_names:
            raise InvalidRequestError(f"synth.verifier {str(path)!r} names its classes differently from the teacher "
                                      f"{c.name!r}; the label ids would not mean the same classes")
        try:
            head = TeacherHead(self._freeze(verifier.model), probe, v.arch)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"synth.verifier {str(path)!r}: {exc}") from exc
        self._verifier_norm = (torch.tensor(v.mean, device=self.device).view(1, -1, 1, 1),
                               torch.tensor(v.std, device=self.device).view(1, -1, 1, 1))
        return v, head

    def _verify(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Verifier top-1 and unit penultimate features on the uint8 images as delivered, in its own normalisation."""
        mean, std = self._verifier_norm
        logits, pre = self._verifier((pixels.float() / 255 - mean) / std)
        return logits.argmax(dim=1).cpu(), F.normalize(pre.float(), dim=1).cpu()

    @property
    def active(self) -> bool:
        return self._bn.active

    def close(self) -> None:
        self._bn.remove()

    # -- the objective ----------------------------------------------------------------------------------------------
    def _teacher_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, penultimate features and per-layer BN distances from one teacher forward (fp32 outputs)."""
        self._bn.clear()  # entries a failed forward left behind
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            logits, pre = self._head(x)
        return logits.float(), pre.float(), self._bn.pop()

    def augment(self, x: torch.Tensor, res: int, jitter: int, gen: torch.Generator) -> torch.Tensor:
        """Pool to `res`, roll-jitter by up to `jitter` px at that resolution, random h-flip, as in the reference.

        Shifts are drawn on a CPU generator, so no device sync.
        """
        if res != x.shape[-1]:
            x = F.interpolate(x, size=(res, res), mode="area")
        if jitter > 0:
            dx, dy = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
        if self.config.flip and torch.rand((), generator=gen).item() < 0.5:
            x = torch.flip(x, dims=(3,))
        return x

    def loss_terms(self, x_view: torch.Tensor, y: torch.Tensor, student: nn.Module | None = None,
                   memory: tuple[torch.Tensor, torch.Tensor, float] | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its terms for one (already augmented) view, in the teacher's normalised space.

        `student` is the adversarial student for this step (the caller reads `self.student` once per batch, so a
        hot swap never changes the student in the middle of one). `memory` is (unit features, labels, weight) of
        earlier images to move away from (`memory_repulsion`).
        """
        cfg = self.config
        logits, features, bn = self._forward(x_view)
        zero = logits.new_zeros(())
        tv_l1, tv_l2 = total_variation(x_view.float())
        terms = {
            "ce": F.cross_entropy(logits, y),
            "bn": (bn * self._bn_weights).sum(),
            "tv_l1": tv_l1,
            "tv_l2": tv_l2,
            "l2": l2_prior(x_view.float()),
            "competition": zero,
            "diversity": intra_class_divergence(features, y) if cfg.diversity > 0 else zero,
            "boundary": boundary_margin(logits, y, cfg.margin) if cfg.boundary > 0 else zero,
            # Only images that still lead by the margin are pushed on, so the push never carries one out of its class.
            "memory": memory_repulsion(features, y, memory[0], memory[1],
                                       active=target_lead(logits.detach(), y) >= cfg.margin)
            if memory is not None else zero,
        }
        if student is not None and cfg.competition > 0:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                student_logits = student(x_view)
            terms["competition"] = js_competition(logits, student_logits.float(), cfg.competition_temperature)
        loss = (terms["ce"] + cfg.bn_weight * terms["bn"] + cfg.tv_l1 * terms["tv_l1"] + cfg.tv_l2 * terms["tv_l2"]
                + cfg.l2 * terms["l2"] + cfg.competition * terms["competition"] + cfg.diversity * terms["diversity"]
                + cfg.boundary * terms["boundary"])
        if memory is not None:
            loss = loss + memory[2] * terms["memory"]
        return loss, terms

    @torch.no_grad()
    def finish(self, x: torch.Tensor, y: torch.Tensor, seed: int, iterations: int,
               return_logits: bool) -> SynthResult:
        """The delivered batch: uint8 pixels of `x` (normalised space) with the teacher's and verifier's figures."""
        cfg = self.config
        frozen = self._bn.frozen()  # final figures must not move a running blend of BN statistics
        try:
            logits, features, bn = self._teacher_forward(x)
        finally:
            self._bn.unfreeze(frozen)
        probs = logits.softmax(dim=1)
        ce = F.cross_entropy(logits, y, reduction="none")
        margin = target_lead(logits, y)
        final_terms = {
            "ce": ce.mean(),
            "bn": (bn * self._bn_weights).sum(),
            "bn_unweighted": bn.sum(),
            "diversity": intra_class_divergence(features, y),
            "boundary": boundary_margin(logits, y, cfg.margin),
        }
        pixels = (x.float() * self.std + self.mean).clamp(0, 1).mul(255).round().to(torch.uint8)
        verifier_top1, verifier_features = self._verify(pixels) if self._verifier is not None else (None, None)
        return SynthResult(
            images=pixels.contiguous().cpu(),
            labels=y.cpu(),
            teacher_top1=logits.argmax(dim=1).cpu(),
            teacher_confidence=probs.gather(1, y[:, None]).squeeze(1).cpu(),
            teacher_margin=margin.cpu(),
            features=F.normalize(features, dim=1).cpu(),
            final_terms={k: float(v) for k, v in final_terms.items()},
            history={},
            seconds=0.0,
            iterations=iterations,
            seed=seed,
            logits=logits.cpu() if return_logits else None,
            per_image={"ce": ce.cpu(), "margin": margin.cpu()},
            verifier_top1=verifier_top1,
            verifier_features=verifier_features,
        )
