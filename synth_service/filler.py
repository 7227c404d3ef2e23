"""Filler labels that make an engine batch class-balanced.

BN-statistics matching compares a batch's statistics with running statistics learned over every class, so a batch
holding a few images of one class is pulled towards the wrong statistics. Filling the rest of the batch with the
classes it holds least of lets a lone 4-image request be inverted as well as a full, mixed batch.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def filler_labels(batch: Sequence[int], n: int, num_classes: int, start: int = 0) -> list[int]:
    """`n` labels that even out the class counts of `batch`, dealt in same-class pairs (BPID's diversity term needs
    pairs) to the class with the fewest images so far; ties go round-robin from `start`, so successive batches of a
    service with many classes cover them all."""
    if n <= 0:
        return []
    counts = Counter(batch)
    out: list[int] = []
    while len(out) < n:
        c = min(range(num_classes), key=lambda k: (counts[k], (k - start) % num_classes))
        take = min(2, n - len(out))
        out += [c] * take
        counts[c] += take
    return out


def capped_deficit_labels(deficit: dict[int, int], space: int, num_classes: int) -> list[int]:
    """Labels that refill the classes short of images: dealt round-robin in pairs, largest shortfall first, with no
    class taking more than about twice its share of a balanced batch (so the batch stays balanced enough to invert
    well; balanced filler completes it)."""
    cap = max(2, 2 * -(-space // num_classes))
    left = {c: min(short, cap) for c, short in deficit.items() if short > 0}
    order = sorted(left, key=lambda c: (-deficit[c], c))
    out: list[int] = []
    while len(out) < space and any(left.values()):
        for c in order:
            if left[c] and len(out) < space:
                take = min(2, left[c], space - len(out))
                out += [c] * take
                left[c] -= take
    return out
