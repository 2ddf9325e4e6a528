"""
How fast is pico-train? One script, one table.

    python bench.py            # CPU: about 6 minutes, prints the table of docs/performance.md#the-table
    python bench.py --gpu      # one CUDA GPU: pico-decoder small and medium, bf16, seq 2048, MFU
    python bench.py --gpu --smoke   # the GPU table's code at toy size on any device (a test)

Rows (CPU default):
  model A/B    forward+backward at pico-decoder-tiny shape (T=2048, fp32), ours vs transformers'
               LlamaForCausalLM (sdpa) holding the same weights, interleaved in one process;
               the ratio is reported with its spread over the repetitions; peak memory and page
               faults of each; SDPA alone at that shape (the kernel both models call)
  train step   the demo and tiny configs: tokens/s and ms per optimizer step (AdamW included)
  data         the loader's tokens/s (embedded corpus, synthetic 2049-token parquet) vs what a
               training step consumes
  hub data     4 ranks reading those files from the local Hub server: bytes sent vs bytes read, and
               the wait for data over a slow link
  data wait    the loop's wait for its batch at pico-decoder-tiny's published shape as rank 15 of 16,
               reading the global batch (before) vs its own share read ahead during a step as long as
               tiny's on 16 H100s; and the tokens/s a GPU needs
  backend bytes  what DDP and ZeRO-2 send per optimizer step (train.py on 2 CPU processes, the demo,
               8 micro-steps: the published accumulation), and so per GPU at each published size on 16
  checkpoint   save time and size (model + optimizer), demo, tiny and small, vs a training step;
               the sha256 manifest part of it, and the check a resume makes before loading
  dynamics     a learning-dynamics capture vs a training step on the same number of rows
  demo checkpoint  one whole checkpoint of the demo vs a training step: the evaluation as a pass
               of its own (before) and taken from the learning-dynamics capture's pass (train.py now)
  hub upload   training step time while a checkpoint uploads in the background (local Hub server)
  format check model.why_not_llama at start-up (is the model still Llama?), at the demo's 256 tokens
               and at the published 2048, vs the training step
"""

import argparse
import os
import resource
import runpy
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import data
import dynamics
from model import ModelConfig, PicoDecoder, gpu_peak_flops, save_pretrained, why_not_llama

ROOT = os.path.dirname(os.path.abspath(__file__))


def preset(name):
    """The model settings of config/<name>.py; those it leaves out are ModelConfig's defaults,
    which are train.py's."""
    settings = runpy.run_path(os.path.join(ROOT, "config", f"{name}.py"))
    return {k: settings[k] for k in ModelConfig.__dataclass_fields__ if k in settings}


TINY, SMALL, MEDIUM, DEMO = (preset(n) for n in ("pico_decoder_tiny", "pico_decoder_small",
                                                 "pico_decoder_medium", "demo"))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory of a block: CUDA max allocated, or on CPU the peak RSS above the start (sampled
    every millisecond by a thread) after glibc has returned its free heap to the system."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import ctypes
            import gc
            import psutil
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the RSS growth is this block's
            self.proc, self.stop = psutil.Process(), False
            self.base = self.proc.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.thread.join()


def fwd_bwd(model, ids, hf=False):
    if hf:
        loss = model(input_ids=ids, labels=ids).loss  # transformers shifts the labels itself
    else:
        _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    model.zero_grad(set_to_none=True)


def model_ab(device, reps, batch, seq_len):
    """Ours vs transformers' Llama on the same weights and batch, interleaved A/B."""
    import transformers
    torch.manual_seed(0)
    ours = PicoDecoder(ModelConfig(**{**TINY, "max_seq_len": seq_len})).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp, llama=True)
        theirs = transformers.LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa").to(device)
    ids = torch.randint(0, 50280, (batch, seq_len + 1), device=device)
    models = {"ours": (ours, ids), "transformers": (theirs, ids[:, :-1])}  # transformers shifts itself
    times, faults = {"ours": [], "transformers": []}, {"ours": [], "transformers": []}
    for name, (m, x) in models.items():  # warm-up
        fwd_bwd(m, x, hf=name != "ours")
    for r in range(reps):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            m, x = models[name]
            sync(device)
            flt, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            fwd_bwd(m, x, hf=name != "ours")
            sync(device)
            times[name].append(time.perf_counter() - t0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt)
    mems = {}
    for name, (m, x) in models.items():  # memory apart: measuring it (malloc_trim) would slow the timed steps
        with PeakMemory(device) as mem:
            fwd_bwd(m, x, hf=name != "ours")
            sync(device)
        mems[name] = mem.peak
    ratios = [a / b for a, b in zip(times["ours"], times["transformers"], strict=True)]
    attn = attention_alone(ours.config, batch, seq_len, device, reps)
    return {"attn_ms": 1000 * attn, "ours_ms": 1000 * statistics.median(times["ours"]),
            "hf_ms": 1000 * statistics.median(times["transformers"]),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ours_mem": mems["ours"], "hf_mem": mems["transformers"],
            "ours_faults": statistics.median(faults["ours"]), "hf_faults": statistics.median(faults["transformers"])}


def attention_alone(cfg, batch, seq_len, device, reps):
    """n_layers x SDPA forward+backward at the model's shape: the kernel both models call."""
    q = torch.randn(batch, cfg.attention_n_heads, seq_len, cfg.head_dim, device=device, requires_grad=True)
    k, v = (torch.randn(batch, cfg.attention_n_kv_heads, seq_len, cfg.head_dim, device=device, requires_grad=True)
            for _ in range(2))
    times = []
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(cfg.n_layers):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def train_step_rate(cfg, batch, micro, device, steps, precision="fp32", compile=False):
    """tokens/s of full optimizer steps (micro-steps, clip, AdamW) on random tokens."""
    torch.manual_seed(0)
    model = PicoDecoder(ModelConfig(**cfg)).to(device)
    run = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    T = model.config.max_seq_len
    ids = torch.randint(0, 50280, (batch, T + 1), device=device)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        for chunk in ids.split(micro):
            with autocast:
                _, loss = run(chunk[:, :-1], chunk[:, 1:])
            (loss / (batch // micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3 if compile else 1):  # warm-up (and compilation)
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    with PeakMemory(device) as mem:  # one more step, apart from the timed ones (see model_ab)
        step()
        sync(device)
    return {"ms": 1000 * dt, "tok_s": batch * T / dt, "mem": mem.peak, "model": model, "opt": opt,
            "flops_per_token": model.flops_per_token(T), "rows_per_s": batch / dt}


def loader_rate(name, seq_len, batch, seconds=3.0):
    stream = data.TrainStream(name, seq_len, 50304, batch, batch)
    t0, tokens = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for x, _ in stream.next_batch():
            tokens += x.numel()
    return tokens / (time.perf_counter() - t0)


def data_wait_row(folder, steps=6, world=16, rank=15, mfu=0.4, peak=989e12):
    """The loop's wait for its batch at pico-decoder-tiny's published shape (1024 x 2048 per step, 4
    micro-steps, 16 GPUs) as rank 15: before, every rank read and checked the whole global batch at
    each step, then kept its share; now it reads its share alone, the next one while a step computes.
    The step is a sleep as long as tiny's step on 16 H100s at 40% MFU (what its FLOPs take)."""
    cfg = dict(TINY, max_seq_len=2048)
    with torch.device("meta"):
        flops = PicoDecoder(ModelConfig(**cfg)).flops_per_token(2048)
    batch, micro = 1024, 4
    step_s = batch * 2048 * flops / (world * peak * mfu)

    def waits(**kw):
        stream = data.TrainStream(folder, 2048, 50304, batch, batch // (micro * kw.get("world_size", 1)), **kw)
        out = []
        for i in range(steps):
            t0 = time.perf_counter()
            stream.next_batch(read_ahead=i + 1 < steps)
            out.append(time.perf_counter() - t0)
            time.sleep(step_s)  # the GPUs' step, while the read ahead runs
        return out

    before = waits(prefetch=False)  # the global batch: as every rank read it before
    alone = waits(rank=rank, world_size=world, prefetch=False)
    now = waits(rank=rank, world_size=world)
    need = batch // world * 2048 / step_s
    return [("data wait", f"tiny, rank {rank} of {world}, {batch} x 2048 per step, step {step_s * 1000:.0f} ms",
             f"before (each rank read the global batch): {statistics.median(before) * 1000:.0f} ms a step; its "
             f"share alone {statistics.median(alone) * 1000:.0f} ms; read ahead: {now[0] * 1000:.0f} ms at the first "
             f"step, then at most {max(now[1:]) * 1000:.1f} ms"),
            ("data wait", "same, tokens/s of one rank",
             f"its GPU needs {need / 1e6:.1f}M tok/s; reading its share gives "
             f"{batch // world * 2048 / statistics.median(alone) / 1e6:.1f}M tok/s on one core")]


BYTES_WRAP = """import atexit, os, runpy, sys
def sent():  # bytes this process has written: gloo's sockets (rank 1 writes no file and logs nothing)
    wchar = next(int(v) for k, v in (l.split(": ") for l in open("/proc/self/io")) if k == "wchar")
    open(os.path.join(os.environ["BYTES_OUT"], os.environ["RANK"]), "w").write(str(wchar))
atexit.register(sent)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def backend_bytes(backend, steps, accumulation=8, nproc=2):
    """Bytes rank 1 sends in a whole train.py run of the demo on 2 CPU processes (gloo), accumulating
    over `accumulation` micro-steps, for `steps` optimizer steps (no evaluation, dynamics or checkpoint
    but the last)."""
    import subprocess
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--no-python", sys.executable, "-c", BYTES_WRAP, "train.py", "config/demo.py", f"--runs_dir={tmp}",
               f"--backend={backend}", f"--max_steps={steps}", f"--gradient_accumulation_steps={accumulation}",
               "--batch_size=16", "--save_every_n_steps=1000", "--save_log_spaced_until=0", "--layer_suffixes=",
               "--eval_every_n_steps=0", "--eval_max_rows=1", "--sample_prompt=", "--run_name=bytes"]
        env = {**os.environ, "BYTES_OUT": tmp, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"train.py --backend={backend} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        return int(open(os.path.join(tmp, "1")).read())


def backend_bytes_rows(steps=(1, 3)):
    """Bytes per optimizer step each backend sends (rank 1 of 2: the difference of two runs over their
    difference in steps) at 8 micro-steps (tiny's 4 too, for ZeRO-2, which reduces at each), as a
    multiple of the fp32 gradient; and what that makes per GPU at each published size on 16 GPUs: a
    ring collective's bytes per rank grow as (W - 1) / W, so 1.875x from 2 ranks to 16."""
    with torch.device("meta"):
        demo_params = PicoDecoder(ModelConfig(**DEMO)).num_params()
    grad = 4 * demo_params
    per_step = {(b, a): (backend_bytes(b, steps[1], a) - backend_bytes(b, steps[0], a)) / (steps[1] - steps[0])
                / grad for b, a in (("ddp", 8), ("deepspeed", 8), ("deepspeed", 4))}
    rows = [("backend bytes", f"demo ({demo_params / 1e6:.2f}M params), 2 CPU processes (gloo)",
             "; ".join(f"{b} at {a} micro-steps: {v:.2f}x the fp32 gradient a step" for (b, a), v in per_step.items())
             + f" (ZeRO-2 / DDP at 8: {per_step['deepspeed', 8] / per_step['ddp', 8]:.1f}x)")]
    for name, cfg, accum in (("tiny", TINY, 4), ("small", SMALL, 8), ("medium", MEDIUM, 8),
                             ("large", preset("pico_decoder_large"), 8)):
        with torch.device("meta"):
            n = PicoDecoder(ModelConfig(**cfg)).num_params()
        ddp, zero = (per_step[b, a] * 4 * n * 1.875 / 1e9 for b, a in (("ddp", 8), ("deepspeed", accum)))
        rows.append(("backend bytes", f"{name} ({n / 1e6:.0f}M params), 16 GPUs, {accum} micro-steps",
                     f"per GPU a step: DDP {ddp:.2f} GB, ZeRO-2 {zero:.2f} GB"))
    return rows


def synthetic_parquet(folder, files=4, rows=512):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(0)
    for f in range(files):
        ids = rng.integers(0, 50280, (rows, 2049), dtype=np.int32)
        pq.write_table(pa.table({"input_ids": pa.array(list(ids), type=pa.list_(pa.int32()))}),
                       os.path.join(folder, f"train-{f:05d}.parquet"), row_group_size=256)
    return folder


def checkpoint_cost(cfg, device):
    torch.manual_seed(0)
    model = PicoDecoder(ModelConfig(**cfg)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # materialise the optimizer state, as after a real step
        p.grad = torch.zeros_like(p)
    opt.step()
    with tempfile.TemporaryDirectory() as run:
        t0 = time.perf_counter()
        tmp = checkpoint.begin(run, 1)
        save_pretrained(model, tmp, llama=True)  # (train.py decides it once, at start-up)
        torch.save({"optimizer": opt.state_dict()}, os.path.join(tmp, "training_state.pt"))
        t1 = time.perf_counter()
        checkpoint.write_manifest(tmp, 1)  # fsync + sha256 of every file
        manifest_s = time.perf_counter() - t1
        final = checkpoint.commit(run, 1, tmp)
        dt = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(final) for f in fs)
        t1 = time.perf_counter()
        checkpoint.verify(final)  # what a resume checks before loading
        verify_s = time.perf_counter() - t1
    return dt, manifest_s, verify_s, size, model.num_params()


def hub_upload_cost(model, opt, cfg, batch, micro, device):
    """Training-step time while a demo checkpoint uploads in the background, against idle."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from hub_server import HubServer
    server = HubServer().start()
    os.environ.update(HF_ENDPOINT=server.url, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_TOKEN="hf_bench_token")
    import huggingface_hub.constants as hf  # transformers imported it already: its settings are read
    hf.ENDPOINT, hf.HF_HUB_OFFLINE, hf.HF_HUB_DISABLE_XET = server.url, False, True
    import hub
    T = cfg["max_seq_len"]
    ids = torch.randint(0, 50280, (batch, T + 1), device=device)

    def step():
        for chunk in ids.split(micro):
            _, loss = model(chunk[:, :-1], chunk[:, 1:])
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with tempfile.TemporaryDirectory() as run:
        tmp = checkpoint.begin(run, 0)
        save_pretrained(model, tmp, llama=True)  # (train.py decides it once, at start-up)
        torch.save({"optimizer": opt.state_dict()}, os.path.join(tmp, "training_state.pt"))
        open(os.path.join(run, "training_config.yaml"), "w").write("model: {}\n")
        idle = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            idle.append(time.perf_counter() - t0)
        up = hub.Uploader(run, "bench/pico", "bench", log_fn=lambda m: None)
        t_up = time.perf_counter()
        checkpoint.write_manifest(tmp, 0)
        checkpoint.commit(run, 0, tmp)
        up.nudge()
        busy, commits = [], len(hub.plan_commits(run, 0))
        while "bench" not in server.state.repos.get("bench/pico", {}).get("branches", {}) or \
                len(server.titles("bench/pico", "bench")) <= commits:  # the branch's first commit, then ours
            t0 = time.perf_counter()
            step()
            busy.append(time.perf_counter() - t0)
        upload_s = time.perf_counter() - t_up
        up.finish(60)
    server.stop()
    return statistics.median(idle), statistics.median(busy) if busy else float("nan"), upload_s


def hub_data_cost(folder, steps, workers=4, seq_len=2048, batch=64, rate=None, step_s=0.0, budget_gb=0.0):
    """A Hub dataset (the parquet files of `folder`) read by `workers` ranks of one node in lockstep
    (a gloo barrier after each step), each step standing in for training by sleeping step_s, with
    the local Hub server sending at `rate` bytes/s (None: at once). Returns what the server sent,
    what the run read, and each rank's rows and waits (see hub_data_worker)."""
    import json
    import socket
    import subprocess
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from hub_server import HubServer
    server = HubServer().start()
    files = sorted(f for f in os.listdir(folder) if f.endswith(".parquet"))
    server.create("datasets/bench/tokens")
    server.plant("datasets/bench/tokens", "main", "data", {f"data/{f}": open(os.path.join(folder, f), "rb").read()
                                                         for f in files})
    server.state.rate, server.state.bytes_sent = rate, 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        job = {"seq_len": seq_len, "batch": batch, "steps": steps, "step_s": step_s, "budget_gb": budget_gb,
               "cache": os.path.join(tmp, "cache")}
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
               "HF_HOME": os.path.join(tmp, "hf"), "WORLD_SIZE": str(workers), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "BENCH_JOB": json.dumps(job), "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-c", "import bench; bench.hub_data_worker()"], cwd=ROOT,
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for r in range(workers)]
        outs = [p.communicate(timeout=600) for p in procs]
        cached = sorted(f for _, _, fs in os.walk(job["cache"]) for f in fs if f.endswith(".parquet"))
        cache_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(job["cache"]) for f in fs
                          if not os.path.islink(os.path.join(d, f)))
        server.stop()
        for p, (_, err) in zip(procs, outs, strict=True):
            if p.returncode:
                raise RuntimeError(f"a data worker failed:\n{err[-3000:]}")
        ranks = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    gets = [p.split("/")[-1] for m, p in server.state.requests if m == "GET" and "/resolve/" in p]
    read = {f for r in ranks for f in r["shards"]}
    return {"bytes_sent": server.state.bytes_sent,
            "bytes_read": sum(os.path.getsize(os.path.join(folder, f)) for f in read),
            "gets": {f: gets.count(f) for f in files}, "cached": cached, "cache_bytes": cache_bytes, "ranks": ranks}


def hub_data_rows(folder, rate=2.5e6, step_s=0.25):
    """The bench table's `hub data` rows: 4 ranks on the 4 synthetic files (one pass, 8 steps of 64
    sequences per file), first at full speed, then over a slow link with steps that take time."""
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet"))
    mib = sum(os.path.getsize(f) for f in files) / len(files) / 2**20
    fast = hub_data_cost(folder, steps=32)
    slow = hub_data_cost(folder, steps=32, rate=rate, step_s=step_s)
    once = "each file sent once" if set(fast["gets"].values()) == {1} else f"GETs per file {fast['gets']}"
    first = max(r["waits"][0] for r in slow["ranks"])
    later = max(w for r in slow["ranks"] for w in r["waits"][1:])
    return [("hub data", f"4 ranks, {len(files)} files of {mib:.1f} MiB, local server",
             f"server sent {fast['bytes_sent'] / fast['bytes_read']:.3f}x the bytes of the files read ({once})"),
            ("hub data", f"same, link {rate / 1e6:.1f} MB/s, steps of {step_s} s",
             f"waited {first:.2f} s for the first file, at most {later * 1000:.0f} ms at each step after")]


def hub_data_worker():
    """One rank of hub_data_cost: prints its rows (token 0 of each), the seconds each step waited
    for files, and the files it read."""
    import json
    import torch.distributed as dist
    job = json.loads(os.environ["BENCH_JOB"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stream = data.TrainStream("bench/tokens", job["seq_len"], 50304, job["batch"], job["batch"] // world, rank, world,
                              cache_dir=job["cache"], cache_budget_gb=job["budget_gb"],
                              fetcher=int(os.environ["LOCAL_RANK"]) == 0)
    out = {"rows": [], "waits": []}
    for i in range(job["steps"]):
        t0 = time.perf_counter()  # what the loop waits for its batch (files, reading; a read ahead's rest)
        subs = stream.next_batch(read_ahead=i + 1 < job["steps"])
        out["waits"].append(time.perf_counter() - t0)
        out["rows"] += [int(t) for x, _ in subs for t in x[:, 0]]
        time.sleep(job["step_s"])  # the training step
        if i + 1 < job["steps"]:  # as train.py's check_step: every rank has read the next batch before the barrier
            t0 = time.perf_counter()
            stream.problem()
            out["waits"][-1] += time.perf_counter() - t0
        dist.barrier()
    assert stream.epoch == 0, "steps must stay within one pass over the data"
    out["shards"] = [os.path.basename(s.name) for s in stream.shards[:stream.shard + 1]]
    dist.destroy_process_group()
    print(json.dumps(out), flush=True)
    os._exit(0)  # not through the interpreter's shutdown, which gloo's threads can abort (see the end of train.py)


def gpu_bench(steps=10, smoke=False):
    """pico-decoder small and medium, bf16, seq 2048, one GPU: tokens/s and MFU. With smoke=True
    the same code runs at toy size on whatever device there is (the tests use it on CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not smoke:
        raise SystemExit("bench.py --gpu needs a CUDA GPU (--smoke runs its code at toy size on CPU)")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    peak = gpu_peak_flops(name)
    print(f"device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, peak bf16 "
          f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}", flush=True)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    runs = (("small", SMALL, 16), ("medium", MEDIUM, 16)) if not smoke else \
        (("smoke", dict(DEMO, max_seq_len=64, n_layers=2), 2),)
    precision = "bf16" if device == "cuda" else "fp32"
    failed = []
    for label, cfg, micro in runs:
        for compiled in (False, True):
            try:
                r = train_step_rate(cfg, batch=micro * 4, micro=micro, device=device, steps=1 if smoke else steps,
                                    precision=precision, compile=compiled)
            except Exception as e:  # one failing row must not cost the others (device time is scarce)
                print(f"pico-decoder-{label:6s} compile={compiled!s:5s} FAILED: {type(e).__name__}: {e}", flush=True)
                failed.append(f"pico-decoder-{label} compile={compiled}")
                continue
            mfu = f"{r['flops_per_token'] * r['tok_s'] / peak:.1%}" if peak else "n/a"
            T = r["model"].config.max_seq_len
            print(f"pico-decoder-{label:6s} compile={compiled!s:5s} {precision}, sub-batch {micro} x {T}: "
                  f"{r['tok_s']:>10,.0f} tok/s  {r['ms']:7.1f} ms/step (4 micro-steps)  MFU {mfu}  "
                  f"peak mem {r['mem'] / 2**30:.1f} GiB", flush=True)
            del r
            if device == "cuda":
                torch.cuda.empty_cache()
    if failed:  # the rows that did run are printed above; the exit status says the table is not whole
        raise SystemExit(f"bench.py --gpu: {len(failed)} of {2 * len(runs)} rows failed ({', '.join(failed)})")


def demo_checkpoint_row(demo, val, suffixes, repeats=2):
    """One checkpoint of the demo as train.py makes it (evaluation of the 200 validation rows, the
    learning dynamics on them and on the next batch, the files written), as a multiple of one
    training step: with the evaluation as a pass of its own, and taken from the capture's pass."""
    model, opt = demo["model"], demo["opt"]
    train_rows = val[:16]  # a batch's worth of rows (16 sequences of 256 tokens)

    def one(fused):
        t0 = time.perf_counter()
        if not fused:  # train.py's evaluate(): no gradients, batches of eval_batch_size (25)
            with torch.no_grad():
                for i in range(0, len(val), 25):
                    chunk = torch.from_numpy(val[i:i + 25])
                    dynamics.eval_sums(model(chunk[:, :-1], chunk[:, 1:], reduction="none", top1=True)[1])
        results = {"val": dynamics.capture(model, val, suffixes, batch_size=25, evaluate=fused),
                   "train": dynamics.capture(model, train_rows, suffixes, batch_size=25)}
        with tempfile.TemporaryDirectory() as run:
            tmp = checkpoint.begin(run, 1)
            for split, result in results.items():
                dynamics.save(result, os.path.join(tmp, "learning_dynamics"), split)
            save_pretrained(model, tmp, llama=True)  # (train.py decides it once, at start-up)
            torch.save({"optimizer": opt.state_dict()}, os.path.join(tmp, "training_state.pt"))
            checkpoint.write_manifest(tmp, 1)
            checkpoint.commit(run, 1, tmp)
        return time.perf_counter() - t0

    step = demo["ms"] / 1000
    separate, fused = (min(one(f) for _ in range(repeats)) for f in (False, True))
    return ("demo checkpoint", "eval + dynamics + files",
            f"evaluation apart {separate:.1f} s = {separate / step:.1f}x a training step; from the capture's pass "
            f"{fused:.1f} s = {fused / step:.1f}x ({separate / fused:.2f}x less)")


def cpu_bench(reps):
    device = "cpu"
    import platform
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"CPU: {cpu} ({os.cpu_count()} cores), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    rows = []
    t_start = time.time()

    def done(what):
        print(f"  [{time.time() - t_start:5.0f}s] {what} measured", file=sys.stderr, flush=True)

    short = model_ab(device, reps, batch=8, seq_len=256)
    ab = model_ab(device, reps, batch=1, seq_len=2048)
    for label, r in (("tiny, T=2048, fp32, fwd+bwd, batch 1", ab), ("tiny, T=256, fp32, fwd+bwd, batch 8", short)):
        rows.append(("model A/B", label, f"ours {r['ours_ms']:.0f} ms vs transformers {r['hf_ms']:.0f} ms: ratio "
                     f"{r['ratio']:.2f} (min {r['ratio_min']:.2f}, max {r['ratio_max']:.2f}, {reps} reps)"))
    done("model A/B")
    rows.append(("attention", "tiny, T=2048: 12 x SDPA fwd+bwd alone",
                 f"{ab['attn_ms']:.0f} ms = {ab['attn_ms'] / ab['hf_ms']:.0%} of transformers' step (the same kernel "
                 f"in both models)"))
    rows.append(("peak memory", "same step",
                 f"ours {ab['ours_mem'] / 2**20:.0f} MiB vs transformers {ab['hf_mem'] / 2**20:.0f} MiB"))
    rows.append(("page faults", "same step (fresh pages touched)",
                 f"ours {ab['ours_faults']:,.0f} vs transformers {ab['hf_faults']:,.0f}"))

    demo = train_step_rate(DEMO, batch=16, micro=8, device=device, steps=3)
    tiny = train_step_rate(TINY, batch=2, micro=1, device=device, steps=2)
    for label, r in (("demo", demo), ("tiny (T=2048)", tiny)):
        rows.append(("train step", label,
                     f"{r['tok_s']:,.0f} tok/s, {r['ms']:.0f} ms/step, peak +{r['mem'] / 2**20:.0f} MiB RSS"))

    done("train steps")
    with tempfile.TemporaryDirectory() as tmp:
        embedded = loader_rate(data.DEMO_DIR, 256, 64)
        synthetic = loader_rate(synthetic_parquet(tmp), 2048, 16)
        rows.append(("data loader", "embedded corpus (T=256)",
                     f"{embedded:,.0f} tok/s = {embedded / demo['tok_s']:,.0f}x the demo step's need"))
        rows.append(("data loader", "synthetic 2049-token parquet",
                     f"{synthetic:,.0f} tok/s = {synthetic / tiny['tok_s']:,.0f}x the tiny step's need"))
        done("data loader")
        rows += hub_data_rows(tmp)
        done("hub data")
    with tempfile.TemporaryDirectory() as tmp:
        rows += data_wait_row(synthetic_parquet(tmp, files=8))
        done("data wait")
    rows += backend_bytes_rows()
    done("backend bytes")
    for label, cfg, step in (("demo", DEMO, demo), ("tiny", TINY, tiny), ("small", SMALL, None)):
        dt, manifest_s, verify_s, size, n = checkpoint_cost(cfg, device)
        vs = f" = {dt / (step['ms'] / 1000):.2f}x its training step" if step else ""
        rows.append(("checkpoint", f"{label} ({n / 1e6:.1f}M params)",
                     f"{dt:.2f} s, {size / 2**20:.0f} MiB (model + AdamW state){vs}; of which the sha256 manifest "
                     f"{manifest_s:.2f} s; checked on resume in {verify_s:.2f} s"))

    done("checkpoints")
    suffixes = ["attention.v_proj", "attention.o_proj", "swiglu.w_2"]
    val = data.load_eval_sequences(data.DEMO_DIR, 256, 50304, "validation")
    tiny_rows = np.random.default_rng(0).integers(0, 50280, (4, 2049))
    for label, r, seqs, bs in (("demo", demo, val, 25), ("tiny (T=2048)", tiny, tiny_rows, 2)):
        t0 = time.perf_counter()
        result = dynamics.capture(r["model"], seqs, suffixes, batch_size=bs)
        cap = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            dynamics.save(result, tmp, "val")
            size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        step_time = len(seqs) / r["rows_per_s"]  # a training step on as many rows
        rows.append(("dynamics", f"{label}, {len(seqs)} rows", f"{cap:.1f} s = {cap / step_time:.2f}x a training "
                     f"step on the same rows; files {size / 2**20:.1f} MiB per split"))
    rows.append(demo_checkpoint_row(demo, val, suffixes))
    model = demo["model"]
    done("dynamics")
    idle, busy, upload_s = hub_upload_cost(model, demo["opt"], DEMO, 16, 8, device)
    rows.append(("hub upload", "demo checkpoint, local server",
                 f"{upload_s:.1f} s in the background; step {busy * 1000:.0f} ms during vs {idle * 1000:.0f} ms idle "
                 f"({busy / idle:.2f}x)"))

    done("hub upload")
    for label, cfg, step in (("demo (T=256)", DEMO, demo), ("tiny (T=2048)", TINY, tiny)):
        with torch.device("meta"):  # the probe makes its own small model: the run's is never touched
            model = PicoDecoder(ModelConfig(**cfg))
        why_not_llama(model)  # warm
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            assert why_not_llama(model) is None
            times.append(time.perf_counter() - t0)
        rows.append(("format check", label, f"{statistics.median(times) * 1000:.0f} ms (median of 5) = "
                     f"{statistics.median(times) / (step['ms'] / 1000):.2f}x its training step, once per start"))
    width = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"| {'what':{width[0]}} | {'setting':{width[1]}} | result |")
    print(f"|{'-' * (width[0] + 2)}|{'-' * (width[1] + 2)}|---|")
    for a, b, c in rows:
        print(f"| {a:{width[0]}} | {b:{width[1]}} | {c} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="measure pico-decoder small and medium on one CUDA GPU")
    parser.add_argument("--smoke", action="store_true", help="with --gpu: run its code at toy size on any device")
    parser.add_argument("--reps", type=int, default=5, help="A/B repetitions of the model comparison")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    gpu_bench(smoke=args.smoke) if args.gpu else cpu_bench(args.reps)
