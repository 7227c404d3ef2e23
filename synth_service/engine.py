"""InversionEngine: DeepInversion + Adaptive-DI + BPID on a frozen teacher. Pure torch, no web code.

See docs/architecture.md §3.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.config import SynthConfig
from shared.errors import DfkdError, InvalidRequestError
from shared.teacher import Teacher, TeacherCard, load_teacher
from synth_service.bn_hooks import BNStatsHooks, batchnorm_layers
from synth_service.labels import check_class_ids
from synth_service.losses import (
    boundary_margin,
    intra_class_divergence,
    js_competition,
    l2_prior,
    total_variation,
)
from synth_service.teacher_features import TeacherHead

# Order of the per-iteration loss history columns.
LOSS_TERMS = ("loss", "ce", "bn", "tv_l1", "tv_l2", "l2", "competition", "diversity", "boundary")

ProgressFn = Callable[[int, int, dict[str, float]], None]


@dataclass
class SynthResult:
    """One engine batch. Tensors are on the CPU; images are uint8 in the teacher's pixel space."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64 target classes
    teacher_top1: torch.Tensor  # (N,) int64 teacher prediction on the final images
    teacher_confidence: torch.Tensor  # (N,) teacher probability of the target class
    teacher_margin: torch.Tensor  # (N,) target logit minus the best other logit
    features: torch.Tensor  # (N, D) L2-normalised penultimate teacher features
    final_terms: dict[str, float]  # batch loss terms on the final (un-jittered) images
    history: dict[str, list[float]]  # per-iteration loss terms (on the jittered views)
    seconds: float
    iterations: int
    seed: int
    logits: torch.Tensor | None = None  # (N, K) fp32, when requested
    per_image: dict[str, torch.Tensor] = field(default_factory=dict)  # per-image final loss terms
    phases: list[tuple[int, int]] = field(default_factory=list)  # (resolution, iterations) run, in history order
    verifier_top1: torch.Tensor | None = None  # (N,) verifier prediction on the final uint8 images, when configured
    verifier_features: torch.Tensor | None = None  # (N, D') L2-normalised penultimate verifier features

    def select(self, start: int, stop: int) -> "SynthResult":
        """Images start..stop of this batch, with the batch-level terms and history shared."""
        part = lambda t: t[start:stop] if t is not None else None  # noqa: E731
        return SynthResult(
            images=part(self.images), labels=part(self.labels), teacher_top1=part(self.teacher_top1),
            teacher_confidence=part(self.teacher_confidence), teacher_margin=part(self.teacher_margin),
            features=part(self.features), final_terms=self.final_terms, history=self.history,
            seconds=self.seconds, iterations=self.iterations, seed=self.seed, logits=part(self.logits),
            per_image={k: part(v) for k, v in self.per_image.items()}, phases=self.phases,
            verifier_top1=part(self.verifier_top1), verifier_features=part(self.verifier_features),
        )

    @staticmethod
    def concat(results: Sequence["SynthResult"]) -> "SynthResult":
        first = results[0]
        cat = lambda name: torch.cat([getattr(r, name) for r in results])  # noqa: E731
        n = [len(r.labels) for r in results]
        # Batch-level terms are averaged weighted by batch size.
        final = {k: sum(r.final_terms[k] * m for r, m in zip(results, n)) / sum(n) for k in first.final_terms}
        return SynthResult(
            images=cat("images"), labels=cat("labels"), teacher_top1=cat("teacher_top1"),
            teacher_confidence=cat("teacher_confidence"), teacher_margin=cat("teacher_margin"),
            features=cat("features"), final_terms=final,
            history={k: [sum(r.history[k][i] * m for r, m in zip(results, n)) / sum(n)
                         for i in range(len(first.history[k]))] for k in first.history},
            seconds=sum(r.seconds for r in results), iterations=first.iterations, seed=first.seed,
            logits=cat("logits") if first.logits is not None else None,
            per_image={k: torch.cat([r.per_image[k] for r in results]) for k in first.per_image},
            phases=first.phases,
            verifier_top1=cat("verifier_top1") if first.verifier_top1 is not None else None,
            verifier_features=cat("verifier_features") if first.verifier_features is not None else None,
        )


def warmup_length(config: SynthConfig, phase_iters: int, scale: float = 1.0) -> int:
    """Warm-up steps of a phase of `phase_iters` steps; `scale` is how much a request's iterations scaled the phase.

    Fixed iterations (the reference's 100) scale with the phase, so a short request is not all warm-up.
    """
    if config.warmup_iterations is not None:
        return min(round(config.warmup_iterations * scale), phase_iters - 1)
    fraction = config.warmup_fraction if config.warmup_fraction is not None else 0.05
    return int(phase_iters * fraction)


def phase_jitter(jitter: int, res: int, size: int) -> int:
    """Roll limit in pixels at resolution `res`: floored as in the reference (30 at 224 px -> 15 at 112), >= 1."""
    return max(1, jitter * res // size) if jitter > 0 else 0


def inversion_lr(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps then cosine to zero, within one phase."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr


def plan_batches(classes: Sequence[int], per_class: int, batch_size: int) -> list[list[int]]:
    """Label lists for the fewest engine batches, of near-equal size, with the classes spread across them.

    BN statistics are batch statistics: a batch holding a single class pulls every image towards that class's
    share of the running statistics, so each class is split into chunks dealt to different batches. Chunks hold
    at least two images (BPID needs same-class pairs) unless a class has a single image.
    """
    if per_class < 1:
        raise InvalidRequestError(f"per-class count must be >= 1, got {per_class}")
    if not classes:
        raise InvalidRequestError("at least one class is needed")
    if batch_size < 1:
        raise InvalidRequestError(f"batch size must be >= 1, got {batch_size}")
    total = len(classes) * per_class
    n = -(-total // batch_size)
    while True:
        batches: list[list[int]] = [[] for _ in range(n)]
        for c in classes:
            chunks = min(n, max(1, per_class // 2))
            sizes = [per_class // chunks + (1 if k < per_class % chunks else 0) for k in range(chunks)]
            for size in sizes:
                # The emptiest batch that does not hold this class yet (else the emptiest).
                order = sorted(range(n), key=lambda b: (c in batches[b], len(batches[b])))
                batches[order[0]].extend([c] * size)
        if max(map(len, batches)) <= batch_size:
            return [b for b in batches if b]
        n += 1


class InversionEngine:
    """Owns a frozen teacher (and optional ADI student); inverts one batch of labels per `synthesize` call.

    Use as a context manager, or call `close()`: that removes the BN hooks from the teacher.
    """

    def __init__(self, teacher: Teacher, config: SynthConfig, device: torch.device | str = "cpu",
                 student: nn.Module | None = None):
        self.card = teacher.card
        self.config = config
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.use_bf16 = config.amp == "bf16" or (config.amp == "auto" and on_cuda)
        self.channels_last = config.channels_last if config.channels_last is not None else on_cuda
        if config.competition > 0 and student is None:
            raise InvalidRequestError("competition > 0 (Adaptive DI) needs a student network")

        self.teacher = self._freeze(teacher.model)
        self.student = self._freeze(student) if student is not None else None
        c = self.card
        probe = torch.randn(2, c.in_chans, c.image_size, c.image_size, device=self.device,
                            generator=torch.Generator(self.device).manual_seed(0))
        batchnorm_layers(self.teacher)  # refuse a teacher without BatchNorm before anything runs on it
        self._head = TeacherHead(self.teacher, probe, c.arch)  # refuses unreadable heads before any hook exists
        self.verifier_card, self._verifier = self._load_verifier(config.verifier, probe)
        self._bn = BNStatsHooks(self.teacher, probe)
        try:  # a failed engine leaves no hooks on the teacher
            n_bn = len(self._bn.layers)
            weights = config.bn_layer_weights or [1.0] * n_bn
            if len(weights) != n_bn:
                raise InvalidRequestError(
                    f"bn_layer_weights has {len(weights)} entries; the teacher has {n_bn} BN layers")
            w = torch.tensor(weights, dtype=torch.float32)
            w[0] *= config.first_bn_multiplier
            self._bn_weights = w.to(self.device)

            self._mean = torch.tensor(c.mean, device=self.device).view(1, -1, 1, 1)
            self._std = torch.tensor(c.std, device=self.device).view(1, -1, 1, 1)
            self._lo, self._hi = -self._mean / self._std, (1 - self._mean) / self._std
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

    def close(self) -> None:
        self._bn.remove()

    def __enter__(self) -> "InversionEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- validation -------------------------------------------------------------------------------------------------
    def validate_labels(self, labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
        y = torch.as_tensor(labels, dtype=torch.int64).flatten()
        if y.numel() == 0:  # one label per image: "no class ids" would misname it here
            raise InvalidRequestError("no labels: the image count must be >= 1")
        check_class_ids(self.card, y.tolist())
        return y

    # -- the loop ---------------------------------------------------------------------------------------------------
    def _teacher_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, penultimate features and per-layer BN distances from one teacher forward (fp32 outputs)."""
        self._bn.clear()  # entries a failed forward left behind
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            logits, pre = self._head(x)
        return logits.float(), pre.float(), self._bn.pop()

    def _augment(self, x: torch.Tensor, res: int, jitter: int, gen: torch.Generator) -> torch.Tensor:
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

    def loss_terms(self, x_view: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its terms for one (already augmented) view, in the teacher's normalised space."""
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
        }
        if self.student is not None and cfg.competition > 0:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                student_logits = self.student(x_view)
            terms["competition"] = js_competition(logits, student_logits.float(), cfg.competition_temperature)
        loss = (terms["ce"] + cfg.bn_weight * terms["bn"] + cfg.tv_l1 * terms["tv_l1"] + cfg.tv_l2 * terms["tv_l2"]
                + cfg.l2 * terms["l2"] + cfg.competition * terms["competition"] + cfg.diversity * terms["diversity"]
                + cfg.boundary * terms["boundary"])
        return loss, terms

    def synthesize(self, labels: Sequence[int] | torch.Tensor, seed: int = 0, iterations: int | None = None,
                   return_logits: bool = False, progress: ProgressFn | None = None,
                   init: torch.Tensor | None = None) -> SynthResult:
        """Invert one batch. `iterations` scales every phase of the schedule to that total.

        `init` (N, C, H, W) replaces the seeded starting noise, so coalesced requests keep their own seeds.
        """
        if not self._bn.active:
            raise RuntimeError("this engine was closed")
        cfg, card = self.config, self.card
        y = self.validate_labels(labels).to(self.device)
        phases = cfg.phases(card.image_size)
        if iterations is not None:
            if iterations < 1:
                raise InvalidRequestError(f"iterations must be >= 1, got {iterations}")
            total = sum(it for _, it in phases)
            phases = [(res, max(1, round(it * iterations / total))) for res, it in phases]
        total_iters = sum(it for _, it in phases)
        scale = 1.0 if iterations is None else iterations / sum(it for _, it in cfg.phases(card.image_size))

        gen = torch.Generator().manual_seed(seed)
        n, size = len(y), card.image_size
        # Noise drawn on the CPU so a seed gives the same start on any device.
        shape = (n, card.in_chans, size, size)
        if init is not None and tuple(init.shape) != shape:
            raise InvalidRequestError(f"init has shape {tuple(init.shape)}, expected {shape}")
        x = (init.detach().float().clone() if init is not None else torch.randn(shape, generator=gen)).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        best_x = x.detach().clone()
        best_loss = torch.full((), float("inf"), device=self.device)
        history = torch.zeros(total_iters, len(LOSS_TERMS), device=self.device)

        start, step = time.perf_counter(), 0
        for res, phase_iters in phases:
            jitter = phase_jitter(cfg.jitter, res, size)
            warmup = warmup_length(cfg, phase_iters, scale)
            optimizer = torch.optim.Adam([x], lr=cfg.lr, betas=cfg.betas)  # fresh state per phase, as in DI
            for i in range(phase_iters):
                for group in optimizer.param_groups:
                    group["lr"] = inversion_lr(i, phase_iters, cfg.lr, warmup)
                view = self._augment(x, res, jitter, gen)
                loss, terms = self.loss_terms(view, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    history[step] = torch.stack([loss.detach()] + [terms[k].detach() for k in LOSS_TERMS[1:]])
                    if cfg.keep_best and res == size:
                        better = loss.detach() < best_loss
                        best_x = torch.where(better, x.detach(), best_x)
                        best_loss = torch.minimum(best_loss, loss.detach())
                optimizer.step()
                with torch.no_grad():
                    x.clamp_(min=self._lo, max=self._hi)
                step += 1
                if progress is not None and (step % cfg.log_every == 0 or step == total_iters):
                    row = history[step - 1].tolist()  # the only host sync, every log_every steps
                    progress(step, total_iters, dict(zip(LOSS_TERMS, row)))

        final_x = best_x if cfg.keep_best and torch.isfinite(best_loss) else x.detach()
        result = self._finish(final_x, y, seed, total_iters, return_logits)
        result.history = {k: v for k, v in zip(LOSS_TERMS, history.t().cpu().tolist())}
        result.phases = [(res, it) for res, it in phases]
        result.seconds = time.perf_counter() - start
        return result

    @torch.no_grad()
    def _finish(self, x: torch.Tensor, y: torch.Tensor, seed: int, iterations: int,
                return_logits: bool) -> SynthResult:
        cfg = self.config
        logits, features, bn = self._teacher_forward(x)
        probs = logits.softmax(dim=1)
        ce = F.cross_entropy(logits, y, reduction="none")
        target = logits.gather(1, y[:, None]).squeeze(1)
        margin = target - logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
        final_terms = {
            "ce": ce.mean(),
            "bn": (bn * self._bn_weights).sum(),
            "bn_unweighted": bn.sum(),
            "diversity": intra_class_divergence(features, y),
            "boundary": boundary_margin(logits, y, cfg.margin),
        }
        pixels = (x.float() * self._std + self._mean).clamp(0, 1).mul(255).round().to(torch.uint8)
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

    def synthesize_classes(self, classes: Sequence[int], per_class: int, seed: int = 0,
                           iterations: int | None = None, return_logits: bool = False,
                           progress: ProgressFn | None = None) -> SynthResult:
        """k images for each class, in engine batches of at most `batch_size`; batch b uses seed + b.

        `progress` sees steps counted over all batches.
        """
        self.validate_labels(list(classes))
        batches = plan_batches(list(classes), per_class, self.config.batch_size)
        results = []
        for b, labels in enumerate(batches):
            batch_progress = None
            if progress is not None:
                def batch_progress(step: int, total: int, terms: dict[str, float], _b: int = b) -> None:
                    progress(_b * total + step, len(batches) * total, terms)
            results.append(self.synthesize(labels, seed=seed + b, iterations=iterations,
                                           return_logits=return_logits, progress=batch_progress))
        return SynthResult.concat(results)
