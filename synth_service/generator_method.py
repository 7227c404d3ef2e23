"""The `generator` method: amortised inversion. One persistent class-conditional generator is trained against the
frozen teacher with the same loss terms as `di` (BN statistics, CE, priors, BPID, the adversarial student term), and
each batch costs K generator steps (a loop) instead of thousands of pixel steps.

- A loop redraws the noisy layer (or a fresh trainable z), runs K Adam steps on the generator and emits the
  lowest-loss batch of the loop. Loops at the configured K train the shared generator.
- A request at another step count (`iterations`, or `generator.serve_steps`) runs on a throwaway copy; 0 steps is one
  forward pass. A request smaller than a batch runs inside a class-balanced batch, so a small single-class request
  neither gets worse images nor drags the shared generator.
- Memory (`generator.memory`): the teacher features of the last N emitted images; each step pushes new images away
  from their nearest same-class one, so loops keep covering new ground instead of redrawing the same images.
- Warm-up: a new generator first takes `warmup_steps` steps on class-balanced batches.
- State (weights, loop count, the memory, the teacher it belongs to) is saved to `generator.checkpoint`, so a
  restarted service resumes warm.
"""
from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from safetensors import safe_open

from shared.config import SynthConfig
from shared.errors import DfkdError
from shared.teacher import Teacher
from shared.weights import save_safetensors
from synth_service.batch_plan import plan_batches
from synth_service.generator_net import ClassConditionalGenerator, slot_of_each_label
from synth_service.result import ProgressFn, SynthResult
from synth_service.synthesizer import Synthesizer, register_synthesizer
from synth_service.teacher_objective import LOSS_TERMS, TeacherObjective

# Settings that shape the generator's weights: a checkpoint made with others cannot be loaded.
_SHAPE_FIELDS = ("embedding", "noise", "embed_dim", "noise_dim", "width")
# The memory's tensors in the checkpoint, beside the generator's (no module of it is named "memory").
_MEMORY_KEYS = ("memory.features", "memory.labels")


@register_synthesizer("generator")
class GeneratorSynthesizer(Synthesizer):
    def __init__(self, teacher: Teacher, config: SynthConfig, device: torch.device | str = "cpu",
                 student: nn.Module | None = None, student_optional: bool = False,
                 log: Callable[[str], None] = lambda m: None):
        self.check_student(config, student, student_optional)
        self.card, self.config, self.gcfg = teacher.card, config, config.generator
        self.log = log
        self.objective = TeacherObjective(teacher, config, device=device, student=student,
                                          bn_blend=config.generator.bn_blend)
        self.device = self.objective.device
        self.verifier_card = self.objective.verifier_card
        self._lock = threading.Lock()  # one loop at a time: the batcher's worker, or a bench, or warm-up
        self.loops = 0
        self.steps_trained = 0
        self.warmup_seconds: float | None = None
        # Features and labels of recently emitted images (`generator.memory`), oldest first.
        self._memory = (torch.empty(0, 0), torch.empty(0, dtype=torch.long))
        self._seed_stream = torch.Generator().manual_seed(self.gcfg.seed)  # generator inits and warm-up noise, reproducible
        try:
            self.generator = self._new_generator()
            if self.gcfg.checkpoint is not None and Path(self.gcfg.checkpoint).is_file():
                self._load(Path(self.gcfg.checkpoint))
        except BaseException:
            self.objective.close()
            raise

    # -- Synthesizer ------------------------------------------------------------------------------------------------
    @property
    def warm(self) -> bool:
        return self.steps_trained >= self.gcfg.warmup_steps

    def describe(self) -> dict[str, Any]:
        g = self.gcfg
        return {"method": self.method, "steps": g.steps, "serve_steps": self.serve_steps, "noise": g.noise,
                "embedding": g.embedding, "warm": self.warm, "loops": self.loops, "steps_trained": self.steps_trained,
                "warmup_seconds": self.warmup_seconds, "student_step": (self.student_info or {}).get("step")}

    @property
    def serve_steps(self) -> int:
        return self.gcfg.serve_steps if self.gcfg.serve_steps is not None else self.gcfg.steps

    min_iterations = 0  # a forward pass only

    def request_iterations(self, iterations: int | None) -> int | None:
        """A request without a step count runs at `serve_steps` (on a copy), not as a training loop."""
        iterations = super().request_iterations(iterations)
        if iterations is None and self.serve_steps != self.gcfg.steps:
            return self.serve_steps
        return iterations

    def warm_up(self, progress: ProgressFn | None = None) -> float:
        """Train a new generator for `warmup_steps` on class-balanced batches; returns the seconds it took."""
        with self._lock:
            if self.warm:
                return 0.0
            started = time.perf_counter()
            remaining = self.gcfg.warmup_steps - self.steps_trained
            per_loop = max(1, self.gcfg.steps)
            total = remaining
            classes = list(range(self.card.num_classes))
            per_class = max(1, self.config.batch_size // len(classes))
            labels = plan_batches(classes, per_class, self.config.batch_size)[0]
            done = 0
            while self.steps_trained < self.gcfg.warmup_steps:
                k = min(per_loop, self.gcfg.warmup_steps - self.steps_trained)
                self._loop(torch.tensor(labels, device=self.device), self.generator, k, self._next_seed(),
                           train_shared=True)
                done += k
                if progress is not None:
                    progress(done, total, {})
            self.warmup_seconds = time.perf_counter() - started
            self.log(f"generator warm after {self.steps_trained} steps ({self.warmup_seconds:.1f}s)")
            self._maybe_checkpoint(force=True)
            return self.warmup_seconds

    def synthesize(self, labels: Sequence[int] | torch.Tensor, seed: int = 0, iterations: int | None = None,
                   return_logits: bool = False, progress: ProgressFn | None = None,
                   init: torch.Tensor | None = None) -> SynthResult:
        """One batch. `init` (per-image starting pixels) does not apply to a generator and is ignored."""
        if not self.objective.active:
            raise RuntimeError("this synthesizer was closed")
        y = self.validate_labels(labels).to(self.device)
        self.request_iterations(iterations)  # refuses a negative count
        if not self.warm:
            self.warm_up()
        with self._lock:
            start = time.perf_counter()
            steps = self.gcfg.steps if iterations is None else iterations
            shared = iterations is None or iterations == self.gcfg.steps
            model = self.generator if shared else copy.deepcopy(self.generator)
            n = len(y)
            if n < self.config.batch_size:
                # The generator's BatchNorm layers and the teacher's statistics loss both work on batch statistics:
                # a small request runs inside a class-balanced batch like the ones the generator trained on, so it
                # neither gets worse images nor drags the shared generator towards its few classes.
                offset = seed % self.card.num_classes
                fill = [(offset + i) % self.card.num_classes for i in range(self.config.batch_size - n)]
                y = torch.cat([y, torch.tensor(fill, device=self.device)])
            result = self._loop(y, model, steps, seed, train_shared=shared, return_logits=return_logits,
                                progress=progress)
            result = result.select(0, n) if len(y) > n else result
            result.seconds = time.perf_counter() - start
            if shared:
                self._maybe_checkpoint()
            return result

    def close(self) -> None:
        if not self.objective.active:
            return
        try:
            if self.gcfg.checkpoint is not None and self.steps_trained > 0:
                with self._lock:
                    self._save(Path(self.gcfg.checkpoint))
        finally:
            self.objective.close()

    # -- the loop ---------------------------------------------------------------------------------------------------
    def _new_generator(self) -> ClassConditionalGenerator:
        c = self.card
        with torch.random.fork_rng(devices=[]):  # seeded weights without moving the process's global RNG
            torch.manual_seed(self._next_seed())
            return ClassConditionalGenerator(c.num_classes, c.in_chans, c.image_size, self.gcfg).to(self.device)

    def _next_seed(self) -> int:
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self._seed_stream))

    def _loop(self, y: torch.Tensor, model: ClassConditionalGenerator, steps: int, seed: int, train_shared: bool,
              return_logits: bool = False, progress: ProgressFn | None = None) -> SynthResult:
        """K steps on `model` for the batch `y`; the lowest-loss images of the loop are the batch."""
        obj, g, size = self.objective, self.gcfg, self.card.image_size
        gen = torch.Generator().manual_seed(seed)
        student = obj.student  # one student for the whole loop, whatever a hot swap does meanwhile
        slots = int(slot_of_each_label(y).max()) + 1
        z = None
        params = [p for n, p in model.named_parameters() if not n.startswith("noise_params")]
        groups: list[dict[str, Any]] = [{"params": params, "lr": g.lr}]
        if g.noise == "noisy_layer":
            groups.append({"params": [model.redraw_noise(slots, gen)], "lr": g.lr})
        else:
            z = torch.randn(len(y), g.noise_dim, generator=gen).to(self.device).requires_grad_(steps > 0)
            groups.append({"params": [z], "lr": g.latent_lr})
        jitter = self.config.jitter
        memory = None
        if g.memory and len(self._memory[1]):
            memory = (self._memory[0].to(self.device), self._memory[1].to(self.device), g.memory_weight)
        history = torch.zeros(max(1, steps), len(LOSS_TERMS), device=self.device)
        model.train()  # batch statistics in the generator's BatchNorm, as in every loop it trained in
        if steps == 0:
            with torch.no_grad():
                best_x = (model(y, z) - obj.mean) / obj.std
        else:
            optimizer = torch.optim.Adam(groups, betas=g.betas)  # fresh per loop, as in the published methods
            best_x, best_loss = None, torch.full((), float("inf"), device=self.device)
            for step in range(steps):
                x = (model(y, z) - obj.mean) / obj.std
                loss, terms = obj.loss_terms(obj.augment(x, size, jitter, gen), y, student, memory)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    history[step] = torch.stack([loss.detach()] + [terms[k].detach() for k in LOSS_TERMS[1:]])
                    better = loss.detach() < best_loss
                    best_x = x.detach() if best_x is None else torch.where(better, x.detach(), best_x)
                    best_loss = torch.minimum(best_loss, loss.detach())
                if progress is not None and ((step + 1) % self.config.log_every == 0 or step + 1 == steps):
                    progress(step + 1, steps, dict(zip(LOSS_TERMS, history[step].tolist())))
            if train_shared:
                self.steps_trained += steps
        if train_shared:
            self.loops += 1
            if g.reinit_every and self.loops % g.reinit_every == 0 and self.warm:
                self.log(f"generator rebuilt after {self.loops} loops")
                self.generator = self._new_generator()
                self.objective._bn.reset_blend()
                self.steps_trained = 0  # the next batch warms the new generator up first
        result = obj.finish(best_x, y, seed, steps, return_logits)
        if g.memory and train_shared:
            feats = torch.cat([self._memory[0], result.features]) if len(self._memory[1]) else result.features
            self._memory = (feats[-g.memory:], torch.cat([self._memory[1], result.labels])[-g.memory:])
        result.history = {k: v for k, v in zip(LOSS_TERMS, history[:steps].t().cpu().tolist())} if steps else \
            {k: [] for k in LOSS_TERMS}
        result.phases = [(size, steps)]
        return result

    # -- state ------------------------------------------------------------------------------------------------------
    def _maybe_checkpoint(self, force: bool = False) -> None:
        if self.gcfg.checkpoint is not None and (force or self.loops % self.gcfg.checkpoint_every == 0):
            self._save(Path(self.gcfg.checkpoint))

    def _save(self, path: Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.generator.state_dict().items()
                 if not k.startswith("noise_params")}
        if len(self._memory[1]):
            state |= {k: v.detach().cpu().contiguous() for k, v in zip(_MEMORY_KEYS, self._memory)}
        meta = {"teacher_fingerprint": self.card.fingerprint, "loops": str(self.loops),
                "steps_trained": str(self.steps_trained),
                "shape": json.dumps({k: getattr(self.gcfg, k) for k in _SHAPE_FIELDS}, sort_keys=True),
                "warmup_seconds": str(self.warmup_seconds or 0.0)}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(path, state, meta)

    def _load(self, path: Path) -> None:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise DfkdError(f"synth.generator.checkpoint {str(path)!r} is not a readable safetensors file: {exc}") \
                from None
        if meta.get("teacher_fingerprint") != self.card.fingerprint:
            raise DfkdError(f"synth.generator.checkpoint {str(path)!r} was trained for another teacher; move it "
                            "away or point the setting at a new file")
        shape = json.dumps({k: getattr(self.gcfg, k) for k in _SHAPE_FIELDS}, sort_keys=True)
        if meta.get("shape") != shape:
            raise DfkdError(f"synth.generator.checkpoint {str(path)!r} has another generator shape "
                            f"({meta.get('shape')}, now {shape}); move it away or restore those settings")
        memory = [state.pop(k) for k in _MEMORY_KEYS if k in state]  # older checkpoints have none
        if memory and (len(memory) != 2 or memory[0].ndim != 2 or memory[1].shape != memory[0].shape[:1]):
            raise DfkdError(f"synth.generator.checkpoint {str(path)!r} holds a damaged memory "
                            f"({[tuple(t.shape) for t in memory]}); move it away")
        missing, unexpected = self.generator.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise DfkdError(f"synth.generator.checkpoint {str(path)!r} does not match the generator "
                            f"(missing {missing}, unexpected {unexpected})")
        self.loops = int(meta.get("loops", 0))
        self.steps_trained = int(meta.get("steps_trained", 0))
        self.warmup_seconds = float(meta.get("warmup_seconds", 0.0)) or None
        if memory and self.gcfg.memory:
            self._memory = (memory[0][-self.gcfg.memory:], memory[1][-self.gcfg.memory:])
        self.log(f"generator resumed from {path} ({self.loops} loops, {self.steps_trained} steps)")

