"""bench/cifar10_cpu.py end to end at tiny budgets on the real CIFAR-10 copy beside the repo: every stage runs,
caches its result, resumes from the cache, and the result line holds every pool's and student's figures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR_COPY = REPO.parent / "shared" / "data" / "cifar10"  # optional, beside the repo
TEACHER = REPO / "teachers" / "cifar10_resnet20.json"

pytestmark = pytest.mark.skipif(not (CIFAR_COPY / "train_jpeg.npz").is_file(), reason=f"no CIFAR-10 at {CIFAR_COPY}")


def run_bench(work: Path, *extra: str, data: Path | None = CIFAR_COPY) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DFKD_")}
    if data is not None:
        env["DFKD_DATA__CIFAR10_DIR"] = str(data)
    return subprocess.run([sys.executable, "bench/cifar10_cpu.py", "--quick", "--work", str(work), *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)


def test_every_stage_runs_caches_reports_and_resumes(tmp_path):
    work = tmp_path / "work"
    res = run_bench(work)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((work / "cifar10_cpu.json").read_text())
    assert out["bench"] == "cifar10_cpu" and out["quick"] is True and out["teacher"]["arch"] == "resnet20"
    assert out["verifier"]["arch"] == "vgg7_gn" and 0 <= out["verifier"]["test_top1"] <= 1
    for method in ("di", "bpid", "adi", "generator", "generator_adi"):
        pool = out["pools"][method]
        assert pool["images"] >= 20 and pool["images"] % 20 == 0, pool  # whole batches of 20
        assert pool["seconds"] >= 4  # the quick budget, spent in full
        assert 0 <= pool["teacher_top1"] <= 1 and 0 <= pool["verifier_top1"] <= 1 and pool["verifier_diversity"] > 0
        assert (work / "grids" / f"cifar10_{method}.png").is_file()
        kd = out["kd_resnet8"][method]
        assert kd["images"] == pool["images"] and kd["steps"] == 6 and 0 <= kd["test_top1"] <= 1
    assert all(out["pools"][m]["warmup_seconds"] is not None for m in ("generator", "generator_adi"))
    assert {(kd["mix"], kd["features"]) for kd in out["kd_resnet8"].values()} == {("cutmix", 30.0)}
    best = max(("di", "bpid", "adi", "generator", "generator_adi"), key=lambda m: out["kd_resnet8"][m]["val_top1"])
    assert out["kd_resnet8"]["real"]["as_many_as"] == best
    assert out["kd_resnet8"]["real"]["images"] == out["pools"][best]["images"]
    assert {v["pool"] for v in out["vit"].values()} == {best, "real"} and out["vit"]["deit"]["pool"] == best
    assert set(out["stage_seconds"]) >= {"verifier", "pool_di", "kd_real", "vit_dearkd_real"}
    assert "| adi |" in out["table"] and "| dearkd_real |" in out["table"]
    assert not (REPO / "bench" / "results" / "cifar10_cpu.json").is_file() or \
        json.loads((REPO / "bench" / "results" / "cifar10_cpu.json").read_text())["quick"] is False

    # A second run reads every stage from the cache: same figures, no new synthesis.
    pool_mtime = (work / "pools" / "di.safetensors").stat().st_mtime
    again = run_bench(work, "--stages", "pools,kd,table")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((work / "cifar10_cpu.json").read_text())["pools"] == out["pools"]
    assert (work / "pools" / "di.safetensors").stat().st_mtime == pool_mtime

    # An unfinished pool resumes where it stopped. Stand in for an interrupted run: the pool's saved progress
    # without its `done` mark, and no stage result.
    meta_path = work / "pools" / "di.json"
    meta = json.loads(meta_path.read_text())
    first = meta["batches"]
    meta_path.write_text(json.dumps(meta | {"done": False, "seconds": 2.0}))
    (work / "pool_di.json").unlink()
    res = run_bench(work, "--stages", "pools", "--methods", "di")
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = json.loads(meta_path.read_text())
    assert resumed["done"] and resumed["batches"] > first  # kept the saved batches and added more
    assert json.loads((work / "pool_di.json").read_text())["images"] == 20 * resumed["batches"]


def test_missing_data_and_bad_stages_are_refused_clearly(tmp_path):
    res = run_bench(tmp_path, data=None)
    assert res.returncode != 0 and "DFKD_DATA__CIFAR10_DIR" in res.stderr and "Traceback" not in res.stderr
    res = run_bench(tmp_path, "--stages", "pools,nope")
    assert res.returncode != 0 and "unknown stage or method: nope" in res.stderr


def test_a_stage_before_its_inputs_and_a_result_of_other_settings_are_refused(tmp_path):
    res = run_bench(tmp_path, "--stages", "kd")
    assert res.returncode != 0 and "run the 'pools' stage first" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "verifier.json").write_text(json.dumps({"card": "x.json", "settings": {"teacher": "another"}}))
    res = run_bench(tmp_path, "--stages", "verifier")
    assert res.returncode != 0 and "was made with other settings (" in res.stderr and "teacher" in res.stderr


def test_feature_mimicking_pulls_the_students_stage_maps_to_the_teachers():
    """`--kd-features`: the ResNet-8's three stage maps are driven towards the ResNet-20's (widths 16/32/64 both),
    and a student whose stages do not line up with the teacher's is refused by name."""
    import torch

    sys.path.insert(0, str(REPO))
    from bench.cifar10_cpu import KDLearner
    from shared.teacher import load_teacher

    teacher = load_teacher(TEACHER)
    card = teacher.card
    run = SimpleNamespace(teacher=teacher, mean=torch.tensor(card.mean).view(1, -1, 1, 1),
                          std=torch.tensor(card.std).view(1, -1, 1, 1))
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    learner = KDLearner("resnet8", teacher.model, run, steps=40, features=3.0)
    assert len(learner.connectors) == 3
    before = learner.feature_gap(images)
    learner.train(images, 40, 32)
    after = learner.feature_gap(images)
    assert after < 0.7 * before, (before, after)
    assert len(KDLearner("resnet8", teacher.model, run, steps=1).connectors) == 0  # logits only by default
    with pytest.raises(ValueError, match="stages match the teacher's: resnet18_cifar"):
        KDLearner("resnet18_cifar", teacher.model, run, steps=1, features=1.0)


def test_the_kd_sweep_scores_each_weight_and_refuses_a_pool_of_other_settings(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DFKD_")}
    env["DFKD_DATA__CIFAR10_DIR"] = str(CIFAR_COPY)

    def sweep(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "bench/cifar10_kd_sweep.py", "--quick", "--work", str(tmp_path),
                               *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    res = sweep("--features", "0,30")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["data"], r["features"]) for r in rows] == [("di", 0.0), ("di", 30.0)]
    assert all(r["images"] >= 20 and 0 <= r["val_top1"] <= 1 and 0 <= r["test_top1"] <= 1 for r in rows)
    real = sweep("--features", "30", "--real")  # the pool is read back, not made again
    assert real.returncode == 0 and json.loads(real.stdout)["data"] == "real", real.stderr[-3000:]
    assert json.loads(real.stdout)["images"] == rows[0]["images"] and "di pool:" not in real.stderr
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3
    bad = sweep("--features", "x")
    assert bad.returncode != 0 and "comma-separated numbers" in bad.stderr

    meta = tmp_path / "pools" / "di.json"  # a pool of another teacher or budget is never reused
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"budget": {"teacher": "another"}}))
    stale = sweep("--features", "0")
    assert stale.returncode != 0 and "was made with other settings" in stale.stderr and "Traceback" not in stale.stderr
