"""The typed config: presets, YAML, environment precedence and validation."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.config import PRESETS, Settings, SynthConfig


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load(preset):
    s = Settings.load(preset)
    assert s.synth.iterations >= 1


def test_precedence_defaults_yaml_env_overrides(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 3\nsynth:\n  iterations: 7\n  lr: 0.3\n  jitter: 4\n")
    monkeypatch.setenv("DFKD_SYNTH__LR", "0.5")
    s = Settings.load(cfg, synth={"jitter": 1})
    assert (s.seed, s.synth.iterations, s.synth.lr, s.synth.jitter) == (3, 7, 0.5, 1)
    assert s.synth.batch_size == SynthConfig().batch_size  # untouched fields keep their defaults
    monkeypatch.setenv("DFKD_CONFIG", str(cfg))
    assert Settings.load().synth.iterations == 7


def test_bad_values_are_rejected(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="presets: digits"):
        Settings.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("synth:\n  iterations: 0\n")
    with pytest.raises(ValidationError, match="iterations"):
        Settings.load(bad)
    bad.write_text("synth:\n  iteratons: 10\n")  # a typo is an error, not a silent default
    with pytest.raises(ValidationError, match="iteratons"):
        Settings.load(bad)
    monkeypatch.setenv("DFKD_SYNTH__LR", "-1")
    with pytest.raises(ValidationError, match="lr"):
        Settings.load()
