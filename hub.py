"""
Checkpoints as version-controlled Hugging Face Hub commits.

A run pushes to the model repo `hf_repo_id`, on a branch named after the run. Every checkpoint
becomes a few commits, one per kind of artefact, titled as pico-train titles them (pico-analyze
finds steps by these titles):

    Saving HF Model -- Step N                    config.json, model.safetensors, ... (model.py: not Llama)
    Saving Tokenizer -- Step 0                   tokenizer.json, tokenizer_config.json
    Saving Training Config -- Step 0             training_config.yaml
    Saving Fabric Checkpoint -- Step N           training_state/ (optimizer, data position, RNG)
    Saving Evaluation Results -- Step N          eval_results/step_N.json
    Saving Learning Dynamics Data (train) -- Step N   learning_dynamics/train_*
    Saving Learning Dynamics Data (val) -- Step N     learning_dynamics/val_*

The branch root always holds the newest files; an older step is read at its commit.

Uploads run in a background thread on rank 0 and never block training. The run folder is the queue:
what is left to upload is every commit of a sealed checkpoint whose content the branch does not
hold under its title yet, in step order. Content is the sha256 of each file, and each commit says it
in its description ("content sha256 <digest of the files' sha256s>"); a titled commit without one
(pico-train's own, say) is compared file by file with the branch's listing. So a crash, a kill or
a Hub outage loses nothing, the next start (or `python hub.py push runs/<run>`) uploads the rest,
nothing is committed twice, and a step saved again with other bytes (a retrain from an earlier
step, a run started over) is uploaded again, as a new commit under the same title.

Command line:
    python hub.py list <repo> --branch <run>
    python hub.py download <repo> --branch <run> --step 9000 --what dynamics --out DIR
    python hub.py restore <repo> --branch <run> --step 9000 --run-dir runs/<run>   # then train.py resumes there
    python hub.py push runs/<run>                                                  # upload what is missing
"""

import argparse
import errno
import fnmatch
import hashlib
import itertools
import os
import re
import threading
import time

TITLE_RE = re.compile(r"^(.*) -- Step (\d+)$")
DIGEST_RE = re.compile(r"content sha256 ([0-9a-f]{64})")  # in a commit's description: what it holds
HUB_REF = re.compile(r"^([\w.-]+/[\w.-]+)@([^\s:@]+):(\d+)$")  # init_from's Hub step: REPO@BRANCH:STEP
NOT_FETCHED = ("learning_dynamics/", "tokenizer.json", "tokenizer_config.json")  # by fetch_step: a fork needs none
# what each commit holds: (title, files of the checkpoint folder, where they go in the repo)
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors", "model.py"]  # model.py: not a Llama
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


def error_line(e):
    """The first line of an error's message, token removed (for every message built from a Hub error)."""
    text = _scrub(str(e))
    return text.splitlines()[0][:300] if text else ""


def _chain(e):
    """e and the exceptions it was raised from (clients wrap network errors in their own)."""
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _status(e):
    return next((s for x in _chain(e) if (s := getattr(getattr(x, "response", None), "status_code", None))), None)


def transient(e):
    """The one retry rule for every call to the Hub (uploads here, dataset reads in data.py): a 5xx,
    a 429, or a failure with no answer at all (refused, reset, timed out, cut off, however the client
    wraps it) is worth retrying; any other answer (400, 401, 403, 404, ...) or a local error is not."""
    status = _status(e)
    if status is not None:
        return status >= 500 or status == 429
    local = (ValueError, TypeError, LookupError, AttributeError, NameError, ImportError, AssertionError,
             FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

    def is_local(x):
        if type(x).__name__ == "LocalEntryNotFoundError":  # a download found no answer and no copy: its cause says why
            return x.__cause__ is None
        return (isinstance(x, local) or type(x).__name__ in ("OfflineModeIsEnabled", "EntryNotFoundError")
                or getattr(x, "errno", None) in (errno.ENOSPC, errno.EDQUOT))  # a full disk
    return not any(is_local(x) for x in _chain(e))


def retry(fn, what, log, attempts=None, max_delay=30.0):
    """fn(), tried again after 1, 2, 4, ... s (at most max_delay) while it fails transiently, at most
    `attempts` times in all (None: until it works). log(message) is told of each retry."""
    delay = 1.0
    for attempt in itertools.count(1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - sorted by transient()
            if not transient(e) or attempt == attempts:
                raise
            cause = list(_chain(e))[-1]  # the root cause: a refused connection, a timeout, ...
            log(f"{what} failed ({type(cause).__name__}: {error_line(cause)}); retry {attempt}"
                + (f"/{attempts - 1}" if attempts else "") + f" in {delay:.0f}s")
            time.sleep(delay)
            delay = min(2 * delay, max_delay)


def plan_commits(run_dir, step):
    """The commits of one sealed checkpoint: [{"title", "step", "files": {repo path: local path},
    "delete": [patterns of repo files this commit replaces]}]."""
    import checkpoint  # here, not at the top: it loads torch, which `hub.py list` and `download` do not need
    step_dir = checkpoint.step_dir(run_dir, step)

    def plain(path):  # a symbolic link is never uploaded: it could point anywhere on this machine
        return os.path.isfile(path) and not os.path.islink(path)

    def files(names):
        return {n: os.path.join(step_dir, n) for n in names if plain(os.path.join(step_dir, n))}

    commits = [{"title": f"Saving HF Model -- Step {step}", "files": files(MODEL_FILES),
                "delete": ["model.py"]}]  # (a Llama checkpoint after a changed model's has none)
    if step == 0:
        if files(TOKENIZER_FILES):
            commits.append({"title": "Saving Tokenizer -- Step 0", "files": files(TOKENIZER_FILES), "delete": []})
        if plain(os.path.join(run_dir, "training_config.yaml")):
            commits.append({"title": "Saving Training Config -- Step 0", "delete": [],
                            "files": {"training_config.yaml": os.path.join(run_dir, "training_config.yaml")}})
    state, dynamics_files = {}, {}  # dynamics_files: split -> {repo path: local path}
    for root, _, names in os.walk(step_dir):
        for n in names:
            if not plain(os.path.join(root, n)):
                continue
            rel = os.path.relpath(os.path.join(root, n), step_dir).replace(os.sep, "/")
            if rel.startswith("learning_dynamics/"):
                split = rel[len("learning_dynamics/"):].split("_", 1)[0]
                dynamics_files.setdefault(split, {})[rel] = os.path.join(root, n)
            elif rel not in MODEL_FILES + TOKENIZER_FILES:
                state["training_state/" + rel] = os.path.join(root, n)
    commits.append({"title": f"Saving Fabric Checkpoint -- Step {step}", "files": state,
                    "delete": ["training_state/*"]})
    eval_file = os.path.join(run_dir, "eval_results", f"step_{step}.json")
    if plain(eval_file):
        commits.append({"title": f"Saving Evaluation Results -- Step {step}", "delete": [],
                        "files": {f"eval_results/step_{step}.json": eval_file}})
    for split in ("train", "val"):
        if split in dynamics_files:
            # replace this split's files; a split this step lacks (train, at the last step) goes too
            stale = [f"learning_dynamics/{s}_*" for s in ("train", "val") if s == split or s not in dynamics_files]
            commits.append({"title": f"Saving Learning Dynamics Data ({split}) -- Step {step}",
                            "files": dynamics_files[split], "delete": stale})
    return [dict(c, step=step, digest=content_digest(c["files"])) for c in commits]


_hashes = {}  # (path, size, mtime, inode) -> sha256: a sealed checkpoint is hashed once per process


def local_sha256(path):
    import checkpoint
    info = os.stat(path)
    key = (path, info.st_size, info.st_mtime_ns, info.st_ino)
    if key not in _hashes:
        _hashes[key] = checkpoint.file_sha256(path)
    return _hashes[key]


def content_digest(files):
    """What a commit holds, as one sha256: of the lines "<repo path>\t<sha256 of the file>", sorted."""
    return hashlib.sha256("".join(f"{k}\t{local_sha256(v)}\n" for k, v in sorted(files.items())).encode()).hexdigest()


def git_blob_sha1(path):
    """The id git (and so the Hub's listing) gives a file kept in git rather than LFS."""
    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Uploader:
    """Rank 0's uploads, in one background thread that training never waits for. The run folder is
    the queue: what is left is the commits of its sealed checkpoints whose content the branch does
    not hold under their title (the module's docstring)."""

    def __init__(self, run_dir, repo_id, branch, collection_slug=None, log_fn=print, lineage=()):
        from huggingface_hub import HfApi
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()  # the log says what was uploaded; bars would flood it
        self.api = HfApi()  # token from HF_TOKEN or `huggingface-cli login`; endpoint from HF_ENDPOINT
        self.run_dir, self.repo_id, self.branch = run_dir, repo_id, branch
        self.collection, self.log, self.lineage = collection_slug, log_fn, list(lineage)  # (a fork's: where from)
        import checkpoint
        self.steps = lambda: checkpoint.saved_steps(run_dir)  # the sealed checkpoints, in order
        self.earlier = self.steps()  # those of earlier sessions
        # on_hub: title -> (the digest its newest commit states or None, that commit's id); left: None until read
        self.on_hub, self.same, self.left, self.failed, self.stopping = {}, {}, None, None, False
        self.wake = threading.Event()  # a checkpoint was sealed (nudge), or the run is ending
        self.thread = threading.Thread(target=self._work, name="hub-uploader", daemon=True)
        self.thread.start()

    def nudge(self):
        self.wake.set()

    def todo(self):
        return [c for step in self.steps() for c in plan_commits(self.run_dir, step) if not self.holds(c)]

    def holds(self, c):
        """Whether the branch's newest commit titled as c holds c's files, byte for byte."""
        if c["title"] not in self.on_hub:
            return False
        digest, commit_id = self.on_hub[c["title"]]
        if digest is not None:
            return digest == c["digest"]
        if (commit_id, c["digest"]) not in self.same:  # no digest stated: its files, one by one, from the listing
            from huggingface_hub.hf_api import RepoFile
            listing = self._call(lambda: self.api.list_repo_tree(self.repo_id, revision=commit_id, recursive=True),
                                 f"listing {c['title']}")
            remote = {f.path: f for f in listing if isinstance(f, RepoFile)}
            self.same[commit_id, c["digest"]] = all(
                path in remote and (remote[path].lfs.sha256 == local_sha256(local) if remote[path].lfs else
                                    remote[path].blob_id == git_blob_sha1(local))
                for path, local in c["files"].items())
        return self.same[commit_id, c["digest"]]

    def _call(self, fn, what):
        said = []  # the first retry is logged; the others go on quietly, 30 s apart at most
        try:
            return retry(fn, what, lambda m: said or said.append(self.log(f"hub: {m} (and on, in the background)")))
        except Exception as e:  # noqa: BLE001 - not worth retrying: one line on why
            status = _status(e)
            raise PermanentError(f"{what}: the Hub refused ({status}): {error_line(e)}. Check HF_TOKEN (or "
                                 f"`huggingface-cli login`) and write access to {self.repo_id}." if status else
                                 f"{what}: " + "; ".join(f"{type(x).__name__}: {error_line(x)}"
                                                         for x in _chain(e))) from None

    def _work(self):
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        api, repo, branch = self.api, self.repo_id, self.branch
        try:
            self._call(lambda: api.create_repo(repo, exist_ok=True), f"creating {repo}")
            self._call(lambda: api.create_branch(repo, branch=branch, exist_ok=True), f"creating branch {branch}")
            if self.collection:  # a nicety: failing here does not stop the uploads
                try:
                    self._call(lambda: api.add_collection_item(self.collection, item_id=repo, item_type="model",
                                                               exists_ok=True), f"adding {repo} to {self.collection}")
                except PermanentError as e:
                    self.log(f"hub: not added to the collection: {e}")
            for c in self._call(lambda: api.list_repo_commits(repo, revision=branch), "listing commits"):
                if c.title not in self.on_hub:  # (newest first: the commit a download of that title reads)
                    self.on_hub[c.title] = (m.group(1) if (m := DIGEST_RE.search(c.message or "")) else None,
                                            c.commit_id)
            remote = set(self._call(lambda: api.list_repo_files(repo, revision=branch), "listing files"))  # kept below
            self.left = self.todo()
            if changed := sorted({c["step"] for c in self.left if c["title"] in self.on_hub}):
                self.log(f"hub: step(s) {', '.join(map(str, changed))} here differ from those on {repo}@{branch} "
                         f"(saved again since): uploading them again, as new commits")
            if earlier := sum(c["step"] in self.earlier for c in self.left):
                self.log(f"hub: {earlier} commit(s) left from an earlier session; uploading them first")
            while True:
                if not self.left and self.stopping:
                    return
                if not self.left:
                    self.wake.wait()
                for c in self.left:  # add its files, delete the ones it replaces
                    stale = sorted(p for p in remote
                                   if p not in c["files"] and any(fnmatch.fnmatch(p, d) for d in c["delete"]))
                    ops = [CommitOperationAdd(k, v) for k, v in sorted(c["files"].items())] + \
                        [CommitOperationDelete(p) for p in stale]
                    description = "".join([f"content sha256 {c['digest']} (of the sorted lines 'path<TAB>sha256' "
                                           f"of its files)"] + [f"\nforked from {line}" for line in self.lineage])
                    self._call(lambda ops=ops, title=c["title"], d=description: api.create_commit(
                        repo, ops, commit_message=title, commit_description=d, revision=branch), c["title"])
                    remote = (remote - set(stale)) | set(c["files"])
                    again = c["title"] in self.on_hub
                    self.on_hub[c["title"]] = (c["digest"], None)
                    self.left = self.left[1:]
                    self.log(f"hub: {c['title']}: uploaded" + (" again (the branch held other bytes under that title)"
                                                               if again else ""))
                self.wake.clear()
                self.left = self.todo()
        except Exception as e:  # noqa: BLE001 - the uploader never takes training down
            self.failed = str(e) if isinstance(e, PermanentError) else f"{type(e).__name__}: {_scrub(str(e))}"
            self.log(f"hub: uploads stopped: {self.failed} Everything stays in {self.run_dir}: "
                     f"the next start or `python hub.py push {self.run_dir}` uploads what is missing.")

    def finish(self, timeout=600.0):
        """Wait at most `timeout` seconds for the uploads to end, then say plainly what is not on the Hub."""
        self.stopping = True
        self.wake.set()
        if self.thread.is_alive() and timeout:
            self.log(f"hub: waiting (at most {timeout:.0f}s) for the uploads to reach {self.repo_id}@{self.branch}")
        self.thread.join(timeout)
        left = self.todo() if self.left is None else self.left
        if left:
            self.log(f"hub: NOT uploaded: {len(left)} commit(s) (" + ", ".join(c["title"] for c in left[:3]) +
                     f"{', ...' if len(left) > 3 else ''}). They stay in {self.run_dir}: run "
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


def lineage_of(repo_id, branch):
    """Where a branch's run was forked from, as its newest commit that says so says ("forked from
    ..." lines, the first parent first), or []."""
    from huggingface_hub import HfApi
    for c in HfApi().list_repo_commits(repo_id, revision=branch):
        if lines := re.findall(r"^forked from (.+)$", c.message or "", re.M):
            return lines
    return []


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


def restore(repo_id, branch, step, run_dir, unchecked=False):
    """Rebuild runs/<run>/checkpoints/step_<N> (and latest) from the Hub, so train.py resumes there.
    Local work is never replaced, hidden or rewound: a run folder that holds step N or a later one is
    refused, as is one that breaks checkpoint.run_folder_problem()'s rule, and the run's lock is held
    throughout (a run training there is never written under). The files are checked against the
    manifest uploaded with them (sizes and sha256), which must list every file a resume reads, and
    scanned for pickled code before the checkpoint is sealed; a bad one leaves nothing behind. A step
    uploaded without a manifest cannot be checked and is restored only when `unchecked` says so (the
    manifest written then makes it look checked later)."""
    import shutil
    import tempfile

    import checkpoint
    where = f"step {step} of {repo_id}@{branch}"
    if problem := checkpoint.run_folder_problem(run_dir):
        raise checkpoint.CheckpointError(problem)
    os.makedirs(os.path.dirname(os.path.abspath(run_dir)), exist_ok=True)
    lock = checkpoint.lock_run(run_dir)  # held until this process ends
    if later := [s for s in checkpoint.saved_steps(run_dir) if s >= step]:
        raise checkpoint.CheckpointError(
            f"{run_dir} already holds step(s) {', '.join(map(str, later[:8]))}, its own work at or after step {step}, "
            f"which restoring {where} would replace or hide. Restore into a new folder (--run-dir "
            f"{run_dir}-from-{step}), or move {run_dir} aside first")
    reachable()
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
            elif not unchecked:
                raise checkpoint.CheckpointError(
                    f"{where} has no {checkpoint.MANIFEST} (uploaded by an older pico-train), so its files cannot "
                    f"be checked for damage; restore it anyway with --unchecked")
            else:
                print(f"warning: {where} has no {checkpoint.MANIFEST}: restored unchecked (--unchecked); the "
                      f"manifest written now records the files as they came")
            checkpoint.scan(target)
            checkpoint.write_manifest(target, step)  # of the files restored
        except checkpoint.CheckpointError as e:  # named as the user knows it, not by the folder deleted now
            shutil.rmtree(target, ignore_errors=True)
            raise checkpoint.CheckpointError(str(e).replace(f"checkpoint {target}", where).replace(target, where)) \
                from None
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        yaml_path = os.path.join(run_dir, "training_config.yaml")
        if not os.path.lexists(yaml_path):  # (a run's own is kept)
            shutil.copy(os.path.join(tmp, "training_config.yaml"), yaml_path + ".tmp")
            os.replace(yaml_path + ".tmp", yaml_path)
        done = checkpoint.commit(run_dir, step, target)  # `latest` -> the restored step, the newest there
    os.close(lock)
    return done


def fetch_step(ref, dest):
    """A step on the Hub that init_from names, REPO@BRANCH:STEP, fetched into dest/step_<STEP> (in
    the new run's folder, which every node sees) at the commits that saved it: the model's files,
    and, where the step has this pico-train's training state and its manifest, those too (a fork of
    all of it). A step without them (pico-train's own: Lightning's pickled state is never fetched)
    is weights alone. Every path is checked to stay inside dest before anything is fetched; the
    caller checks the files (checkpoint.find_parent). Returns the folder."""
    import shutil
    import tempfile

    from huggingface_hub import HfApi
    repo_id, branch, step = HUB_REF.match(ref).groups()
    step = int(step)
    reachable()
    steps = list_steps(repo_id, branch)
    os.makedirs(dest, exist_ok=True)
    tmp, folder = tempfile.mkdtemp(dir=dest), os.path.join(dest, f"step_{step}")
    try:
        download(repo_id, branch, step, "model", tmp, steps)
        state = steps.get(step, {}).get(WHAT["state"][0])
        if state and "training_state/manifest.json" in HfApi().list_repo_files(repo_id, revision=state):
            download(repo_id, branch, step, "state", tmp, steps)
            for name in os.listdir(os.path.join(tmp, "training_state")):
                os.replace(os.path.join(tmp, "training_state", name), os.path.join(tmp, name))
            os.rmdir(os.path.join(tmp, "training_state"))
        shutil.rmtree(os.path.join(tmp, ".cache"), ignore_errors=True)  # huggingface_hub's own bookkeeping
        if os.path.lexists(folder):  # fetched before (a fork that stopped before its first checkpoint)
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def push(run_dir, repo_id=None, timeout=3600.0):
    """Upload what of a run's checkpoints is not on its branch yet (say the Hub was down at the end).
    The repository is repo_id or the run's hf_repo_id, the branch its run_name; both are said first."""
    import checkpoint
    import configurator
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    if problem := checkpoint.run_folder_problem(run_dir):
        raise SystemExit(f"hub.py push: {problem}")
    if not os.path.isdir(checkpoint.checkpoints_dir(run_dir)):
        raise SystemExit(f"hub.py push: {run_dir} is not a run folder (no checkpoints/ in it)")
    settings = configurator.read_yaml(os.path.join(run_dir, "training_config.yaml"))
    repo_id, branch = repo_id or settings.get("hf_repo_id"), settings.get("run_name") or os.path.basename(run_dir)
    if not repo_id:
        raise SystemExit(f"hub.py push: {run_dir}/training_config.yaml names no hf_repo_id (the run was not set up "
                         f"to go to the Hub); name the repository: python hub.py push {run_dir} --repo <you>/<model>")
    try:
        if not isinstance(repo_id, str):
            raise HFValidationError("it is not a string")
        validate_repo_id(repo_id)
        if not isinstance(branch, str) or not re.fullmatch(r"[\w.-]{1,96}", branch):
            raise HFValidationError(f"its run_name {branch!r} is not a branch name")
    except HFValidationError as e:
        raise SystemExit(f"hub.py push: {run_dir}/training_config.yaml: hf_repo_id {repo_id!r} and run_name "
                         f"{branch!r} do not name a repository and branch ({error_line(e)})") from None
    reachable()
    print(f"pushing {run_dir} to {repo_id}@{branch}")
    uploader = Uploader(run_dir, repo_id, branch, log_fn=print)
    return uploader.finish(timeout)


def reachable():
    """Fail fast, in one line, where the Hub cannot be reached at all (the client would retry for
    half a minute before saying so)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        raise SystemExit("hub.py: HF_HUB_OFFLINE is set, and this command needs the Hub: unset it")
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=10).close()
    except OSError as e:
        raise SystemExit(f"hub.py: cannot reach the Hub at {constants.ENDPOINT} ({e.strerror or e}); check the "
                         f"network (or HF_ENDPOINT)") from None


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
    p.add_argument("--unchecked", action="store_true", help="restore a step uploaded without a manifest")
    p = sub.add_parser("push", help="upload what of a run's checkpoints is not on the Hub yet")
    p.add_argument("run_dir")
    p.add_argument("--repo", help="the repository (default: the run's hf_repo_id)")
    return parser.parse_args()


def main(args):
    if args.cmd == "download" and os.path.lexists(args.out):
        import checkpoint
        if problem := checkpoint.run_folder_problem(args.out):  # (the same rule as a run folder's)
            raise SystemExit(f"hub.py download: {problem}")
    if args.cmd in ("list", "download"):
        reachable()  # (restore and push check the local folder first)
    if args.cmd == "list":
        for line in lineage_of(args.repo, args.branch):
            print(f"forked from {line}")
        for step, commits in list_steps(args.repo, args.branch).items():
            print(f"step {step}: " + ", ".join(f"{t} ({cid[:8]})" for t, cid in commits.items()))
    elif args.cmd == "download":
        rev, files = download(args.repo, args.branch, args.step, args.what, args.out)
        print(f"{len(files)} file(s) of step {args.step} at commit {rev[:8]} -> {args.out}")
    elif args.cmd == "restore":
        print(f"restored {restore(args.repo, args.branch, args.step, args.run_dir, args.unchecked)}; "
              f"now run train.py with run_name/runs_dir pointing at {args.run_dir}")
    else:
        raise SystemExit(0 if push(args.run_dir, args.repo) else 1)


if __name__ == "__main__":
    cli = parse_args()
    try:
        main(cli)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - one line, never the token, instead of a traceback
        raise SystemExit(f"hub.py {cli.cmd}: {type(e).__name__}: {error_line(e)}") from None
