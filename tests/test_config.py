"""The typed config: presets, YAML, environment precedence and validation."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
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


def test_configuration_reference_is_in_sync_with_the_code():
    from shared.config_reference import render

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert doc == render(), "docs/configuration.md is stale: regenerate it with `dfkd config --reference`"
    for key in ("`train.steps`", "`DFKD_STREAM__REDIS_URL`", "`service.auth_token`", "`dearkd.stage1_fraction`"):
        assert key in doc


def test_dfkd_config_prints_effective_settings_without_secrets():
    env = {**os.environ, "DFKD_SERVICE__AUTH_TOKEN": "s3cret-token", "DFKD_TRAIN__STEPS": "77"}
    run = subprocess.run([sys.executable, "-m", "dfkd", "config", "--config", "digits"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "s3cret-token" not in run.stdout
    printed = yaml.safe_load(run.stdout)
    assert printed["train"]["steps"] == 77 and printed["synth"]["iterations"] == 150


def test_settings_that_could_never_run_are_refused():
    with pytest.raises(ValidationError, match=r"production_per_class \(200\) is larger than an engine batch \(100"):
        Settings.load("digits", service={"production_per_class": 200})
    with pytest.raises(ValidationError, match=r"engine batch of 100 images is over stream.max_batch_images \(50\)"):
        Settings.load("digits", stream={"max_batch_images": 50})
    assert Settings.load("digits", service={"max_batch": 200, "production_per_class": 200}).service.max_batch == 200
