"""Data-parallel training under `torchrun`: every rank consumes its own share of the stream, and DDP (wrapped in
trainer/engine.py) averages the gradients.

Each rank is a consumer in the same group with its own store and checkpoint folder; rank 0 evaluates, serves the
metrics and writes the final student. Without torchrun's environment this is a no-op (world size 1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from shared.errors import DfkdError


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistributedContext":
        """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them."""
        try:
            return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError as exc:
            raise DfkdError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from None

    def device(self, device: torch.device) -> torch.device:
        """One GPU per rank: cuda means cuda:LOCAL_RANK."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def start(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def stop(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def rank_dir(self, path: Path) -> Path:
        """Per-rank stores and checkpoints: ranks never write the same file."""
        return Path(path) / f"rank{self.rank}" if self.enabled else Path(path)

    def rank_name(self, name: str) -> str:
        return f"{name}-r{self.rank}" if self.enabled else name

    def check_same_step(self, step: int) -> None:
        """Resumed ranks must agree on the step, or they would wait on each other's collectives forever."""
        if not self.enabled:
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        steps = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world_size)]
        dist.all_gather(steps, torch.tensor([step], dtype=torch.long, device=device))
        found = [int(s) for s in steps]
        if len(set(found)) > 1:
            raise DfkdError(f"the ranks' checkpoints are at different steps {found}: resume with the same "
                            f"world size, or remove the rank*/checkpoint folders to start over")
