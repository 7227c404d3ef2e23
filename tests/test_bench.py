"""The benches run on the CPU, on a clean checkout, and end with one JSON line of measured figures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from shared.models import create_model

REPO = Path(__file__).resolve().parents[1]


def test_synth_throughput_prints_its_json_line():
    res = subprocess.run([sys.executable, "bench/synth_throughput.py", "--teacher", "resnet18", "--resolution", "32",
                          "--batch", "8", "--iterations", "4", "--warmup-iterations", "1", "--device", "cpu"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["bench"] == "synth_throughput" and out["device"].startswith("cpu")
    assert out["batch"] == 8 and out["iterations"] == 4 and out["amp"] == "fp32"
    assert out["images_per_s"] > 0
    assert abs(out["image_iterations_per_s"] - 8 * 4 / out["seconds"]) < 0.01 * out["image_iterations_per_s"] + 0.1
    # The teacher is frozen, so the backward computes only input gradients: about one forward's worth of FLOPs
    # (a backward with weight gradients would make the ratio about 3).
    model = create_model("resnet18", num_classes=1000).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    ratio = out["flops_per_image_iteration"] / counter.get_total_flops()
    assert 1.9 < ratio < 2.2, ratio


def test_http_coalescing_prints_its_json_line(digits_teacher, teacher_dir):
    res = subprocess.run([sys.executable, "bench/http_coalescing.py", "--teacher", str(teacher_dir / "digits_cnn.json"),
                          "--requests", "8", "--per-request", "2", "--iterations", "2", "--device", "cpu"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["bench"] == "http_coalescing" and out["max_batch"] == 16
    for scenario in ("one_full_batch", "concurrent_small"):
        assert out[scenario]["engine_batches"] >= 1 and out[scenario]["wall_s"] > 0
    assert out["one_full_batch"]["engine_batches"] == 1 and out["one_full_batch"]["batch_fill"] == 1.0


def test_trainer_throughput_prints_its_json_line_for_the_cpu_vit(digits_teacher, teacher_dir):
    res = subprocess.run([sys.executable, "bench/trainer_throughput.py", "--teacher",
                          str(teacher_dir / "digits_cnn.json"), "--steps", "2", "--warmup", "1", "--batch", "8",
                          "--device", "cpu", "--cpu-vit"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["bench"] == "trainer_throughput" and out["batch"] == 8
    # --cpu-vit: the CIFAR-10 CPU bench's ViT, whatever the preset's student
    assert (out["student"]["embed_dim"], out["student"]["depth"]) == (96, 6)
    for key in ("stage1_images_per_s", "stage2_images_per_s", "bare_timm_images_per_s"):
        assert out[key] > 0


def test_trainer_throughput_times_stored_against_online_logits(digits_teacher, verifier_card, teacher_dir):
    res = subprocess.run([sys.executable, "bench/trainer_throughput.py", "--teacher",
                          str(teacher_dir / "digits_cnn.json"), "--steps", "2", "--warmup", "1", "--batch", "8",
                          "--device", "cpu", "--ensemble", str(verifier_card)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])["stored_logits"]
    assert out["ensemble"]["members"] == ["digits_cnn", "digits_lenet"] and out["teacher"]["members"] == ["digits_cnn"]
    for paths in (out["teacher"], out["ensemble"]):
        for key in ("with_features", "logits_only"):
            assert paths[key]["online_images_per_s"] > 0 and paths[key]["stored_images_per_s"] > 0
    assert out["ensemble"]["logits_only"]["beta"] == 0.0


def test_ensemble_kd_prints_its_json_line(digits_teacher, verifier_card, teacher_dir):
    """The LeNet verifier stands in for the involution teacher, which takes minutes to train."""
    res = subprocess.run([sys.executable, "bench/ensemble_kd.py", "--teacher", str(teacher_dir / "digits_cnn.json"),
                          "--involution", str(verifier_card), "--per-class", "2", "--steps", "2", "--seeds", "1",
                          "--variants", "conv,ensemble,ensemble_per_teacher,ensemble_online"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])["results"]
    assert out["conv"]["runs"][0]["members"] == ["digits_cnn"]
    assert out["ensemble"]["runs"][0]["members"] == ["digits_cnn", "digits_lenet"]
    assert out["ensemble"]["runs"][0]["online_logit_rows"] == 0 and out["ensemble_online"]["runs"][0][
        "online_logit_rows"] > 0
    assert out["ensemble_per_teacher"]["runs"][0]["online_logit_rows"] == 0


def test_ensemble_kd_on_cifar10_says_what_it_needs(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DFKD_")}
    bench = [sys.executable, "bench/ensemble_kd.py", "--dataset", "cifar10"]
    res = subprocess.run(bench, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "DFKD_DATA__CIFAR10_DIR" in res.stderr and "Traceback" not in res.stderr
    missing = tmp_path / "rednet.json"
    res = subprocess.run(bench + ["--involution", str(missing)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0 and f"cannot load the teacher {str(missing)!r}" in res.stderr


@pytest.mark.slow  # CIFAR-10 reads and an involution teacher trained: the plumbing, in a minute
def test_ensemble_kd_runs_on_cifar10_from_a_pool_file(tmp_path):
    from safetensors.torch import save_file

    from shared.config import Settings, TeacherRecipe
    from shared.data.cifar10 import load_cifar10_split
    from shared.data.splits import unit_to_uint8
    from trainer.teacher_train import train_teacher

    root = REPO.parent / "shared/data/cifar10"
    if not (root / "train_jpeg.npz").is_file():
        pytest.skip(f"CIFAR-10 copy not found at {root}")
    env = {**os.environ, "DFKD_DATA__CIFAR10_DIR": str(root)}
    bench = [sys.executable, "bench/ensemble_kd.py", "--dataset", "cifar10"]
    data = Settings.load("cifar10", data={"cifar10_dir": root}).data
    recipe = TeacherRecipe(dataset="cifar10", arch="rednet_cifar", epochs=1, train_limit=200, test_limit=100)
    _, involution = train_teacher(recipe, data, tmp_path, log=lambda m: None)
    split = load_cifar10_split(root, 200, 100)
    pool = {"images": unit_to_uint8(split.x_train[:40]).contiguous(), "labels": split.y_train[:40]}  # real stand-ins
    save_file(pool, tmp_path / "pool.safetensors")
    save_file({"images": pool["images"][:4, :1].contiguous()}, tmp_path / "bad.safetensors")  # 1 channel, no labels
    bad = subprocess.run(bench + ["--involution", str(involution), "--pool", str(tmp_path / "bad.safetensors")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "is not a safetensors file with `images` and `labels`" in bad.stderr

    res = subprocess.run(bench + ["--involution", str(involution), "--pool", str(tmp_path / "pool.safetensors"),
                                  "--variants", "conv,ensemble", "--steps", "2", "--seeds", "1", "--limit", "200"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["dataset"] == "cifar10" and out["synthetic_images"] == 40
    assert out["teachers"]["conv"]["arch"] == "resnet20" and out["teachers"]["involution"]["arch"] == "rednet_cifar"
    assert out["results"]["ensemble"]["runs"][0]["members"] == ["cifar10_resnet20", "cifar10_rednet_cifar"]
    assert out["results"]["ensemble"]["runs"][0]["online_logit_rows"] == 0
    assert all(0 <= r["mean_val_top1"] <= 1 for r in out["results"].values())


def test_dearkd_ablation_prints_its_json_line(digits_teacher, teacher_dir):
    res = subprocess.run([sys.executable, "bench/dearkd_ablation.py", "--teacher", str(teacher_dir / "digits_cnn.json"),
                          "--per-class", "2", "--steps", "2", "--variants", "dearkd,no_mhca"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["synthetic_images"] == 20 and set(out["results"]) == {"dearkd", "no_mhca"}
    assert all(0 <= r["heldout_top1"] <= 1 for r in out["results"].values())


def test_a_bench_on_a_clean_checkout_trains_the_digits_teacher_it_needs(tmp_path):
    # No --teacher and an empty working directory, as on a fresh clone: the bench trains and caches the teacher.
    res = subprocess.run([sys.executable, str(REPO / "bench" / "dearkd_ablation.py"), "--per-class", "1",
                          "--steps", "1", "--variants", "dearkd"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["bench"] == "dearkd_ablation"
    assert (tmp_path / "runs" / "teachers" / "digits_cnn.json").is_file()


@pytest.mark.parametrize("bench", ["dearkd_ablation", "http_coalescing", "synth_throughput", "trainer_throughput"])
def test_a_bench_names_a_missing_teacher_in_one_line(bench, tmp_path):
    missing = tmp_path / "no_such_teacher.json"
    res = subprocess.run([sys.executable, str(REPO / "bench" / f"{bench}.py"), "--teacher", str(missing)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and str(missing) in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_synth_methods_prints_its_json_line(digits_teacher, teacher_dir):
    cmd = [sys.executable, "bench/synth_methods.py", "--teacher", str(teacher_dir / "digits_cnn.json"),
           "--images", "20", "--batch", "20", "--iterations", "3", "--warmup-steps", "4", "--epochs", "1",
           "--split", "val"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["bench"] == "synth_methods" and out["split"] == "val" and len(out["results"]) == 1
    run = out["results"][0]["runs"][0]
    assert run["generator"]["warm"] is True
    pools = run["pools"]
    assert pools["di"]["images"] == pools["generator_equal_images"]["images"] == 20
    assert pools["generator_equal_time"]["images"] >= 20  # a batch at least, in DI's time
    for pool in pools.values():
        assert pool["images_per_s"] > 0 and 0 <= pool["student_val_top1"] <= 1
        assert pool["verifier_top1"] is not None and pool["diversity"]["verifier"] is not None
    assert [s["steps"] for s in run["serving"]] == [0, run["generator"]["serve_steps"]]
    assert all(s["p50_ms"] > 0 for s in run["serving"])
    summary = out["results"][0]["summary"]
    assert summary["di"]["student_mean"] == pools["di"]["student_val_top1"]

    # A grid over generator settings, two seeds each, the generator alone.
    res = subprocess.run(cmd + ["--methods", "generator", "--seeds", "2", "--grid", "synth.generator.memory=0,40"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert [r["settings"] for r in out["results"]] == [{"synth.generator.memory": 0}, {"synth.generator.memory": 40}]
    for result in out["results"]:
        assert [r["seed"] for r in result["runs"]] == [0, 1] and set(result["summary"]) == {"generator_equal_images"}
        scores = [r["pools"]["generator_equal_images"]["student_val_top1"] for r in result["runs"]]
        assert result["summary"]["generator_equal_images"]["student_min"] == min(scores)
    # The seed changes the generator's pool.
    a, b = out["results"][0]["runs"]
    assert a["pools"]["generator_equal_images"]["diversity"] != b["pools"]["generator_equal_images"]["diversity"]
    bad = subprocess.run(cmd[:4] + ["--grid", "synth.generator.nonsense=1"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode != 0 and "nonsense" in bad.stderr and "Traceback" not in bad.stderr


def test_tune_digits_scores_on_validation_and_resumes(digits_teacher, teacher_dir, tmp_path):
    cmd = [sys.executable, "bench/tune_digits.py", "--teacher", str(teacher_dir / "digits_cnn.json"),
           "--grid", "synth.diversity=0,3", "--grid", "synth.iterations=2", "--grid", "train.steps=3",
           "--seeds", "1", "--per-class", "2", "--cache", str(tmp_path)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["split"] == "val" and out["val_images"] == 201 and len(out["results"]) == 2
    assert {r["settings"]["synth.diversity"] for r in out["results"]} == {0, 3}
    assert len(list((tmp_path / "pools").iterdir())) == 2 and len(list((tmp_path / "scores").iterdir())) == 2
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert json.loads(again.stdout.strip().splitlines()[-1])["results"] == out["results"]  # read back from the cache
    bad = subprocess.run(cmd[:2] + ["--grid", "synth.nonsense=1"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode != 0 and "nonsense" in bad.stderr and "Traceback" not in bad.stderr
