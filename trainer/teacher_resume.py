"""Epoch checkpoints for `dfkd teacher train`, so a long CPU run (CIFAR-10: about an hour) survives an interruption.

One safetensors file holds the model, the optimiser's buffers and the RNG states (data order, dropout); its metadata holds the epoch,
the optimiser's and scheduler's plain settings and the recipe. A file written for another recipe is never resumed
from; it is moved aside (`<name>.progress.previous.safetensors`). No pickle: tensors in safetensors, everything else
as JSON.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open

from shared.weights import save_safetensors

# Recipe fields that do not change training: a run that differs only in them resumes.
NOT_IN_KEY = ("test_limit",)


def _key(recipe: dict) -> dict:
    return {k: v for k, v in recipe.items() if k not in NOT_IN_KEY}


def _aside(path: Path) -> Path:
    """A free name beside `path` for a progress file that is not resumed."""
    stem = path.name.removesuffix(".safetensors")
    aside, n = path.with_name(f"{stem}.previous.safetensors"), 2
    while aside.exists():
        aside, n = path.with_name(f"{stem}.previous.{n}.safetensors"), n + 1
    return aside


def save_progress(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                  sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator, epoch: int, recipe: dict,
                  seconds: float) -> None:
    """Write the state after `epoch` (1-based) atomically: a crash mid-write leaves the previous file whole."""
    opt_state = opt.state_dict()
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimiser state {key!r} is not a tensor; it cannot be checkpointed")
            tensors[f"opt.{index}.{key}"] = value.detach().cpu().contiguous()
    tensors["rng"] = gen.get_state()
    tensors["rng_global"] = torch.get_rng_state()  # dropout draws from the global generator
    device = next(model.parameters()).device
    if device.type == "cuda":
        tensors["rng_cuda"] = torch.cuda.get_rng_state(device)
    meta = {"epoch": str(epoch), "seconds": str(seconds), "recipe": json.dumps(_key(recipe), sort_keys=True),
            "param_groups": json.dumps(opt_state["param_groups"]), "scheduler": json.dumps(sched.state_dict())}
    save_safetensors(path, tensors, meta)


def load_progress(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                  sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator,
                  recipe: dict, log: Callable[[str], None] = print) -> tuple[int, float] | None:
    """Restore the state in `path` into the given objects; returns (epochs done, seconds spent) or None when there is
    no file or it was written for another recipe (that file is then moved aside, and the keys that differ logged)."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        saved, wanted = _key(json.loads(meta.get("recipe", "{}"))), _key(recipe)
        tensors = {k: f.get_tensor(k) for k in f.keys()} if saved == wanted else {}
    if saved != wanted:
        differ = ", ".join(f"{k} {saved.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(saved.keys() | wanted.keys())
                           if saved.get(k) != wanted.get(k))
        aside = _aside(path)
        path.replace(aside)
        log(f"not resuming {path}: another recipe ({differ}); kept it as {aside}")
        return None
    device = next(model.parameters()).device
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            # On the CPU as saved: load_state_dict moves each value to its parameter's device, except AdamW's step.
            state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    sched.load_state_dict(json.loads(meta["scheduler"]))
    gen.set_state(tensors["rng"])
    torch.set_rng_state(tensors["rng_global"])
    if "rng_cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng_cuda"], device)
    return int(meta["epoch"]), float(meta["seconds"])
