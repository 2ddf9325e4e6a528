"""Checkpoints you can trust: a planted pickle never runs (DeepSpeed's own files are never read),
a diverged step is never applied or saved, flipped bytes are caught, auto_resume=False keeps the
old run, and bad settings, checkpoints and data files get one clear line before any work."""

import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

import checkpoint
from helpers import ROOT, copy_run, last_line, metrics, plant_pickle, refresh_manifest, run_train


def test_a_planted_pickle_in_the_training_state_never_runs(base_run, tmp_path):
    ckpt = copy_run(base_run, tmp_path)
    marker = tmp_path / "pwned"
    plant_pickle(ckpt / "step_2" / "training_state.pt", marker)
    refresh_manifest(ckpt / "step_2")
    proc = run_train(tmp_path, "--run_name=r", "--max_steps=4", check=False)
    assert proc.returncode != 0 and not marker.exists()
    line = last_line(proc)
    assert "refusing to load" in line and "training_state.pt" in line and "posix.system" in line, line
    # the loader itself refuses, without the scan in front of it
    with pytest.raises(checkpoint.CheckpointError, match="could run code"):
        checkpoint.load_state(ckpt / "step_2" / "training_state.pt")
    assert not marker.exists()


def test_deepspeeds_own_checkpoint_files_are_never_read(base_run, tmp_path):
    # An earlier pico-train kept ZeRO-2's optimizer in DeepSpeed's per-rank files, which DeepSpeed
    # unpickles in full. Nothing reads them now: a checkpoint that has them is refused in one line,
    # before any of its files is loaded, even with a pickle planted there and listed in the manifest.
    ckpt = copy_run(base_run, tmp_path)
    marker = tmp_path / "pwned"
    os.makedirs(ckpt / "step_2" / "deepspeed")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        plant_pickle(ckpt / "step_2" / "deepspeed" / name, marker)
    with open(ckpt / "step_2" / "manifest.json") as f:
        manifest = json.load(f)
    manifest["files"].update({f"deepspeed/{n}": {} for n in os.listdir(ckpt / "step_2" / "deepspeed")})
    with open(ckpt / "step_2" / "manifest.json", "w") as f:
        json.dump(manifest, f)
    refresh_manifest(ckpt / "step_2")
    proc = run_train(tmp_path, "--run_name=r", "--max_steps=4", "--backend=deepspeed", check=False)
    assert proc.returncode != 0 and not marker.exists()
    line = last_line(proc)
    assert line.startswith("cannot resume: ") and "DeepSpeed's own files (deepspeed/)" in line, line
    assert not hasattr(checkpoint, "deepspeed_engine")  # nor any loader that would read them


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_a_diverged_step_is_never_applied_or_saved(tmp_path, backend):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    # lr 1e6: step 1 takes the weights far off (finite), step 2's gradient is NaN. Today's main
    # applies step 2 and saves its NaN weights as step_2, the `latest` a resume fails on again.
    args = ["--run_name=nan", "--max_steps=6", "--save_every_n_steps=2", f"--backend={backend}"]
    proc = run_train(tmp_path, *args, "--lr=1e6", check=False)
    assert proc.returncode != 0
    line = last_line(proc)
    ckpt = tmp_path / "nan" / "checkpoints"
    assert "not finite, so the step was not applied" in line and "The last good checkpoint is" in line, line
    assert line.startswith("step 2: loss "), line
    assert line.split("The last good checkpoint is ")[1].startswith(str(ckpt / "step_0") + ":")
    assert os.readlink(ckpt / "latest") == "step_0" and checkpoint.saved_steps(tmp_path / "nan") == [0]
    for name, w in load_file(ckpt / "step_0" / "model.safetensors").items():
        assert torch.isfinite(w).all(), name
    # it resumes from there with a sane learning rate and finishes
    proc = run_train(tmp_path, *args, "--lr=1e-3")
    assert f"resumed from {ckpt / 'step_0'}" in proc.stdout
    assert os.readlink(ckpt / "latest") == "step_6"


def test_flipped_bytes_of_the_same_size_are_detected(base_run, tmp_path):
    ckpt = copy_run(base_run, tmp_path)
    model_file = ckpt / "step_2" / "model.safetensors"
    raw = bytearray(model_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    model_file.write_bytes(bytes(raw))
    proc = run_train(tmp_path, "--run_name=r", "--max_steps=4", check=False)
    assert proc.returncode != 0
    line = last_line(proc)
    assert "model.safetensors has the right size but not the content" in line and "ln -sfn step_0" in line, line


def test_auto_resume_false_keeps_the_old_run(base_run, tmp_path):
    copy_run(base_run, tmp_path)
    before = (tmp_path / "r" / "logs" / "metrics.jsonl").read_text()
    weights_before = (tmp_path / "r" / "checkpoints" / "step_2" / "model.safetensors").read_bytes()
    proc = run_train(tmp_path, "--run_name=r", "--max_steps=1", "--auto_resume=False")
    kept = tmp_path / "r.set-aside-1"
    assert f"kept, untouched, in {kept}" in proc.stdout
    assert (kept / "logs" / "metrics.jsonl").read_text() == before
    assert (kept / "checkpoints" / "step_2" / "model.safetensors").read_bytes() == weights_before
    assert [m["step"] for m in metrics(tmp_path, "r") if "loss" in m] == [1]  # a fresh log, not appended
    assert checkpoint.saved_steps(tmp_path / "r") == [0, 1]


@pytest.mark.parametrize("args,message", [
    (["--batch_size=0"], "batch_size must be a number of at least 1, got 0"),
    (["--batch_size=-8"], "batch_size must be a number of at least 1, got -8"),
    (["--gradient_accumulation_steps=0"], "gradient_accumulation_steps must be a number of at least 1, got 0"),
    (["--save_every_n_steps=0"], "save_every_n_steps must be a number of at least 1, got 0"),
    (["--log_every_n_steps=0"], "log_every_n_steps must be a number of at least 1, got 0"),
    (["--eval_batch_size=0"], "eval_batch_size must be a number of at least 1, got 0"),
    (["--learning_dynamics_batch_size=0"], "learning_dynamics_batch_size must be a number of at least 1, got 0"),
    (["--eval_max_rows=0"], "eval_max_rows must be a number of at least 1, got 0 (None: the whole evaluation set)"),
    (["--max_steps=-1"], "max_steps must be a number of at least 0, got -1 (the run's length in optimizer steps)"),
    (["--lr", "1e-3"], "--lr has no value; write it with '=', as --lr=1e-3"),
    (["config/dem0.py"], "no config file 'config/dem0.py' (settings are written --key=value)"),
    (["--learning_rate=1e-3"], "unknown setting 'learning_rate'; here it is lr (python train.py --help says what "
                               "each setting means)"),
    (["--lr_scheduler=step"], "lr_scheduler must be one of 'linear_with_warmup', 'cosine', 'wsd' (schedules.py), "
                               "got 'step'"),
])
def test_bad_settings_get_one_line_before_anything_is_made(tmp_path, args, message):
    proc = run_train(tmp_path, "--run_name=bad", *args, check=False)
    assert proc.returncode != 0 and proc.stderr.strip() == f"config error: {message}", proc.stderr[-2000:]
    assert not os.listdir(tmp_path)  # no run folder


@pytest.mark.parametrize("damage,message", [
    ("latest_missing", "latest points at step_9, which does not exist; point it at an earlier checkpoint "
                       "(steps here: 0, 2), e.g. `ln -sfn step_2"),
    ("latest_file", "latest is a regular file, not a link to a step_<N> folder"),
    ("manifest_json", "step_2/manifest.json is not a valid manifest (JSONDecodeError"),
])
def test_bad_checkpoint_files_are_named(base_run, tmp_path, damage, message):
    ckpt = copy_run(base_run, tmp_path)
    if damage == "latest_missing":
        os.remove(ckpt / "latest")
        os.symlink("step_9", ckpt / "latest")
    elif damage == "latest_file":
        os.remove(ckpt / "latest")
        (ckpt / "latest").write_text("step_2\n")
    else:
        (ckpt / "step_2" / "manifest.json").write_text('{"step": 2, "files": {')
    proc = run_train(tmp_path, "--run_name=r", "--max_steps=4", check=False)
    assert proc.returncode != 0 and "checkpoint saved" not in proc.stdout
    assert message in last_line(proc), last_line(proc)


def write_ids(path, ids, kind=None):
    kind = kind or pa.int32()
    pq.write_table(pa.table({"input_ids": pa.array(ids, type=pa.list_(kind))}), path)


@pytest.mark.parametrize("case,message", [
    ("empty", "train.parquet: the file is empty (0 bytes)"),
    ("not_parquet", "train.parquet: not a parquet file"),
    ("strings", "input_ids has type string, expected lists of integer token ids (text must be tokenized first"),
    ("floats", "double>, expected lists of integer token ids"),
    ("typo", "data/dem0: no such file or folder in data/ (did you mean data/demo?)"),
])
def test_bad_data_files_are_named_before_any_work(tmp_path, case, message):
    folder = tmp_path / "mine"
    folder.mkdir()
    if case == "empty":
        (folder / "train.parquet").write_bytes(b"")
    elif case == "not_parquet":
        (folder / "train.parquet").write_text("In the beginning God created the heaven and the earth.\n")
    elif case == "strings":
        pq.write_table(pa.table({"input_ids": ["In the beginning"]}), folder / "train.parquet")
    elif case == "floats":
        write_ids(folder / "train.parquet", [[float(i) for i in range(65)]], pa.float64())
    name = "data/dem0" if case == "typo" else str(folder)
    proc = run_train(tmp_path, "--run_name=data", f"--dataset_name={name}", check=False,
                     env={"HF_HUB_OFFLINE": "0"} if case == "typo" else None)
    assert proc.returncode != 0 and "step 0" not in proc.stdout
    line = last_line(proc)
    assert line.startswith("data error: ") and message in line, line
    assert not os.path.exists(tmp_path / "data" / "checkpoints")


@pytest.mark.slow
def test_a_bad_row_mid_run_names_the_step(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    good = pq.read_table(os.path.join(ROOT, "data", "demo", "train.parquet")).slice(0, 1)
    pq.write_table(good.select(["input_ids"]), folder / "train-00000.parquet")  # 32 sequences of 64: 4 steps
    write_ids(folder / "train-00001.parquet", [[7] * 100 + [50304] + [7] * 1948])
    proc = run_train(tmp_path, "--run_name=midrun", f"--dataset_name={folder}", "--max_steps=6",
                     "--save_every_n_steps=10", "--save_log_spaced_until=4", "--eval_dataset_name=data/demo",
                     "--eval_dataset_split=validation", check=False)
    assert proc.returncode != 0 and "step 4/6" in proc.stdout
    line = last_line(proc)
    assert line.startswith("data error in the batch of step 5: ")
    assert "train-00001.parquet row 0: token id 50304" in line
    # the checkpoint at step 4 looked ahead at that bad batch for its train dynamics: it is still whole
    run = tmp_path / "midrun" / "checkpoints"
    assert checkpoint.saved_steps(str(tmp_path / "midrun")) == [0, 1, 2, 4]
    assert os.path.realpath(run / "latest").endswith("step_4")
    checkpoint.verify(str(run / "step_4"))
    assert not (run / "step_4" / "learning_dynamics" / "train_activations.pt").exists()
    assert (run / "step_4" / "learning_dynamics" / "val_activations.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("bad_step", [1, 2])
def test_a_bad_row_that_only_one_rank_reads_stops_every_rank(tmp_path, bad_step):
    """Each rank reads only its own rows of a batch: a bad row in rank 1's half is found by rank 1 alone
    (while the step before computes, or at the start for the first batch), and every rank stops at that
    step, rank 0's log naming rank 1 and the row, instead of waiting for rank 1 at the next collective."""
    folder = tmp_path / "mine"
    folder.mkdir()
    good = pq.read_table(os.path.join(ROOT, "data", "demo", "train.parquet")).select(["input_ids"])
    bad = [[7] * 100 + [50304] + [7] * 1948]
    # 2049-token rows cut into 32 sequences of 64; a batch of 64 is two rows: rank 0's, then rank 1's
    pq.write_table(good.slice(0, 2 if bad_step > 1 else 1), folder / "train-00000.parquet")
    write_ids(folder / "train-00001.parquet", [good.column("input_ids")[2].as_py()] * (bad_step > 1) + bad)
    proc = run_train(tmp_path, "--run_name=shares", f"--dataset_name={folder}", "--batch_size=64",
                     "--max_steps=3", "--save_every_n_steps=10", "--eval_dataset_name=data/demo",
                     "--eval_dataset_split=validation", "--dist_timeout_min=2", nproc=2, check=False, timeout=240)
    assert proc.returncode != 0, proc.stdout[-2000:]
    lines = open(tmp_path / "shares" / "logs" / "train.log").read().splitlines()
    assert lines[-1].endswith(f"data error in the batch of step {bad_step} (rank 1's rows): {folder}/train-00001"
                              f".parquet row {bad_step - 1}: token id 50304 outside [0, 50304)"), lines[-1]
    assert (f"step {bad_step - 1}/3" in proc.stdout) == (bad_step > 1)
    assert "Timeout" not in proc.stderr and "timed out" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# a training state checked field by field before torch or numpy touch it (issue 28)

def groups_of(config):
    """The param groups train.py makes (2-D weights decayed, the rest not) for a run's settings."""
    import dataclasses

    from model import ModelConfig, PicoDecoder
    model = PicoDecoder(ModelConfig(**{f.name: config[f.name] for f in dataclasses.fields(ModelConfig)}))
    return [p for p in model.parameters() if p.dim() >= 2], [p for p in model.parameters() if p.dim() < 2]


def nested_lists(depth):
    shared = []
    for _ in range(depth):
        shared = [shared, shared]  # a few bytes pickled; each level doubles a walk over it
    return shared


DAMAGE = {  # what an attacker who re-signs the manifest writes into training_state.pt -> the refusal
    "empty optimizer state": (lambda s: s["optimizer"].update(state={}), "is empty at step 2"),
    "betas of 5.0": (lambda s: s["optimizer"]["param_groups"][0].update(betas=(5.0, 0.999)), "not plain numbers"),
    "a NaN moment": (lambda s: s["optimizer"]["state"][3]["exp_avg"].view(-1)[0].fill_(float("nan")),
                     "of parameter 3 holds exp_avg values that are NaN"),
    "nested shared lists": (lambda s: s["optimizer"]["state"][0].update(exp_avg=nested_lists(40)),
                            "of parameter 0 holds something other than float32 tensors"),
    "lists in a param group": (lambda s: s["optimizer"]["param_groups"][1].update(eps=nested_lists(40)),
                               "not plain numbers"),
    "a wrong shape": (lambda s: s["optimizer"]["state"].update({1: {**s["optimizer"]["state"][1],
                                                                    "exp_avg": torch.zeros(3)}}),
                      "of parameter 1 has exp_avg of shape \\(3,\\)"),
    "a 625-word numpy key": (lambda s: s["rng"][0]["numpy"].__setitem__(1, torch.zeros(625, dtype=torch.int64)),
                             "numpy's is not MT19937's 624 words"),
    "a short torch state": (lambda s: s["rng"][0].update(torch=torch.zeros(8, dtype=torch.uint8)),
                            "torch's is not 5056 bytes"),
    "a python state of strings": (lambda s: s["rng"][0].update(python=(3, ("x",) * 625, None)),
                                  "python's is not Mersenne Twister's 625 words"),
    "a shard name that is a number": (lambda s: s["data"].update(shard_name=7), "data position is not whole numbers"),
    "a row length of text": (lambda s: s["data"].update(row_len="65"), "data position is not whole numbers"),
    "a data position field too many": (lambda s: s["data"].update(extra=1), "is not the data stream's"),
}


def test_the_training_state_is_checked_field_by_field_before_use(base_run, tmp_path):
    ckpt = copy_run(base_run, tmp_path)
    folder = str(ckpt / "step_2")
    state_file = ckpt / "step_2" / "training_state.pt"
    good = torch.load(state_file, weights_only=True)
    groups = groups_of(good["config"])
    assert checkpoint.read(folder, groups, good["config"], ())[0]["step"] == 2  # as saved: it loads
    torch.save(good, tmp_path / "good.pt")
    for name, (damage, message) in DAMAGE.items():
        state = torch.load(tmp_path / "good.pt", weights_only=True)
        damage(state)
        torch.save(state, tmp_path / "damaged.pt")
        os.replace(tmp_path / "damaged.pt", state_file)
        t0 = time.time()
        with pytest.raises(checkpoint.CheckpointError, match=message) as e:
            checkpoint.read(folder, groups, good["config"], ())
        assert time.time() - t0 < 10 and "training_state.pt is damaged" in str(e.value), (name, str(e.value))
    torch.save(good, state_file)
    # a manifest that leaves out a file a resume reads lets nothing through unchecked
    manifest = json.loads((ckpt / "step_2" / "manifest.json").read_text())
    for dropped in ({}, {k: v for k, v in manifest["files"].items() if k != "model.safetensors"}):
        (ckpt / "step_2" / "manifest.json").write_text(json.dumps({**manifest, "files": dropped}))
        with pytest.raises(checkpoint.CheckpointError, match="its manifest does not list .*model.safetensors"):
            checkpoint.verify(folder)


def test_a_resume_trains_with_the_settings_given_now_on_every_backend():
    """torch's load_state_dict puts the saved param groups back; the run's own settings must win (ZeRO-2
    keeps its own groups, so there they always did)."""
    weights = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    before = torch.optim.AdamW([{"params": weights[:1], "weight_decay": 0.01}, {"params": weights[1:],
                               "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    sum(w.square().sum() for w in weights).backward()
    before.step()
    saved = checkpoint.optimizer_state(before, [weights[:1], weights[1:]])
    now = torch.optim.AdamW([{"params": weights[:1], "weight_decay": 0.5}, {"params": weights[1:],
                            "weight_decay": 0.0}], lr=1e-3, betas=(0.8, 0.95), eps=1e-6)
    checkpoint.load_optimizer_state(now, saved, [weights[:1], weights[1:]])
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in now.param_groups] == [(0.5, (0.8, 0.95), 1e-6),
                                                                                     (0.0, (0.8, 0.95), 1e-6)]
    assert torch.equal(now.state[weights[0]]["exp_avg"], before.state[weights[0]]["exp_avg"])  # the moments: saved
