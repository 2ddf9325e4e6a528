"""hub.py against a local Hub server (tests/hub_server.py) through the real huggingface_hub client:
commit titles and files per step, step lookup and download at a commit, outages, kill -9 during
uploads, a bad token, and a pico-analyze-style read of a run fetched back from the Hub."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from helpers import ROOT, TINY, max_diff, run_train, weights
from hub_server import HubServer

pytestmark = pytest.mark.slow  # every test here trains or serves a run through the local Hub

REPO = "tester/pico-demo"


@pytest.fixture
def hub(tmp_path):
    server = HubServer().start()
    env = {"HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
           "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": "hf_dummy_test_token",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    server.env = env
    yield server
    try:
        server.stop()
    except Exception:
        pass


def hub_args(run):
    return [f"--run_name={run}", "--save_to_hf=True", f"--hf_repo_id={REPO}", "--max_steps=4"]


def expected_titles(steps, final):
    titles = []
    for s in steps:
        titles.append(f"Saving HF Model -- Step {s}")
        if s == 0:
            titles += ["Saving Tokenizer -- Step 0", "Saving Training Config -- Step 0"]
        titles += [f"Saving Fabric Checkpoint -- Step {s}", f"Saving Evaluation Results -- Step {s}"]
        if s != final:
            titles.append(f"Saving Learning Dynamics Data (train) -- Step {s}")
        titles.append(f"Saving Learning Dynamics Data (val) -- Step {s}")
    return titles


def run_hub_cli(hub, *args):
    return subprocess.run([sys.executable, "hub.py", *args], cwd=ROOT, env={**os.environ, **hub.env},
                          capture_output=True, text=True, timeout=120)


def test_a_pushed_run_has_one_commit_per_artefact_and_is_read_and_resumed_from_the_hub(tmp_path, hub):
    # with a log-spaced checkpoint (step 1) besides the regular ones (0, 2, 4)
    proc = run_train(tmp_path, *hub_args("pushed"), "--hf_collection_slug=tester/pico-runs-0123",
                     "--save_log_spaced_until=1", env=hub.env)
    assert "hub: everything is on" in proc.stdout
    assert hub.state.collections == {"tester/pico-runs-0123": [REPO]}
    assert "hf_dummy_test_token" not in proc.stdout + proc.stderr
    titles = [t for t, _ in hub.titles(REPO, "pushed")][1:]  # after the repo's initial commit
    assert titles == expected_titles([0, 1, 2, 4], final=4)
    root = hub.files(REPO, "pushed")
    assert not [p for p in root if p.startswith("learning_dynamics/train_")]  # stale train files deleted
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_config.yaml",
            "training_state/training_state.pt", "eval_results/step_4.json",
            "learning_dynamics/val_activations.pt"} <= set(root)
    local = tmp_path / "pushed" / "checkpoints"
    assert root["model.safetensors"] == (local / "step_4" / "model.safetensors").read_bytes()

    listing = run_hub_cli(hub, "list", REPO, "--branch", "pushed")
    assert listing.returncode == 0, listing.stderr
    assert [line.split(":")[0] for line in listing.stdout.splitlines()] == ["step 0", "step 1", "step 2", "step 4"]
    for step in (0, 1, 2, 4):  # every step's dynamics, fetched at its commit, equal the bytes on disk
        out = tmp_path / f"dl{step}"
        proc = run_hub_cli(hub, "download", REPO, "--branch", "pushed", "--step", str(step), "--what", "dynamics",
                           "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        for split in (("val",) if step == 4 else ("train", "val")):
            for kind in ("activations", "weights", "gradients"):
                name = f"{split}_{kind}.pt"
                assert (out / "learning_dynamics" / name).read_bytes() == \
                    (local / f"step_{step}" / "learning_dynamics" / name).read_bytes(), (step, name)

    # read back as pico-analyze reads a run: the config, then a step's dynamics at its commit
    from test_dynamics import read_like_pico_analyze
    proc = run_hub_cli(hub, "download", REPO, "--branch", "pushed", "--step", "2", "--what", "config",
                       "--out", str(tmp_path / "dl2"))
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(open(tmp_path / "dl2" / "training_config.yaml"))
    assert cfg["model"]["d_model"] == 32 and cfg["checkpointing"]["run_name"] == "pushed"
    for split in ("train", "val"):
        read_like_pico_analyze(tmp_path / "dl2" / "learning_dynamics", split, 2)

    # restored elsewhere from step 2, the run resumes and ends where the original did
    elsewhere = tmp_path / "elsewhere"
    proc = run_hub_cli(hub, "restore", REPO, "--branch", "pushed", "--step", "2",
                       "--run-dir", str(elsewhere / "pushed"))
    assert proc.returncode == 0, proc.stderr
    proc = run_train(elsewhere, "--run_name=pushed", "--max_steps=4", "--save_log_spaced_until=1")
    assert "resumed from" in proc.stdout
    assert max_diff(weights(tmp_path, "pushed", 4), weights(elsewhere, "pushed", 4)) == 0.0


def test_outage_mid_run_loses_nothing(tmp_path, hub):
    args = hub_args("outage") + ["--max_steps=8", "--save_every_n_steps=2", "--hf_wait_at_end_s=120"]
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, f"--runs_dir={tmp_path}", *args], cwd=ROOT,
                            env={**os.environ, **hub.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    def outage_titles():
        have = REPO in hub.state.repos and "outage" in hub.state.repos[REPO]["branches"]
        return hub.titles(REPO, "outage") if have else []
    while not any(t.startswith("Saving HF Model -- Step 0") for t, _ in outage_titles()):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    hub.stop()
    while not (tmp_path / "outage" / "checkpoints" / "step_4").exists():
        assert proc.poll() is None, "training stopped during the outage"
        time.sleep(0.1)
    hub.start()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "hub: everything is on" in out, out[-3000:]
    titles = [t for t, _ in hub.titles(REPO, "outage")][1:]
    assert titles == expected_titles([0, 2, 4, 6, 8], final=8)  # all, once each, in order


def test_kill_during_upload_then_restart_uploads_everything_once(tmp_path, hub):
    args = hub_args("killed") + ["--max_steps=4"]
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, f"--runs_dir={tmp_path}", *args], cwd=ROOT,
                            env={**os.environ, **hub.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while sum(1 for m, p in hub.state.requests if "/commit/" in p) < 3:  # mid-way through the uploads
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(hub.titles(REPO, "killed")) - 1 < len(expected_titles([0, 2, 4], final=4))  # cut short
    assert not [f for _, _, files in os.walk(tmp_path) for f in files if "queue" in f]  # the run folder is the queue
    out = run_train(tmp_path, *args, env=hub.env).stdout
    assert "left from an earlier session" in out
    titles = [t for t, _ in hub.titles(REPO, "killed")][1:]
    assert titles == expected_titles([0, 2, 4], final=4)


def test_bad_token_is_reported_once_and_training_goes_on(tmp_path, hub):
    proc = run_train(tmp_path, *hub_args("badtoken"), env={**hub.env, "HF_TOKEN": "bad"})
    assert proc.stdout.count("the Hub refused (401)") == 1
    assert "NOT uploaded" in proc.stdout and "hub.py push" in proc.stdout
    assert os.path.exists(tmp_path / "badtoken" / "checkpoints" / "step_4" / "model.safetensors")
    assert "Bearer" not in proc.stdout
    # later, with a good token, `hub.py push` uploads what is queued
    push = run_hub_cli(hub, "push", str(tmp_path / "badtoken"))
    assert push.returncode == 0, push.stdout + push.stderr
    assert [t for t, _ in hub.titles(REPO, "badtoken")][1:] == expected_titles([0, 2, 4], final=4)


def test_restore_refuses_damaged_hostile_and_pickled_steps(tmp_path, hub):
    from helpers import plant_pickle
    run_train(tmp_path, *hub_args("shared"), "--max_steps=2", env=hub.env)
    local = tmp_path / "shared" / "checkpoints" / "step_2"
    elsewhere = tmp_path / "elsewhere" / "shared"

    def restore():
        proc = run_hub_cli(hub, "restore", REPO, "--branch", "shared", "--step", "2", "--run-dir", str(elsewhere))
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert not os.path.exists(elsewhere / "checkpoints" / "step_2")  # nothing sealed, nothing left half-done
        assert not [n for n in os.listdir(elsewhere / "checkpoints") if n.endswith(".tmp")]
        line = proc.stderr.strip().splitlines()[-1]
        assert ".tmp" not in line, line  # named as the user knows it, not by the folder deleted meanwhile
        return line

    # 1. flipped bytes (same size) in the model on the Hub: the uploaded manifest catches them
    raw = bytearray((local / "model.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    hub.plant(REPO, "shared", "Saving HF Model -- Step 2", {"model.safetensors": bytes(raw)})
    assert "model.safetensors has the right size but not the content" in restore()
    hub.plant(REPO, "shared", "Saving HF Model -- Step 2",
              {"model.safetensors": (local / "model.safetensors").read_bytes()})

    # 2. a path that climbs out of the target folder: refused before anything is downloaded
    outside = tmp_path / "escaped.txt"
    climb = "training_state/" + "../" * (len(outside.parents) + 2) + str(outside).lstrip("/")
    hub.plant(REPO, "shared", "Saving Fabric Checkpoint -- Step 2", {climb: b"written outside"})
    line = restore()
    assert "refusing the repository file" in line and "outside" in line, line
    assert not outside.exists()
    proc = run_hub_cli(hub, "download", REPO, "--branch", "shared", "--step", "2", "--what", "state",
                       "--out", str(tmp_path / "dl"))
    assert proc.returncode != 0 and "refusing the repository file" in proc.stderr and not outside.exists()

    # 3. a training state whose pickle runs a command, with the manifest fixed up to match
    repo = hub.state.repos[REPO]
    del repo["commits"][repo["branches"]["shared"]]["files"][climb]
    marker = tmp_path / "pwned"
    evil = tmp_path / "training_state.pt"
    plant_pickle(evil, marker)
    manifest = json.loads((local / "manifest.json").read_text())
    manifest["files"]["training_state.pt"] = {"bytes": evil.stat().st_size,
                                              "sha256": hashlib.sha256(evil.read_bytes()).hexdigest()}
    hub.plant(REPO, "shared", "Saving Fabric Checkpoint -- Step 2", {
        "training_state/training_state.pt": evil.read_bytes(),
        "training_state/manifest.json": json.dumps(manifest).encode()})
    line = restore()
    assert "refusing to load" in line and "training_state.pt" in line and not marker.exists(), line

    # 4. a step uploaded without its manifest: not restored as if checked, unless asked to
    hub.plant(REPO, "shared", "Saving Fabric Checkpoint -- Step 2",
              {"training_state/training_state.pt": (local / "training_state.pt").read_bytes()})
    del repo["commits"][repo["branches"]["shared"]]["files"]["training_state/manifest.json"]
    line = restore()
    assert "has no manifest.json" in line and "--unchecked" in line, line
    proc = run_hub_cli(hub, "restore", REPO, "--branch", "shared", "--step", "2", "--run-dir", str(elsewhere),
                       "--unchecked")
    assert proc.returncode == 0 and "restored unchecked" in proc.stdout, proc.stderr[-2000:]


def test_no_hub_command_prints_the_token(tmp_path, hub):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "training_config.yaml").write_text(f"checkpointing:\n  hf_repo_id: {REPO}\n  run_name: leaky\n")
    hub.state.echo_token = True  # every answer is a 403 that repeats the Authorization header
    token = hub.env["HF_TOKEN"]
    for args in (["list", REPO, "--branch", "leaky"],
                 ["download", REPO, "--branch", "leaky", "--step", "0", "--out", str(tmp_path / "dl")],
                 ["restore", REPO, "--branch", "leaky", "--step", "0", "--run-dir", str(tmp_path / "re")],
                 ["push", str(run)]):
        proc = run_hub_cli(hub, *args)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "403" in out and "Authorization: Bearer ***" in out, (args, out[-2000:])
        assert token not in out and "Traceback" not in out, (args, out[-2000:])


def test_a_refused_dataset_read_is_one_line_without_the_token(tmp_path, hub):
    hub.state.echo_token = True  # a 403 that repeats the Authorization header
    proc = run_train(tmp_path, "--dataset_name=tester/private-data", env=hub.env, check=False)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert line.startswith("data error: listing files of tester/private-data on the Hub: the Hub refused"), line
    assert hub.env["HF_TOKEN"] not in proc.stdout + proc.stderr and "***" in line


def test_a_changed_model_goes_up_with_the_model_py_that_reads_it(tmp_path):
    """A checkpoint in the pico-decoder's own format (model.py changed) carries its model.py in the
    model commit; a Llama checkpoint after it removes that copy from the branch."""
    import hub
    step_dir = tmp_path / "run" / "checkpoints" / "step_3"
    step_dir.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors", "model.py", "training_state.pt"):
        (step_dir / name).write_text(name)
    model_commit, state_commit = hub.plan_commits(str(tmp_path / "run"), 3)[:2]
    assert set(model_commit["files"]) == {"config.json", "generation_config.json", "model.safetensors", "model.py"}
    assert set(state_commit["files"]) == {"training_state/training_state.pt"}
    assert model_commit["delete"] == ["model.py"]  # replaced when there, removed when a step has none


def test_the_hub_holds_the_local_bytes_and_restore_never_replaces_local_work(tmp_path, hub):
    run = tmp_path / "again"
    run_train(tmp_path, *hub_args("again"), "--max_steps=2", env=hub.env)
    first = len(hub.titles(REPO, "again"))
    # the run started over (auto_resume=False keeps the old one aside) with another lr: what differs goes up again
    proc = run_train(tmp_path, *hub_args("again"), "--max_steps=2", "--auto_resume=False", "--lr=1e-3", env=hub.env)
    assert "hub: Saving HF Model -- Step 2: uploaded again (the branch held other bytes" in proc.stdout
    assert "hub: everything is on" in proc.stdout
    new = [t for t, _ in hub.titles(REPO, "again")][first:]
    assert "Saving Fabric Checkpoint -- Step 0" in new and "Saving Training Config -- Step 0" in new  # another lr
    assert "Saving HF Model -- Step 0" not in new  # the same weights at step 0 (the same seed): not again
    assert "Saving HF Model -- Step 2" in new and "Saving Learning Dynamics Data (val) -- Step 2" in new
    for step in (0, 2):  # what a download of each step gets is what is on disk now
        proc = run_hub_cli(hub, "download", REPO, "--branch", "again", "--step", str(step), "--what", "state",
                           "--out", str(tmp_path / f"dl{step}"))
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / f"dl{step}" / "training_state" / "training_state.pt").read_bytes() == \
            (run / "checkpoints" / f"step_{step}" / "training_state.pt").read_bytes()

    # commits that do not state their content (pico-train's own) are compared file by file: git ids, LFS sha256
    for commit in hub.state.repos[REPO]["commits"].values():
        commit["message"] = ""
    count = len(hub.titles(REPO, "again"))
    push = run_hub_cli(hub, "push", str(run))
    assert push.returncode == 0 and "everything is on" in push.stdout and len(hub.titles(REPO, "again")) == count
    (run / "eval_results" / "step_2.json").write_text('{"loss": 1.5}')  # edited here: not what the Hub holds
    push = run_hub_cli(hub, "push", str(run))
    assert push.returncode == 0 and "step(s) 2 here differ" in push.stdout, push.stdout + push.stderr
    assert [t for t, _ in hub.titles(REPO, "again")][count:] == ["Saving Evaluation Results -- Step 2"]

    # restore onto a run holding that step or a later one: refused, and nothing of the run changes
    def snapshot():
        return {str(p): p.read_bytes() for p in run.rglob("*") if p.is_file()}, os.readlink(run / "checkpoints" /
                                                                                           "latest")
    before = snapshot()
    for step in ("0", "2"):
        proc = run_hub_cli(hub, "restore", REPO, "--branch", "again", "--step", step, "--run-dir", str(run))
        line = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert f"already holds step(s) {'0, 2' if step == '0' else '2'}" in line and "--run-dir" in line, line
    assert snapshot() == before
    # ... onto a run in use: its lock is held
    fresh = tmp_path / "fresh"
    holder = subprocess.Popen([sys.executable, "-c", "import checkpoint, sys, time; checkpoint.lock_run(sys.argv[1]);"
                               " print('held', flush=True); time.sleep(120)", str(fresh)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_hub_cli(hub, "restore", REPO, "--branch", "again", "--step", "2", "--run-dir", str(fresh))
        assert proc.returncode != 0 and "is in use by process" in proc.stderr and not fresh.exists(), proc.stderr
    finally:
        holder.kill()
    # ... and never through a link: a dangling training_config.yaml, a linked step for push
    fresh.mkdir()
    os.symlink(tmp_path / "planted.yaml", fresh / "training_config.yaml")
    proc = run_hub_cli(hub, "restore", REPO, "--branch", "again", "--step", "2", "--run-dir", str(fresh))
    assert proc.returncode != 0 and "training_config.yaml is a symbolic link" in proc.stderr, proc.stderr
    assert not (tmp_path / "planted.yaml").exists() and not (fresh / "checkpoints").exists()
    os.symlink(tmp_path / "dl2", run / "checkpoints" / "step_9")
    push = run_hub_cli(hub, "push", str(run))
    assert push.returncode != 0 and "step_9 is a symbolic link" in push.stderr, push.stderr


def test_a_run_forks_from_a_step_on_the_hub_ours_or_pico_trains(tmp_path, hub):
    """init_from=REPO@BRANCH:STEP: one of our steps (weights, optimizer, data position, RNG: the same
    run on from there, bit for bit) or a pico-train repository's (its weights alone; Lightning's
    pickled state is never fetched); the fork's commits and `hub.py list` name where it came from."""
    run_train(tmp_path, *hub_args("src"), "--max_steps=2", env=hub.env)
    proc = run_train(tmp_path, *hub_args("fromhub"), "--max_steps=2", f"--init_from={REPO}@src:0", env=hub.env)
    assert f"forked from {REPO}@src:0 (step 0, manifest sha256 " in proc.stdout
    assert max_diff(weights(tmp_path, "src", 2), weights(tmp_path, "fromhub", 2)) == 0.0
    listing = run_hub_cli(hub, "list", REPO, "--branch", "fromhub")
    assert listing.stdout.startswith(f"forked from {REPO}@src:0 (step 0, manifest sha256 "), listing.stdout
    # a pico-train repository: its branch holds the run's commits, with pico-train's titles
    from helpers import pico_train_checkpoint, plant_pickle
    from model import load_pretrained
    from test_model import reference_pico_train_logits
    sd, cfg = pico_train_checkpoint(tmp_path / "theirs", seed=7)
    plant_pickle(tmp_path / "fabric.pt", tmp_path / "pwned")
    hub.create("pico-lm/pico-decoder-tiny")
    hub.state.repos["pico-lm/pico-decoder-tiny"]["branches"]["pico-decoder-tiny-1"] = \
        hub.state.repos["pico-lm/pico-decoder-tiny"]["branches"]["main"]
    hub.plant("pico-lm/pico-decoder-tiny", "pico-decoder-tiny-1", "Saving HF Model -- Step 1000",
              {name: (tmp_path / "theirs" / name).read_bytes() for name in ("config.json", "model.safetensors")})
    hub.plant("pico-lm/pico-decoder-tiny", "pico-decoder-tiny-1", "Saving Fabric Checkpoint -- Step 1000",
              {"fabric_state/checkpoint.pt": (tmp_path / "fabric.pt").read_bytes()})
    ref = "pico-lm/pico-decoder-tiny@pico-decoder-tiny-1:1000"
    proc = run_train(tmp_path, "--run_name=tiny-tuned", f"--init_from={ref}", "--max_steps=0", env=hub.env)
    assert f"forked from {ref} (weights alone, model.safetensors sha256 " in proc.stdout
    assert not (tmp_path / "pwned").exists() and not list(tmp_path.glob("tiny-tuned/parent/**/*.pt"))
    ids = torch.randint(0, 50304, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_pretrained(tmp_path / "tiny-tuned" / "checkpoints" / "step_0")(ids)[0]
    reference = reference_pico_train_logits(sd, cfg, ids)
    assert (ours - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()
    # a step the branch does not have, and no Hub at all: one line each
    proc = run_train(tmp_path, "--run_name=nostep", f"--init_from={REPO}@src:7", env=hub.env, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and \
        f"init_from '{REPO}@src:7': {REPO}@src has no step 7" in proc.stderr.strip().splitlines()[-1], proc.stderr
    proc = run_train(tmp_path, "--run_name=offline", f"--init_from={REPO}@src:0", check=False)
    assert proc.returncode != 0 and "HF_HUB_OFFLINE is set" in proc.stderr.strip().splitlines()[-1], proc.stderr
