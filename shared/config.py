"""The one typed config: defaults < YAML file < environment (DFKD_*, nested with __) < explicit overrides."""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource


PRESETS_DIR = Path(__file__).parent / "presets"
PRESETS = ("digits", "cifar10", "imagenet")


class GeneratorConfig(BaseModel):
    """The `generator` synthesis method: one persistent class-conditional generator, a few steps per batch."""

    model_config = {"extra": "forbid"}

    embedding: Literal["orthogonal", "learned"] = Field(
        "orthogonal", description="per-class input: a fixed random orthogonal vector, or a learned embedding")
    noise: Literal["noisy_layer", "latent"] = Field(
        "noisy_layer", description="noisy_layer: a linear layer redrawn from N(0, 1) every loop, the only randomness; "
                                   "latent: a fresh trainable z per batch, optimised with the generator")
    embed_dim: int = Field(64, ge=2, le=4096, description="class-embedding size")
    noise_dim: int = Field(128, ge=2, le=4096, description="output of the noisy layer, or the size of z")
    width: int = Field(64, ge=4, le=1024, description="channels of the conv body (at its widest)")
    steps: int = Field(10, ge=0, le=10_000, description="K: generator steps per batch (a loop); 0: a forward only")
    warmup_steps: int = Field(300, ge=0, le=1_000_000, description="steps a new generator takes before its first "
                                                                 "batch, spread over warm-up loops")
    lr: float = Field(4e-3, gt=0, le=1)
    latent_lr: float = Field(0.01, gt=0, le=10, description="lr of z (noise: latent)")
    betas: tuple[float, float] = (0.5, 0.999)
    reinit_every: int = Field(0, ge=0, description="rebuild the generator every N loops (0: never)")
    seed: int = Field(0, ge=0, description="seed of the generator's initial weights and warm-up noise")
    memory: int = Field(0, ge=0, le=1_000_000, description="teacher features of the last N emitted images kept; each "
                                                           "step pushes new images away from their nearest same-class "
                                                           "one, while they lead their class by `synth.margin` (0: off)")
    memory_weight: float = Field(1.0, ge=0, description="weight of that memory term")
    bn_blend: float = Field(0.0, ge=0, lt=1, description="match a running blend of the batch's BN statistics with "
                                                          "earlier batches' (momentum; 0: this batch alone)")
    serve_steps: int | None = Field(None, ge=0, le=10_000, description="steps for HTTP requests once warm; None: "
                                                                       "`steps`. 0 serves a generator forward only")
    checkpoint: Path | None = Field(None, description="safetensors file of the generator's state: loaded at start "
                                                      "(a restarted service resumes warm), saved on a schedule and "
                                                      "at shutdown")
    checkpoint_every: int = Field(20, ge=1, description="loops between checkpoints")


class SynthConfig(BaseModel):
    """DeepInversion + ADI + BPID settings. Defaults follow the ImageNet reference (ResNet-50, 224 px)."""

    model_config = {"extra": "forbid"}

    method: Literal["di", "generator"] = Field(
        "di", description="di: per-batch pixel optimisation (DeepInversion); generator: a persistent generator "
                          "trained against the teacher, a few steps per batch (see `synth.generator`)")
    batch_size: int = Field(152, ge=1, le=4096, description="images per engine batch")
    iterations: int = Field(2000, ge=1, le=100_000, description="steps at full resolution (no schedule)")
    resolution_schedule: list[tuple[int, int]] | None = Field(
        None, description="[(resolution, iterations), ...]; overrides `iterations`, e.g. [[112, 2000], [224, 1000]]")
    lr: float = Field(0.25, gt=0, le=10)
    betas: tuple[float, float] = (0.5, 0.9)
    warmup_fraction: float | None = Field(
        None, ge=0, lt=1, description="linear warm-up share of each phase, then cosine to zero; 0.05 when neither "
                                      "this nor `warmup_iterations` is set")
    warmup_iterations: int | None = Field(
        None, ge=0, description="linear warm-up length in iterations at the start of each phase, then cosine to zero "
                                "(the reference uses 100); scaled with the phase when a request sets its iterations; "
                                "exclusive with `warmup_fraction`")
    bn_weight: float = Field(0.01, ge=0, description="a_f: BN-statistics matching")
    first_bn_multiplier: float = Field(10.0, ge=0)
    bn_layer_weights: list[float] | None = Field(None, description="per-BN-layer weights in forward order")
    tv_l1: float = Field(0.0, ge=0)
    tv_l2: float = Field(1e-4, ge=0)
    l2: float = Field(1e-5, ge=0)
    jitter: int = Field(30, ge=0, le=512, description="roll-jitter in pixels at full resolution; a lower-resolution "
                                                      "phase pools first, then rolls by up to jitter x res / size "
                                                      "px (floored, at least 1), as the reference's jitter // 2 at "
                                                      "half size")
    flip: bool = True
    competition: float = Field(
        0.0, ge=0, description="a_c: Adaptive-DI teacher/student competition (needs a student). The term is "
                               "1 - clamp(JS', 0, 1), JS' = 0.5 (KL(M‖P) + KL(M‖Q)) averaged over images, with P, Q "
                               "the teacher and student softmax at `competition_temperature` and M = (P + Q) / 2, all "
                               "three clamped to [0.01, 0.99] as in the ADI reference, so its a_c values carry over")
    competition_temperature: float = Field(3.0, gt=0, description="T of the competition softmax (3 in the reference)")
    diversity: float = Field(0.0, ge=0, description="a_div: BPID intra-class divergence")
    boundary: float = Field(0.0, ge=0, description="a_bp: BPID boundary margin")
    margin: float = Field(1.0, ge=0, description="m: teacher logit margin kept by the boundary term")
    keep_best: bool = True
    amp: Literal["auto", "bf16", "off"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    channels_last: bool | None = Field(None, description="None: on CUDA only")
    compile: bool = False
    log_every: int = Field(50, ge=1)
    generator: GeneratorConfig = GeneratorConfig()
    verifier: Path | None = Field(
        None, description="card (JSON) of an independent classifier, ideally another architecture, that the "
                          "losses never see; when set, the report and metrics add its top-1 agreement with the "
                          "target labels and the intra-class diversity in its penultimate features. It must have "
                          "the teacher's classes, channels and input size")

    @model_validator(mode="after")
    def _check(self) -> "SynthConfig":
        if self.resolution_schedule is not None:
            if not self.resolution_schedule:
                raise ValueError("resolution_schedule must have at least one (resolution, iterations) phase")
            for res, iters in self.resolution_schedule:
                if res < 4 or iters < 1:
                    raise ValueError(f"bad schedule phase ({res}, {iters}): resolution >= 4, iterations >= 1")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.warmup_iterations is not None:
            if self.warmup_fraction is not None:
                raise ValueError("set either synth.warmup_iterations or synth.warmup_fraction, not both")
            shortest = min(it for _, it in self.resolution_schedule) if self.resolution_schedule else self.iterations
            if self.warmup_iterations >= shortest:
                raise ValueError(f"synth.warmup_iterations ({self.warmup_iterations}) must be shorter than every "
                                 f"phase; the shortest has {shortest} iterations")
        return self

    def phases(self, image_size: int) -> list[tuple[int, int]]:
        return [tuple(p) for p in self.resolution_schedule] if self.resolution_schedule else [(image_size, self.iterations)]


class DataConfig(BaseModel):
    model_config = {"extra": "forbid"}

    cifar10_dir: Path | None = Field(None, description="CIFAR-10 folder, in one of three layouts: torchvision's "
                                     "cifar-10-batches-py (the folder or its parent); an ImageFolder tree, "
                                     "train/<class>/ and test/<class>/ of .png/.jpg/.jpeg files, classes named "
                                     "airplane..truck or 0-9; a JPEG copy, train_jpeg.npz plus test.npz or "
                                     "test_jpeg.npz")
    digits_size: int = Field(16, ge=8, le=64, description="digits are upsampled from 8x8 to this size")


class TeacherRecipe(BaseModel):
    """How `dfkd teacher train` trains a teacher. Unset fields take the dataset's preset."""

    model_config = {"extra": "forbid"}

    dataset: Literal["digits", "cifar10"] = "digits"
    arch: str | None = None
    epochs: int | None = Field(None, ge=1, le=10_000)
    batch_size: int | None = Field(None, ge=1, le=65_536)
    optimizer: Literal["sgd", "adamw"] | None = None
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    label_smoothing: float | None = Field(None, ge=0, lt=1)
    crop_padding: int | None = Field(None, ge=0)
    flip: bool | None = None
    channels_last: bool | None = Field(None, description="channels-last memory format (always on a GPU; on the CPU "
                                                          "it trains CIFAR's ResNet-20 about 1.4x faster)")
    amp: Literal["auto", "bf16", "off"] | None = Field(
        None, description="auto: bf16 autocast on CUDA only; bf16: also on a CPU with native bf16 (avx512_bf16 or "
                          "AMX; 1.57x for ResNet-20 on 2 cores), else it trains in fp32 and says so")
    refit: bool | None = Field(None, description="train on the validation images too: for a final teacher whose "
                                                 "settings were already chosen on them (its card then reports no "
                                                 "validation figure)")
    train_limit: int | None = Field(None, ge=1, description="use only N training images, the same share of each "
                                                            "class (smoke tests)")
    test_limit: int | None = Field(None, ge=1, description="evaluate on only N test images, the same share of each "
                                                           "class")
    seed: int = Field(0, ge=0)

    def resolved(self) -> "TeacherRecipe":
        preset = dict(TEACHER_PRESETS[self.dataset])
        preset |= ARCH_RECIPES.get((self.dataset, self.arch or preset["arch"]), {})
        return self.model_copy(update={k: v for k, v in preset.items() if getattr(self, k) is None})


TEACHER_PRESETS: dict[str, dict[str, Any]] = {
    "digits": dict(arch="digits_cnn", epochs=20, batch_size=64, optimizer="adamw", lr=3e-3, weight_decay=5e-4,
                   label_smoothing=0.0, crop_padding=2, flip=False, channels_last=False, amp="auto", refit=False),
    "cifar10": dict(arch="wrn_40_2", epochs=200, batch_size=128, optimizer="sgd", lr=0.1, weight_decay=5e-4,
                    label_smoothing=0.0, crop_padding=4, flip=True, channels_last=True, amp="auto", refit=False),
}


# Recipes for particular (dataset, arch) pairs, over the dataset's preset. ResNet-20 is the CPU teacher: a short
# one-cycle schedule with label smoothing that fits an hour on 2 cores (chosen on the validation split, 50 epochs:
# 0.888 there; the final teacher refits on all 50,000 images); VGG-7 (GroupNorm) is the CPU verifier.
ARCH_RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    ("cifar10", "resnet20"): dict(epochs=52, batch_size=128, lr=0.2, weight_decay=5e-4, label_smoothing=0.1,
                                  amp="bf16", refit=True),
    ("cifar10", "vgg7_gn"): dict(epochs=15, batch_size=128, lr=0.1, weight_decay=5e-4, label_smoothing=0.1,
                                 amp="bf16"),
    # ViTs learn from 1,146 digits only with more epochs, weight decay and smoothing than the CNN preset.
    ("digits", "vit_nano_patch2_16"): dict(epochs=60, lr=1e-3, weight_decay=0.05, label_smoothing=0.1),
    # CPU-scale ensemble member and ViT teacher for CIFAR-10 (LIB-KD and ScaleKD benches). Epochs are set by what 2
    # idle cores train in about an hour (RedNet: 4.6 min per epoch; the ViT: 1.6); both run fp32, which is faster
    # than bf16 autocast for them on the CPU. The other settings are the ResNet-20's and the digits ViT's.
    ("cifar10", "rednet_cifar"): dict(epochs=12, batch_size=128, lr=0.2, weight_decay=5e-4, label_smoothing=0.1,
                                      amp="off"),
    ("cifar10", "vit_nano_patch4_32"): dict(epochs=36, batch_size=128, optimizer="adamw", lr=1e-3,
                                            weight_decay=0.05, label_smoothing=0.1, channels_last=False, amp="off"),
}


class StreamConfig(BaseModel):
    """The Redis stream between the synthesis service and the trainers (docs/architecture.md §5)."""

    model_config = {"extra": "forbid"}

    redis_url: str | None = Field(None, description="redis://host:port/db; None: no streaming (HTTP still works)")
    run: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="stream keys are dfkd:{run}:*")
    group: str = Field("trainers", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    max_backlog: int = Field(64, ge=1, description="stream entries not yet acknowledged (lag + pending) before "
                                                   "producers pause")
    maxlen_safety: int = Field(100_000, ge=10, description="approximate MAXLEN safety cap; >= 4x max_backlog")
    chunk_bytes: int = Field(16 * 2**20, ge=1024, le=512 * 2**20, description="entries over this are chunked")
    include_logits: bool = Field(True, description="ship the teacher's fp16 logits with each batch")
    max_batch_images: int = Field(4096, ge=1, le=1_000_000, description="trainers dead-letter batches with more "
                                                                        "images")
    max_batch_bytes: int = Field(2**30, ge=1024, description="trainers dead-letter batches whose payload (images + "
                                                             "logits) is larger")
    max_batch_chunks: int = Field(1024, ge=1, le=1_000_000, description="trainers dead-letter batches split into "
                                                                        "more entries")
    retry_initial_s: float = Field(0.2, gt=0)
    retry_max_s: float = Field(10.0, gt=0)
    dedupe_ttl_s: int = Field(7 * 86400, ge=60, description="how long a published batch id is remembered")

    @model_validator(mode="after")
    def _check(self) -> "StreamConfig":
        if self.maxlen_safety < 4 * self.max_backlog:
            raise ValueError("maxlen_safety must be at least 4x max_backlog so trimming never reaches unread data")
        return self

    def key(self, name: str) -> str:
        return f"dfkd:{self.run}:{name}"


class FeedbackConfig(BaseModel):
    """The trainer's student, published to Redis (`dfkd:{run}:student`) for the service's adversarial terms."""

    model_config = {"extra": "forbid"}

    enabled: bool = Field(False, description="the trainer publishes its student; the service polls for it")
    publish_every: int = Field(200, ge=1, description="trainer steps between publications (and at the stage switch)")
    poll_s: float = Field(5.0, gt=0, le=3600, description="how often the service looks for a newer student")
    max_bytes: int = Field(64 * 2**20, ge=1024, le=2**31, description="larger students are neither published nor "
                                                                      "loaded")


class PoolConfig(BaseModel):
    """A warm per-class pool of recent synthetic images: `"fresh": false` requests are served from it at once and it
    is refilled in the background (docs/architecture.md §6)."""

    model_config = {"extra": "forbid"}

    enabled: bool = False
    max_bytes: int = Field(64 * 2**20, ge=2**10, le=2**40,
                           description="cap on the pool's bytes (in memory: pixels plus a fixed per-image overhead; "
                                       "on disk: file sizes), split evenly between the classes")
    per_class: int | None = Field(None, ge=1, le=10**6, description="images kept warm per class; None: as many as "
                                                                     "max_bytes allows")
    directory: Path | None = Field(None, description="keep the pool on disk here (it survives restarts); None: in "
                                                     "memory")
    serve_by_default: bool = Field(False, description="requests that omit `fresh` are served from the pool when it "
                                                      "is warm (a request's `fresh: true` still synthesises)")


class ServiceConfig(BaseModel):
    """The HTTP synthesis service: batching, limits, auth (docs/architecture.md §6)."""

    model_config = {"extra": "forbid"}

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    auth_token: SecretStr | None = Field(None, description="bearer token; None: no auth")
    metrics_auth: bool = Field(False, description="also require the token on /metrics")
    max_batch: int | None = Field(None, ge=1, le=4096, description="images per engine batch; None: synth.batch_size")
    max_wait_ms: int = Field(100, ge=0, le=60_000, description="how long a batch waits to fill after its first item")
    max_queue_images: int = Field(1024, ge=1, description="queued images beyond which requests get 429")
    sync_max_images: int = Field(64, ge=1, le=4096, description="largest POST /v1/images request")
    max_iterations: int = Field(10_000, ge=1, description="cap on a request's iterations")
    max_body_bytes: int = Field(2**20, ge=1024, le=2**30, description="larger request bodies get 413 before they "
                                                                       "are read")
    docs_open: bool = Field(False, description="serve /docs, /redoc and /openapi.json without the token")
    request_timeout_s: float = Field(600.0, gt=0)
    job_max_images: int = Field(100_000, ge=1)
    job_retention: int = Field(32, ge=1, description="jobs kept (finished ones are evicted oldest first)")
    job_ttl_s: float = Field(3600.0, gt=0, description="finished jobs are dropped after this")
    job_retention_bytes: int = Field(2**30, ge=2**20, description="memory for job results; beyond it the oldest "
                                                                  "finished results are evicted and new jobs that "
                                                                  "cannot fit get 429")
    min_batch_fill: int | None = Field(None, ge=0, le=4096,
                                       description="fill every engine batch to at least this many images with "
                                                   "filler dealt across all classes, since BN-statistics matching "
                                                   "needs a class-balanced batch; None: the full engine batch; 0: off")
    filler_destination: Literal["auto", "pool", "drop"] = Field(
        "auto", description="where filler images go. auto: the stream when one is configured and has room, else the "
                            "pool when enabled, else dropped; pool: the pool (else dropped); drop: dropped. Filler "
                            "of a batch run at a request's own iterations is always dropped")
    pool: PoolConfig = PoolConfig()
    production_per_class: int = Field(8, ge=2, description="images per class in background batches")
    production_enabled: bool = Field(False, description="start producing into the stream at start-up")
    access_log: bool = Field(True, description="log every HTTP request (off under `dfkd up`: scrapes and polls)")


class StudentConfig(BaseModel):
    """A timm DeiT/ViT with a distillation token; the first `mhca_blocks` blocks use MHCA (docs/architecture.md §4).

    Input size, channels and classes come from the teacher card unless set; set ones must match the teacher."""

    model_config = {"extra": "forbid"}

    img_size: int | None = Field(None, ge=4, le=1024, description="None: the teacher's image size")
    patch_size: int = Field(2, ge=1, le=64)
    in_chans: int | None = Field(None, ge=1, le=4, description="None: the teacher's channels")
    num_classes: int | None = Field(None, ge=2, description="None: the teacher's class count")
    embed_dim: int = Field(96, ge=8, le=4096)
    depth: int = Field(6, ge=1, le=48)
    num_heads: int = Field(4, ge=1, le=64)
    mlp_ratio: float = Field(2.0, gt=0, le=16)
    mhca_blocks: int = Field(2, ge=0, description="the first K blocks use MHCA (0: plain DeiT)")
    mhca_dropout: float = Field(0.1, ge=0, lt=1, description="attention dropout in MHCA blocks")
    drop_path: float = Field(0.1, ge=0, lt=1)
    dist_tokens: int = Field(1, ge=1, le=16, description="distillation tokens, each with its own head; the trainer "
                                                          "makes one per ensemble member under "
                                                          "dearkd.ensemble_tokens: per_teacher")

    @model_validator(mode="after")
    def _check(self) -> "StudentConfig":
        if self.img_size is not None and self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.mhca_blocks > self.depth:
            raise ValueError(f"mhca_blocks {self.mhca_blocks} > depth {self.depth}")
        return self

    def for_teacher(self, card) -> "StudentConfig":
        """This config with the teacher card's (a TeacherCard) size, channels and classes filled in; a value set
        in the config that disagrees with the teacher is an error, since the student trains on its images."""
        teacher = {"img_size": card.image_size, "in_chans": card.in_chans, "num_classes": card.num_classes}
        for key, value in teacher.items():
            given = getattr(self, key)
            if given is not None and given != value:
                raise ValueError(f"student.{key} is {given} but the teacher {card.name!r} has {value}; leave "
                                 f"student.{key} unset to take it from the teacher")
        return type(self).model_validate(self.model_dump() | teacher)

    @property
    def resolved(self) -> bool:
        return None not in (self.img_size, self.in_chans, self.num_classes)


class DearKDConfig(BaseModel):
    """Two-stage DearKD losses (docs/architecture.md §4)."""

    model_config = {"extra": "forbid"}

    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation-token KD term in stage 1")
    kd: Literal["hard", "soft"] = Field("hard", description="distillation-token target: hard = the teacher's "
                                                             "argmax (CE), soft = its softmax at `temperature` (KL)")
    temperature: float = Field(1.0, gt=0, description="soft KD temperature T")
    soft_kd_reduction: Literal["deit", "batchmean"] = Field(
        "deit", description="soft KD scale: deit = KL summed over the batch, / (batch x classes), x T^2 (DeiT's); "
                            "batchmean = KL / batch x T^2, `classes` times larger")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    beta: float = Field(1.0, ge=0, description="weight of the aligned early-feature MSE")
    feature_pairs: list[tuple[int, int]] = Field(
        default_factory=lambda: [(1, 1), (2, 2)],
        description="(teacher stage, student block) pairs, 1-based: the output of teacher stage s is matched to "
                    "the output of student block b")
    stage1_fraction: float = Field(0.8, ge=0, le=1, description="share of the steps spent in stage 1")
    ensemble_tokens: Literal["average", "per_teacher"] = Field(
        "average", description="with an `ensemble`: average = the members' averaged soft targets through the one "
                               "distillation token; per_teacher = one distillation token per member, each learning "
                               "its member's logits (Co-advise)")


class ScaleKDConfig(BaseModel):
    """The ScaleKD recipe (`train.recipe: scalekd`): a ViT teacher for a student of any architecture
    (docs/architecture.md §4)."""

    model_config = {"extra": "forbid"}

    teacher: Path | None = Field(None, description="the ViT teacher's card; None: `teacher` itself, which must then be "
                                                   "a ViT. The synthesising teacher's images are relabelled by it")
    student: str = Field("resnet8", description="the student: any registry or timm model with timm's "
                                                "`forward_intermediates` (the project's CNNs, ViTs, MLP-Mixers)")
    student_stages: tuple[int, int] = Field((-2, -1), description="the student's intermediate indices matched to the "
                                                                  "teacher's middle and final tokens")
    teacher_tail_blocks: int = Field(2, ge=1, description="the teacher's last blocks: their input is its middle "
                                                          "point, and TPP runs the student's projections through them")
    cap: bool = Field(True, description="cross-attention projectors; off: a 1x1 conv resized to the teacher's grid")
    dfm: bool = Field(True, description="dual-view mimicking; off: the spatial view alone")
    tpp: bool = Field(True, description="teacher parameter perception: projected middle features through the frozen "
                                        "teacher's tail, matched to its final tokens and used as the final projectors' "
                                        "queries")
    spatial_weight: float = Field(0.08, ge=0, description="spatial view: MSE of per-position L2-normalised tokens")
    frequency_weight: float = Field(0.06, ge=0, description="frequency view: the same after removing each "
                                                            "channel's DCT direct component")
    logit_weight: float = Field(0.5, ge=0, description="KL to the teacher's softmax at `temperature`")
    label_weight: float = Field(1.0, ge=0, description="cross-entropy on the labels")
    temperature: float = Field(1.0, gt=0)
    heads: int = Field(4, ge=1, description="attention heads of each projector (divides the teacher's width)")


class TrainConfig(BaseModel):
    """The student's training run: optimisation, data mix, checkpoints (docs/architecture.md §4-§5)."""

    model_config = {"extra": "forbid"}

    steps: int = Field(2000, ge=1)
    batch_size: int = Field(128, ge=1, le=65_536)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(100, ge=0)
    clip_grad_norm: float | None = Field(5.0, gt=0, description="clip the global gradient norm to this; None: no "
                                                                "clipping")
    recipe: Literal["dearkd", "scalekd"] = Field(
        "dearkd", description="dearkd: the two-stage DearKD ViT from a CNN teacher; scalekd: a student of any "
                              "architecture from a ViT teacher (`scalekd`)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on CUDA, fp32 on CPU; bf16 autocasts the forward passes (losses, weights and "
                            "optimizer stay fp32). On CUDA, fp32 matmuls and convolutions use TF32")
    crop_padding: int = Field(2, ge=0, description="random-crop padding (px) for synthetic and in-memory images")
    flip: bool = False
    teacher_logits: Literal["auto", "stored", "online"] = Field(
        "auto", description="stored: distil the logits shipped with each batch (no teacher forward for them); "
                            "synthetic images are then only flipped, the one view besides the original whose logits "
                            "are shipped. online: run the teachers on every augmented view. auto: stored when "
                            "`ensemble` is set")
    real_dir: Path | None = Field(None, description="ImageFolder of real images, read with DALI")
    real_fraction: float = Field(0.0, ge=0, le=1, description="share of each batch from real_dir "
                                                              "(1.0: the partial-data setting, no synthetic data)")
    eval_every: int = Field(500, ge=1)
    eval_split: Literal["val", "test"] = Field(
        "test", description="real images the student is scored on: 'val' when choosing settings, 'test' to report")
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(50, ge=1)
    out_dir: Path = Path("runs/train")
    store_dir: Path = Path("runs/store")
    consumer_name: str = Field("trainer-0", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    max_deliveries: int = Field(5, ge=1)
    claim_idle_ms: int = Field(60_000, ge=100)
    metrics_port: int | None = Field(None, ge=0, le=65535)


class Settings(BaseSettings):
    """Everything configurable. Load with `Settings.load(yaml_path, **overrides)`."""

    model_config = SettingsConfigDict(env_prefix="DFKD_", env_nested_delimiter="__", extra="forbid")

    teacher: Path | None = Field(None, description="teacher card (JSON) written by `dfkd teacher train`")
    ensemble: list[Path] = Field(default_factory=list, description="further teacher cards (LIB-KD): the service "
                                 "ships every member's logits with each batch, the teacher's first; the trainer "
                                 "distils their averaged soft targets. Service and trainer must list the same cards")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    seed: int = Field(0, ge=0)
    runs_dir: Path = Path("runs")
    synth: SynthConfig = SynthConfig()
    data: DataConfig = DataConfig()
    teacher_train: TeacherRecipe = TeacherRecipe()
    stream: StreamConfig = StreamConfig()
    service: ServiceConfig = ServiceConfig()
    student: StudentConfig = StudentConfig()
    dearkd: DearKDConfig = DearKDConfig()
    scalekd: ScaleKDConfig = ScaleKDConfig()
    train: TrainConfig = TrainConfig()
    feedback: FeedbackConfig = FeedbackConfig()

    _yaml_file: ClassVar[Path | None] = None

    @model_validator(mode="after")
    def _production_fits(self) -> "Settings":
        # Production deals whole per-class groups into engine batches: a group larger than a batch never fits.
        max_batch = self.service.max_batch or self.synth.batch_size
        if self.service.production_per_class > max_batch:
            raise ValueError(f"service.production_per_class ({self.service.production_per_class}) is larger than an "
                             f"engine batch ({max_batch}: service.max_batch, else synth.batch_size), so production "
                             "could never fill one")
        if self.service.min_batch_fill is not None and self.service.min_batch_fill > max_batch:
            raise ValueError(f"service.min_batch_fill ({self.service.min_batch_fill}) is larger than an engine batch "
                             f"({max_batch}: service.max_batch, else synth.batch_size)")
        if self.service.pool.serve_by_default and not self.service.pool.enabled:
            raise ValueError("service.pool.serve_by_default needs service.pool.enabled: there is no pool to serve from")
        if max_batch > self.stream.max_batch_images:
            raise ValueError(f"an engine batch of {max_batch} images is over stream.max_batch_images "
                             f"({self.stream.max_batch_images}): trainers would dead-letter every batch")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=cls._yaml_file))
        return tuple(sources)

    @classmethod
    def load(cls, yaml_file: Path | str | None = None, **overrides: Any) -> "Settings":
        """`yaml_file` (or $DFKD_CONFIG), a path or a preset name, is read first; env vars and `overrides` win."""
        import os

        path = yaml_file or os.environ.get("DFKD_CONFIG")
        if path is not None and not Path(path).is_file():
            if str(path) not in PRESETS:
                raise FileNotFoundError(f"config file not found: {path} (presets: {', '.join(PRESETS)})")
            path = PRESETS_DIR / f"{path}.yaml"
        cls._yaml_file = Path(path) if path else None
        try:
            return cls(**overrides)
        finally:
            cls._yaml_file = None


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device

