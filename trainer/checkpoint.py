"""Crash-safe checkpoints without pickle: tensors in safetensors, everything else in JSON, swapped in atomically.

Layout of `<out>/checkpoint/`: `model.safetensors` (student + aligners), `optimizer.safetensors` (the optimizer's
tensor state), `state.json` (step, stage, optimizer scalars, sampler and stream positions, RNG states as ints).
A new checkpoint is written to a temporary folder, fsynced, then renamed over the old one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from shared.atomic_file import fsync_dir

CHECKPOINT_DIR = "checkpoint"


def _write(path: Path, writer) -> None:
    writer(path)
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors to `state.{param}.{name}` keys; the rest (param groups, scalar steps) stays JSON-able."""
    tensors, scalars = {}, {}
    for param_id, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    for key, value in meta["scalars"].items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, list[int]]:
    return {"torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, list[int]]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_checkpoint(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
    out_dir = Path(out_dir)
    final = out_dir / CHECKPOINT_DIR
    tmp = out_dir / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _write(tmp / "model.safetensors", lambda p: save_file(weights, str(p)))
    opt_tensors, opt_meta = split_optimizer_state(optimizer.state_dict())
    _write(tmp / "optimizer.safetensors", lambda p: save_file(opt_tensors, str(p)))
    full_state = {**state, "optimizer": opt_meta, "rng": rng_state()}
    _write(tmp / "state.json", lambda p: p.write_text(json.dumps(full_state)))
    fsync_dir(tmp)
    old = out_dir / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)  # a crash between the two renames leaves .old, which load_checkpoint falls back to
    tmp.rename(final)
    fsync_dir(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out_dir: Path) -> Path | None:
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        path = Path(out_dir) / name
        if (path / "state.json").is_file():
            return path
    return None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG in place; return the saved training state (step, stage, positions)."""
    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    opt_state = join_optimizer_state(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer"))
    optimizer.load_state_dict(opt_state)
    set_rng_state(state.pop("rng"))
    return state
