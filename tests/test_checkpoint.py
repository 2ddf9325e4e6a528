"""Checkpoints and resume: SIGKILL mid-save and at a random moment (the planned stops are in
test_newcomer.py), DeepSpeed ZeRO-2 against a single process, transformers loading every
checkpoint, and clear refusals of incompatible configs and damaged checkpoints."""

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import checkpoint

from helpers import ROOT, TINY, copy_run, max_diff, metrics, run_train, weights

pytestmark = pytest.mark.slow  # every test here trains runs

STRAIGHT = ("--max_steps=6", "--save_every_n_steps=2")


def losses(runs_dir, run):
    return {m["step"]: m["loss"] for m in metrics(runs_dir, run) if "loss" in m}


def test_sigkill_at_random_moments_and_mid_save(tmp_path, reference_run):
    final = weights(reference_run(*STRAIGHT), "ref", 6)
    rng = random.Random(0)
    caught_mid_save = 0
    cmd = [sys.executable, "train.py", *TINY, f"--runs_dir={tmp_path}", *STRAIGHT]
    for trial in range(3):
        run = f"killed{trial}"
        proc = subprocess.Popen(cmd + [f"--run_name={run}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        ckpt = tmp_path / run / "checkpoints"
        if trial < 2:  # kill the moment a checkpoint is being written
            target = f".step_{2 * (trial + 1)}.tmp"
            deadline = time.time() + 60
            while not (ckpt / target).exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(2.5, 5.0))  # anywhere: a step, an evaluation, a capture, a save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if trial < 2:
            caught_mid_save += (ckpt / target).exists()  # killed before the rename sealed it
        out = run_train(tmp_path, f"--run_name={run}", *STRAIGHT).stdout
        assert max_diff(final, weights(tmp_path, run, 6)) == 0.0, (trial, out)
        assert not [n for n in os.listdir(ckpt) if n.endswith(".tmp")]
    assert caught_mid_save >= 1


def test_every_checkpoint_loads_in_transformers_with_the_same_loss(reference_run):
    transformers = pytest.importorskip("transformers")
    import data
    from model import load_pretrained
    run = reference_run() / "ref"
    seqs = torch.from_numpy(data.load_eval_sequences("data/demo", 64, 50304, "validation", max_rows=1)[:4])
    for step in (0, 2, 4):
        path = run / "checkpoints" / f"step_{step}"
        hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        ours = load_pretrained(path).eval()
        with torch.no_grad():
            theirs = hf(seqs[:, :-1], labels=seqs[:, :-1].clone()).loss  # HF shifts labels itself
            _, mine = ours(seqs[:, :-1], seqs[:, 1:])
        # HF's loss skips the last position's target; compare on the same tokens
        with torch.no_grad():
            per_token = ours(seqs[:, :-1], seqs[:, 1:], reduction="none")[1]["loss"]
        assert abs(per_token[:, :-1].mean().item() - theirs.item()) <= 1e-5
        assert abs(per_token.mean().item() - mine.item()) <= 1e-5  # two summation orders of one loss


def test_incompatible_config_is_refused_and_harmless_change_reported(tmp_path, base_run):
    copy_run(base_run, tmp_path)  # a finished run of 2 steps
    proc = run_train(tmp_path, "--run_name=r", "--max_steps=4", "--d_model=64", check=False)
    assert proc.returncode != 0
    assert "cannot resume" in proc.stderr and "d_model (saved 32, now 64)" in proc.stderr
    proc = run_train(tmp_path, "--run_name=r", "--max_steps=4", "--log_every_n_steps=2")
    assert "log_every_n_steps: 1 -> 2" in proc.stdout and "max_steps: 2 -> 4" in proc.stdout


def test_damaged_checkpoint_is_reported_not_loaded(tmp_path, base_run):
    copy_run(base_run, tmp_path)  # a finished run of 2 steps
    model_file = tmp_path / "r" / "checkpoints" / "step_2" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-100])
    proc = run_train(tmp_path, "--run_name=r", "--max_steps=4", check=False)
    assert proc.returncode != 0 and "step_2 is damaged: model.safetensors" in proc.stderr
    os.remove(tmp_path / "r" / "checkpoints" / "step_2" / "manifest.json")
    proc = run_train(tmp_path, "--run_name=r", "--max_steps=4", check=False)
    assert proc.returncode != 0 and "is incomplete" in proc.stderr


def test_one_checkpoint_resumes_on_either_backend_and_any_number_of_ranks(tmp_path, reference_run):
    """The published configs' shape: ZeRO-2 with gradient accumulation (2 micro-steps x 2 ranks x 2 rows).
    Its checkpoints hold fp32 weights and AdamW's own state_dict, as one process's do, and carry on
    under DDP or ZeRO-2, on 1 or 2 ranks, as if never interrupted (4 on 2: test_train.py)."""
    pytest.importorskip("deepspeed")
    plain = reference_run(*STRAIGHT)  # one process: 2 micro-steps x 4 rows
    final = weights(plain, "ref", 6)
    proc = run_train(tmp_path, "--run_name=ds", *STRAIGHT, "--backend=deepspeed", "--dist_timeout_min=7", nproc=2)
    # every process group waits dist_timeout_min, DeepSpeed's own too (made with torch's default, 30 or 10 min)
    assert re.search(r"\] [2-9] process groups, each waiting at most 0:07:00 at a collective\n", proc.stdout)
    assert max_diff(final, weights(tmp_path, "ds", 6)) <= 1e-5
    step2 = tmp_path / "ds" / "checkpoints" / "step_2"
    assert not (step2 / "deepspeed").exists()
    assert {w.dtype for w in weights(tmp_path, "ds", 2).values()} == {torch.float32}
    theirs, ours = (checkpoint.load_state(d / "training_state.pt")["optimizer"]
                    for d in (step2, plain / "ref" / "checkpoints" / "step_2"))
    assert theirs["param_groups"] == ours["param_groups"] and theirs["state"].keys() == ours["state"].keys()
    for i, state in ours["state"].items():
        assert state.keys() == theirs["state"][i].keys()
        assert torch.equal(state["step"], theirs["state"][i]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            err = (theirs["state"][i][key] - state[key]).norm() / state[key].norm()  # fp32 sums in another order
            assert err <= 1e-5, (i, key, err)

    # stopped at step 3 and resumed as it was: bit for bit
    run_train(tmp_path, "--run_name=ds_resumed", *STRAIGHT, "--backend=deepspeed", "--stop_at_step=3", nproc=2)
    shutil.copytree(tmp_path / "ds_resumed", tmp_path / "ds_to_ddp", symlinks=True)
    run_train(tmp_path, "--run_name=ds_resumed", *STRAIGHT, "--backend=deepspeed", nproc=2)
    assert max_diff(weights(tmp_path, "ds", 6), weights(tmp_path, "ds_resumed", 6)) == 0.0
    assert losses(tmp_path, "ds") == losses(tmp_path, "ds_resumed")
    # the same step-3 checkpoint resumed by one DDP process
    proc = run_train(tmp_path, "--run_name=ds_to_ddp", *STRAIGHT)
    assert "backend: 'deepspeed' -> 'ddp'" in proc.stdout and "world_size: 2 -> 1" in proc.stdout
    assert max_diff(final, weights(tmp_path, "ds_to_ddp", 6)) <= 1e-5
    # one process's step-2 checkpoint taken up by 2-process ZeRO-2, as a fork (init_from): a new run that goes on
    # as the one process did (a resume reads a checkpoint the same way: 2 ranks resumed by 1 above, 4 by 2 in
    # test_train.py)
    step2 = plain / "ref" / "checkpoints" / "step_2"
    proc = run_train(tmp_path, "--run_name=ddp_to_ds", *STRAIGHT, "--backend=deepspeed", f"--init_from={step2}",
                     nproc=2)
    assert f"forked from {step2} (step 2, manifest sha256" in proc.stdout
    assert max_diff(final, weights(tmp_path, "ddp_to_ds", 6)) <= 1e-5


def test_bf16_is_the_same_numerics_under_ddp_and_zero2(tmp_path):
    """precision=bf16: fp32 weights, gradients and optimizer, bf16 matmuls under autocast, on every
    backend. At the published configs' 8 accumulation steps, 2-rank ZeRO-2 equals 2-rank DDP, its
    checkpoints hold fp32 weights that are the model evaluated (read back by transformers), and the
    learning dynamics are fp32."""
    pytest.importorskip("deepspeed")
    transformers = pytest.importorskip("transformers")

    import pyarrow as pa
    import pyarrow.parquet as pq

    import data
    # the evaluation and the learning dynamics on 4 sequences of the demo's held-out rows (bf16 on a CPU is slow)
    seqs = data.load_eval_sequences("data/demo", 64, 50304, "validation", max_rows=1)[:4]
    (tmp_path / "held_out").mkdir()
    pq.write_table(pa.table({"input_ids": pa.array(list(seqs), type=pa.list_(pa.int32()))}),
                   tmp_path / "held_out" / "validation.parquet")
    args = ("--precision=bf16", "--batch_size=16", "--gradient_accumulation_steps=8", "--max_steps=2",
            f"--eval_dataset_name={tmp_path / 'held_out'}", "--eval_dataset_split=validation", "--eval_max_rows=4")
    for backend in ("ddp", "deepspeed"):
        proc = run_train(tmp_path, f"--run_name={backend}", *args, f"--backend={backend}", nproc=2)
        assert f"cpu, bf16, backend {backend}" in proc.stdout and "8 micro-steps x 2 ranks x sub-batch 1" in proc.stdout
    ddp, ds = weights(tmp_path, "ddp", 2), weights(tmp_path, "deepspeed", 2)
    assert {w.dtype for w in list(ddp.values()) + list(ds.values())} == {torch.float32}
    # measured: 2e-7 relative (the order of the fp32 gradient sums); DeepSpeed's own bf16 mode: 1e-2
    assert max(((ddp[k] - ds[k]).abs().max() / ddp[k].abs().max()).item() for k in ddp) <= 1e-5
    a, b = losses(tmp_path, "ddp"), losses(tmp_path, "deepspeed")
    assert a.keys() == b.keys() and all(abs(b[s] / a[s] - 1) <= 1e-5 for s in a), (a, b)
    seqs = torch.from_numpy(seqs)
    for step in (0, 2):
        step_dir = tmp_path / "deepspeed" / "checkpoints" / f"step_{step}"
        hf = transformers.AutoModelForCausalLM.from_pretrained(step_dir).eval()
        with torch.no_grad():
            logits = hf(seqs[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), seqs[:, 1:].flatten()).item()
        logged = json.load(open(tmp_path / "deepspeed" / "eval_results" / f"step_{step}.json"))["loss"]
        assert loss != logged and abs(loss / logged - 1) <= 0.01, (step, loss, logged)  # bf16 did round
        for kind in ("activations", "weights", "gradients"):
            saved = torch.load(step_dir / "learning_dynamics" / f"val_{kind}.pt", weights_only=True)
            assert {t.dtype for t in saved.values()} == {torch.float32}, (step, kind)


# ---------------------------------------------------------------------------------------------
# forks: a new run from another run's checkpoint, or from weights alone (init_from)

def test_a_fork_that_changes_nothing_is_its_parent_and_says_where_it_came_from(tmp_path, reference_run):
    parent = reference_run(*STRAIGHT) / "ref"  # steps 0, 2, 4, 6
    before = {p: p.read_bytes() for p in parent.rglob("*") if p.is_file() and not p.is_symlink()}
    step2 = parent / "checkpoints" / "step_2"
    proc = run_train(tmp_path, "--run_name=fork", *STRAIGHT, f"--init_from={step2}")
    assert proc.stdout.splitlines()[0].endswith(f"; init_from {step2}")  # the first line says where it starts
    line = next(x for x in proc.stdout.splitlines() if "forked from" in x)
    digest = hashlib.sha256((step2 / "manifest.json").read_bytes()).hexdigest()
    assert line.endswith(f"forked from {step2} (step 2, manifest sha256 {digest})"), line
    for step in (4, 6):  # the parent's later checkpoints, bit for bit
        assert max_diff(weights(parent.parent, "ref", step), weights(tmp_path, "fork", step)) == 0.0
        assert (tmp_path / "fork" / "eval_results" / f"step_{step}.json").read_bytes() == \
            (parent / "eval_results" / f"step_{step}.json").read_bytes()
    assert not (tmp_path / "fork" / "checkpoints" / "step_0").exists()
    assert yaml.safe_load(open(tmp_path / "fork" / "training_config.yaml"))["checkpointing"]["init_from"] == str(step2)
    state = checkpoint.load_state(tmp_path / "fork" / "checkpoints" / "step_6" / "training_state.pt")
    assert state["config"]["lineage"] == [f"{step2} (step 2, manifest sha256 {digest})"]
    import data  # what each of the fork's steps trained on: its parent's batches (before its own checkpoints too)
    shutil.rmtree(tmp_path / "fork" / "checkpoints" / "step_2")
    for step in (2, 3, 5):
        assert (data.global_batch(str(tmp_path / "fork"), step)[0] == data.global_batch(str(parent), step)[0]).all()
    with pytest.raises(data.DataError, match="it starts at step 2"):
        data.global_batch(str(tmp_path / "fork"), 1)
    # with ten times the learning rate: a model of its own; and a fork of that fork carries both lines
    run_train(tmp_path, "--run_name=hot", *STRAIGHT, f"--init_from={step2}", "--lr=3e-2")
    assert max_diff(weights(parent.parent, "ref", 6), weights(tmp_path, "hot", 6)) > 1e-3
    hot4 = tmp_path / "hot" / "checkpoints" / "step_4"
    run_train(tmp_path, "--run_name=hotter", *STRAIGHT, f"--init_from={hot4}", "--lr=3e-2")
    assert max_diff(weights(tmp_path, "hot", 6), weights(tmp_path, "hotter", 6)) == 0.0
    lineage = checkpoint.load_state(tmp_path / "hotter" / "checkpoints" / "step_6" / "training_state.pt")
    assert [x.split(" (")[0] for x in lineage["config"]["lineage"]] == [str(step2), str(hot4)]
    # the two runs on one picture: the means it draws are the layers' own numbers
    import csv

    import dynamics
    proc = subprocess.run([sys.executable, "dynamics.py", "plot", str(parent), str(tmp_path / "hot")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (tmp_path / "hot" / "plots" / "compare.png").stat().st_size > 10_000, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "hot" / "plots" / "compare.csv")))
    assert {(r["run"], r["step"]) for r in rows} >= {("ref", "0"), ("ref", "6"), ("hot", "2"), ("hot", "6")}
    layers = next(r for r in dynamics.layer_table(str(tmp_path / "hot")) if r["step"] == 6)
    drawn = next(r for r in rows if (r["run"], r["step"]) == ("hot", "6"))
    for kind in ("attention.v_proj", "swiglu.w_2"):
        values = [v for k, v in layers.items() if k.endswith(f".{kind}/weight_rel_change")]
        assert len(values) == 2 and float(drawn[f"{kind}/weight_rel_change"]) == pytest.approx(sum(values) / 2)
    assert {p: p.read_bytes() for p in parent.rglob("*") if p.is_file() and not p.is_symlink()} == before


def test_weights_alone_start_a_run_at_step_0_and_bad_parents_are_one_line(tmp_path, base_run):
    """pico-train's own format (its names, q and k interleaved) as init_from: the new run's step-0
    checkpoint computes the logits of a from-scratch pico-train reference; a wrong shape, a missing
    folder, flipped bytes or a planted pickle in the parent are each one line, and nothing runs."""
    from helpers import pico_train_checkpoint
    from model import load_pretrained
    from test_model import reference_pico_train_logits
    theirs = tmp_path / "pico-train"
    sd, cfg = pico_train_checkpoint(theirs, seed=5)
    proc = run_train(tmp_path, "--run_name=tuned", f"--init_from={theirs}", "--max_steps=0")
    assert "forked from" in proc.stdout and "(weights alone, model.safetensors sha256" in proc.stdout
    ids = torch.randint(0, 50304, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_pretrained(tmp_path / "tuned" / "checkpoints" / "step_0")(ids)[0]
    ref = reference_pico_train_logits(sd, cfg, ids)
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()

    def refused(init_from, *args):
        proc = run_train(tmp_path, "--run_name=refused", f"--init_from={init_from}", *args, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert not (tmp_path / "refused" / "checkpoints").exists() or not os.listdir(tmp_path / "refused" /
                                                                                      "checkpoints")
        return proc.stderr.strip().splitlines()[-1]
    assert "holds a model of another shape than these settings say: d_model 32 there, 64 here" in \
        refused(theirs, "--d_model=64")
    assert "is not a checkpoint folder" in refused(tmp_path / "nowhere")
    line = refused(base_run / "checkpoints" / "step_2", "--d_model=64")
    assert "d_model (saved 32, now 64); a fork keeps its parent's shape: set them as there" in line, line
    copy = tmp_path / "damaged"
    shutil.copytree(base_run / "checkpoints" / "step_2", copy)
    raw = bytearray((copy / "model.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(raw))
    assert "model.safetensors has the right size but not the content" in refused(copy)
    from helpers import plant_pickle, refresh_manifest
    shutil.copytree(base_run / "checkpoints" / "step_2", tmp_path / "pickled")
    plant_pickle(tmp_path / "pickled" / "training_state.pt", tmp_path / "pwned")
    refresh_manifest(tmp_path / "pickled")
    assert "refusing to load" in refused(tmp_path / "pickled") and not (tmp_path / "pwned").exists()
