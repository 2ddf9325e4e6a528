"""Running train.py the way users do (a subprocess, or torchrun), on a tiny model."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["config/demo.py", "--d_model=32", "--n_layers=2", "--attention_n_heads=2", "--attention_n_kv_heads=1",
        "--activation_hidden_dim=64", "--max_seq_len=64", "--batch_size=8", "--gradient_accumulation_steps=2",
        "--max_steps=4", "--save_every_n_steps=2", "--log_every_n_steps=1", "--eval_max_rows=1",
        "--lr_warmup_steps=2", "--sample_prompt=", "--learning_dynamics_batch_size=4",
        "--save_log_spaced_until=0"]


def run_train(runs_dir, *args, nproc=1, check=True, env=None, timeout=300, cwd=ROOT):
    cmd = [sys.executable, "train.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
                **(env or {})}
    proc = subprocess.run(cmd + TINY + [f"--runs_dir={runs_dir}", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def busy_at_shutdown_env(tmp_path):
    """An environment whose torchrun workers, when their interpreter shuts down, have a thread inside a
    torch op (as gloo's worker threads can be, letting go of a collective's tensors): a process that goes
    through that shutdown aborts ("terminate called without an active exception")."""
    hook = tmp_path / "busy_at_shutdown"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, os, threading, time\n"
        "def busy():\n"
        "    import torch\n"
        "    a = torch.ones(256, 256)\n"
        "    while True:\n"
        "        a @ a\n"
        "def at_shutdown():\n"
        "    threading.Thread(target=busy, daemon=True).start()\n"
        "    time.sleep(0.2)\n"
        "if 'LOCAL_RANK' in os.environ:  # a worker, not torchrun itself\n"
        "    atexit.register(at_shutdown)\n")
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)}


def train_py_settings(*config_files):
    """train.py's settings after config files, read as train.py reads them (no process, no process group)."""
    import configurator
    with open(os.path.join(ROOT, "train.py")) as f:
        settings = {"__file__": os.path.join(ROOT, "train.py")}
        exec(f.read().split(configurator.RULE)[1], settings)  # the settings block: plain assignments
    configurator.configure([os.path.join(ROOT, c) for c in config_files], settings)
    return settings


def weights(runs_dir, run, step):
    return load_file(os.path.join(runs_dir, run, "checkpoints", f"step_{step}", "model.safetensors"))


def metrics(runs_dir, run):
    with open(os.path.join(runs_dir, run, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# damaging a run as an attacker or a careless tool would (tests/test_trust.py, test_mistakes.py)
def plant_pickle(path, marker):
    """Replace a torch.save file by one whose unpickling runs a shell command (it creates marker)."""
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    torch.save({"step": 2, "payload": Payload()}, path)


def refresh_manifest(step_dir):
    """Fix up the manifest after files were replaced, as an attacker who edits a run folder would
    (by hand, in whichever format it has: sizes only before sha256 was added)."""
    path = os.path.join(step_dir, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    for name, entry in manifest["files"].items():
        raw = open(os.path.join(step_dir, name), "rb").read()
        manifest["files"][name] = len(raw) if isinstance(entry, int) else \
            {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    with open(path, "w") as f:
        json.dump(manifest, f)


def last_line(proc):
    """The one line a failed run ends with; and there is no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def copy_run(base_run, tmp_path):
    shutil.copytree(base_run, tmp_path / "r", symlinks=True)
    return tmp_path / "r" / "checkpoints"


# a student's changes to model.py (docs/course.md, exercise 7): (text in model.py, what replaces it)
EDITS = {
    "layernorm": [("RMSNorm(config.d_model, config.norm_eps)", "nn.LayerNorm(config.d_model, eps=config.norm_eps)")],
    "gelu": [("F.silu(self.w_0(x))", "F.gelu(self.w_0(x))")],
    "position_table": [
        ("self.embedding_proj = nn.Embedding(config.vocab_size, config.d_model)\n",
         "self.embedding_proj = nn.Embedding(config.vocab_size, config.d_model)\n"
         "        self.position_emb = nn.Embedding(config.max_seq_len, config.d_model)\n"),
        ("x = self.embedding_proj(input_ids)  # (B, T, d_model)",
         "x = self.embedding_proj(input_ids) + self.position_emb.weight[start:start + T]")],
}


def edited_repo(tmp_path, edit, file="model.py", edits=None):
    """A copy of the repository (its code and config/; data/ linked) whose `file` has `edits`, a list of
    (text there, what replaces it): by default model.py with EDITS[edit]."""
    repo = tmp_path / f"repo-{edit}"
    repo.mkdir()
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            shutil.copy(os.path.join(ROOT, name), repo)
    shutil.copytree(os.path.join(ROOT, "config"), repo / "config")
    os.symlink(os.path.join(ROOT, "data"), repo / "data")
    text = (repo / file).read_text()
    for old, new in edits or EDITS[edit]:
        assert old in text, old  # the file still reads as the course (or the test) says
        text = text.replace(old, new)
    (repo / file).write_text(text)
    return repo


def import_file(path, name):
    """The module at `path` under its own name (an edited model.py beside the repository's own)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pico_train_checkpoint(folder, seed):
    """A checkpoint in pico-train's own format (PicoDecoderHF: config.json of model_type pico_decoder,
    weights named pico_decoder.*, q and k rows interleaved) of TINY's shape, random weights, written
    into folder. Returns (its weights, its config) for tests/test_model.reference_pico_train_logits."""
    from safetensors.torch import save_file

    from model import ModelConfig, PicoDecoder
    cfg = {"d_model": 32, "n_layers": 2, "vocab_size": 50304, "max_seq_len": 64, "attention_n_heads": 2,
           "attention_n_kv_heads": 1, "activation_hidden_dim": 64, "norm_eps": 1e-6, "position_emb_theta": 10000.0}
    torch.manual_seed(seed)
    shapes = PicoDecoder(ModelConfig(**cfg)).state_dict()
    weights = {"pico_decoder." + k: torch.randn_like(v) * 0.3 for k, v in shapes.items()}
    os.makedirs(folder, exist_ok=True)
    save_file(weights, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**cfg, "model_type": "pico_decoder", "architectures": ["PicoDecoderHF"]}, f)
    return weights, cfg
