"""train.py end to end on a tiny model: accumulation and DDP against a single process, the
schedule's defining points, config handling, determinism, wandb offline."""

import glob
import json
import math
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from helpers import ROOT, TINY, busy_at_shutdown_env, max_diff, metrics, run_train, train_py_settings, weights
from hub_server import HubServer


def test_gradient_accumulation_is_exact(tmp_path, reference_run):
    ref = reference_run()  # 2 micro-steps of 4 sequences
    run_train(tmp_path, "--run_name=one", "--gradient_accumulation_steps=1")  # one micro-step of 8
    assert max_diff(weights(tmp_path, "one", 4), weights(ref, "ref", 4)) <= 1e-6
    assert max_diff(weights(tmp_path, "one", 0), weights(tmp_path, "one", 4)) > 1e-3  # it trained


def hub_copy_of_the_demo(server, files=5, per_file=8):
    """The demo corpus's first sequences of 64 + 1 tokens (those the tiny model trains on, in the same
    order) as a Hub dataset of `files` files of `per_file` rows (8: one step each)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    import data
    rows = np.array(pq.read_table(os.path.join(ROOT, "data/demo/train.parquet")).slice(0, 2)["input_ids"].to_pylist())
    ids = data.to_windows(rows, 64)  # 2 rows of 2049 tokens: 64 sequences
    server.create("datasets/tester/demo")
    planted = {}
    for f in range(files):
        sink = pa.BufferOutputStream()
        part = ids[f * per_file:(f + 1) * per_file]
        pq.write_table(pa.table({"input_ids": pa.array(list(part), type=pa.list_(pa.int32()))}), sink)
        planted[f"data/train-{f}.parquet"] = sink.getvalue().to_pybytes()
    server.plant("datasets/tester/demo", "main", "data", planted)


# that dataset as train.py's settings, and the environment that points the Hub client at the stand-in
HUB_DEMO = ("--dataset_name=tester/demo", "--eval_dataset_name=data/demo", "--eval_dataset_split=validation")


def hub_env(server, tmp_path):
    return {"HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(tmp_path / "hf")}


def test_ddp_two_processes_match_one(tmp_path, reference_run):
    """Two processes equal one; and they read the same sequences from the Hub (the local server):
    each file downloaded once for the node, the one ahead in the background, passed ones removed. And the
    run ends cleanly whatever a thread is doing in torch when the ranks exit."""
    server = HubServer().start()
    hub_copy_of_the_demo(server)
    ref = reference_run()
    run_train(tmp_path, "--run_name=ddp", "--gradient_accumulation_steps=1", *HUB_DEMO,
              f"--data_cache_dir={tmp_path / 'cache'}", "--data_cache_gb=0", nproc=2,
              env={**hub_env(server, tmp_path), **busy_at_shutdown_env(tmp_path)})
    server.stop()
    gets = [p.split("/")[-1] for m, p in server.state.requests if m == "GET" and "/resolve/" in p]
    assert sorted(gets) == [f"train-{f}.parquet" for f in range(5)]  # 4 steps read 4 files; the 5th came ahead
    assert sorted(f for _, _, fs in os.walk(tmp_path / "cache") for f in fs if f.endswith(".parquet")) == \
        ["train-2.parquet", "train-3.parquet", "train-4.parquet"]  # data_cache_gb=0: the last step's files
    # (it began at the end of file 2 and read file 3) and the next; files 0 and 1 were removed
    assert max_diff(weights(ref, "ref", 4), weights(tmp_path, "ddp", 4)) <= 1e-5
    single, ddp = metrics(ref, "ref"), metrics(tmp_path, "ddp")
    assert [m["step"] for m in single] == [m["step"] for m in ddp]
    for a, b in zip(single, ddp, strict=True):
        for key in ("loss", "eval/loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5, (a, b)


def test_four_processes_with_the_demo_batch_arithmetic_resume_on_two(tmp_path, reference_run):
    # the launch users name: torchrun --nproc_per_node=4 train.py config/demo.py (sub-batch 8 / (2 x 4) = 1);
    # its checkpoint resumed on 2 ranks (and ZeRO-2) continues as if uninterrupted: allocations change size
    pytest.importorskip("deepspeed")
    ref = reference_run()
    proc = run_train(tmp_path, "--run_name=four", "--stop_at_step=2", nproc=4)
    assert "2 micro-steps x 4 ranks x sub-batch 1" in proc.stdout
    assert max_diff(weights(ref, "ref", 2), weights(tmp_path, "four", 2)) <= 1e-5
    proc = run_train(tmp_path, "--run_name=four", "--backend=deepspeed", nproc=2)
    assert "world_size: 4 -> 2" in proc.stdout and "backend: 'ddp' -> 'deepspeed'" in proc.stdout
    assert max_diff(weights(ref, "ref", 4), weights(tmp_path, "four", 4)) <= 1e-5


def two_nodes(runs_dirs, *args, timeout=120, caches=None, env=None):
    """Two torchrun "nodes" of one process each on this machine, meeting through torchrun's c10d
    rendezvous on 127.0.0.1 as nodes of a cluster do; node i writes to runs_dirs[i] (and caches a Hub
    dataset in caches[i])."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={i}", "--nproc_per_node=1",
         "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "train.py", *TINY, f"--runs_dir={runs_dirs[i]}",
         *args, *([f"--data_cache_dir={caches[i]}"] if caches else [])], cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    return [(p.returncode, out, err) for p in procs for out, err in [p.communicate(timeout=timeout)]]


def test_two_nodes_need_one_shared_runs_dir_and_then_train_as_one_process(tmp_path, reference_run):
    """Rank 0 alone writes checkpoints and every rank reads them, so runs_dir must be shared by the
    nodes. Each node with its own: both stop at start with one line. Sharing one: 2 nodes train as
    2 processes on one node do, stop and resume bit-identically, and match one process."""
    t0 = time.time()
    server = HubServer().start()  # (a Hub dataset, each node caching it apart: that check passes, before this one)
    hub_copy_of_the_demo(server)
    for code, _, err in two_nodes([tmp_path / "node0", tmp_path / "node1"], "--run_name=apart", *HUB_DEMO,
                                  caches=[tmp_path / "cache0", tmp_path / "cache1"], env=hub_env(server, tmp_path)):
        assert code != 0 and "runs_dir must be on a filesystem that every node shares" in err, err[-3000:]
        assert "cannot start: 1 of 2 ranks cannot see the run folder" in err
    server.stop()
    assert time.time() - t0 < 60
    assert not (tmp_path / "node0" / "apart").exists()  # rank 0's empty run folder is not left behind
    args = ("--max_steps=12", "--save_every_n_steps=5", "--gradient_accumulation_steps=1")  # as test_newcomer's
    for extra in (["--stop_at_step=3"], []):
        for code, out, err in two_nodes([tmp_path, tmp_path], "--run_name=shared", *args, *extra):
            assert code == 0, out[-2000:] + err[-3000:]
    final = weights(tmp_path, "shared", 12)
    assert max_diff(weights(reference_run(*args, nproc=2), "ref", 12), final) == 0.0
    assert max_diff(weights(reference_run(*args), "ref", 12), final) <= 1e-5


def test_two_nodes_refuse_a_shared_data_cache(tmp_path):
    """Each node's first rank downloads a Hub dataset's files into data_cache_dir and removes those
    passed: two nodes sharing the folder would fetch and remove the same files, so both stop at start
    with one line naming it. (Each with its own: test_two_nodes_need_one_shared_runs_dir... gets past it.)"""
    server = HubServer().start()
    hub_copy_of_the_demo(server)
    shared = tmp_path / "cache"
    for code, out, err in two_nodes([tmp_path, tmp_path], "--run_name=shared", *HUB_DEMO, caches=[shared, shared],
                                    env=hub_env(server, tmp_path)):
        assert code != 0, out[-2000:]
        assert f"data error: data_cache_dir {shared} is shared by 2 nodes: " in err, err[-3000:]
    server.stop()
    assert not [f for f in os.listdir(shared) if f.startswith(".pico-node")]  # the marks are gone
    assert not (tmp_path / "shared").exists()  # stopped before the run folder was made


@pytest.mark.parametrize("config", sorted(os.path.basename(c) for c in glob.glob(os.path.join(ROOT, "config", "*.py"))))
def test_every_config_splits_its_batch_or_names_the_choices(config):
    import configurator
    s = train_py_settings(os.path.join("config", config))
    for world in (1, 2, 4, 8, 16, 32):
        try:
            sub = configurator.batch_split(s["batch_size"], s["gradient_accumulation_steps"], world)
        except ValueError as e:
            assert not config.startswith("pico_decoder"), (config, world, e)  # published shapes fit 1-32 GPUs
            msg = str(e)
            assert "\n" not in msg and msg.startswith(f"batch_size {s['batch_size']} is not divisible"), msg
            choices = re.findall(r"(\d+) \(sub-batch (\d+)\)", msg)
            assert choices or f"make batch_size a multiple of {world}" in msg, msg
            for accum, sub in choices:  # each choice named does split the batch so
                assert int(accum) * world * int(sub) == s["batch_size"], msg
                assert configurator.batch_split(s["batch_size"], int(accum), world) == int(sub)
        else:
            assert sub >= 1 and s["gradient_accumulation_steps"] * world * sub == s["batch_size"]
    if config.startswith("pico_decoder"):  # the published shape: 4 nodes x 4 GPUs, 8 rows per GPU (tiny: 16)
        assert s["batch_size"] == 1024 and s["max_seq_len"] == 2048
        assert configurator.batch_split(1024, s["gradient_accumulation_steps"], 16) == (16 if "tiny" in config else 8)
        assert s["learning_dynamics_batch_size"] == (256 if "tiny" in config else 128)


def test_the_default_backend_is_ddp_unless_the_adamw_state_fills_the_gpus():
    """backend="auto" on several GPUs: DDP (it sends 1/8.5 of ZeRO-2's bytes at 8 micro-steps, as bench.py
    measures) wherever the 16 bytes a parameter of fp32 weights, gradients and AdamW take at most half a
    GPU: every published size on 80 GB GPUs and on 24 GB ones; large on 16 GB ones gets ZeRO-2."""
    import configurator
    from model import ModelConfig, PicoDecoder
    sizes = {}
    for name in ("tiny", "small", "medium", "large"):
        s = train_py_settings(os.path.join("config", f"pico_decoder_{name}.py"))
        with torch.device("meta"):
            sizes[name] = PicoDecoder(ModelConfig(**{k: s[k] for k in ModelConfig.__dataclass_fields__})).num_params()
    gb = 2**30
    assert {n: configurator.auto_backend(p, 16, 80 * gb) for n, p in sizes.items()} == dict.fromkeys(sizes, "ddp")
    assert {n: configurator.auto_backend(p, 16, 24 * gb) for n, p in sizes.items()} == dict.fromkeys(sizes, "ddp")
    assert configurator.auto_backend(sizes["large"], 16, 16 * gb) == "deepspeed"
    assert configurator.auto_backend(sizes["medium"], 16, 16 * gb) == "ddp"
    assert configurator.auto_backend(sizes["large"], 1, 16 * gb) == "ddp"  # one GPU: nothing to shard across
    assert configurator.auto_backend(sizes["large"], 16, None) == "ddp"  # CPU processes


def test_run_folder_layout_and_config_yaml(reference_run):
    run = reference_run("--max_steps=2") / "ref"
    cfg = yaml.safe_load(open(run / "training_config.yaml"))
    assert cfg["model"]["d_model"] == 32 and cfg["model"]["attention_n_kv_heads"] == 1
    assert cfg["checkpointing"]["run_name"] == "ref" and cfg["data"]["batch_size"] == 8
    import configurator
    in_yaml = [k for section in cfg.values() for k in section if k not in ("model_type", "world_size")]
    assert sorted(in_yaml) == sorted(configurator.sections(os.path.join(ROOT, "train.py")))  # every setting, once
    assert cfg["training"]["lr"] == 3e-3 and cfg["evaluation"]["eval_max_rows"] == 1
    assert "layer_suffixes" in cfg["checkpointing"]
    assert sorted(os.listdir(run / "eval_results")) == ["step_0.json", "step_2.json"]
    ev = json.load(open(run / "eval_results" / "step_2.json"))
    assert ev["paloma"] > 1 and ev["loss"] > 0 and ev["rows"] == 32  # 1 row of 2049 = 32 windows of 64
    assert os.readlink(run / "checkpoints" / "latest") == "step_2"
    for step in (0, 2):
        files = os.listdir(run / "checkpoints" / f"step_{step}")
        assert {"config.json", "model.safetensors", "tokenizer.json", "training_state.pt"} <= set(files)
    assert "step 2/2 | loss" in open(run / "logs" / "train.log").read()


def test_the_learning_rate_schedules_hit_their_defining_points(tmp_path, reference_run):
    """train.py's get_lr, seen where it acts: the lr logged at step N is the one the optimizer step
    N-1 -> N used. Linear warmup over 2 steps, then linear decay to 0 at max_steps (the tiny
    reference: 4 steps) or cosine decay to lr * min_lr_ratio (6 steps, min_lr_ratio 0.1)."""
    def logged(runs, run):
        lr = yaml.safe_load(open(runs / run / "training_config.yaml"))["training"]["lr"]
        return [m["lr"] / lr for m in metrics(runs, run) if "lr" in m]
    assert logged(reference_run(), "ref") == pytest.approx([0.5, 1.0, 1.0, 0.5])  # decay reaches 0 at step 4
    run_train(tmp_path, "--run_name=cos", "--lr_scheduler=cosine", "--min_lr_ratio=0.1", "--max_steps=6",
              "--save_every_n_steps=6", "--layer_suffixes=")
    cos = [0.1 + 0.9 * (1 + math.cos(math.pi * p)) / 2 for p in (0, 0.25, 0.5, 0.75)]  # progress after warmup
    assert logged(tmp_path, "cos") == pytest.approx([0.5, 1.0] + cos) and cos[2] == pytest.approx(0.55)


@pytest.mark.parametrize("args,message", [
    (["--lerning_rate=1"], "unknown setting 'lerning_rate'"),
    (["--lr_warmup=5"], "did you mean lr_warmup_steps"),
    (["--max_steps=2.5"], "max_steps must be a whole number"),
    (["--auto_resume=yes"], "auto_resume must be True or False"),
    (["--layer_suffixes=3"], "layer_suffixes must be a list of names"),
    (["--batch_size=9"], "batch_size 9 is not divisible by gradient_accumulation_steps 2 x world_size 1 = 2; with 1 "
                         "rank(s), gradient_accumulation_steps can be 1 (sub-batch 9), 3 (sub-batch 3), "
                         "9 (sub-batch 1)"),
])
def test_config_errors_are_clear(tmp_path, args, message):
    proc = run_train(tmp_path, *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_a_runs_training_config_yaml_trains_it_again(tmp_path, reference_run):
    """python train.py <run>/training_config.yaml: the same settings, so the same weights, bit for bit
    (run_train's own settings come first; the YAML's replace them all, then the new name)."""
    ref = reference_run("--max_steps=2")
    run_train(tmp_path, str(ref / "ref" / "training_config.yaml"), f"--runs_dir={tmp_path}", "--run_name=again")
    assert max_diff(weights(ref, "ref", 2), weights(tmp_path, "again", 2)) == 0.0


@pytest.mark.parametrize("text,message", [
    ("training:\n  lr: !!python/object/apply:os.system ['touch {marker}']\n", "is not plain YAML"),  # never runs
    ("data:\n  dataloader:\n    batch_size: 32\n", "data.dataloader is nested deeper than training_config.yaml"),
    ("- lr: 1\n", "is not laid out as training_config.yaml is"),
])
def test_a_yaml_config_runs_no_code_and_must_have_the_runs_layout(tmp_path, text, message):
    import configurator
    marker = tmp_path / "ran"
    (tmp_path / "c.yaml").write_text(text.format(marker=marker))
    with pytest.raises(SystemExit, match=message):
        configurator.read_yaml(str(tmp_path / "c.yaml"))
    assert not marker.exists()


@pytest.mark.slow
def test_overrides_are_typed_and_saved(tmp_path):
    run_train(tmp_path, "--run_name=typed", "--max_steps=1", "--lr=2e-3", "--weight_decay=0",
              "--layer_suffixes=attention.v_proj,swiglu.w_2", "--eval_every_n_steps=0")
    cfg = yaml.safe_load(open(tmp_path / "typed" / "training_config.yaml"))
    assert cfg["training"]["lr"] == 0.002 and cfg["training"]["weight_decay"] == 0.0
    assert cfg["checkpointing"]["layer_suffixes"] == ["attention.v_proj", "swiglu.w_2"]


def test_config_file_with_unknown_key_fails(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("d_model = 64\nn_layer = 3\n")  # nanoGPT's name for it: ours is named
    proc = run_train(tmp_path, str(bad), check=False)
    assert "unknown setting 'n_layer'; here it is n_layers (python train.py --help" in proc.stderr
    import configurator
    names = list(configurator.sections(os.path.join(ROOT, "train.py")))
    assert "did you mean n_layers" in str(configurator.unknown("n_layerz", names))  # a typo: the closest names


def wandb_records(path):
    """Records of a .wandb file: a 7-byte header, then LevelDB-style log records (crc32, length,
    type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    raw, pos, records, pending = open(path, "rb").read(), 7, [], b""
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # block trailer too small for a header: padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        payload, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(payload)
        elif kind in (2, 3):
            pending += payload
        elif kind == 4:
            records.append(pending + payload)
            pending = b""
    return records


@pytest.mark.slow
def test_wandb_offline_records_the_metrics(tmp_path):
    pytest.importorskip("wandb")
    run_train(tmp_path, "--run_name=wb", "--max_steps=2", "--save_to_wandb=True", "--wandb_project=pico-test",
              env={"WANDB_MODE": "offline", "WANDB_API_KEY": ""})
    files = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    from wandb.proto import wandb_internal_pb2
    history = []
    for record in wandb_records(files[0]):
        pb = wandb_internal_pb2.Record()
        pb.ParseFromString(record)
        if pb.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in pb.history.item})
    logged = metrics(tmp_path, "wb")
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses == [m["loss"] for m in logged if "loss" in m] and len(losses) == 2
    assert any("eval/paloma" in h for h in history)


def test_wandb_online_without_key_fails_at_once(tmp_path):
    pytest.importorskip("wandb")
    proc = run_train(tmp_path, "--run_name=nokey", "--save_to_wandb=True", check=False, timeout=60,
                     env={"WANDB_MODE": "online", "WANDB_API_KEY": "", "NETRC": str(tmp_path / "none"),
                          "HOME": str(tmp_path)})
    assert proc.returncode != 0 and "no wandb key" in proc.stderr
