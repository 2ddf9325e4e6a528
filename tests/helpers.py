"""Running train.py the way users do (a subprocess, or torchrun), on a tiny model."""

import json
import os
import subprocess
import sys

from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["config/demo.py", "--d_model=32", "--n_layers=2", "--attention_n_heads=2", "--attention_n_kv_heads=1",
        "--activation_hidden_dim=64", "--max_seq_len=64", "--batch_size=8", "--gradient_accumulation_steps=2",
        "--max_steps=4", "--save_every_n_steps=2", "--log_every_n_steps=1", "--eval_max_rows=1",
        "--lr_warmup_steps=2", "--sample_prompt=", "--learning_dynamics_batch_size=4",
        "--save_log_spaced_until=0"]


def run_train(runs_dir, *args, nproc=1, check=True, env=None, timeout=300):
    cmd = [sys.executable, "train.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
                **(env or {})}
    proc = subprocess.run(cmd + TINY + [f"--runs_dir={runs_dir}", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def weights(runs_dir, run, step):
    return load_file(os.path.join(runs_dir, run, "checkpoints", f"step_{step}", "model.safetensors"))


def metrics(runs_dir, run):
    with open(os.path.join(runs_dir, run, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
