"""The newcomer's path: --help, your own data evaluated on its own held-out split, start-up errors
that are one line and leave no run folder (no network included), and safe stops (stop_at_step,
SIGTERM, SIGINT) that resume bit-identically (one process and 2-process DDP)."""

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pyarrow.parquet as pq
import pytest

from helpers import ROOT, TINY, max_diff, metrics, run_train, weights


def test_help_lists_every_setting_with_its_default_and_exits_0():
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    import configurator
    for name in configurator.sections(os.path.join(ROOT, "train.py")):
        line = next((x for x in proc.stdout.splitlines() if x.startswith(f"{name} = ")), None)
        assert line is not None, name
        ast.literal_eval(line.split(" = ", 1)[1].split("  #")[0])  # a plain value, as a config file takes it
    assert "# training: optimisation" in proc.stdout and "lr = 3e-4" in proc.stdout
    assert "lr_scheduler = \"linear_with_warmup\"  # or \"cosine\"" in proc.stdout  # with its comment


def test_each_setting_is_declared_once_under_a_section(tmp_path):
    import configurator
    settings = configurator.sections(os.path.join(ROOT, "train.py"))
    assert settings["d_model"] == settings["attention_n_kv_heads"] == "model"  # what pico-analyze reads
    assert settings["run_name"] == "checkpointing" and settings["batch_size"] == "data"
    rule = configurator.RULE
    script = tmp_path / "script.py"
    script.write_text(f"import os\n{rule}# intro\nlr = 1.0\n# training: optimisation\nbeta = 0.9\n{rule}")
    with pytest.raises(SystemExit, match="the setting lr comes before any '# <section>: ...' line"):
        configurator.sections(str(script))


def tokenize(tmp_path, val_every):
    """This repository's own files as a corpus, tokenized with the data.py command a newcomer runs."""
    files = sorted(os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py"))
    out = tmp_path / "mine"
    proc = subprocess.run([sys.executable, "data.py", "tokenize", *files, "--out", str(out), "--val-every",
                           str(val_every)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


@pytest.mark.slow
def test_your_own_data_is_evaluated_on_its_own_held_out_split(tmp_path):
    out, said = tokenize(tmp_path, 3)
    n_val = pq.ParquetFile(out / "validation.parquet").metadata.num_rows
    assert f"validation rows -> {out / 'validation.parquet'}" in said and f"{n_val} validation rows" in said
    n_train = pq.ParquetFile(out / "train.parquet").metadata.num_rows
    assert f"{n_train} train rows" in said
    proc = run_train(tmp_path, "--run_name=own", f"--dataset_name={out}", "--max_steps=2", "--eval_max_rows=None")
    result = json.loads((tmp_path / "own" / "eval_results" / "step_2.json").read_text())
    assert result["dataset"] == str(out) and result["rows"] == n_val * 32  # 2049-token rows = 32 windows of 64
    assert f"on {n_val * 32} sequences of {out} (validation)" in proc.stdout
    assert f"learning dynamics on {out}" in proc.stdout
    acts = __import__("dynamics").load(tmp_path / "own", 2, "val")[0]
    assert next(iter(acts.values())).shape[0] == n_val * 32  # the dynamics' val rows follow it too


@pytest.mark.slow
def test_own_data_without_a_held_out_split_says_what_to_set(tmp_path):
    out, said = tokenize(tmp_path, 0)
    assert "0 validation rows" in said and "eval_dataset_name" in said
    proc = run_train(tmp_path, "--run_name=own", f"--dataset_name={out}", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"data error: {out} has no 'validation' (or 'val') split") and "eval_dataset_name" in line
    assert not (tmp_path / "own").exists()


@pytest.mark.parametrize("args,env,message", [
    (["--attention_n_heads=3"], {}, "config error: d_model (32) must be divisible by attention_n_heads (3)"),
    (["--dataset_name=pico-lm/pretokenized-dolma"], {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
     "data error: listing files of pico-lm/pretokenized-dolma on the Hub: still failing after 3 attempts "
     "(ConnectError"),
])
def test_start_up_errors_are_one_paragraph_and_leave_no_run_folder(tmp_path, args, env, message):
    proc = run_train(tmp_path, "--run_name=never", *args, check=False, env=env, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
    if "HF_ENDPOINT" in env:
        assert "Could not reach the Hugging Face Hub at http://127.0.0.1:9" in proc.stderr
        assert "config/demo.py" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("nproc", [1, 2])
def test_stopped_by_stop_at_step_then_by_sigterm_resumes_bit_identically(tmp_path, reference_run, nproc):
    """Three sessions of one run: the first ends at stop_at_step=3 (a job's time limit), the second
    is sent SIGTERM (a scheduler's warning) after step 5, the third finishes. The result equals a
    run never stopped, bit for bit, for one process and for 2-process DDP."""
    args = ("--max_steps=12", "--save_every_n_steps=5") + (("--gradient_accumulation_steps=1",) if nproc == 2 else ())
    ref = reference_run(*args, nproc=nproc)
    run_train(tmp_path, "--run_name=stopped", *args, "--stop_at_step=3", nproc=nproc)
    assert sorted(os.listdir(tmp_path / "stopped" / "checkpoints")) == ["latest", "step_0", "step_3"]
    cmd = [sys.executable, "train.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    threads = "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2")  # as run_train: same threads, same sums
    proc = subprocess.Popen(cmd + TINY + [f"--runs_dir={tmp_path}", "--run_name=stopped", *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": threads}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = ""
    while not re.search(r"step [67]/12", seen):  # resumed at 3, past the step-5 checkpoint, before the end
        line = proc.stdout.readline()
        assert line, seen[-3000:]
        seen += line
    # signal the last rank (a torchrun worker, not torchrun itself): any rank stops them all
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
    target = workers[-1] if nproc > 1 else psutil.Process(proc.pid)
    target.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    seen += rest
    assert proc.returncode == 0, seen[-3000:]
    assert "resumed from" in seen and "step_3" in seen and "step 3: checkpoint saved" not in seen  # not saved twice
    stopped_at = int(re.search(r"stopped at step (\d+) by a signal", seen).group(1))
    assert 6 <= stopped_at < 12 and os.readlink(tmp_path / "stopped" / "checkpoints" / "latest") == f"step_{stopped_at}"
    assert "run the same command again to continue" in seen
    proc = run_train(tmp_path, "--run_name=stopped", *args, nproc=nproc)
    assert f"resumed from {tmp_path / 'stopped' / 'checkpoints' / f'step_{stopped_at}'}" in proc.stdout
    assert max_diff(weights(ref, "ref", 12), weights(tmp_path, "stopped", 12)) == 0.0
    losses = [{m["step"]: m["loss"] for m in metrics(d, r) if "loss" in m}
              for d, r in ((ref, "ref"), (tmp_path, "stopped"))]
    assert losses[0] == losses[1]
    evals = sorted(os.listdir(tmp_path / "stopped" / "eval_results"))
    assert evals == ["step_0.json", "step_10.json", "step_12.json", "step_5.json"]  # none at the stops


@pytest.mark.slow
def test_a_signal_while_starting_stops_at_once_even_in_a_background_job(tmp_path):
    # a script's background job (`python train.py ... &`) starts with SIGINT ignored
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, f"--runs_dir={tmp_path}", "--run_name=early"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert "process(es)" in proc.stdout.readline()  # the first line: set-up has begun; the data is read next
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "SIGINT: stopped while starting, before any step"
    assert "step 1/" not in out


@pytest.mark.slow
def test_a_second_signal_stops_at_once(tmp_path):
    # steps of about 2 s (and a checkpoint of about 3 s) on 2 cores, so the second signal comes mid-way
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, f"--runs_dir={tmp_path}", "--run_name=twice",
                             "--max_steps=400", "--save_every_n_steps=1000", "--max_seq_len=256", "--batch_size=64"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    while "step 1/400" not in seen:
        line = proc.stdout.readline()
        assert line, seen[-3000:]
        seen += line
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "SIGINT again: stopped at once" in rest, rest[-3000:]
    assert "Traceback" not in rest
