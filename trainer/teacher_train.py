"""Train a teacher on real data (digits on CPU in seconds, CIFAR-10 on a GPU) and write safetensors + a JSON card."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.config import DataConfig, TeacherRecipe
from shared.data import cifar10, digits
from shared.data.splits import ImageSplit, split_digest, stratified_limit
from shared.models import create_model
from shared.teacher import Teacher, TeacherCard
from shared.weights import fingerprint, save_weights
from trainer.teacher_resume import load_progress, save_progress


# Cards record this; a cached teacher trained on another split (before validation images were held out) is stale.
SPLIT_VERSION = "train-val-test/1"


def load_split(recipe: TeacherRecipe, data: DataConfig) -> tuple[ImageSplit, list[str]]:
    if recipe.dataset == "digits":
        split = digits.load_digits_split(data.digits_size)
        split.x_test, split.y_test = _limited(split.x_test, split.y_test, recipe.test_limit)
        return split, digits.CLASS_NAMES
    split = cifar10.load_cifar10_split(data.cifar10_dir, recipe.train_limit, recipe.test_limit)
    return split, cifar10.CLASS_NAMES


def load_heldout(recipe: TeacherRecipe, data: DataConfig, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The 'val' or 'test' images `load_split` gives for `recipe`, without decoding the training images."""
    if recipe.dataset == "digits":
        x, y = digits.load_digits_split(data.digits_size).images(name)
        return _limited(x, y, recipe.test_limit) if name == "test" else (x, y)
    limit = recipe.test_limit if name == "test" else recipe.train_limit  # validation is carved from the training
    return cifar10.load_cifar10_images(data.cifar10_dir, name, limit)


def _limited(x: torch.Tensor, y: torch.Tensor, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.from_numpy(stratified_limit(y.numpy(), limit))
    return x[keep], y[keep]


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per-image random crop from a zero-padded copy, and optional h-flip, on whole batches on the device."""
    n, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding,) * 4)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # (n, h)
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # (n, w)
        idx = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def bf16_autocast(amp: str | None, device: torch.device, log: Callable[[str], None]) -> bool:
    """Whether to train under bf16 autocast; a CPU without native bf16 would emulate it, slower than fp32."""
    if device.type == "cuda":
        return amp != "off"
    if amp != "bf16":
        return False
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log("amp=bf16: this CPU has no native bf16 (avx512_bf16 or AMX), so the teacher trains in fp32")
        return False
    return True


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
             batch_size: int = 1024) -> float:
    """Top-1 accuracy of `model` on [0, 1] images `x`."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(y), batch_size):
        xb = ((x[i:i + batch_size].to(device) - mean) / std)
        correct += (model(xb).argmax(1).cpu() == y[i:i + batch_size]).sum().item()
    return correct / len(y)


def train_teacher(recipe: TeacherRecipe, data: DataConfig, out_dir: Path, name: str | None = None,
                  device: torch.device | str = "cpu",
                  log: Callable[[str], None] = print) -> tuple[Teacher, Path]:
    """Train, evaluate on the held-out split, write `<name>.safetensors` and `<name>.json`; return the card path.

    After every epoch the state is saved to `<name>.progress.safetensors`; a run of the same recipe started again
    resumes from it (one of another recipe is moved aside), and the file is removed once the teacher is written.
    """
    r = recipe.resolved()
    name = name or f"{r.dataset}_{r.arch}"
    out_dir = Path(out_dir)
    device = torch.device(device)
    torch.manual_seed(r.seed)
    gen = torch.Generator().manual_seed(r.seed)
    started = time.perf_counter()
    split, class_names = load_split(r, data)
    mean_t, std_t = split.channel_stats()
    in_chans, size = split.x_train.shape[1], split.x_train.shape[-1]
    model = create_model(r.arch, num_classes=len(class_names), in_chans=in_chans).to(device)
    on_cuda = device.type == "cuda"
    channels_last = on_cuda or bool(r.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    use_bf16 = bf16_autocast(r.amp, device, log)
    mean = torch.tensor(mean_t, device=device).view(1, -1, 1, 1)
    std = torch.tensor(std_t, device=device).view(1, -1, 1, 1)

    x_train, y_train = split.x_train.to(device), split.y_train.to(device)
    if r.refit:  # the settings were chosen on the validation images; the final teacher learns from them too
        x_train, y_train = torch.cat([x_train, split.x_val.to(device)]), torch.cat([y_train, split.y_val.to(device)])
    steps_per_epoch = max(1, len(y_train) // r.batch_size)
    total_steps = r.epochs * steps_per_epoch
    if r.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=0.9, weight_decay=r.weight_decay, nesterov=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.lr, total_steps=total_steps, pct_start=0.15)

    progress_path = out_dir / f"{name}.progress.safetensors"
    recipe_key = r.model_dump(mode="json") | {"device": str(device), "split": SPLIT_VERSION}
    first_epoch, spent_before = 0, 0.0
    resumed = load_progress(progress_path, model, opt, sched, gen, recipe_key, log)
    if resumed is not None:
        first_epoch, spent_before = resumed
        log(f"resuming after epoch {first_epoch}/{r.epochs} from {progress_path}")
    started -= spent_before  # train_seconds counts every run of this recipe
    out_dir.mkdir(parents=True, exist_ok=True)

    for epoch in range(first_epoch, r.epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=gen).to(device)
        running = torch.zeros((), device=device)
        for s in range(steps_per_epoch):
            idx = perm[s * r.batch_size:(s + 1) * r.batch_size]
            xb = random_crop_flip(x_train[idx], r.crop_padding, r.flip, gen)
            xb = (xb - mean) / std
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = F.cross_entropy(model(xb).float(), y_train[idx], label_smoothing=r.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.detach()
        if epoch == r.epochs - 1 or (epoch + 1) % max(1, r.epochs // 10) == 0:
            log(f"epoch {epoch + 1}/{r.epochs} loss {running.item() / steps_per_epoch:.4f} "
                f"({time.perf_counter() - started:.0f}s)")
        if epoch < r.epochs - 1:
            save_progress(progress_path, model, opt, sched, gen, epoch + 1, recipe_key,
                          time.perf_counter() - started)

    model = model.to(memory_format=torch.contiguous_format)
    val_accuracy = None if r.refit else evaluate(model, split.x_val, split.y_val, mean, std)
    accuracy = evaluate(model, split.x_test, split.y_test, mean, std)
    seconds = time.perf_counter() - started
    scored_val = ("validation images trained on (refit)" if val_accuracy is None
                  else f"validation accuracy {val_accuracy:.4f} ({len(split.y_val)} images)")
    log(f"{scored_val}, test accuracy {accuracy:.4f} ({len(split.y_test)} images) in {seconds:.1f}s")

    weights_path = out_dir / f"{name}.safetensors"
    save_weights(model, weights_path)
    card = TeacherCard(
        name=name, arch=r.arch, num_classes=len(class_names), in_chans=in_chans, image_size=size,
        mean=mean_t, std=std_t, class_names=class_names, fingerprint=fingerprint(model.state_dict()),
        weights=weights_path.name,
        metrics=({} if val_accuracy is None else {"val_top1": val_accuracy, "val_images": float(len(split.y_val))})
        | {"test_top1": accuracy, "test_images": float(len(split.y_test)), "train_images": float(len(y_train)),
           "train_seconds": seconds},
        recipe=r.model_dump(mode="json") | {"device": str(device), "torch": torch.__version__,
                                            "split": SPLIT_VERSION, "autocast": "bf16" if use_bf16 else "fp32",
                                            "val_sha256": split_digest(split.x_val, split.y_val)},
    )
    card_path = out_dir / f"{name}.json"
    card.write(card_path)
    progress_path.unlink(missing_ok=True)
    return Teacher(model.cpu().eval(), card), card_path
