"""The one check that class ids exist in the teacher: the HTTP routes, the batcher and the engine all call it, so a
bad id reads the same whichever way it came in."""
from __future__ import annotations

from collections.abc import Iterable

from shared.errors import InvalidRequestError
from shared.teacher import TeacherCard

SHOWN_IDS = 10  # a message names at most this many bad ids: a long request is never echoed back


def check_class_ids(card: TeacherCard, class_ids: Iterable[int]) -> list[int]:
    """The ids as plain ints; InvalidRequestError when there are none or one is not a class of the teacher."""
    ids = [int(c) for c in class_ids]
    if not ids:
        raise InvalidRequestError("no class ids: at least one is needed")
    k = card.num_classes
    bad = sorted({c for c in ids if not 0 <= c < k})
    if bad:
        shown = f"{bad}" if len(bad) <= SHOWN_IDS else f"{bad[:SHOWN_IDS]} (and {len(bad) - SHOWN_IDS} more)"
        raise InvalidRequestError(f"unknown class id(s) {shown} for teacher {card.name!r}: valid ids are 0..{k - 1}")
    return ids
