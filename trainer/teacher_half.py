"""A half-precision copy of a trained teacher, small enough to commit: fp16 weights and a card whose accuracies are
measured again with those rounded weights, so the card always describes the file beside it."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from shared.config import DataConfig, TeacherRecipe
from shared.teacher import load_teacher
from shared.weights import fingerprint
from trainer.teacher_train import evaluate, load_split


def half_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Floating-point tensors as fp16; integer buffers (BatchNorm's batch counters) unchanged."""
    return {k: v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu().contiguous()
            for k, v in model.state_dict().items()}


def write_half_teacher(card_path: Path, data: DataConfig, out_dir: Path, name: str | None = None) -> Path:
    """Write `<name>.safetensors` (fp16) and `<name>.json` into `out_dir`; returns the new card's path.

    The dataset named by the teacher's own recipe is scored again (validation and test) with the fp16 weights,
    computed in fp32; the full-precision figures stay in the card beside them.
    """
    teacher = load_teacher(Path(card_path))
    card = teacher.card
    if "dataset" not in card.recipe:
        raise ValueError(f"{card_path}: the card has no training recipe, so its data cannot be scored again")
    state = half_state(teacher.model)
    model = teacher.model
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    recipe = TeacherRecipe(**{k: v for k, v in card.recipe.items() if k in TeacherRecipe.model_fields})
    split, _ = load_split(recipe, data)
    mean, std = torch.tensor(card.mean).view(1, -1, 1, 1), torch.tensor(card.std).view(1, -1, 1, 1)

    name = name or card.name
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / f"{name}.safetensors"
    tmp = weights_path.with_name(weights_path.name + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(weights_path)
    metrics = dict(card.metrics)
    metrics |= {f"fp32_{k}": card.metrics[k] for k in ("val_top1", "test_top1") if k in card.metrics}
    metrics |= {"val_top1": evaluate(model, split.x_val, split.y_val, mean, std),
                "test_top1": evaluate(model, split.x_test, split.y_test, mean, std)}
    half = card.model_copy(update={"name": name, "weights": weights_path.name, "fingerprint": fingerprint(state),
                                   "metrics": metrics, "recipe": card.recipe | {"weights_dtype": "float16"}})
    out = out_dir / f"{name}.json"
    half.write(out)
    return out
