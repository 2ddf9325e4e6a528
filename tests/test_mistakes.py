"""Nothing lost, nothing written outside the run: ordinary mistakes (a max_steps below the
checkpoint, a copy without `latest`, two jobs on one run, a crash mid-write, a huge lr) and files
from elsewhere (a run's YAML, symbolic links, bombs in loaded files, a token in an error) each
lose no work and reach nothing outside the run; bad input is one line before any work."""

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import zipfile

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import data
from helpers import ROOT, TINY, copy_run, last_line, plant_pickle, refresh_manifest, run_train, train_py_settings


def fails(tmp_path, *args, **kw):
    proc = run_train(tmp_path, "--run_name=r", *args, check=False, **kw)
    assert proc.returncode != 0, proc.stdout[-2000:]
    return last_line(proc)


def steps_and_latest(ckpt):
    latest = os.readlink(ckpt / "latest") if os.path.lexists(ckpt / "latest") else None
    return checkpoint.saved_steps(ckpt.parent), latest


# ---------------------------------------------------------------------------------------------
# work is lost or never ends

def test_a_resume_past_max_steps_says_so_and_a_negative_step_is_damage(base_run, tmp_path):
    ckpt = copy_run(base_run, tmp_path)  # steps 0 and 2
    line = fails(tmp_path, "--max_steps=1")  # today: trains on forever (step 3/1, eta -1s, ...)
    assert "it is at step 2, past max_steps 1; set max_steps to at least 2" in line, line
    assert steps_and_latest(ckpt) == ([0, 2], "step_2")
    state = checkpoint.load_state(ckpt / "step_2" / "training_state.pt")
    torch.save({**state, "step": -3}, ckpt / "step_2" / "training_state.pt")
    refresh_manifest(ckpt / "step_2")
    line = fails(tmp_path, "--max_steps=4")  # today: a negative learning rate, and steps 0-4 overwritten
    assert "training_state.pt is damaged: its step -3 is not 2" in line, line
    assert steps_and_latest(ckpt) == ([0, 2], "step_2")


def test_a_copy_without_latest_resumes_its_newest_step_or_overwrites_nothing(base_run, tmp_path):
    ckpt = copy_run(base_run, tmp_path)
    os.remove(ckpt / "latest")  # rsync without -l, zip, ...: today the run starts again at step 0
    proc = run_train(tmp_path, "--run_name=r", "--max_steps=4")
    assert "was missing" in proc.stdout and f"resumed from {ckpt / 'step_2'} at step 2" in proc.stdout
    assert steps_and_latest(ckpt) == ([0, 2, 4], "step_4")
    os.remove(ckpt / "latest")
    (ckpt / "step_4" / "model.safetensors").write_bytes(b"damaged")
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    line = fails(tmp_path, "--max_steps=6")
    assert "holds checkpoints (steps 0, 2, 4) but no `latest` link" in line
    assert f"ln -sfn step_2 {ckpt / 'latest'}" in line
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before
    assert not os.path.lexists(ckpt / "latest")


def test_a_refused_resume_leaves_the_runs_yaml_as_it_was(base_run, tmp_path):
    copy_run(base_run, tmp_path)
    yaml_file = tmp_path / "r" / "training_config.yaml"
    before = yaml_file.read_bytes()
    line = fails(tmp_path, "--max_steps=4", "--d_model=64")
    assert "d_model (saved 32, now 64)" in line
    assert yaml_file.read_bytes() == before  # today: rewritten with d_model 64, another model
    assert (tmp_path / "r" / "logs" / "train.log").read_text().rstrip().endswith(line)  # the log says why, too
    # dynamics.py plot on a disk that takes no more: one line
    def full():
        resource.setrlimit(resource.RLIMIT_FSIZE, (99, 99))
    proc = subprocess.run([sys.executable, "dynamics.py", "plot", str(tmp_path / "r")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, preexec_fn=full)
    assert proc.returncode != 0 and re.fullmatch(r"cannot plot .*/r: File too large writing .* GiB free there\)",
                                                 last_line(proc)), proc.stderr[-2000:]


@pytest.mark.slow
def test_one_run_folder_one_process_and_a_dead_ones_lock_is_taken_over(tmp_path):
    cmd = [sys.executable, "train.py", *TINY, f"--runs_dir={tmp_path}", "--run_name=r", "--max_steps=400",
           "--save_every_n_steps=100"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "r" / "checkpoints" / "step_0").exists() and time.time() < deadline:
            time.sleep(0.1)
        line = fails(tmp_path, "--max_steps=400", "--save_every_n_steps=100")  # a requeued job, say
        assert f"is in use by process {first.pid} on " in line and "use another run_name" in line, line
        assert first.poll() is None  # the first run goes on, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    proc = run_train(tmp_path, "--run_name=r", "--max_steps=400", "--save_every_n_steps=100", "--stop_at_step=1")
    assert "resumed from" in proc.stdout  # the dead process's lock is taken over


def test_metrics_are_rewritten_whole_and_a_partial_line_is_dropped(base_run, tmp_path):
    copy_run(base_run, tmp_path)
    metrics_file = tmp_path / "r" / "logs" / "metrics.jsonl"
    with open(metrics_file, "a") as f:
        f.write('{"step": 3, "loss": 4.2, "l')  # a crash in the middle of a write: today every resume fails
    proc = run_train(tmp_path, "--run_name=r", "--max_steps=4")
    assert "1 line(s) of" in proc.stdout and "were dropped" in proc.stdout
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4] and not os.path.exists(f"{metrics_file}.tmp")


@pytest.mark.slow
def test_a_huge_learning_rate_stops_with_one_line(tmp_path):
    line = fails(tmp_path, "--lr=30")  # today: OverflowError in math.exp, and every resume repeats it
    assert line.startswith("step 2: eval loss ") and "perplexity inf" in line and "diverged" in line, line
    assert "The last good checkpoint is" in line and os.readlink(tmp_path / "r" / "checkpoints" / "latest") == "step_0"


def test_nan_or_unreadable_weights_with_a_matching_manifest_are_refused(base_run, tmp_path):
    ckpt = copy_run(base_run, tmp_path)
    model_file = ckpt / "step_2" / "model.safetensors"
    good = model_file.read_bytes()
    weights = load_file(model_file)
    name = sorted(weights)[0]
    weights[name][0, 0] = float("nan")
    save_file(weights, model_file, metadata={"format": "pt"})
    refresh_manifest(ckpt / "step_2")  # damage before the hash was written, or a hostile upload
    line = fails(tmp_path, "--max_steps=4")
    assert "model.safetensors holds NaN or inf weights" in line, line
    model_file.write_bytes(good[:8] + b"\xff" * 8 + good[16:])  # a header that is not one; re-hashed
    refresh_manifest(ckpt / "step_2")
    line = fails(tmp_path, "--max_steps=4")
    assert "model.safetensors (or config.json) cannot be read" in line, line


# ---------------------------------------------------------------------------------------------
# files from elsewhere reach outside the run

def test_a_runs_yaml_never_decides_where_or_whether_anything_is_written(base_run, tmp_path):
    text = (base_run / "training_config.yaml").read_text()
    assert "runs_dir: " in text and "auto_resume: true" in text
    elsewhere = tmp_path / "somewhere"
    planted = tmp_path / "downloaded.yaml"
    planted.write_text(text.replace("run_name: r", "run_name: .ssh").replace("auto_resume: true", "auto_resume: false")
                       .replace(f"runs_dir: {base_run.parent}", f"runs_dir: {elsewhere}"))
    (tmp_path / "runs").mkdir()
    proc = subprocess.run([sys.executable, "train.py", str(planted), "--max_steps=2", f"--runs_dir={tmp_path / 'runs'}",
                           "--run_name=mine"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = next(line for line in proc.stdout.splitlines() if "from the run's YAML, not taken" in line)
    assert all(k in said for k in ("runs_dir", "run_name", "auto_resume", "save_to_hf", "hf_repo_id", "data_cache_dir"))
    assert not elsewhere.exists() and sorted(os.listdir(tmp_path / "runs")) == [".mine.lock", "mine"]


@pytest.mark.parametrize("target", ["training_config.yaml", "logs/train.log"])
def test_a_symbolic_link_in_the_run_folder_is_never_written_through(base_run, tmp_path, target):
    copy_run(base_run, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    os.remove(tmp_path / "r" / target)
    os.symlink(victim, tmp_path / "r" / target)
    line = fails(tmp_path, "--max_steps=4")
    assert line.startswith(f"cannot start: {tmp_path / 'r' / target} is a symbolic link"), line
    assert victim.read_text() == "mine"


def test_links_are_never_uploaded_and_manifests_or_latest_never_lead_outside(base_run, tmp_path):
    import hub
    ckpt = copy_run(base_run, tmp_path)
    secret = tmp_path / "id_rsa"
    secret.write_text("secret")
    os.symlink(secret, ckpt / "step_2" / "notes.txt")
    os.remove(ckpt / "step_2" / "config.json")
    os.symlink(secret, ckpt / "step_2" / "config.json")
    planned = [f for c in hub.plan_commits(tmp_path / "r", 2) for f in c["files"].values()]
    assert planned
    assert not any(os.path.islink(f) or os.path.basename(f) in ("notes.txt", "config.json") for f in planned)
    with pytest.raises(checkpoint.CheckpointError, match="not a file inside it"):
        checkpoint.verify(ckpt / "step_2")  # config.json, listed in the manifest, is now a link
    manifest = json.loads((ckpt / "step_0" / "manifest.json").read_text())
    manifest["files"]["../../../id_rsa"] = {"bytes": 6, "sha256": "0" * 64}
    (ckpt / "step_0" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match="not a file inside it"):
        checkpoint.verify(ckpt / "step_0")
    os.remove(ckpt / "latest")
    os.symlink("../../../somewhere", ckpt / "latest")
    with pytest.raises(checkpoint.CheckpointError, match="not at a step_<N> folder"):
        checkpoint.latest(tmp_path / "r")


def test_hub_errors_never_show_the_token(monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError
    token = "hf_secret_test_token_123"
    monkeypatch.setenv("HF_TOKEN", token)
    for status in (403, 500):
        def answer(status=status):
            response = httpx.Response(status, request=httpx.Request("GET", "http://hub.test/api/datasets/x"))
            raise HfHubHTTPError(f"{status} error; you sent Authorization: Bearer {token}", response=response)
        with pytest.raises(data.DataError) as e:
            data._retry(answer, "listing files of x on the Hub", attempts=1)
        assert token not in str(e.value) and "***" in str(e.value) and e.value.__cause__ is None, str(e.value)


def test_bombs_in_loaded_files_are_refused_before_they_go_off(base_run, tmp_path):
    ckpt = copy_run(base_run, tmp_path)
    state_file = ckpt / "step_2" / "training_state.pt"
    state = checkpoint.load_state(state_file)
    shared = []
    for _ in range(40):  # a few hundred bytes pickled; printing it would take forever
        shared = [shared, shared]
    torch.save({**state, "config": {**state["config"], "layer_suffixes": shared}}, state_file)
    refresh_manifest(ckpt / "step_2")
    t0 = time.time()
    line = fails(tmp_path, "--max_steps=4")
    assert "its settings (config) are not plain values" in line and time.time() - t0 < 60, line
    torch.save(state, state_file)  # a genuine state, packed again with deflate (torch.save never compresses)
    with zipfile.ZipFile(state_file) as z:
        members = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(state_file, "w", zipfile.ZIP_DEFLATED) as z:
        for info, raw in members:
            z.writestr(info.filename, raw)
    refresh_manifest(ckpt / "step_2")
    line = fails(tmp_path, "--max_steps=4")
    assert "is compressed, which torch.save never does" in line, line


@pytest.mark.parametrize("text,message", [
    ('x: &a ["a","a","a","a","a","a","a","a","a"]\ny: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
     'checkpointing:\n  hf_collection_slug: [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n', "uses YAML aliases"),
    ("checkpointing:\n  stop_at_step: [[1, [2]]]\n", "stop_at_step must be a whole number or None"),
])
def test_yaml_bombs_and_nested_values_are_refused(tmp_path, text, message):
    planted = tmp_path / "bomb.yaml"
    planted.write_text(text)
    proc = subprocess.run([sys.executable, "train.py", str(planted)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and message in last_line(proc), proc.stderr[-2000:]


def test_loading_dynamics_runs_no_code_and_names_are_shown_inert(base_run, tmp_path):
    import dynamics
    ckpt = copy_run(base_run, tmp_path)
    marker = tmp_path / "pwned"
    plant_pickle(ckpt / "step_2" / "learning_dynamics" / "val_weights.pt", marker)
    # today: torch's advice to use weights_only=False
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load"):
        dynamics.load(tmp_path / "r", 2, "val")
    proc = subprocess.run([sys.executable, "dynamics.py", "plot", str(tmp_path / "r")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "cannot plot" in last_line(proc) and not marker.exists()
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "evil\x1b]0;pwned\x07.parquet").write_bytes(b"")  # a name that would retitle the terminal
    with pytest.raises(data.DataError) as e:
        data.TrainStream(str(tmp_path / "odd"), 64, 50304, 8, 4)
    assert "\x1b" not in str(e.value) and "\\x1b" in str(e.value)


# ---------------------------------------------------------------------------------------------
# bad input is one line, before any work

def test_damaged_parquet_footer_and_data_page_are_one_data_error(tmp_path):
    rows = np.arange(64 * 65).reshape(64, 65) % 50000
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"input_ids": pa.array(list(rows), type=pa.list_(pa.int32()))}), path, row_group_size=16,
                   compression="zstd")
    raw = bytearray(path.read_bytes())
    footer = bytearray(raw)
    footer[-8:-4] = b"\xff\xff\xff\x7f"  # the footer's length: more than the whole file
    (tmp_path / "footer").mkdir()
    (tmp_path / "footer" / "train.parquet").write_bytes(bytes(footer))
    with pytest.raises(data.DataError, match="not a parquet file, or a damaged one"):
        data.TrainStream(str(tmp_path / "footer"), 64, 50304, 8, 8)
    raw[40:400] = b"\xff" * 360  # in the first row group's compressed data page
    (tmp_path / "page").mkdir()
    (tmp_path / "page" / "train.parquet").write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match="row group 0 .* cannot be read, the file is damaged") as e:
        stream = data.TrainStream(str(tmp_path / "page"), 64, 50304, 8, 8)  # (the footer is fine: it opens)
        for _ in range(8):  # met by the stream, mid-run
            stream.next_batch()
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_full_disk_while_saving_stops_with_one_line_and_a_good_latest(tmp_path):
    def small_files():  # writes past 5 MB fail, as on a full disk (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (5_000_000, 5_000_000))
    proc = subprocess.run([sys.executable, "train.py", *TINY, f"--runs_dir={tmp_path}", "--run_name=r"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    line = last_line(proc)
    assert proc.returncode != 0 and line.startswith("step 0: the checkpoint could not be written"), line
    assert "GiB free" in line and "with no checkpoint saved" in line
    assert os.listdir(tmp_path / "r" / "checkpoints") == []  # no half-written step, no latest


def test_tokenize_refuses_what_is_not_text_in_one_line(tmp_path):
    cases = {"empty.txt": b"", "nul.txt": b"\0" * 100, "binary.txt": b"ok \xff\xfe\x00\x81"}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
    for path, message in ((tmp_path / "empty.txt", "the file is empty"), (tmp_path / "nul.txt", "holds NUL bytes"),
                          (tmp_path / "binary.txt", "NUL bytes"), (tmp_path, "not a regular file"),
                          ("/dev/zero", "not a regular file")):  # /dev/zero: today it reads forever
        with pytest.raises(data.DataError, match=message):
            data.tokenize_files([str(path)], str(tmp_path / "out"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    proc = subprocess.run([sys.executable, "data.py", "tokenize", str(tmp_path / "latin1.txt"), "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "not UTF-8 text (byte 3" in last_line(proc)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--layer_suffixes=attention.nosuch"], "config error: layer_suffixes ['attention.nosuch'] match no linear layer"),
    (["--adam_beta1=2.0"], "config error: adam_beta1 must be at least 0 and below 1, got 2.0"),
    (["--adam_beta2=-1.0"], "config error: adam_beta2 must be at least 0 and below 1"),
    (["--adam_eps=-1.0"], "config error: adam_eps must be above 0"),
    (["--weight_decay=-1.0"], "config error: weight_decay must be a number of at least 0"),
    (["--min_lr_ratio=-5.0"], "config error: min_lr_ratio must be at least 0 and at most 1"),
    (["--device=nonsense"], "config error: device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>'"),
    pytest.param(["--device=cuda"], "config error: device 'cuda', but torch sees no CUDA GPU here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
    (["--sequence_idx=1000"], "config error: sequence_idx 1000 is not a token position of a 64-token sequence"),
    (["--stop_at_step=9"], "config error: stop_at_step 9 is past max_steps 4"),
    (["--eval_dataset_split=nosuch"], "data error: data/demo: no files for split 'nosuch'"),
    (["--tokenizer_path=README.md"], "data error: README.md is not a tokenizer file"),
    (["--run_name=../outside"], "config error: run_name '../outside' must be a plain folder name"),
    (["--run_name="], "config error: run_name '' must be a plain folder name"),
])
def test_bad_settings_are_one_line_before_any_work(tmp_path, args, message):
    proc = run_train(tmp_path, *args, check=False)
    assert proc.returncode != 0 and last_line(proc).startswith(message), proc.stderr[-2000:]
    assert not os.listdir(tmp_path)  # no run folder, no lock


# ---------------------------------------------------------------------------------------------
# what a run folder may hold, settings that cannot work, files that would hang or flood (issue 28)

@pytest.mark.parametrize("args,message", [
    (["--lr=1e999"], "lr must be a finite number (its default is 0.0003), got inf"),
    (["--adam_eps=1e999"], "adam_eps must be a finite number"),
    (["--grad_clip=nan"], "grad_clip must be a finite number"),
    (["--eval_every_n_steps=2.5"], "eval_every_n_steps must be a whole number or None"),
    (["--dist_timeout_min=10000000000000"], "dist_timeout_min must be at most 10080 (a week)"),
])
def test_settings_that_could_only_fail_later_are_refused_at_once(args, message):
    import configurator
    settings = train_py_settings()
    with pytest.raises(SystemExit) as e:
        configurator.configure(args, settings)
        configurator.refuse_unworkable(settings)
    assert str(e.value).startswith("config error: ") and message in str(e.value), e.value


def test_names_stay_names_whatever_they_look_like(tmp_path):
    import configurator
    settings = train_py_settings()
    configurator.configure(["--run_name=2024", "--hf_collection_slug=True", "--data_cache_dir=[1,2]",
                            "--eval_max_rows=5"], settings)
    assert (settings["run_name"], settings["hf_collection_slug"], settings["data_cache_dir"]) == ("2024", "True",
                                                                                                 "[1,2]")
    assert settings["eval_max_rows"] == 5
    (tmp_path / "c.yaml").write_text("checkpointing:\n  stop_at_step: 2.5\n")
    with pytest.raises(SystemExit, match="stop_at_step must be a whole number or None"):
        configurator.configure([str(tmp_path / "c.yaml")], train_py_settings())


@pytest.mark.parametrize("text", ["training: " + "[" * 1000 + "]" * 1000 + "\n",  # was a RecursionError
                                  "training: " + "[" * 999_000 + "\n",  # at the size limit: was hours
                                  "training: {lr: " + "{a: " * 200 + "1" + "}" * 201 + "\n"])
def test_deep_yaml_is_refused_at_once(tmp_path, text):
    import configurator
    (tmp_path / "deep.yaml").write_text(text)
    t0 = time.time()
    with pytest.raises(SystemExit, match="is not plain YAML .it nests values more than 8 deep"):
        configurator.read_yaml(str(tmp_path / "deep.yaml"))
    assert time.time() - t0 < 5


def test_one_rule_for_what_a_run_folder_holds(tmp_path):
    """FIFOs, sockets and links where a run reads or writes are refused by the one rule that train.py
    (checkpoint.open_run), hub.py and dynamics.py apply, without ever opening them."""
    run = tmp_path / "r"
    (run / "logs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    os.mkfifo(run / "logs" / "train.log")
    t0 = time.time()
    with pytest.raises(checkpoint.CheckpointError, match="logs/train.log is a FIFO, not a plain file"):
        checkpoint.open_run(str(run), auto_resume=True)
    with pytest.raises(checkpoint.CheckpointError, match="is not a plain file"):
        checkpoint.read_plain(str(run / "logs" / "train.log"), 1000)
    for cmd in (["dynamics.py", "plot", str(run)], ["hub.py", "push", str(run)],
                ["hub.py", "download", "a/b", "--branch", "x", "--step", "0", "--out", str(run)]):
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "train.log is a FIFO, not a plain file" in last_line(proc), proc.stderr
    assert time.time() - t0 < 30  # nothing waited on the FIFO
    os.remove(run / "logs" / "train.log")
    os.symlink(tmp_path / "elsewhere", run / "checkpoints" / "step_9")
    assert "step_9 is a symbolic link" in checkpoint.run_folder_problem(str(run))
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(checkpoint.CheckpointError, match="is a file, not a run folder"):
        checkpoint.open_run(str(tmp_path / "file"), auto_resume=False)
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot make the (run folder|lock file) .* \(File name too "
                                                         r"long\)"):
        checkpoint.open_run(str(tmp_path / ("x" * 300)), auto_resume=True)
    with pytest.raises(checkpoint.CheckpointError, match="cannot read .* never through a symbolic link"):
        os.symlink(tmp_path / "file", run / "training_config.yaml")
        checkpoint.read_plain(str(run / "training_config.yaml"), 1000)


def test_a_filesystem_without_locks_is_named_and_a_full_disk_still_locks(tmp_path, monkeypatch):
    import errno
    import fcntl
    real_flock = fcntl.flock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(checkpoint.CheckpointError, match="does not lock files .flock: No locks available.*put "
                                                         "runs_dir on one that does"):
        checkpoint.lock_run(str(tmp_path / "r"))
    monkeypatch.setattr(fcntl, "flock", real_flock)

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "pwrite", full)
    fd = checkpoint.lock_run(str(tmp_path / "r"))  # held, without the note of who holds it
    with pytest.raises(checkpoint.CheckpointError, match="is in use by another process"):
        checkpoint.lock_run(str(tmp_path / "r"))  # (a second open file description: flock refuses it)
    os.close(fd)


@pytest.mark.parametrize("what", ["log", "metrics", "evaluation"])
def test_a_full_disk_while_reporting_stops_with_one_line(tmp_path, monkeypatch, what):
    import errno

    import monitor
    report = monitor.Monitor(master=True)
    report.open(str(tmp_path))

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        flush = close = lambda self: None
        __enter__ = lambda self: self  # noqa: E731
        __exit__ = lambda self, *a: None  # noqa: E731
    if what == "log":
        report.file = Full()
    else:
        monkeypatch.setattr(monitor, "open", lambda *a, **k: Full(), raising=False)
    with pytest.raises(SystemExit, match=r"cannot write .* \(No space left on device; [\d.]+ GiB free there\): "
                                         r"stopping.* resumes from its last checkpoint"):
        if what == "evaluation":
            report.evaluation(4, {"loss": 1.0, "rows": 1}, "somewhere")
        else:
            report.log("a line") if what == "log" else report.metrics({"step": 1, "loss": 1.0})
    assert not os.path.exists(tmp_path / "eval_results" / "step_4.json")


def test_a_row_too_long_is_refused_from_the_metadata_unread(tmp_path):
    """A few KB of parquet can say a row holds 2 x 10^8 tokens; the stream refuses it from the file's
    metadata before reading it (pyarrow's allocations stay small)."""
    (tmp_path / "huge").mkdir()
    ids = pa.array([np.zeros(3 * 2**20, np.int32)], type=pa.list_(pa.int32()))  # 3M tokens in 1 row
    pq.write_table(pa.table({"input_ids": ids}), tmp_path / "huge" / "train.parquet", compression="zstd")
    assert os.path.getsize(tmp_path / "huge" / "train.parquet") < 100_000
    before = pa.total_allocated_bytes()
    with pytest.raises(data.DataError, match=r"row group 0 \(rows 0-0\) holds 3,145,728 token ids in 1 rows, so a "
                                             r"row has more than 1,048,576 tokens; it is not read"):
        data.TrainStream(str(tmp_path / "huge"), 64, 50304, 8, 8).next_batch()
    assert pa.total_allocated_bytes() - before < 2**20
    # a later row group with one row longer than the others': refused from its token count too
    rows = [np.arange(65) for _ in range(16)] + [np.arange(65)] * 15 + [np.arange(100_000) % 50000]
    (tmp_path / "long").mkdir()
    pq.write_table(pa.table({"input_ids": pa.array(rows, type=pa.list_(pa.int32()))}),
                   tmp_path / "long" / "train.parquet", row_group_size=16)
    stream = data.TrainStream(str(tmp_path / "long"), 64, 50304, 8, 8)
    with pytest.raises(data.DataError, match="row group 1 .rows 16-31. holds 100,975 token ids in 16 rows, so a row "
                                             "has more than the 65 tokens the others have"):
        for _ in range(4):
            stream.next_batch()


def test_a_saved_data_position_that_the_data_does_not_have_is_one_line(tmp_path):
    rows = np.arange(32 * 65).reshape(32, 65) % 50000
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"input_ids": pa.array(list(rows), type=pa.list_(pa.int32()))}),
                   tmp_path / "d" / "train.parquet")
    stream = data.TrainStream(str(tmp_path / "d"), 64, 50304, 8, 8)
    stream.next_batch()
    saved = stream.state_dict()
    for change, message in (({"seq": 10**15}, "sequence 1,000,000,000,000,000 of .* is past its end .32 sequences."),
                            ({"row_len": 129}, "counts rows of 129 tokens, but .* has rows of 65; the data changed "
                                               "since that checkpoint, or the checkpoint is damaged"),
                            ({"row_len": 100}, "counts rows of 100 tokens, which no max_seq_len=64 dataset has")):
        again = data.TrainStream(str(tmp_path / "d"), 64, 50304, 8, 8)
        with pytest.raises(data.DataError, match="cannot resume .* from the checkpoint: .*" + message):
            again.load_state_dict({**saved, **change})
            again.next_batch()
    (tmp_path / "empty").mkdir()
    pq.write_table(pa.table({"input_ids": pa.array([], type=pa.list_(pa.int32()))}),
                   tmp_path / "empty" / "validation.parquet")
    with pytest.raises(data.DataError, match="its validation split has no rows to evaluate on"):
        data.load_eval_sequences(str(tmp_path / "empty"), 64, 50304, "validation")


def test_hub_commands_say_plainly_what_is_wrong_and_fast(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}

    def hub_cli(*args):
        t0 = time.time()
        proc = subprocess.run([sys.executable, "hub.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode != 0 and time.time() - t0 < 15, (args, proc.stderr[-2000:])  # not the client's retries
        return last_line(proc)
    for args in (["list", "a/b", "--branch", "x"], ["download", "a/b", "--branch", "x", "--step", "0", "--out",
                                                    str(tmp_path / "dl")]):
        assert hub_cli(*args) == "hub.py: cannot reach the Hub at http://127.0.0.1:9 (Connection refused); check " \
                                 "the network (or HF_ENDPOINT)"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "training_config.yaml").write_text("checkpointing:\n  run_name: run\n")
    assert "names no hf_repo_id (the run was not set up to go to the Hub); name the repository: python hub.py " \
           "push" in hub_cli("push", str(run))
    (run / "training_config.yaml").write_text("a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a]\n"
                                              "checkpointing:\n  hf_repo_id: [*b, *b, *b, *b, *b, *b, *b]\n")
    assert "uses YAML aliases" in hub_cli("push", str(run))
