"""How a request's labels are dealt into engine batches."""
from __future__ import annotations

from typing import Sequence

from shared.errors import InvalidRequestError


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
