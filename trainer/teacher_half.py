"""A half-precision copy of a trained teacher, small enough to commit: fp16 weights and a card whose accuracies are
measured again with those rounded weights, so the card always describes the file beside it."""
from __future__ import annotations

from pathlib import Path

import torch
from pydantic import ValidationError

from shared.config import DataConfig, TeacherRecipe
from shared.data.splits import split_digest
from shared.errors import DfkdError
from shared.teacher import TeacherCard, load_teacher
from shared.weights import fingerprint, save_safetensors
from trainer.teacher_train import evaluate, load_heldout


def half_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Floating-point tensors as fp16; integer buffers (BatchNorm's batch counters) unchanged."""
    return {k: v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu().contiguous()
            for k, v in model.state_dict().items()}


def write_half_teacher(card_path: Path, data: DataConfig, out_dir: Path, name: str | None = None,
                       device: torch.device | str = "cpu") -> Path:
    """Write `<name>.safetensors` (fp16) and `<name>.json` into `out_dir`; returns the new card's path.

    The dataset named by the teacher's own recipe is scored again (validation and test) with the fp16 weights,
    computed in fp32 on `device`; the full-precision figures stay in the card beside them (`fp32_*`).
    """
    card_path = Path(card_path)
    teacher = load_teacher(card_path)
    card = teacher.card
    name = name or card.name
    out_dir = Path(out_dir)
    weights_path, out = out_dir / f"{name}.safetensors", out_dir / f"{name}.json"
    _refuse_to_overwrite_the_input(card_path, card, [weights_path, out])
    recipe = _training_recipe(card_path, card)

    # Only the two scored splits are read; digits at the size the teacher was trained on.
    data = data.model_copy(update={"digits_size": card.image_size})
    x_val, y_val = load_heldout(recipe, data, "val")
    digest = card.recipe.get("val_sha256")
    if digest is not None and split_digest(x_val, y_val) != digest:
        raise DfkdError(
            f"{card_path}: the validation images read now are not the ones this teacher was scored on. Validation "
            "images are positions within each class in the order the data's layout lists them (an ImageFolder tree: "
            "by file name), so another copy, layout or file naming gives another set; point data.cifar10_dir "
            "(DFKD_DATA__CIFAR10_DIR) at the copy the teacher was trained on")
    x_test, y_test = load_heldout(recipe, data, "test")

    device = torch.device(device)
    state = half_state(teacher.model)
    model = teacher.model
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.to(device)
    mean = torch.tensor(card.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(card.std, device=device).view(1, -1, 1, 1)
    metrics = dict(card.metrics)
    if card.recipe.get("weights_dtype") != "float16":  # a copy of an fp16 card keeps the fp32 figures it carries
        metrics |= {f"fp32_{k}": card.metrics[k] for k in ("val_top1", "test_top1") if k in card.metrics}
    metrics["test_top1"] = evaluate(model, x_test, y_test, mean, std)
    if not recipe.refit:  # a refit teacher trained on the validation images: no figure to give
        metrics["val_top1"] = evaluate(model, x_val, y_val, mean, std)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(weights_path, state)
    half = card.model_copy(update={"name": name, "weights": weights_path.name, "fingerprint": fingerprint(state),
                                   "metrics": metrics, "recipe": card.recipe | {"weights_dtype": "float16"}})
    half.write(out)
    return out


def _refuse_to_overwrite_the_input(card_path: Path, card: TeacherCard, outputs: list[Path]) -> None:
    inputs = [card_path] + ([card_path.parent / card.weights] if card.weights else [])
    for output in outputs:
        for source in inputs:
            if output.resolve() == source.resolve() or (output.exists() and output.samefile(source)):
                raise DfkdError(f"{output} is the input teacher's own file: the fp16 copy would replace it. Pass "
                                "--name for another file stem, or another --out folder")


def _training_recipe(card_path: Path, card: TeacherCard) -> TeacherRecipe:
    if not card.recipe.get("dataset"):
        raise DfkdError(f"{card_path}: the card has no training recipe (dataset, limits), so its accuracies cannot "
                        "be measured again; `dfkd teacher half` takes cards written by `dfkd teacher train`")
    try:
        return TeacherRecipe(**{k: v for k, v in card.recipe.items() if k in TeacherRecipe.model_fields})
    except ValidationError as exc:
        raise DfkdError(f"{card_path}: the card's training recipe is not one `dfkd teacher train` writes: "
                        f"{exc}") from None
