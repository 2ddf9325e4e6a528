"""
Checkpoint folders that survive a crash at any instant.

    runs/<run>/checkpoints/step_<N>/      a complete checkpoint (model, tokenizer, training state)
    runs/<run>/checkpoints/latest         symlink to the newest complete step_<N>
    runs/<run>/checkpoints/.step_<N>.tmp  a checkpoint being written (deleted on the next start)

A checkpoint is written under its temporary name and renamed into place only when every rank has
finished writing and every file is flushed to disk; `latest` is then switched with an atomic
rename of a new symlink. A kill at any moment therefore leaves the previous `latest` intact.
`manifest.json` lists every file with its size, so a truncated or damaged checkpoint is reported
instead of loaded.
"""

import json
import os
import random
import shutil

import numpy as np
import torch

MANIFEST = "manifest.json"


def checkpoints_dir(run_dir):
    return os.path.join(run_dir, "checkpoints")


def step_dir(run_dir, step):
    return os.path.join(checkpoints_dir(run_dir), f"step_{step}")


def begin(run_dir, step):
    """Make (empty) the temporary folder a checkpoint is written into. Rank 0 only."""
    tmp = os.path.join(checkpoints_dir(run_dir), f".step_{step}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(run_dir, step, tmp):
    """Seal a fully written temporary folder as step_<N> and point `latest` at it. Rank 0 only,
    after all ranks have written their files."""
    files = {}
    for root, _, names in os.walk(tmp):
        for name in names:
            path = os.path.join(root, name)
            _fsync(path)
            files[os.path.relpath(path, tmp)] = os.path.getsize(path)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    final = step_dir(run_dir, step)
    if os.path.exists(final):  # a step re-saved after a resume from an older checkpoint
        shutil.rmtree(final)
    os.rename(tmp, final)
    link = os.path.join(checkpoints_dir(run_dir), ".latest.tmp")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(f"step_{step}", link)
    os.replace(link, os.path.join(checkpoints_dir(run_dir), "latest"))
    _fsync(checkpoints_dir(run_dir))
    return final


def clean_partial(run_dir):
    """Delete temporary folders left by a crash mid-save; return their names."""
    ckpt = checkpoints_dir(run_dir)
    if not os.path.isdir(ckpt):
        return []
    stale = [n for n in os.listdir(ckpt) if n.startswith(".") and n.endswith(".tmp")]
    for name in stale:
        path = os.path.join(ckpt, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    return stale


def latest(run_dir):
    """The folder `latest` points to, checked against its manifest; None if there is none."""
    link = os.path.join(checkpoints_dir(run_dir), "latest")
    if not os.path.lexists(link):
        return None
    path = os.path.join(checkpoints_dir(run_dir), os.readlink(link))
    verify(path)
    return path


def verify(path):
    manifest = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest):
        raise RuntimeError(f"checkpoint {path} is incomplete (no {MANIFEST}); it will not be loaded. "
                           f"Point checkpoints/latest at an earlier step_<N> or remove the run folder.")
    with open(manifest) as f:
        files = json.load(f)["files"]
    for name, size in files.items():
        full = os.path.join(path, name)
        if not os.path.exists(full) or os.path.getsize(full) != size:
            found = os.path.getsize(full) if os.path.exists(full) else "missing"
            raise RuntimeError(f"checkpoint {path} is damaged: {name} should be {size} bytes, found "
                               f"{found}. Point checkpoints/latest at an earlier step_<N>.")


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def compare_configs(saved, current, must_match):
    """(keys that forbid resuming, harmless keys) that differ between two flat configs."""
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return [k for k in differ if k in must_match], [k for k in differ if k not in must_match]
