"""Log-spaced checkpoints and `python dynamics.py plot`: the schedule, a kill after step 4 then
a bit-identical resume, and the figures' numbers against an independent recomputation from the
saved files (norms with torch, CKA with a plain numpy reference)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint
from helpers import ROOT, TINY, max_diff, metrics, run_train, weights

pytestmark = pytest.mark.slow  # every test here trains a run

SCHEDULE = ["--save_log_spaced_until=8", "--save_every_n_steps=10", "--max_steps=20"]
STEPS = [0, 1, 2, 4, 8, 10, 20]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("plots")
    run_train(runs, "--run_name=straight", *SCHEDULE)
    return runs


def test_log_spaced_checkpoints_are_full_checkpoints(runs):
    run = runs / "straight"
    assert checkpoint.saved_steps(run) == STEPS
    assert sorted(int(n[5:-5]) for n in os.listdir(run / "eval_results")) == STEPS
    for step in STEPS:
        files = os.listdir(run / "checkpoints" / f"step_{step}" / "learning_dynamics")
        assert "val_weights.pt" in files and ("train_weights.pt" in files) == (step != 20), (step, files)


def test_killed_after_step_4_resumes_bit_identically(runs):
    cmd = [sys.executable, "train.py", *TINY, f"--runs_dir={runs}", "--run_name=killed", *SCHEDULE]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (runs / "killed" / "checkpoints" / "step_4").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 4 in checkpoint.saved_steps(runs / "killed") and 20 not in checkpoint.saved_steps(runs / "killed")
    run_train(runs, "--run_name=killed", *SCHEDULE)
    assert checkpoint.saved_steps(runs / "killed") == STEPS
    assert max_diff(weights(runs, "straight", 20), weights(runs, "killed", 20)) == 0.0
    loss = [{m["step"]: m["loss"] for m in metrics(runs, r) if "loss" in m} for r in ("straight", "killed")]
    assert loss[0] == loss[1]


def cka_numpy(x, y):
    """Linear CKA, written out independently: centre the columns, ||Y^T X||^2 / (||X^T X|| ||Y^T Y||)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def read_csv(path):
    with open(path) as f:
        return [{k: (float(v) if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]


def test_plot_writes_pictures_and_numbers_that_match_the_saved_files(runs):
    run = runs / "straight"
    proc = subprocess.run([sys.executable, "dynamics.py", "plot", str(run)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import matplotlib.image
    for name in ("loss.png", "layers.png"):
        raw = (run / "plots" / name).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 10_000
        image = matplotlib.image.imread(run / "plots" / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0.01  # not blank

    def load(step, split, kind):
        return torch.load(run / "checkpoints" / f"step_{step}" / "learning_dynamics" / f"{split}_{kind}.pt",
                          weights_only=True)

    table = read_csv(run / "plots" / "layers.csv")
    assert [int(r["step"]) for r in table] == STEPS
    final = load(20, "val", "activations")
    assert len(final) == 6  # 2 layers x 3 suffixes
    for i, row in enumerate(table):
        step = STEPS[i]
        w, g, a = load(step, "val", "weights"), load(step, "val", "gradients"), load(step, "val", "activations")
        for name in w:
            assert row[f"{name}/weight_norm"] == pytest.approx(w[name].norm().item(), rel=1e-6)
            assert row[f"{name}/grad_norm_val"] == pytest.approx(g[name].norm().item(), rel=1e-6)
            if i:
                prev = load(STEPS[i - 1], "val", "weights")[name]
                assert row[f"{name}/weight_rel_change"] == pytest.approx(
                    ((w[name] - prev).norm() / prev.norm()).item(), rel=1e-5)
            else:
                assert row[f"{name}/weight_rel_change"] is None
            if step != 20:
                assert row[f"{name}/grad_norm_train"] == pytest.approx(
                    load(step, "train", "gradients")[name].norm().item(), rel=1e-6)
            assert row[f"{name}/cka_to_final"] == pytest.approx(cka_numpy(a[name], final[name]), rel=1e-6)
    assert all(row == pytest.approx(1.0) for k, row in table[-1].items() if k.endswith("cka_to_final"))
    assert any(v < 0.999 for k, v in table[0].items() if k.endswith("cka_to_final"))  # it moved

    losses = read_csv(run / "plots" / "loss.csv")
    logged = {m["step"]: m["loss"] for m in metrics(runs, "straight") if "loss" in m}
    assert {int(r["step"]): r["train_loss"] for r in losses if r["train_loss"] is not None} == \
        pytest.approx(logged, rel=1e-9)
    for r in losses:
        if r["eval_loss"] is not None:
            saved = json.loads((run / "eval_results" / f"step_{int(r['step'])}.json").read_text())
            assert r["eval_loss"] == pytest.approx(saved["loss"]) and r["eval_paloma"] == pytest.approx(saved["paloma"])


def test_a_run_without_dynamics_still_gets_its_loss_plots(tmp_path):
    run_train(tmp_path, "--run_name=plain", "--max_steps=1", "--layer_suffixes=")
    proc = subprocess.run([sys.executable, "dynamics.py", "plot", str(tmp_path / "plain")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "note: no learning dynamics in this run" in proc.stdout, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "plain" / "plots")) == ["loss.csv", "loss.png"]
