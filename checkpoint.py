"""
Checkpoint folders that survive a crash at any instant, and that run no code when loaded.

    runs/<run>/checkpoints/step_<N>/      a complete checkpoint (model, tokenizer, training state)
    runs/<run>/checkpoints/latest         symlink to the newest complete step_<N>
    runs/<run>/checkpoints/.step_<N>.tmp  a checkpoint being written (deleted on the next start)

A checkpoint is written under its temporary name and renamed into place only when every rank has
finished writing and every file is flushed to disk; `latest` is then switched with an atomic
rename of a new symlink. A kill at any moment therefore leaves the previous `latest` intact.
`manifest.json` lists every file with its size and sha256, checked before a checkpoint is loaded,
so a truncated file or flipped bytes are reported instead of loaded.

Loading never runs code: the training state is read with torch.load(weights_only=True), which
accepts tensors and plain Python values only; the weights are safetensors.

A checkpoint is the same on every backend and number of ranks: fp32 weights, and the optimizer as
torch AdamW's own state_dict (under DeepSpeed ZeRO-2 gathered from the ranks' shards when saved and
shared out again when loaded), so a run resumes with DDP or ZeRO-2 on any number of GPUs.
"""

import errno
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import zipfile

import numpy as np
import torch

MANIFEST = "manifest.json"
RESUME_READS = ("config.json", "model.safetensors", "training_state.pt")  # a manifest must list these


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded safely; the message names the file and what to do."""


def checkpoints_dir(run_dir):
    return os.path.join(run_dir, "checkpoints")


def step_dir(run_dir, step):
    return os.path.join(checkpoints_dir(run_dir), f"step_{step}")


def saved_steps(run_dir):
    """The step numbers of the complete-looking step_<N> folders, in order."""
    ckpt = checkpoints_dir(run_dir)
    names = os.listdir(ckpt) if os.path.isdir(ckpt) else []
    return sorted(int(n[5:]) for n in names if re.fullmatch(r"step_\d+", n))


def begin(run_dir, step):
    """Make (empty) the temporary folder a checkpoint is written into. Rank 0 only."""
    tmp = os.path.join(checkpoints_dir(run_dir), f".step_{step}.tmp")
    _remove(tmp)
    os.makedirs(tmp)
    return tmp


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(tmp, step):
    """Flush every file of a fully written temporary folder to disk and list it, with its size and
    sha256, in manifest.json. Rank 0 only, after all ranks have written their files."""
    files = {}
    for root, _, names in os.walk(tmp):
        for name in names:
            path = os.path.join(root, name)
            if path == os.path.join(tmp, MANIFEST):
                continue
            _fsync(path)
            files[os.path.relpath(path, tmp).replace(os.sep, "/")] = {
                "bytes": os.path.getsize(path), "sha256": file_sha256(path)}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def commit(run_dir, step, tmp):
    """Seal a temporary folder that has its manifest as step_<N> and point `latest` at it."""
    final = step_dir(run_dir, step)
    _remove(final)  # a step re-saved after a resume from an older checkpoint
    os.rename(tmp, final)
    point_latest(run_dir, step)
    return final


def save(run_dir, step, write, optimizer, groups, zero=False):
    """Save a checkpoint atomically; a collective (every rank calls it). Every rank gives its RNG
    state and (under ZeRO-2) its shards of the optimizer state; rank 0 calls write(folder,
    optimizer_state, rng) to fill a temporary folder, lists it in the manifest, and seals it as
    step_<step>. Returns None, or on every rank the one line that says why it could not be written
    (a full disk, say), with nothing half-written left behind."""
    import torch.distributed as dist
    from safetensors import SafetensorError
    is_dist = dist.is_available() and dist.is_initialized()
    master = not is_dist or dist.get_rank() == 0
    folder = [begin(run_dir, step) if master else None]
    rng = [None] * (dist.get_world_size() if is_dist else 1)
    if is_dist:
        dist.broadcast_object_list(folder)
        dist.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    # AdamW's state_dict on every backend (under ZeRO-2 gathered from the ranks' shards; rank 0 keeps it)
    state = optimizer_state(optimizer, groups, zero=zero, keep=master)
    failed = [None]
    if master:
        try:
            write(folder[0], state, rng)
            write_manifest(folder[0], step)
            commit(run_dir, step, folder[0])
        except (OSError, RuntimeError, SafetensorError) as e:  # (torch.save and safetensors wrap OSErrors)
            shutil.rmtree(folder[0], ignore_errors=True)
            free = shutil.disk_usage(run_dir).free / 2**30
            failed[0] = (f"step {step}: the checkpoint could not be written ({str(e).splitlines()[0][:200]}; "
                         f"{free:.1f} GiB free)")
    if is_dist:
        dist.broadcast_object_list(failed)
    return failed[0]


def point_latest(run_dir, step):
    """Switch `latest` to step_<step> atomically (a new link renamed over the old one)."""
    link = os.path.join(checkpoints_dir(run_dir), ".latest.tmp")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(f"step_{step}", link)
    os.replace(link, os.path.join(checkpoints_dir(run_dir), "latest"))
    _fsync(checkpoints_dir(run_dir))


def _remove(path):
    """Remove a file, a link (never what it points to) or a folder, if there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def lock_run(run_dir):
    """Hold the run for this process's life: an exclusive flock on `.<run>.lock` beside the run
    folder (outside it, so auto_resume=False can move the folder aside). A process that dies lets go
    at once, so a stale lock is simply taken over. Returns the open file descriptor (closing it lets
    go); raises CheckpointError naming the holder."""
    import fcntl
    import socket
    import time
    path = os.path.join(os.path.dirname(os.path.abspath(run_dir)), f".{os.path.basename(run_dir)}.lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise CheckpointError(f"cannot make the lock file {path} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # ENOLCK, ENOSYS, EOPNOTSUPP: no locks there
            os.close(fd)
            raise CheckpointError(f"the filesystem of {os.path.dirname(path)} does not lock files (flock: "
                                  f"{e.strerror}), so two runs in one folder could not be told apart: put runs_dir "
                                  f"on one that does (a local disk, NFS with its lock service, Lustre mounted with "
                                  f"-o flock)") from None
        holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise CheckpointError(f"{run_dir} is in use by {holder}: two runs in one folder would overwrite each "
                              f"other's checkpoints and logs. Wait for it to end (or stop it), or use another "
                              f"run_name") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})"
                  f"\n".encode(), 0)
    except OSError:  # a full disk: the lock holds without the note of who holds it
        pass
    return fd


def open_run(run_dir, auto_resume, device="cpu"):
    """Make the run folder ready, on every rank (collective), before anything is written in it:
    rank 0 takes the run's lock and refuses what run_folder_problem() does; auto_resume=False
    moves a run already there aside (it is never overwritten), to <run_dir>.set-aside-<n>; and
    every rank checks that it sees the folder rank 0 made (runs_dir must be one filesystem shared
    by every node). Returns (the lock's file descriptor, the set-aside folder or None) on rank 0,
    (None, None) elsewhere; a refusal is a CheckpointError on every rank."""
    import secrets
    import time

    import torch.distributed as dist
    is_dist = dist.is_available() and dist.is_initialized()
    master = not is_dist or dist.get_rank() == 0
    verdict, lock, set_aside, made = [None, None], None, None, False
    if master:
        try:  # one run at a time in a run folder (a requeued job while the old one still runs)
            os.makedirs(os.path.dirname(os.path.abspath(run_dir)), exist_ok=True)
            lock = lock_run(run_dir)
            problem = run_folder_problem(run_dir)  # (auto_resume=False moves a folder aside unread)
            if problem and (auto_resume or not os.path.isdir(run_dir)):
                raise CheckpointError(problem)
            if not auto_resume and os.path.isdir(run_dir) and os.listdir(run_dir):
                set_aside = next(f"{run_dir}.set-aside-{n}" for n in range(1, 10**6)
                                 if not os.path.exists(f"{run_dir}.set-aside-{n}"))
                os.rename(run_dir, set_aside)
            made = not os.path.isdir(run_dir)
            os.makedirs(run_dir, exist_ok=True)
        except CheckpointError as e:
            verdict[1] = str(e)
        except OSError as e:  # a name too long, a read-only or full disk, ...
            verdict[1] = f"cannot make the run folder {run_dir} ({e.strerror}); check runs_dir and run_name"
    heard_from_rank0(verdict)
    if is_dist:  # each rank looks for a file rank 0 has just made there
        mark = [f".rank0-{secrets.token_hex(8)}" if master else None]
        dist.broadcast_object_list(mark)
        mark = os.path.join(run_dir, mark[0])
        if master:
            open(mark, "w").close()
        dist.barrier()
        for _ in range(20):  # a network filesystem may show a new file to other nodes a moment late
            if os.path.isdir(run_dir) and os.path.basename(mark) in os.listdir(run_dir):
                break
            time.sleep(0.5)
        unseen = torch.tensor([0 if os.path.exists(mark) else 1], device=device)
        dist.all_reduce(unseen)
        if master:
            os.remove(mark)
            if unseen.item() and made:
                os.rmdir(run_dir)
        if unseen.item():
            raise CheckpointError(f"{unseen.item()} of {dist.get_world_size()} ranks cannot see the run folder "
                                  f"{os.path.abspath(run_dir)} that rank 0 made: runs_dir must be on a filesystem "
                                  f"that every node shares (NFS, Lustre, ...)")
    return lock, set_aside


def read_metrics(run_dir):
    """(rows of logs/metrics.jsonl, how many lines were not JSON rows and were passed over: a crash
    mid-write leaves a partial last line)."""
    rows, bad = [], 0
    path = os.path.join(run_dir, "logs", "metrics.jsonl")
    if os.path.lexists(path):
        for line in read_plain(path, 2**30, "metrics log").decode(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and type(row.get("step")) is int:
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def keep_metrics_until(run_dir, step):
    """Drop the rows of logs/metrics.jsonl after `step` (a resumed run redoes those steps), and lines
    that are not rows; returns how many of those there were. Rank 0 only."""
    rows, unreadable = read_metrics(run_dir)
    path = os.path.join(run_dir, "logs", "metrics.jsonl")
    if rows or unreadable:
        with open(path + ".tmp", "w") as f:  # then renamed over it: a crash leaves one or the other
            f.writelines(json.dumps(row) + "\n" for row in rows if row["step"] <= step)
        os.replace(path + ".tmp", path)
    return unreadable


def run_folder_problem(run_dir):
    """The one rule for what a run folder may hold, checked by train.py, hub.py and dynamics.py before
    they read or write in it: folders and plain files, and no symbolic link but checkpoints/latest (a
    run would write through a link, or upload what it points to) and no FIFO, socket or device
    (opening one can wait for ever). Returns one line saying what is wrong and what to do, or None."""
    import stat
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        return f"{run_dir} is a file, not a run folder: move it away, or use another run_name"
    ours = {os.path.join(checkpoints_dir(run_dir), n) for n in ("latest", ".latest.tmp")}
    for root, dirs, names in os.walk(run_dir):  # os.walk does not follow links to folders
        if root == run_dir and "wandb" in dirs:
            dirs.remove("wandb")  # wandb's own folder, with links wandb makes and remakes itself
        for name in sorted(dirs + names):
            full = os.path.join(root, name)
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode) and full not in ours:
                return (f"{full} is a symbolic link (to {os.readlink(full)}), which pico-train does not make there: "
                        f"it never reads, writes or uploads through one. Replace it by the file itself, or remove it")
            if not (stat.S_ISLNK(mode) or stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
                return (f"{full} is {kind}, not a plain file: opening it could wait for ever, so nothing in "
                        f"{run_dir} is read or written until it is removed")
    return None


def read_plain(path, limit, what="file"):
    """The bytes of a plain file of at most `limit` bytes, read without following a symbolic link or
    opening a FIFO or device (which could wait for ever). Anything else is a CheckpointError."""
    import stat
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP: a link
        raise CheckpointError(f"cannot read {path} ({e.strerror}): pico-train reads plain files only, "
                              f"never through a symbolic link") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path} is not a plain file (a FIFO or a device?): it is not read; remove it")
        if info.st_size > limit:
            raise CheckpointError(f"{path} is {info.st_size:,} bytes, more than a {what} ever is ({limit:,}): "
                                  f"it is not read")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)[:limit]
    finally:
        os.close(fd)


def clean_partial(run_dir):
    """Delete temporary folders left by a crash mid-save; return their names."""
    ckpt = checkpoints_dir(run_dir)
    if not os.path.isdir(ckpt):
        return []
    stale = [n for n in os.listdir(ckpt) if n.startswith(".") and n.endswith(".tmp")]
    for name in stale:
        _remove(os.path.join(ckpt, name))
    return stale


def _fix(run_dir, bad=None):
    """What to do about a bad `latest`: the commands that point it at a step that exists."""
    link = os.path.join(checkpoints_dir(run_dir), "latest")
    others = [s for s in saved_steps(run_dir) if f"step_{s}" != bad]
    if others:
        return (f"point it at an earlier checkpoint (steps here: {', '.join(map(str, others[-8:]))}), "
                f"e.g. `ln -sfn step_{others[-1]} {link}`, then run again")
    return "no other checkpoint is here: start over with auto_resume=False (this run is then kept aside)"


def latest(run_dir, log=print):
    """The folder `latest` points to, checked against its manifest; None if there is no checkpoint.
    Without `latest` (a copy tool that drops symbolic links) but with step_<N> folders, the newest
    is taken if it passes its checks (`latest` is made again and log() is told); otherwise nothing
    is overwritten: CheckpointError names the steps and the command that restores `latest`."""
    link = os.path.join(checkpoints_dir(run_dir), "latest")
    if not os.path.lexists(link):
        steps = saved_steps(run_dir)
        if not steps:
            return None
        shown = ", ".join(map(str, steps[-8:]))
        try:
            verify(step_dir(run_dir, steps[-1]))
        except CheckpointError as e:
            example = steps[-2] if len(steps) > 1 else steps[-1]
            raise CheckpointError(f"{checkpoints_dir(run_dir)} holds checkpoints (steps {shown}) but no `latest` "
                                  f"link (a copy that drops symbolic links?), and the newest does not pass its "
                                  f"checks ({e}); point `latest` at the one to resume, e.g. `ln -sfn step_{example} "
                                  f"{link}`, or start over with auto_resume=False (this run is then kept "
                                  f"aside)") from None
        point_latest(run_dir, steps[-1])
        log(f"{link} was missing (a copy that drops symbolic links?): resuming from step_{steps[-1]}, the newest "
            f"of the checkpoints here (steps {shown}); `latest` is made again")
        return step_dir(run_dir, steps[-1])
    if not os.path.islink(link):
        raise CheckpointError(f"{link} is a regular file, not a link to a step_<N> folder; remove it and "
                              f"{_fix(run_dir)}")
    target = os.readlink(link)
    path = os.path.join(checkpoints_dir(run_dir), target)
    if not re.fullmatch(r"step_\d+", target):  # never a path out of the run folder
        raise CheckpointError(f"{link} points at {target!r}, not at a step_<N> folder beside it; {_fix(run_dir)}")
    if not os.path.isdir(path) or os.path.islink(path):
        what = "a link elsewhere, not a checkpoint folder" if os.path.islink(path) else "does not exist"
        raise CheckpointError(f"{link} points at {target}, which {what}; {_fix(run_dir, target)}")
    verify(path, fix=_fix(run_dir, target))
    return path


def find(run_dir, log=print):
    """The checkpoint a run resumes from, or None for a new run; a collective (every rank calls it).
    Rank 0 removes what a crash left mid-save, then checks checkpoints/latest against its manifest
    (sizes and sha256) and for pickled code, without loading any of it, once for every rank; a
    checkpoint that cannot be loaded is a CheckpointError on every rank."""
    import torch.distributed as dist
    verdict = [None, None]  # (the checkpoint folder, or why it cannot be loaded)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        for stale in clean_partial(run_dir):
            log(f"removed {stale}: a checkpoint that a crash interrupted mid-save")
        try:
            verdict[0] = latest(run_dir, log=log)
            if verdict[0]:
                scan(verdict[0])
        except CheckpointError as e:
            verdict[1] = str(e)
    return heard_from_rank0(verdict)


def find_parent(init_from, run_dir):
    """The checkpoint a new run starts from (a fork), checked as a resume's is, by rank 0 for every
    rank (a collective): one of our checkpoint folders (with its manifest: checked against it and
    scanned for pickled code; weights, optimizer, step, data position and RNG are taken), any
    folder load_pretrained() reads (weights alone: pico-train's, a Llama one), or a step on the Hub,
    REPO@BRANCH:STEP, fetched first into run_dir/parent/ (hub.fetch_step). It is only read.
    Returns (the folder, its line of lineage: where it is, its step, the sha256 of its manifest or
    of its weights), or raises CheckpointError on every rank."""
    import torch.distributed as dist

    import hub
    verdict = [None, None]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        try:
            folder, skip = os.path.abspath(init_from), ()
            if not os.path.lexists(init_from) and hub.HUB_REF.match(init_from):
                try:
                    folder, skip = hub.fetch_step(init_from, os.path.join(run_dir, "parent")), hub.NOT_FETCHED
                except (SystemExit, CheckpointError) as e:  # hub.py's own line (no network, a damaged step)
                    raise CheckpointError(f"init_from {init_from!r}: {e}") from None
                except Exception as e:  # noqa: BLE001 - whatever the Hub said, in one line
                    raise CheckpointError(f"init_from {init_from!r}: {type(e).__name__}: {hub.error_line(e)}") from None
            elif not os.path.isdir(folder) or problem_in(folder, ("config.json", "model.safetensors")):
                raise CheckpointError(f"init_from {init_from!r} is not a checkpoint folder: it takes a step_<N> folder "
                                      f"of a run (runs/demo/checkpoints/step_32), a folder with config.json and "
                                      f"model.safetensors (pico-train's, a Llama one), a step on the Hub "
                                      f"(REPO@BRANCH:STEP), or 'scratch'")
            where = init_from if folder != os.path.abspath(init_from) else folder
            if os.path.lexists(os.path.join(folder, MANIFEST)):
                verify(folder, fix="fork another step", skip=skip)
                scan(folder)
                step, digest = folder_step(folder), file_sha256(os.path.join(folder, MANIFEST))
                line = f"{where} (step {step}, manifest sha256 {digest})"
            else:
                digest = file_sha256(os.path.join(folder, "model.safetensors"))
                line = f"{where} (weights alone, model.safetensors sha256 {digest})"
            verdict[0] = (folder, line)
        except CheckpointError as e:
            verdict[1] = str(e)
    return heard_from_rank0(verdict)


def problem_in(folder, names):
    """The first of these files that is not a plain file in folder (missing, a link, a FIFO), or None."""
    import stat
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.lexists(path) or not stat.S_ISREG(os.lstat(path).st_mode):
            return path
    return None


def heard_from_rank0(verdict):
    """verdict = [an answer, or why not] as rank 0 made it, on every rank (a collective): the answer,
    or the same CheckpointError raised on every rank."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(verdict)
    if verdict[1]:
        raise CheckpointError(verdict[1])
    return verdict[0]


def read(folder, groups, config, must_match, model_config=None, fix=None):
    """A checkpoint folder's training state (None for a folder of weights alone: a fork's parent),
    weights ({name: tensor}) and how its settings differ from `config` where they may
    (compare_configs()), read without running any code and checked, field by field, before any of it
    is used: settings in must_match that differ are refused first, and weights alone must be of a
    model of model_config's shape. Every rank reads; the training state is memory-mapped (the
    optimizer state's check reads it whole, 8 bytes per parameter). The folder was checked against
    its manifest and scanned for pickled code first (latest() or find_parent(), then scan())."""
    from model import load_pretrained
    state_file, state, harmless = os.path.join(folder, "training_state.pt"), None, ""
    if os.path.exists(os.path.join(folder, MANIFEST)):  # ours (find_parent() takes a folder without one as weights)
        state = load_state(state_file, mmap=True)
        check_training_state(state, state_file, folder_step(folder))
        bad, harmless = compare_configs(state["config"], config, must_match)
        if bad:
            raise CheckpointError(f"{folder}: these settings differ from the saved run: {bad}; "
                                  f"{fix or 'use another run_name, or auto_resume=False to start over'}")
        check_optimizer_state(state["optimizer"], groups, state_file, state["step"])
    try:
        model = load_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - whatever safetensors or the config says of a damaged file
        raise CheckpointError(f"{folder}/model.safetensors (or config.json) cannot be read ({type(e).__name__}: "
                              f"{str(e)[:200]}); point checkpoints/latest at another step_<N>") from None
    if state is None and model.config != model_config:
        theirs, ours = vars(model.config), vars(model_config)
        raise CheckpointError(f"{folder} holds a model of another shape than these settings say: " + ", ".join(
            f"{k} {theirs[k]!r} there, {ours[k]!r} here" for k in ours if ours[k] != theirs[k]) + "; set them as "
            "there (--" + " --".join(f"{k}={theirs[k]!r}" for k in ours if ours[k] != theirs[k]) + ")")
    weights = model.state_dict()
    if not all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point()):
        raise CheckpointError(f"{folder}/model.safetensors holds NaN or inf weights, so it is not resumed; point "
                              f"checkpoints/latest at an earlier step_<N>")
    return state, weights, harmless


def folder_step(folder):
    """The step a checkpoint folder holds: its name's (step_<N>), or, where it was copied under
    another name, its manifest's."""
    name = os.path.basename(os.path.normpath(folder))
    if re.fullmatch(r"step_\d+", name):
        return int(name[5:])
    try:
        step = json.loads(read_plain(os.path.join(folder, MANIFEST), 2**24))["step"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}/{MANIFEST} does not say which step it holds ({type(e).__name__})") from None
    if type(step) is not int or step < 0:
        raise CheckpointError(f"{folder}/{MANIFEST} gives the step {step!r}, not a whole number from 0 on")
    return step


def read_manifest(path):
    """{relative path: {"bytes", "sha256"}} from a checkpoint folder's manifest.json."""
    manifest = os.path.join(path, MANIFEST)
    try:
        files = json.loads(read_plain(manifest, 2**24, "manifest"))["files"]
        if not all(isinstance(v, dict) and {"bytes", "sha256"} <= set(v) for v in files.values()):
            raise ValueError("an entry lacks 'bytes' or 'sha256' (written by an older pico-train?)")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MANIFEST})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest} is not a valid manifest ({type(e).__name__}: {e})") from None
    return files


def verify(path, fix="point checkpoints/latest at an earlier step_<N>", skip=(), only=None):
    """Check every file of a checkpoint folder against its manifest (size, then sha256).
    skip: relative path prefixes that may be absent (restore leaves out learning_dynamics/);
    only: check these files alone (the manifest must still list what a resume reads)."""
    try:
        files = read_manifest(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; it will not be loaded: {fix}") from None
    if unlisted := [n for n in RESUME_READS if n not in files]:
        raise CheckpointError(f"checkpoint {path}: its manifest does not list {', '.join(unlisted)}, which a resume "
                              f"reads, so it cannot be checked; {fix}")
    for name, entry in sorted(files.items()):
        if only is not None and name not in only:
            continue
        full = os.path.join(path, name)
        parts = name.split("/")
        if name.startswith("/") or "" in parts or ".." in parts or any(
                os.path.islink(os.path.join(path, *parts[:i + 1])) for i in range(len(parts))):
            raise CheckpointError(f"checkpoint {path}: its manifest lists {name!r}, which is not a file inside it (an "
                                  f"absolute path, '..', or a symbolic link); {fix}")
        if name.startswith(tuple(skip)) and not os.path.exists(full):
            continue
        found = os.path.getsize(full) if os.path.isfile(full) else None
        if found != entry["bytes"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} should be {entry['bytes']} bytes, found "
                                  f"{'nothing' if found is None else found}; {fix}")
        if file_sha256(full) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} has the right size but not the content "
                                  f"its manifest records (sha256 differs); {fix}")


REFUSE = ("and loading them could run code. Do not load this checkpoint unless you made it: delete it, or point "
          "checkpoints/latest at another step")


def load_state(path, map_location="cpu", mmap=False):
    """torch.load that cannot run code: tensors and plain Python values only (weights_only=True).
    A file holding anything else (for instance a pickle that calls a shell command) is refused.
    mmap: tensors are read from disk only where they are touched."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        what = re.search(r"(?i)unsupported GLOBAL \S+", str(e))
        raise CheckpointError(f"refusing to load {path}: it holds Python objects other than tensors and plain "
                              f"values ({what.group(0) if what else str(e).splitlines()[0]}), {REFUSE}") from None


def scan(path):
    """Refuse a checkpoint folder any of whose pickle-based files (*.pt) names a Python object that
    load_state() would not accept, without loading any of it."""
    if os.path.isdir(os.path.join(path, "deepspeed")):
        raise CheckpointError(f"{path} keeps its optimizer state in DeepSpeed's own files (deepspeed/), the format "
                              f"of an earlier pico-train, which is no longer read (its pickles could run code); its "
                              f"weights (model.safetensors) load as ever, but to go on training, resume it with "
                              f"the pico-train that wrote it or start a new run")
    for root, _, names in os.walk(path):
        for name in sorted(n for n in names if n.endswith(".pt")):
            full = os.path.join(root, name)
            try:
                with zipfile.ZipFile(full) as z:
                    packed = [i.filename for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED]
                if packed:  # torch.save stores; a compressed member can unpack to any size
                    raise CheckpointError(f"refusing to load {full}: its member {packed[0]} is compressed, which "
                                          f"torch.save never does, {REFUSE}")
                found = torch.serialization.get_unsafe_globals_in_checkpoint(full)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - not a torch.save file at all
                raise CheckpointError(f"refusing to load {full}: not a file torch.save wrote ({e})") from None
            if unsafe := sorted(set(found)):
                raise CheckpointError(f"refusing to load {full}: it names Python objects other than tensors and "
                                      f"plain values ({', '.join(unsafe[:3])}), {REFUSE}")


OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter tensors (besides "step")


def optimizer_state(optimizer, groups, zero=False, keep=True):
    """The optimizer as torch AdamW's state_dict; `groups` lists the parameters of each param group,
    which numbers them as AdamW does. zero: `optimizer` is DeepSpeed's ZeRO-2 optimizer around our
    AdamW, whose state lives in flat fp32 shards, one per rank and param group: each parameter's full
    state is gathered (a collective: every rank calls this) and kept, on the CPU, where keep is true
    (rank 0, which so holds 8 bytes per parameter). None where keep is false."""
    if not zero:
        return optimizer.state_dict() if keep else None
    from deepspeed.utils import safe_get_full_optimizer_state
    base = optimizer.optimizer  # our torch AdamW, stepping DeepSpeed's shards
    params = [p for group in groups for p in group]
    state = {}
    if base.state:  # empty until the first step, as AdamW's own
        step = next(iter(base.state.values()))["step"].detach().float().cpu()
        link_zero_state(optimizer)
        for i, p in enumerate(params):
            full = {k: safe_get_full_optimizer_state(p, k) for k in OPTIMIZER_KEYS}
            if keep:
                state[i] = {"step": step.clone(), **{k: v.cpu() for k, v in full.items()}}
    numbers = iter(range(len(params)))
    param_groups = [{**{k: v for k, v in base_group.items() if k != "params"},
                     "params": [next(numbers) for _ in group]}
                    for base_group, group in zip(base.param_groups, groups, strict=True)]
    return {"state": state, "param_groups": param_groups} if keep else None


def link_zero_state(optimizer):
    """Point each parameter's DeepSpeed handle at its slice of the ZeRO-2 optimizer state.
    DeepSpeed 0.19.8 links them once, after the first param group's first step, when the other
    groups have no state yet; their parameters then fail safe_get_full_optimizer_state."""
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()


ADAMW_SETTINGS = {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                  "differentiable", "fused", "decoupled_weight_decay", "initial_lr"}  # a param group's keys


def check_optimizer_state(saved, groups, path, step):
    """Refuse, naming the field, an optimizer state that is not optimizer_state()'s form for these
    param groups (lists of parameters), before torch reads any of it: AdamW's state_dict with, from
    the first optimizer step on, exactly step, exp_avg and exp_avg_sq for each parameter, plain
    tensors of its shape with finite values, and param groups of plain settings in range."""
    def bad(what):
        raise CheckpointError(f"{path} is damaged: its optimizer state {what}; point checkpoints/latest at "
                              f"another step_<N>")
    params = [p for group in groups for p in group]
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"} or not isinstance(saved["state"], dict):
        bad("is not AdamW's state_dict (state and param_groups)")
    state = saved["state"]
    if not state and step > 0:
        bad(f"is empty at step {step} (AdamW has one for every parameter from the first step on)")
    if state and (not all(type(k) is int for k in state) or sorted(state) != list(range(len(params)))):
        bad(f"is not for this model's {len(params)} parameters")
    for i, p in enumerate(params if state else []):
        entry = state[i]
        if not isinstance(entry, dict) or set(entry) != {"step", *OPTIMIZER_KEYS}:
            bad(f"of parameter {i} is not AdamW's (step, exp_avg, exp_avg_sq)")
        if any(type(v) is not torch.Tensor or v.dtype != torch.float32 for v in entry.values()):
            bad(f"of parameter {i} holds something other than float32 tensors")
        if entry["step"].shape != () or not 0 <= entry["step"].item() < 2**40:
            bad(f"of parameter {i} has a step count that is not a number from 0 on")
        for k in OPTIMIZER_KEYS:
            if entry[k].shape != p.shape:
                bad(f"of parameter {i} has {k} of shape {tuple(entry[k].shape)}, not its {tuple(p.shape)}")
            if not torch.isfinite(entry[k]).all() or k == "exp_avg_sq" and (entry[k] < 0).any():
                bad(f"of parameter {i} holds {k} values that are NaN, infinite or (exp_avg_sq) negative")
    numbered = saved["param_groups"]
    if not isinstance(numbered, list) or len(numbered) != len(groups) or not all(
            isinstance(g, dict) and set(g) - {"params"} <= ADAMW_SETTINGS and
            g.get("params") == list(range(sum(map(len, groups[:j])), sum(map(len, groups[:j + 1]))))
            for j, g in enumerate(numbered)):
        bad(f"does not number this model's parameters in its {len(groups)} param groups")
    for g in numbered:
        betas, settings = g.get("betas", (0.9, 0.999)), {k: v for k, v in g.items() if k not in ("params", "betas")}
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
                type(b) is float and 0 <= b < 1 for b in betas)) or not all(
                v is None or type(v) in (bool, int, float) and math.isfinite(v) and v >= 0 for v in settings.values()):
            bad("has param group settings that are not plain numbers in range (betas from 0 to below 1, the rest "
                "finite and at least 0)")


def load_optimizer_state(optimizer, saved, groups, zero=False):
    """Load optimizer_state()'s dict into a plain AdamW or (zero) into DeepSpeed's ZeRO-2 shards of
    this rank, whatever backend and number of ranks wrote it. The saved tensors are taken; the param
    groups' settings stay those the run was started with, on both."""
    if not zero:  # torch puts the saved settings back; the run's own (lr, betas, eps, weight_decay) apply
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(saved)
        for group, own in zip(optimizer.param_groups, settings, strict=True):
            group.update(own)
        return
    if not saved["state"]:  # saved before the first step
        return
    params = [p for group in groups for p in group]
    from deepspeed.utils import safe_set_full_optimizer_state
    base = optimizer.optimizer
    step = saved["state"][0]["step"]
    for group, flat in zip(base.param_groups, optimizer.single_partition_of_fp32_groups, strict=True):
        on_device = group.get("fused") or group.get("capturable")  # AdamW keeps `step` there in these modes
        base.state[flat] = {"step": step.to(flat.device if on_device else "cpu", torch.float32).clone(),
                            **{k: torch.zeros_like(flat) for k in OPTIMIZER_KEYS}}
    link_zero_state(optimizer)
    for i, p in enumerate(params):
        for k in OPTIMIZER_KEYS:  # each rank copies only its own slice (of a memory-mapped file: reads only it)
            safe_set_full_optimizer_state(p, saved["state"][i][k], k)


def check_training_state(state, path, step):
    """Refuse a loaded training_state.pt that is not laid out as train.py writes it, before any of it
    is used: a step that is not the folder's, settings that are not plain values (a few bytes of
    shared references can make printing them take forever), RNG states and a data position of
    other types. Each refusal names the field."""
    def bad(what):
        raise CheckpointError(f"{path} is damaged: {what}; point checkpoints/latest at another step_<N>")
    if not isinstance(state, dict) or not {"step", "optimizer", "data", "rng", "config"} <= set(state):
        bad("it is not a dict of step, optimizer, data, rng and config")
    if type(state["step"]) is not int or state["step"] != step:
        bad(f"its step {state['step']!r} is not {step}, the step of its folder")
    config = state["config"]
    scalars = (bool, int, float, str, type(None))
    def plain(v):
        return isinstance(v, scalars) or isinstance(v, list) and all(isinstance(x, scalars) for x in v)
    if not isinstance(config, dict) or not all(isinstance(k, str) and plain(v) for k, v in config.items()):
        bad("its settings (config) are not plain values and flat lists of them")
    position = state["data"]
    if not isinstance(position, dict) or set(position) != {"dataset", "epoch", "shard", "shard_name", "seq",
                                                            "row_len"}:
        bad("its data position is not the data stream's (dataset, epoch, shard, shard_name, seq, row_len)")
    if not all(type(position[k]) is int and 0 <= position[k] < 2**53 for k in ("epoch", "shard", "seq")) or not (
            isinstance(position["dataset"], str) and isinstance(position["shard_name"], str)
            and len(position["dataset"]) + len(position["shard_name"]) < 10_000) or not (
            position["row_len"] is None or type(position["row_len"]) is int and 1 < position["row_len"] < 2**24):
        bad("its data position is not whole numbers from 0 on, names, and a row length")
    rng = state["rng"]
    if not isinstance(rng, list) or not 0 < len(rng) < 2**20:
        bad("its RNG states are not a list, one per rank")
    if problem := next(filter(None, map(rng_state_problem, rng)), None):
        bad(f"its RNG states are not those of torch, Python and numpy for each rank ({problem})")


def rng_state_problem(r):
    """What is wrong with one rank's rng_state() as loaded, or None: each generator's state must have
    the type, shape and range that generator takes (a 2^40-element numpy key would ask for 4 TiB)."""
    if not isinstance(r, dict) or not {"python", "torch", "numpy"} <= set(r) <= {"python", "torch", "numpy", "cuda"}:
        return "not a dict of python, torch, numpy (and cuda) states"
    version, words, _ = random.getstate()
    py = r["python"]
    if not (isinstance(py, tuple) and len(py) == 3 and py[0] == version and isinstance(py[1], tuple)
            and len(py[1]) == len(words) and all(type(w) is int and 0 <= w < 2**32 for w in py[1])
            and py[1][-1] <= len(words) - 1 and (py[2] is None or type(py[2]) is float)):
        return "python's is not Mersenne Twister's 625 words"
    own = torch.get_rng_state()
    if not (type(r["torch"]) is torch.Tensor and r["torch"].dtype == own.dtype and r["torch"].shape == own.shape):
        return f"torch's is not {own.numel()} bytes"
    if "cuda" in r and not (type(r["cuda"]) is torch.Tensor and r["cuda"].dtype == torch.uint8
                            and r["cuda"].dim() == 1 and r["cuda"].numel() <= 64):
        return "cuda's is not a few bytes"
    np_state = r["numpy"]
    if not (isinstance(np_state, list) and len(np_state) == 5 and np_state[0] == "MT19937"
            and type(np_state[1]) is torch.Tensor and np_state[1].dtype == torch.int64 and np_state[1].shape == (624,)
            and bool(((np_state[1] >= 0) & (np_state[1] < 2**32)).all()) and type(np_state[2]) is int
            and 0 <= np_state[2] <= 624 and type(np_state[3]) is int and np_state[3] in (0, 1)
            and type(np_state[4]) is float and math.isfinite(np_state[4])):
        return "numpy's is not MT19937's 624 words and position"
    return None


def rng_state():
    """Every generator's state as tensors and plain values (what load_state() accepts)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def compare_configs(saved, current, must_match):
    """How two flat configs differ: (the keys in must_match that differ, saying how, or "";
    the other keys that differ, saying how, or "")."""
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k) and k != "lineage")
    bad = ", ".join(f"{k} (saved {saved.get(k)!r}, now {current.get(k)!r})" for k in differ if k in must_match)
    return bad, ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ if k not in must_match)
