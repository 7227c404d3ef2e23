"""Epoch checkpoints for `dfkd teacher train`, so a long CPU run (CIFAR-10: about an hour) survives an interruption.

One safetensors file holds the model, the optimiser's buffers and the RNG states (data order, dropout); its metadata holds the epoch,
the optimiser's and scheduler's plain settings and the recipe. A file written for another recipe is never resumed
from. No pickle: tensors in safetensors, everything else as JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file


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
    meta = {"epoch": str(epoch), "seconds": str(seconds), "recipe": json.dumps(recipe, sort_keys=True),
            "param_groups": json.dumps(opt_state["param_groups"]), "scheduler": json.dumps(sched.state_dict())}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_progress(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                  sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator,
                  recipe: dict) -> tuple[int, float] | None:
    """Restore the state in `path` into the given objects; returns (epochs done, seconds spent) or None when there is
    no file or it was written for another recipe."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("recipe") != json.dumps(recipe, sort_keys=True):
            return None
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    device = next(model.parameters()).device
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value.to(device)
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    sched.load_state_dict(json.loads(meta["scheduler"]))
    gen.set_state(tensors["rng"])
    torch.set_rng_state(tensors["rng_global"])
    if "rng_cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng_cuda"], device)
    return int(meta["epoch"]), float(meta["seconds"])
