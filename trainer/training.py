"""`dfkd train`: the stream consumer, the durable store, the data mix and the DearKD loop, with resume."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import torch

from shared.batch_contract import BatchContract
from shared.config import Settings, resolve_device
from shared.ensemble import Ensemble
from shared.stream import connect_redis
from shared.teacher import Teacher, load_teacher
from shared.weights import save_weights
from trainer.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from trainer.consumer import StreamConsumer
from trainer.distributed import DistributedContext
from trainer.engine import DearKDTrainer, student_for_ensemble
from trainer.scalekd import ScaleKDTrainer
from trainer.metrics import TrainerMetrics
from trainer.mixing import REAL, MixInSampler
from trainer.schedule import stage_at
from trainer.augment import Augment, to_device
from trainer.store import FreshFirstSampler, SyntheticStore
from trainer.student_publisher import StudentPublisher


class StreamFeeder:
    """A thread that moves stream entries into the store (validated, fsynced, then acknowledged)."""

    def __init__(self, consumer: StreamConsumer, metrics: TrainerMetrics, log: Callable[[str], None]):
        self.consumer, self.metrics, self.log = consumer, metrics, log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-feeder", daemon=True)

    def start(self) -> "StreamFeeder":
        self.consumer.ensure_group()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        last_claim = 0.0
        while not self._stop.is_set():
            try:
                result = self.consumer.poll()
                self.metrics.consumed(result)
                if time.monotonic() - last_claim > 5:
                    self.consumer.claim_stale()
                    last_claim = time.monotonic()
            except Exception as exc:  # Redis down: keep the trainer alive, retry
                self.log(f"stream: {exc}; retrying")
                self._stop.wait(1.0)


def _synthetic_source(store: SyntheticStore, sampler: FreshFirstSampler, augment: Augment, metrics: TrainerMetrics,
                      log: Callable[[str], None], seed: int, stored_logits: tuple[str, ...] | None = None):
    """`sample(n)`: n images from the store, augmented and normalised on `augment.device`, with their labels.

    With `stored_logits` (the ensemble's fingerprints) it also gives the logits shipped with the images, [M, n, K],
    for the views drawn (original or flipped, no crop). Images stored without those logits are cropped as usual
    and come with None: the trainer then runs the teachers on them."""
    gen = torch.Generator().manual_seed(seed)
    fallbacks = [0]

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        started = time.monotonic()
        polls = 0
        while len(store) == 0:  # starved: nothing synthesized yet
            if polls % 50 == 0:  # every 10 s
                log(f"waiting for synthetic batches in {store.root} ({time.monotonic() - started:.0f}s)")
            time.sleep(0.2)
            polls += 1
        metrics.starve(time.monotonic() - started if polls else 0.0)
        # Take only the n used: a full batch would move the fresh cursor past images never trained on.
        s = sampler.sample(n)
        labels = to_device(torch.from_numpy(s.labels).long(), augment.device)
        if stored_logits is not None:
            views = _usable_views(s, stored_logits, augment.flip)
            if views:
                x, pick = augment.views(torch.from_numpy(s.images), gen, tuple(s.logit_views[v] for v in views))
                logits = torch.from_numpy(s.logits)[:, torch.tensor(views)[pick], torch.arange(n)]
                return x, labels, to_device(logits, augment.device).float()
            fallbacks[0] += 1
            if fallbacks[0] in (1, 10, 100, 1000):
                log(f"{fallbacks[0]} sample(s) without the ensemble's stored logits: the teachers run on them")
        # On the host only the gather; the copy is pinned and asynchronous, the pixel work on the device.
        return augment(torch.from_numpy(s.images), gen), labels, None

    return sample


def _usable_views(s, members: tuple[str, ...], flip: bool) -> list[int]:
    """Indices into `s.logit_views` of the views a sample can be trained on with its stored logits."""
    if s.logits is None or s.logit_members != members:
        return []
    return [i for i, v in enumerate(s.logit_views) if v == "identity" or (flip and v == "hflip")]


def check_scalekd(settings: Settings, ctx: DistributedContext) -> None:
    """What the ScaleKD recipe does not take, refused before anything starts."""
    if settings.ensemble:
        raise ValueError("`ensemble` is for the DearKD recipe; train.recipe: scalekd distils one ViT teacher "
                         "(scalekd.teacher)")
    if ctx.enabled:
        raise ValueError("train.recipe: scalekd runs in one process; start it without torchrun")
    if settings.train.teacher_logits == "stored":
        raise ValueError("train.teacher_logits: stored is for the DearKD recipe; ScaleKD runs its ViT teacher on "
                         "every view (set it to auto or online)")


def _rank_log(log: Callable[[str], None], rank: int) -> Callable[[str], None]:
    """Progress and evaluation come from rank 0; other ranks report only what is theirs."""
    def rank_log(message: str) -> None:
        if not message.startswith("step "):
            log(f"rank {rank}: {message}")
    return rank_log


def run_training(settings: Settings, teacher: Teacher, eval_set: tuple[torch.Tensor, torch.Tensor] | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Train (or resume) the student; `eval_set` is held-out real data as [0, 1] images and labels.

    Under torchrun each rank runs this with its own share of the stream (see trainer/distributed.py)."""
    ctx = DistributedContext.from_env()
    device = ctx.device(resolve_device(settings.device))
    ctx.start(device)
    try:
        return _train(settings, teacher, eval_set, log, ctx, device)
    finally:
        ctx.stop()


def _train(settings: Settings, teacher: Teacher, eval_set: tuple[torch.Tensor, torch.Tensor] | None,
           log: Callable[[str], None], ctx: DistributedContext, device: torch.device) -> dict:
    cfg, card = settings.train, teacher.card
    scalekd = cfg.recipe == "scalekd"
    student, ensemble, stored = None, None, False  # ScaleKD builds its own student and has no ensemble
    if scalekd:
        check_scalekd(settings, ctx)
    else:
        student = settings.student.for_teacher(card)  # first: a student that cannot take the images is an error
        ensemble = Ensemble.load(teacher, settings.ensemble)
        # What the publisher sends too: one distillation token per member under per_teacher.
        student = student_for_ensemble(student, settings.dearkd,
                                       len(ensemble.members) if settings.dearkd.stage1_fraction > 0 else 1)
        stored = cfg.teacher_logits == "stored" or (cfg.teacher_logits == "auto" and bool(settings.ensemble))
    if not ctx.is_main:
        log = _rank_log(log, ctx.rank)
    out = ctx.rank_dir(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = settings.seed + ctx.rank  # ranks draw different augmentations and replay orders
    metrics = TrainerMetrics(port=cfg.metrics_port if ctx.is_main else None)
    # One contract for the stream and the store: only batches this teacher's student can train on get in.
    # A trainer that distils an ensemble (or stored logits) refuses batches carrying another ensemble's logits.
    contract = BatchContract.from_stream(settings.stream, card,
                                         ensemble.fingerprints if ensemble and (stored or settings.ensemble) else None)
    store = SyntheticStore(ctx.rank_dir(cfg.store_dir), contract)
    for batch_id, reason in store.quarantined:
        log(f"store: batch {batch_id!r} quarantined to {store.quarantine_dir}: {reason}")
    metrics.quarantined.inc(len(store.quarantined))
    sampler = FreshFirstSampler(store, cfg.batch_size, seed=seed)
    feeder = None
    if settings.stream.redis_url is not None and cfg.real_fraction < 1:
        consumer = StreamConsumer(connect_redis(settings.stream.redis_url), settings.stream,
                                  ctx.rank_name(cfg.consumer_name), store,
                                  contract=contract, max_deliveries=cfg.max_deliveries,
                                  # ranks read one entry at a time, so the stream is shared out evenly
                                  batch_entries=1 if ctx.enabled else 16,
                                  claim_idle_ms=cfg.claim_idle_ms)
        feeder = StreamFeeder(consumer, metrics, log).start()

    def real_reader():
        from trainer.dali_reader import RealImageReader, pipeline_device

        if cfg.real_dir is None:
            raise ValueError("train.real_fraction > 0 needs train.real_dir (an ImageFolder of real images)")
        return RealImageReader(cfg.real_dir, cfg.batch_size, card.image_size, card.mean, card.std,
                               in_chans=card.in_chans, device=pipeline_device(str(device)), seed=seed,
                               flip=cfg.flip)

    synthetic = (_synthetic_source(store, sampler, Augment(card.mean, card.std, cfg.crop_padding, cfg.flip, device),
                                   metrics, log, seed, ensemble.fingerprints if stored else None)
                 if cfg.real_fraction < 1 else None)
    mix = MixInSampler(real_reader if cfg.real_fraction > 0 else None, synthetic, cfg.real_fraction, cfg.batch_size,
                       seed=seed)
    if scalekd:
        vit = load_teacher(settings.scalekd.teacher) if settings.scalekd.teacher is not None else teacher
        trainer = ScaleKDTrainer(settings.scalekd, cfg, vit.model, vit.card, card, device)
        teachers = [vit.card.name]
        log(f"ScaleKD: {settings.scalekd.student} from the ViT teacher {vit.card.name!r}")
    else:
        distils = settings.dearkd.stage1_fraction > 0
        trainer = DearKDTrainer(student, settings.dearkd, cfg, teacher.model if distils else None, device,
                                distributed=ctx.enabled, ensemble=ensemble if distils else None)
        teachers = ensemble.names

    checkpoint = find_checkpoint(out)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, trainer.model, trainer.optimizer)
        trainer.step = state["step"]
        sampler.load_state_dict(state["sampler"])
        mix.step, mix.real_seen, mix.synthetic_seen = state["mix"]
        log(f"resumed from {checkpoint} at step {trainer.step}, stage {trainer.stage}")
    ctx.check_same_step(trainer.step)  # DDP then starts every rank from rank 0's weights
    # The service's adversarial terms take DearKD students: a ScaleKD student is not fed back.
    publisher = (StudentPublisher.from_settings(settings, student, card, metrics, log)
                 if ctx.is_main and not scalekd else None)

    def save() -> None:
        save_checkpoint(out, trainer.model, trainer.optimizer, {
            "step": trainer.step, "stage": trainer.stage, "sampler": sampler.state_dict(),
            "mix": [mix.step, mix.real_seen, mix.synthetic_seen]})

    evaluation: dict[str, float] = {}

    def evaluate() -> None:
        if eval_set is None or not ctx.is_main:
            return
        mean = torch.tensor(card.mean).view(1, -1, 1, 1)
        std = torch.tensor(card.std).view(1, -1, 1, 1)
        top1 = trainer.evaluate((eval_set[0] - mean) / std, eval_set[1])
        evaluation["top1"] = top1
        metrics.eval_top1.set(top1)
        log(f"step {trainer.step} eval top-1 {top1:.4f} on {len(eval_set[1])} held-out images")

    started, window_start, window_images = time.perf_counter(), time.perf_counter(), 0
    try:
        while trainer.step < cfg.steps:
            batch = next(mix)
            online = (batch.source == REAL) if batch.teacher_logits is not None else None
            terms = trainer.train_step(batch.images, batch.labels, batch.teacher_logits, online)
            window_images += len(batch.labels)
            metrics.step(terms, len(batch.labels), store)
            if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
                # The loop's one host sync, here rather than every step: the device runs ahead in between.
                losses = " ".join(f"{k} {v:.4f}" for k, v in metrics.losses(terms).items())
                rate = window_images / max(1e-9, time.perf_counter() - window_start)
                log(f"step {trainer.step}/{cfg.steps} stage {terms['stage']} {losses} {rate:.0f} img/s "
                    f"starved {metrics.starved_seconds():.1f}s store {len(store)} batches "
                    f"real {mix.real_seen} synthetic {mix.synthetic_seen}")
                window_start, window_images = time.perf_counter(), 0
            if trainer.step % cfg.eval_every == 0:
                evaluate()
            if trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps:
                save()
            # The stage switch publishes the finished stage-1 student: the service sees the distilled one.
            if publisher is not None and publisher.due(trainer.step, trainer.stage != terms["stage"]):
                publisher.publish(trainer.student, trainer.step, terms["stage"])
    except KeyboardInterrupt:
        if ctx.enabled:  # a peer may be gone mid-step: keep the last periodic checkpoint, which all ranks share
            log(f"interrupted at step {trainer.step}; resume from the last periodic checkpoint in {out}")
            raise
        save()  # an interrupted run resumes from where it stopped, not from the last periodic checkpoint
        log(f"interrupted at step {trainer.step}; checkpoint saved in {out}")
        raise
    finally:
        if feeder is not None:
            feeder.stop()
    if "top1" not in evaluation or trainer.step % cfg.eval_every:
        evaluate()
    if publisher is not None:
        if publisher.last_step != trainer.step:
            trained = stage_at(max(trainer.step - 1, 0), cfg.steps, settings.dearkd.stage1_fraction)
            publisher.publish(trainer.student, trainer.step, trained)
        publisher.close()
    if ctx.is_main:
        save_weights(trainer.student, Path(cfg.out_dir) / "student.safetensors")
    return {"step": trainer.step, "eval_top1": evaluation.get("top1"),
            "eval_images": len(eval_set[1]) if eval_set is not None else None, "seconds": time.perf_counter() - started,
            "real_seen": mix.real_seen, "synthetic_seen": mix.synthetic_seen, "teacher_calls": trainer.teacher_calls,
            "online_logit_rows": trainer.online_logit_rows, "ensemble": teachers,
            "out": str(cfg.out_dir), "rank": ctx.rank, "world_size": ctx.world_size}
