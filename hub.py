"""
Checkpoints as version-controlled Hugging Face Hub commits.

A run pushes to the model repo `hf_repo_id`, on a branch named after the run. Every checkpoint
becomes a few commits, one per kind of artefact, titled as pico-train titles them (pico-analyze
finds steps by these titles):

    Saving HF Model -- Step N                    config.json, model.safetensors, ...
    Saving Tokenizer -- Step 0                   tokenizer.json, tokenizer_config.json
    Saving Training Config -- Step 0             training_config.yaml
    Saving Fabric Checkpoint -- Step N           training_state/ (optimizer, data position, RNG)
    Saving Evaluation Results -- Step N          eval_results/step_N.json
    Saving Learning Dynamics Data (train) -- Step N   learning_dynamics/train_*
    Saving Learning Dynamics Data (val) -- Step N     learning_dynamics/val_*

The branch root always holds the newest files; an older step is read at its commit.

Uploads run in a background thread on rank 0 and never block training. What is still to upload is
kept in runs/<run>/hub_queue.json, written before a checkpoint is sealed, so a crash, a kill or a
Hub outage loses nothing: the next start (or `python hub.py push runs/<run>`) uploads the rest, in
order. A commit whose title is already on the branch is not made twice.

Command line:
    python hub.py list <repo> --branch <run>
    python hub.py download <repo> --branch <run> --step 9000 --what dynamics --out DIR
    python hub.py restore <repo> --branch <run> --step 9000 --run-dir runs/<run>   # then train.py resumes there
    python hub.py push runs/<run>                                                  # upload what is queued
"""

import argparse
import fnmatch
import json
import logging
import os
import re
import threading
import time

log = logging.getLogger("pico.hub")

QUEUE_FILE = "hub_queue.json"
TITLE_RE = re.compile(r"^(.*) -- Step (\d+)$")
# what each commit holds: (title, files of the checkpoint folder, where they go in the repo)
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]
WHAT = {  # for `download --what`: the commit title and the repo paths it holds
    "model": ("Saving HF Model", MODEL_FILES),
    "tokenizer": ("Saving Tokenizer", TOKENIZER_FILES),
    "config": ("Saving Training Config", ["training_config.yaml"]),
    "state": ("Saving Fabric Checkpoint", ["training_state/*"]),
    "eval": ("Saving Evaluation Results", ["eval_results/*"]),
    "dynamics": ("Saving Learning Dynamics Data (val)", ["learning_dynamics/*"]),
}


class PermanentError(Exception):
    """The Hub refused us in a way that retrying will not fix (bad token, no write access)."""


def _scrub(text):
    """text without the Hub token in it, wherever it came from (a server may echo it in an error)."""
    try:
        from huggingface_hub import get_token
        tokens = {os.environ.get("HF_TOKEN"), get_token()}
    except Exception:  # noqa: BLE001 - an unreadable token file: scrub what we know
        tokens = {os.environ.get("HF_TOKEN")}
    for token in sorted(filter(None, tokens), key=len, reverse=True):
        text = text.replace(token, "***")
    return text


def _line(e):
    """The first line of an error's message, token removed."""
    text = _scrub(str(e))
    return text.splitlines()[0][:300] if text else ""


def _chain(e):
    """e and the exceptions it was raised from (the client wraps network errors in RuntimeError)."""
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _status(e):
    return next((s for x in _chain(e) if (s := getattr(getattr(x, "response", None), "status_code", None))), None)


def _transient(e):
    """True for errors worth retrying: 5xx, 429, and failures without an HTTP answer (no connection,
    timeouts, a transfer cut off: the client wraps these in RuntimeError). Answers such as 400/401/
    403/404 and local errors (a missing file, a bad argument) are permanent."""
    status = _status(e)
    if status is not None:
        return status >= 500 or status == 429
    return not isinstance(e, (ValueError, TypeError, KeyError, FileNotFoundError, PermissionError))


def plan_commits(run_dir, step, step_dir, has_eval):
    """The commits for one checkpoint: [{"title", "files": {repo path: local path}, "delete": [patterns]}]."""
    def files(names):
        return {n: os.path.join(step_dir, n) for n in names if os.path.exists(os.path.join(step_dir, n))}

    commits = [{"title": f"Saving HF Model -- Step {step}", "files": files(MODEL_FILES), "delete": []}]
    if step == 0:
        if files(TOKENIZER_FILES):
            commits.append({"title": "Saving Tokenizer -- Step 0", "files": files(TOKENIZER_FILES), "delete": []})
        commits.append({"title": "Saving Training Config -- Step 0", "delete": [],
                        "files": {"training_config.yaml": os.path.join(run_dir, "training_config.yaml")}})
    state, dynamics_files = {}, {}  # dynamics_files: split -> {repo path: local path}
    for root, _, names in os.walk(step_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), step_dir).replace(os.sep, "/")
            if rel.startswith("learning_dynamics/"):
                split = rel[len("learning_dynamics/"):].split("_", 1)[0]
                dynamics_files.setdefault(split, {})[rel] = os.path.join(root, n)
            elif rel not in MODEL_FILES + TOKENIZER_FILES:
                state["training_state/" + rel] = os.path.join(root, n)
    commits.append({"title": f"Saving Fabric Checkpoint -- Step {step}", "files": state, "delete": ["training_state/*"]})
    if has_eval:
        commits.append({"title": f"Saving Evaluation Results -- Step {step}", "delete": [], "files": {
            f"eval_results/step_{step}.json": os.path.join(run_dir, "eval_results", f"step_{step}.json")}})
    for split in ("train", "val"):
        if split in dynamics_files:
            # replace this split's files; a split this step lacks (train, at the last step) goes too
            stale = [f"learning_dynamics/{s}_*" for s in ("train", "val") if s == split or s not in dynamics_files]
            commits.append({"title": f"Saving Learning Dynamics Data ({split}) -- Step {step}",
                            "files": dynamics_files[split], "delete": stale})
    return commits


class Uploader:
    """Rank 0's background uploader with a persisted queue (runs/<run>/hub_queue.json)."""

    def __init__(self, run_dir, repo_id, branch, collection_slug=None, log_fn=print, max_delay=30.0):
        from huggingface_hub import HfApi
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()  # the log says what was uploaded; bars would flood it
        self.api = HfApi()  # token from HF_TOKEN or `huggingface-cli login`; endpoint from HF_ENDPOINT
        self.run_dir, self.repo_id, self.branch, self.collection_slug = run_dir, repo_id, branch, collection_slug
        self.log, self.max_delay = log_fn, max_delay
        self.path = os.path.join(run_dir, QUEUE_FILE)
        self.lock, self.wake = threading.Lock(), threading.Event()
        self.failed = None  # a PermanentError message: uploads stop, training goes on
        self.give_up_at = None  # set by finish(): after it, transient failures are no longer retried
        self.remote_titles = None
        self.stopping = False
        self.busy = False
        self.session = f"{os.getpid()}-{time.time()}"  # marks what this process queued
        self.thread = threading.Thread(target=self._work, name="hub-uploader", daemon=True)
        pending = self.queue()
        if pending:
            self.log(f"hub: {len(pending)} commit(s) left from an earlier session; uploading them first")
        self.thread.start()

    def queue(self):
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return json.load(f)

    def _write_queue(self, items):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(items, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def enqueue(self, run_dir, step, final_step_dir, tmp_step_dir, has_eval):
        """Record a checkpoint's commits; called before the checkpoint folder is sealed, with the
        folder's final name (the files are read only once it exists)."""
        commits = plan_commits(run_dir, step, tmp_step_dir, has_eval)
        for c in commits:
            c["files"] = {k: v.replace(tmp_step_dir, final_step_dir, 1) for k, v in c["files"].items()}
            c["step_dir"] = final_step_dir
            c["session"] = self.session
        with self.lock:
            self._write_queue(self.queue() + commits)
        self.wake.set()

    def _call(self, fn, what):
        """Run fn(), retrying transient failures with backoff until it works (or we are told to stop)."""
        delay, reported = 1.0, False
        while True:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below
                status = _status(e)
                if status in (401, 403) or type(e).__name__ in ("RepositoryNotFoundError", "GatedRepoError"):
                    raise PermanentError(f"{what}: the Hub refused ({status}): {_line(e)}. "
                                         f"Check HF_TOKEN (or `huggingface-cli login`) and write access to "
                                         f"{self.repo_id}.") from None
                if not _transient(e):
                    detail = "; ".join(f"{type(x).__name__}: {_line(x)}" for x in _chain(e))
                    raise PermanentError(f"{what}: {detail}") from None
                if not reported:
                    cause = list(_chain(e))[-1]  # the root cause: a refused connection, a timeout, ...
                    self.log(f"hub: {what} failed ({type(cause).__name__}: {_line(cause)}); retrying in the background")
                    reported = True
                if self.stopping and self.give_up_at and time.time() > self.give_up_at:
                    raise
                self.wake.wait(delay)
                self.wake.clear()
                delay = min(delay * 2, self.max_delay)

    def _setup(self):
        self._call(lambda: self.api.create_repo(self.repo_id, exist_ok=True), f"creating {self.repo_id}")
        self._call(lambda: self.api.create_branch(self.repo_id, branch=self.branch, exist_ok=True),
                   f"creating branch {self.branch}")
        if self.collection_slug:  # a nicety: failing here must not stop the uploads
            try:
                self._call(lambda: self.api.add_collection_item(self.collection_slug, item_id=self.repo_id,
                                                                item_type="model", exists_ok=True),
                           f"adding {self.repo_id} to collection {self.collection_slug}")
            except PermanentError as e:
                self.log(f"hub: not added to the collection: {e}")
        self.remote_titles = {c.title for c in self._call(
            lambda: self.api.list_repo_commits(self.repo_id, revision=self.branch), "listing commits")}

    def _push(self, commit):
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        if commit["title"] in self.remote_titles:
            return "already on the Hub"
        if not os.path.isdir(commit["step_dir"]):  # queued by a session that crashed before sealing it
            return "skipped: its checkpoint was never completed"
        remote = set(self._call(lambda: self.api.list_repo_files(self.repo_id, revision=self.branch), "listing files"))
        ops = [CommitOperationAdd(path_in_repo=k, path_or_fileobj=v) for k, v in sorted(commit["files"].items())]
        stale = {p for p in remote for pattern in commit["delete"] if fnmatch.fnmatch(p, pattern)} - set(commit["files"])
        ops += [CommitOperationDelete(path_in_repo=p) for p in sorted(stale)]
        self._call(lambda: self.api.create_commit(self.repo_id, ops, commit_message=commit["title"],
                                                  revision=self.branch), commit["title"])
        self.remote_titles.add(commit["title"])
        return "uploaded"

    def _work(self):
        try:
            self._setup()
            while True:
                with self.lock:
                    items = self.queue()
                if not items:
                    if self.stopping:
                        return
                    self.wake.wait(1.0)
                    self.wake.clear()
                    continue
                head = items[0]
                if not os.path.isdir(head["step_dir"]) and head.get("session") == self.session:
                    self.wake.wait(0.2)  # queued a moment before its checkpoint is sealed: wait for it
                    self.wake.clear()
                    continue
                self.busy = True
                outcome = self._push(head)
                with self.lock:  # drop the head only once it is on the Hub
                    self._write_queue(self.queue()[1:])
                self.busy = False
                self.log(f"hub: {items[0]['title']}: {outcome}")
        except PermanentError as e:
            self.failed = str(e)
            self.log(f"hub: uploads stopped: {e} Everything stays in {self.run_dir}; the queue "
                     f"({QUEUE_FILE}) is uploaded by the next start or `python hub.py push {self.run_dir}`.")
        except Exception as e:  # noqa: BLE001 - the uploader must never take training down
            self.failed = f"{type(e).__name__}: {_scrub(str(e))}"
            self.log(f"hub: uploads stopped after an unexpected error: {self.failed}")
        finally:
            self.busy = False

    def finish(self, timeout=600.0):
        """Wait (with a progress line) until the queue is empty, at most `timeout` seconds; then
        say plainly what was not uploaded."""
        self.stopping, self.give_up_at = True, time.time() + timeout
        self.wake.set()
        last = None
        while self.thread.is_alive() and time.time() < self.give_up_at:
            left = len(self.queue())
            if left != last:
                self.log(f"hub: waiting for {left} commit(s) to reach {self.repo_id}@{self.branch}")
                last = left
            self.thread.join(timeout=2.0)
            self.wake.set()
        left = self.queue()
        if left:
            self.log(f"hub: NOT uploaded: {len(left)} commit(s) (" + ", ".join(c["title"] for c in left[:4]) +
                     (", ..." if len(left) > 4 else "") + f"). They are kept in {self.path}; run "
                     f"`python hub.py push {self.run_dir}` or restart the run to upload them.")
        elif not self.failed:
            self.log(f"hub: everything is on {self.repo_id}@{self.branch}")
        return not left and not self.failed


# ----------------------------------------------------------------------------------------------
# reading a run back by step

def list_steps(repo_id, branch):
    """{step: {title: commit id}} from the commit titles on a branch, oldest step first."""
    from huggingface_hub import HfApi
    steps = {}
    for c in reversed(HfApi().list_repo_commits(repo_id, revision=branch)):
        m = TITLE_RE.match(c.title)
        if m:
            steps.setdefault(int(m.group(2)), {})[m.group(1)] = c.commit_id
    return dict(sorted(steps.items()))


def commit_for(steps, repo_id, branch, step, title):
    """The commit id of `title` at `step`, from a list_steps() listing."""
    if step not in steps:
        raise SystemExit(f"{repo_id}@{branch} has no step {step}; steps: {list(steps)[:20]}")
    if title not in steps[step]:
        raise SystemExit(f"{repo_id}@{branch} step {step} has no '{title}' commit; it has {sorted(steps[step])}")
    return steps[step][title]


def local_path(out_dir, repo_path):
    """Where a repository file goes under out_dir. A path that would land outside it (a `..` part,
    an absolute path) is refused here, whatever the installed huggingface_hub would do with it."""
    parts = repo_path.split("/")
    inside = os.path.realpath(out_dir)
    target = os.path.realpath(os.path.join(inside, *parts))
    if (repo_path.startswith(("/", "\\")) or "\\" in repo_path or ".." in parts or os.path.isabs(repo_path)
            or os.path.commonpath([inside, target]) != inside):
        raise ValueError(f"refusing the repository file {repo_path!r}: it would be written outside {out_dir}. "
                         f"This repository is malformed or hostile; nothing of it was downloaded")
    return target


def download(repo_id, branch, step, what, out_dir, steps=None):
    """Files of one kind at the commit that saved them at `step`, into out_dir (repo layout).
    steps: a list_steps() listing already fetched (else it is fetched here). Every repository path
    is checked to stay inside out_dir before any file is fetched."""
    from huggingface_hub import HfApi, hf_hub_download
    steps = steps if steps is not None else list_steps(repo_id, branch)
    title, patterns = WHAT[what]
    step_for_title = 0 if what in ("tokenizer", "config") else step
    revision = commit_for(steps, repo_id, branch, step_for_title, title)
    files = [f for f in HfApi().list_repo_files(repo_id, revision=revision)
             if any(fnmatch.fnmatch(f, p) for p in patterns)]
    fetch = [(f, revision) for f in files]
    if what == "dynamics":  # the train split is in its own commit (absent at the final step)
        fetch = [(f, r) for f, r in fetch if fnmatch.fnmatch(f, "learning_dynamics/val_*")]
        train_rev = steps.get(step, {}).get("Saving Learning Dynamics Data (train)")
        if train_rev:
            fetch += [(f, train_rev) for f in HfApi().list_repo_files(repo_id, revision=train_rev)
                      if fnmatch.fnmatch(f, "learning_dynamics/train_*")]
    for f, _ in fetch:
        local_path(out_dir, f)
    for f, rev in fetch:
        hf_hub_download(repo_id, f, revision=rev, local_dir=out_dir)
    return revision, [f for f, _ in fetch]


def restore(repo_id, branch, step, run_dir):
    """Rebuild runs/<run>/checkpoints/step_<N> (and latest) from the Hub, so train.py resumes there.
    The files are checked against the manifest uploaded with them (sizes and sha256) and scanned
    for pickled code before the checkpoint is sealed; a bad one leaves nothing behind."""
    import shutil
    import tempfile

    import checkpoint
    steps = list_steps(repo_id, branch)
    with tempfile.TemporaryDirectory() as tmp:
        for what in ("model", "state", "tokenizer", "config"):
            download(repo_id, branch, step, what, tmp, steps)
        os.makedirs(checkpoint.checkpoints_dir(run_dir), exist_ok=True)
        target = checkpoint.begin(run_dir, step)
        try:
            for name in MODEL_FILES + TOKENIZER_FILES:
                if os.path.exists(os.path.join(tmp, name)):
                    shutil.copy(os.path.join(tmp, name), target)
            state = os.path.join(tmp, "training_state")
            for root, _, names in os.walk(state):
                for n in names:
                    dest = os.path.join(target, os.path.relpath(os.path.join(root, n), state))
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    shutil.copy(os.path.join(root, n), dest)
            fix = f"restore another step (python hub.py list {repo_id} --branch {branch})"
            if os.path.exists(os.path.join(target, checkpoint.MANIFEST)):
                checkpoint.verify(target, fix=fix, skip=("learning_dynamics/",))  # not restored: not needed to resume
            else:
                print(f"warning: step {step} of {repo_id}@{branch} has no {checkpoint.MANIFEST} (uploaded by an "
                      f"older pico-train): its files cannot be checked for damage")
            checkpoint.scan(target)
            checkpoint.write_manifest(target, step)  # of the files restored
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        if not os.path.exists(os.path.join(run_dir, "training_config.yaml")):
            shutil.copy(os.path.join(tmp, "training_config.yaml"), run_dir)
        return checkpoint.commit(run_dir, step, target)


def push(run_dir, timeout=3600.0):
    """Upload what a run's queue still holds (e.g. after the Hub was down at the end of a run)."""
    import yaml
    with open(os.path.join(run_dir, "training_config.yaml")) as f:
        cfg = yaml.safe_load(f)["checkpointing"]
    uploader = Uploader(run_dir, cfg["hf_repo_id"], cfg["run_name"], log_fn=print)
    return uploader.finish(timeout)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="list the steps saved on a branch")
    p.add_argument("repo")
    p.add_argument("--branch", required=True)
    p = sub.add_parser("download", help="fetch one step's files at the commit that saved them")
    p.add_argument("repo")
    p.add_argument("--branch", required=True)
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--what", choices=sorted(WHAT), default="model")
    p.add_argument("--out", required=True)
    p = sub.add_parser("restore", help="rebuild a local checkpoint from the Hub to resume training from it")
    p.add_argument("repo")
    p.add_argument("--branch", required=True)
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--run-dir", required=True)
    p = sub.add_parser("push", help="upload what a run's hub_queue.json still holds")
    p.add_argument("run_dir")
    return parser.parse_args()


def main(args):
    if args.cmd == "list":
        for step, commits in list_steps(args.repo, args.branch).items():
            print(f"step {step}: " + ", ".join(f"{t} ({cid[:8]})" for t, cid in commits.items()))
    elif args.cmd == "download":
        rev, files = download(args.repo, args.branch, args.step, args.what, args.out)
        print(f"{len(files)} file(s) of step {args.step} at commit {rev[:8]} -> {args.out}")
    elif args.cmd == "restore":
        print(f"restored {restore(args.repo, args.branch, args.step, args.run_dir)}; "
              f"now run train.py with run_name/runs_dir pointing at {args.run_dir}")
    else:
        raise SystemExit(0 if push(args.run_dir) else 1)


if __name__ == "__main__":
    cli = parse_args()
    try:
        main(cli)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - one line, never the token, instead of a traceback
        raise SystemExit(f"hub.py {cli.cmd}: {type(e).__name__}: {_line(e)}") from None
