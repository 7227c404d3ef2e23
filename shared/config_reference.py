"""The configuration reference (docs/configuration.md), rendered from the typed config so it cannot drift."""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, SecretStr

from shared.config import PRESETS, Settings

HEADER = f"""# Configuration reference

Generated from `shared/config.py` by `dfkd config --reference`; a test keeps this file in sync.

Every setting is layered, lowest priority first: the default below; a YAML file or preset (`--config` or
`DFKD_CONFIG`; presets: {", ".join(PRESETS)}); the environment variable shown; a command-line flag. Unknown keys and
out-of-range values are errors. `dfkd config --config NAME` prints the settings a command would use.
"""


def _default(value: Any) -> str:
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = json.dumps(value, default=str)
    return f"`{text}`" if text != "null" else "none"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            continue  # a section: its own table
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | `DFKD_{(prefix + name).replace('.', '__').upper()}` | "
                    f"{_default(default)} | {meaning} |")
    return rows


def _section(model: type[BaseModel], key: str) -> list[str]:
    """One table for `model` at `key`, then one for each nested section (e.g. `synth.generator`)."""
    doc = (model.__doc__ or "").strip().splitlines()[:1]
    parts = [f"## `{key}`", "", *doc, "", "| key | environment | default | meaning |", "|---|---|---|---|",
             *_rows(model, f"{key}."), ""]
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            parts += _section(sub, f"{key}.{name}")
    return parts


def render() -> str:
    parts = [HEADER, "## Top level", "", "| key | environment | default | meaning |", "|---|---|---|---|",
             *_rows(Settings, ""), ""]
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            parts += _section(section, name)
    return "\n".join(parts)
