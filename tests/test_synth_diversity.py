"""Diversity outside the space the losses optimise: pixel space (no model) and an independent verifier's features,
next to the teacher-space figure that BPID's diversity loss drives directly."""
from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from shared.errors import DfkdError, InvalidRequestError
from synth_service.app import create_app
from synth_service.engine import InversionEngine
from synth_service.report import build_report, pixel_diversity
from live_server import LiveServer

LABELS = [c for c in range(10) for _ in range(4)]
ITERATIONS = 40


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_pixel_diversity_is_zero_for_identical_images_and_rises_with_variation():
    base = torch.randint(0, 256, (1, 3, 12, 12), generator=torch.Generator().manual_seed(0)).float()
    noise = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * 64
    labels = torch.zeros(4, dtype=torch.int64)
    same = pixel_diversity(base.repeat(4, 1, 1, 1), labels)[0]
    assert same == pytest.approx(0.0, abs=1e-6)
    # Brightness and contrast are standardised away: only the pattern counts.
    assert pixel_diversity(torch.cat([base, base * 0.5 + 40]), labels[:2])[0] == pytest.approx(0.0, abs=1e-6)
    figures = [pixel_diversity(base + a * noise, labels)[0] for a in (0.1, 0.5, 1.0, 4.0)]
    assert figures == sorted(figures) and figures[0] > 0.01 and figures[-1] < 2
    assert figures == [pixel_diversity(base + a * noise, labels)[0] for a in (0.1, 0.5, 1.0, 4.0)]
    # Uncorrelated images sit near sqrt 2; a class with one image has no figure.
    unrelated = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    assert pixel_diversity(unrelated, torch.zeros(32, dtype=torch.int64))[0] == pytest.approx(math.sqrt(2), abs=0.02)
    assert pixel_diversity(base, labels[:1]) == {}


@pytest.fixture(scope="module")
def bpid_reports(digits_teacher, digits_settings, verifier_card):
    """The same seed and batch with the BPID diversity weight on and off, a verifier watching."""
    on = digits_settings.synth.model_copy(update={"verifier": verifier_card})
    assert on.diversity > 0
    reports = {}
    for name, cfg in (("off", on.model_copy(update={"diversity": 0.0})), ("on", on)):
        with InversionEngine(digits_teacher, cfg) as engine:
            assert engine.verifier_card.fingerprint != digits_teacher.card.fingerprint
            result = engine.synthesize(LABELS, seed=0, iterations=ITERATIONS)
            assert _hooks(engine.objective._verifier.model) == 0  # the teacher's BN hooks are the teacher's alone
        reports[name] = build_report(result, digits_teacher.card, {})
    return reports


def test_bpid_moves_teacher_space_diversity_and_the_verifier_reports_its_own(bpid_reports):
    for name, report in bpid_reports.items():
        div = report["intra_class_diversity"]
        assert set(div) == {"teacher", "pixel", "verifier"}
        assert all(math.isfinite(v) and 0 <= v <= 2 for v in div.values()), div
        assert 0 <= report["verifier_top1"] <= 1
        for stats in report["per_class"].values():
            assert set(stats["intra_class_diversity"]) == {"teacher", "pixel", "verifier"}
            assert "verifier_top1" in stats
        print(f"BPID diversity {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in div.items())
              + f"; teacher top-1 {report['teacher_top1']:.3f}, verifier top-1 {report['verifier_top1']:.3f}")
    off, on = (bpid_reports[k]["intra_class_diversity"] for k in ("off", "on"))
    print("rise on/off - 1: " + ", ".join(f"{k} {on[k] / off[k] - 1:+.1%}" for k in off))
    assert on["teacher"] > off["teacher"]


def _card_variant(src: Path, dst: Path, **changes) -> Path:
    card = json.loads(src.read_text())
    card["weights"] = str(src.parent / card["weights"]) if card["weights"] else None
    dst.write_text(json.dumps(card | changes))
    return dst


@pytest.mark.parametrize("variant,message", [
    ({"image_size": 8}, "has input size 8; the teacher 'digits_cnn' has 16"),
    ({"num_classes": 5, "class_names": list("abcde"), "weights": None, "fingerprint": ""}, "has classes 5"),
    ({"in_chans": 3, "mean": [0.5] * 3, "std": [0.5] * 3, "weights": None, "fingerprint": ""}, "has channels 3"),
    ({"class_names": [f"digit {i}" for i in range(10)]}, "names its classes differently"),
    ("teacher", "has the teacher's own weights"),
    ("missing", "synth.verifier: teacher card not found"),
])
def test_a_verifier_that_does_not_fit_the_teacher_is_refused(digits_teacher, digits_settings, verifier_card,
                                                             teacher_dir, tmp_path, variant, message):
    if variant == "teacher":
        path = teacher_dir / "digits_cnn.json"
    elif variant == "missing":
        path = tmp_path / "nope.json"
    else:
        path = _card_variant(verifier_card, tmp_path / "verifier.json", **variant)
    cfg = digits_settings.synth.model_copy(update={"verifier": path})
    hooks = _hooks(digits_teacher.model)
    with pytest.raises(DfkdError, match="synth.verifier") as info:
        InversionEngine(digits_teacher, cfg)
    assert message in str(info.value)
    assert _hooks(digits_teacher.model) == hooks


def test_the_service_refuses_a_mismatched_verifier_at_start_up(digits_teacher, digits_settings, verifier_card,
                                                                tmp_path):
    bad = _card_variant(verifier_card, tmp_path / "verifier.json", image_size=8)
    settings = digits_settings.model_copy(update={
        "synth": digits_settings.synth.model_copy(update={"verifier": bad})})
    app = create_app(settings, teacher=digits_teacher)
    with pytest.raises(InvalidRequestError, match="input size 8"), TestClient(app):
        pass


def test_metrics_export_diversity_by_space_and_verifier_agreement(digits_teacher, digits_settings, verifier_card):
    synth = type(digits_settings.synth).model_validate(
        digits_settings.synth.model_dump() | {"iterations": 10, "batch_size": 16, "verifier": verifier_card})
    service = type(digits_settings.service).model_validate(
        digits_settings.service.model_dump() | {"max_batch": 16, "max_wait_ms": 50})
    settings = digits_settings.model_copy(update={"synth": synth, "service": service})
    with LiveServer(create_app(settings, teacher=digits_teacher)) as live:
        res = httpx.post(f"{live.url}/v1/images", json={"class_ids": [0, 1], "per_class": 2, "seed": 0,
                                                        "format": "npz"}, timeout=120)
        assert res.status_code == 200, res.text
        text = httpx.get(f"{live.url}/metrics").text
    samples = {(s.name, s.labels.get("space")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    for space in ("teacher", "pixel", "verifier"):
        assert 0 < samples[("dfkd_synth_intra_class_diversity", space)] <= 2
        assert samples[("dfkd_synth_batch_intra_class_diversity_count", space)] == 1
    assert 0 <= samples[("dfkd_synth_verifier_top1", None)] <= 1
