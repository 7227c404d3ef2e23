"""The teacher a bench runs against: the one named on the command line, else the digits demo's teacher.

The digits teacher is trained on first use (about 15 s on 2 cores) and cached where `dfkd up` keeps it, so every
bench runs on a clean checkout with its defaults.
"""
from __future__ import annotations

import sys

from shared.config import Settings
from shared.errors import DfkdError
from shared.teacher import Teacher, resolve_teacher

HELP = "teacher card (JSON) or model name (default: the digits preset's teacher, trained and cached on first use)"


def bench_teacher(ref: str | None) -> Teacher:
    """Exits with one line, not a traceback, when the named teacher cannot be loaded."""
    try:
        if ref is None:
            from dfkd.up import ensure_teacher

            ref = str(ensure_teacher(Settings.load("digits"), log=lambda m: print(m, file=sys.stderr, flush=True)))
        return resolve_teacher(ref)
    except (DfkdError, OSError, ValueError) as e:
        sys.exit(f"bench: cannot load the teacher {ref!r}: {e}")


def digits_teacher(arch: str, ref: str | None = None) -> Teacher:
    """The card named by `ref`, else a digits teacher of `arch`, trained once by the recipe for it and cached as
    `runs/teachers/digits_<arch>.json` beside the other bench teachers."""
    if ref is not None:
        return bench_teacher(ref)
    from shared.config import TeacherRecipe
    from shared.teacher import load_teacher
    from trainer.teacher_train import train_teacher

    s = Settings.load("digits")
    card = s.runs_dir / "teachers" / f"digits_{arch}.json"
    if not card.is_file():
        train_teacher(TeacherRecipe(dataset="digits", arch=arch), s.data, card.parent, name=card.stem,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    return load_teacher(card)
