"""
Train a pico-decoder. One process:            python train.py config/demo.py
Data parallel on one node (DDP or ZeRO-2):    torchrun --nproc_per_node=4 train.py config/demo.py
Override any setting below:                   python train.py config/demo.py --lr=1e-3 --max_steps=50

The file reads in the order a run happens: settings, set-up, model, data, the loop, the end.
"""

import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import sys
import time
from datetime import datetime, timedelta

import torch
import torch.distributed as dist
import yaml
from safetensors import SafetensorError

import checkpoint
import configurator
import data
import dynamics
from model import ModelConfig, PicoDecoder, export_names, gpu_peak_flops, load_pretrained, save_pretrained

# -----------------------------------------------------------------------------
# settings (pico-train's names and defaults; a config file or --key=value overrides them). Each
# `# <section>: ...` line starts a section of training_config.yaml, the layout pico-train writes.
# checkpointing: the run and its checkpoints
run_name = None  # None: a timestamped name
runs_dir = "runs"
save_every_n_steps = 1000
save_log_spaced_until = 0  # also save at steps 1, 2, 4, 8, ... up to this one (early learning moves fastest); 0: no
auto_resume = True  # continue from runs/<run_name>/checkpoints/latest if it exists
stop_at_step = None  # end this session at this step with a checkpoint (job time limits); run again to go on
# checkpointing: the Hugging Face Hub (hub.py)
save_to_hf = False
hf_repo_id = ""
hf_collection_slug = None
hf_wait_at_end_s = 600  # at the end, wait this long for queued uploads (they are kept for later either way)
# monitoring: the log and wandb
log_every_n_steps = 100
save_to_wandb = False
wandb_project = ""
wandb_entity = ""
# data: what the model trains on
dataset_name = "pico-lm/pretokenized-dolma"  # a Hub dataset, a folder/glob of parquet files, or a save_to_disk folder
dataset_split = "train"
tokenizer_path = None  # None: the OLMo tokenizer in data/tokenizer (the one dolma was tokenized with)
batch_size = 1024  # sequences per optimizer step, over all ranks and micro-steps
data_cache_dir = None  # a Hub dataset's files are downloaded here, once per node (None: the Hugging Face cache)
# files there that the run has passed are removed while its files take more than this (None: never)
data_cache_gb = 20.0
# evaluation: held-out loss and paloma at each checkpoint
eval_dataset_name = "pico-lm/pretokenized-paloma-tinsy"  # None: the training data's held-out split
eval_dataset_split = "val"  # (with eval_dataset_name None: 'validation' or 'val', whichever the data has)
eval_every_n_steps = None  # None: whenever a checkpoint is saved; 0: never (but at the end)
eval_batch_size = 16
eval_max_rows = None  # None: the whole evaluation set
# where the learning dynamics' val rows are these rows: one forward pass for both (False: two)
eval_from_dynamics = True
sample_prompt = ""  # if set, rank 0 prints a sample continuation at the end of the run
# model: the pico-decoder (model.ModelConfig)
d_model = 768
n_layers = 12
vocab_size = 50304
max_seq_len = 2048
attention_n_heads = 12
attention_n_kv_heads = 4
activation_hidden_dim = 3072
norm_eps = 1e-6
position_emb_theta = 10000.0
# training: optimisation
gradient_accumulation_steps = 128
max_steps = 200_000
lr = 3e-4
lr_scheduler = "linear_with_warmup"  # or "cosine"
lr_warmup_steps = 2500
min_lr_ratio = 0.0  # cosine decays to lr * min_lr_ratio
weight_decay = 0.01  # torch's AdamW default, as pico-train; applied to 2-D weights only
adam_beta1 = 0.9
adam_beta2 = 0.999
adam_eps = 1e-8
grad_clip = 1.0  # 0 disables clipping
# checkpointing: learning dynamics saved with each checkpoint (dynamics.py)
layer_suffixes = ["attention.v_proj", "attention.o_proj", "swiglu.w_2"]
sequence_idx = -1
# rows per capture batch over all ranks (pico-train's meaning); each rank takes its share
learning_dynamics_batch_size = 8
learning_dynamics_eval_data = "pico-lm/pretokenized-paloma-tinsy"  # None: the evaluation data
# training: the system
device = "auto"  # auto: cuda if available, else cpu; "cuda" means each rank's own GPU (cuda:<local rank>)
precision = "auto"  # auto: bf16 on GPUs with native bf16 (Ampere and later), else fp32; or "bf16" / "fp32"
backend = "auto"  # auto: DeepSpeed ZeRO-2 on >1 CUDA device, else DDP; or "ddp" / "deepspeed"
compile = False  # torch.compile the model
seed = 42
dist_timeout_min = 60  # how long a rank waits at a collective (e.g. for another node's first data download)
# -----------------------------------------------------------------------------
config_keys, ignored_from_yaml = configurator.configure(sys.argv[1:], globals())
configurator.refuse_unworkable(globals())  # settings that cannot work: one line each, before anything is made
if device.startswith("cuda") and not torch.cuda.is_available():
    raise SystemExit(f"config error: device {device!r}, but torch sees no CUDA GPU here (use device='cpu' or 'auto')")
configurator.load_dotenv(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".env"))

# -----------------------------------------------------------------------------
# set-up: processes, device, precision
rank, local_rank, world_size = (int(os.environ.get(k, 1 if k == "WORLD_SIZE" else 0))
                                 for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
master = rank == 0
# batch arithmetic: batch_size sequences per step = gradient_accumulation_steps x world_size x sub_batch
try:
    sub_batch = configurator.batch_split(batch_size, gradient_accumulation_steps, world_size)
except ValueError as e:
    raise SystemExit(f"config error: {e}") from None
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if device == "cuda":
    device = f"cuda:{local_rank}"  # each rank its own GPU: set_device("cuda") would put every rank on GPU 0
device_type = "cuda" if device.startswith("cuda") else "cpu"
if device_type == "cuda":
    torch.cuda.set_device(device)
if backend == "auto":
    backend = "deepspeed" if device_type == "cuda" and world_size > 1 else "ddp"
if backend not in ("ddp", "deepspeed"):
    raise SystemExit(f"config error: backend must be 'auto', 'ddp' or 'deepspeed', got {backend!r}")
# bf16 only where the GPU computes it natively: before Ampere torch emulates it, slower than fp32
native_bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
precision_note = ""
if precision == "auto":
    precision = "bf16" if native_bf16 else "fp32"
    if device_type == "cuda" and not native_bf16:
        precision_note = f" ({torch.cuda.get_device_name()} has no native bf16, so fp32)"
elif precision == "bf16" and device_type == "cuda" and not native_bf16:
    precision_note = f" (emulated: {torch.cuda.get_device_name()} has no native bf16; fp32 is faster there)"
use_deepspeed = backend == "deepspeed"
if use_deepspeed and compile:
    raise SystemExit("config error: compile=True works with backend 'ddp' (or one process), not with 'deepspeed'")
timeout = timedelta(minutes=dist_timeout_min)  # NCCL's own default, 10 minutes, is shorter than a first download
if use_deepspeed:
    # ZeRO stage 2 shards the optimizer state and the gradients across ranks while every rank keeps
    # the full weights. Stage 3 (sharded weights) is not supported: learning dynamics need every
    # layer's full weights, activations and gradients on hand at each checkpoint.
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                 ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
        os.environ.setdefault(k, v)  # plain `python train.py` with DeepSpeed: a world of one
    import deepspeed
    if device_type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # else it compiles an op for ~minutes
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo", timeout=timeout)
elif world_size > 1:
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timeout,
                            device_id=torch.device(device) if device_type == "cuda" else None)
is_dist = dist.is_available() and dist.is_initialized()  # the one flag: is there a process group to talk to


def barrier():
    if is_dist:
        dist.barrier()


def all_ranks_sum(t):
    if is_dist:
        dist.all_reduce(t)  # gloo has no AVG: sum, then divide where needed
    return t


tokens_per_step = batch_size * max_seq_len

# the Hub and wandb: their settings are checked now; they start once the run folder exists
if save_to_hf:
    if not hf_repo_id:
        raise SystemExit("config error: save_to_hf=True needs hf_repo_id (e.g. 'your-name/pico-decoder-tiny')")
    if data.hub_offline():
        raise SystemExit("config error: save_to_hf=True needs the network, but HF_HUB_OFFLINE is set")
    os.environ["HF_HUB_OFFLINE"] = "0"  # a local dataset would otherwise switch the Hub client offline
if save_to_wandb and master:
    import wandb
    if os.environ.get("WANDB_MODE", "online") not in ("offline", "disabled", "dryrun") and not (
            os.environ.get("WANDB_API_KEY") or wandb.login(prompt=False, verify=False)):
        raise SystemExit("config error: save_to_wandb=True but no wandb key: put `export WANDB_API_KEY=...` in "
                         ".env, run `wandb login`, or set WANDB_MODE=offline")
log_file, log_lines = None, []  # logs/train.log opens with the run folder; the lines before it wait here


def log(msg, console=True):
    if master:
        line = f"[{datetime.now():%H:%M:%S}] {msg}"
        if console:
            print(line, flush=True)
        log_lines.append(line)
        if log_file:
            log_file.write("\n".join(log_lines) + "\n")
            log_file.flush()
            log_lines.clear()


log(f"{world_size} process(es), {device}, {precision}{precision_note}, "
    f"backend {backend}{'' if is_dist else ' (a world of one)'}; step = {batch_size} sequences x "
    f"{max_seq_len} tokens = {gradient_accumulation_steps} micro-steps x "
    f"{world_size} ranks x sub-batch {sub_batch}")

# -----------------------------------------------------------------------------
# model and optimizer
try:
    model_config = ModelConfig(d_model=d_model, n_layers=n_layers, vocab_size=vocab_size, max_seq_len=max_seq_len,
                               attention_n_heads=attention_n_heads, attention_n_kv_heads=attention_n_kv_heads,
                               activation_hidden_dim=activation_hidden_dim, norm_eps=norm_eps,
                               position_emb_theta=position_emb_theta)
except ValueError as e:
    raise SystemExit(f"config error: {e}") from None
torch.manual_seed(seed)
model = PicoDecoder(model_config).to(device)
raw_model = model  # the plain module, for evaluation, checkpoints and learning dynamics
try:
    dynamics.find_layers(model, layer_suffixes)  # fail now, not at the first checkpoint, on a typo
    export_names(model)  # every checkpoint is the Llama export (model.py's contract): a weight it cannot name stops now
except ValueError as e:
    raise SystemExit(f"config error: {e}") from None
# weight decay on the 2-D weights (matrices, embedding) only: decaying the norms' gains pulls them to 0
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=lr, betas=(adam_beta1, adam_beta2), eps=adam_eps,
                              fused=device_type == "cuda")  # one kernel for all parameters on a GPU
flops_per_token = raw_model.flops_per_token(max_seq_len)
# MFU is reported only where the GPU's dense bf16 peak is known, never guessed
peak_flops = gpu_peak_flops(torch.cuda.get_device_name()) if device_type == "cuda" and precision == "bf16" else None
log(f"model: {raw_model.num_params():,} parameters, {flops_per_token / 1e6:.1f} MFLOPs per token")

# -----------------------------------------------------------------------------
# data (local files are opened and their schemas checked now, so a bad file stops the run before any work;
# a Hub dataset's files are downloaded as the run reaches them)
try:
    train_data = data.TrainStream(dataset_name, max_seq_len, vocab_size, batch_size, sub_batch, rank, world_size,
                                  split=dataset_split, device=device, cache_dir=data_cache_dir,
                                  cache_budget_gb=data_cache_gb, fetcher=local_rank == 0)
    if eval_dataset_name is None:  # follow the training data: its held-out split, unless one is named
        eval_dataset_name = dataset_name
        eval_dataset_split = data.held_out_split(dataset_name) if eval_dataset_split == "val" else eval_dataset_split
    eval_seqs = data.load_eval_sequences(eval_dataset_name, max_seq_len, vocab_size, eval_dataset_split, eval_max_rows,
                                         data_cache_dir)
    learning_dynamics_eval_data = learning_dynamics_eval_data or eval_dataset_name
    dynamics_val_seqs = None  # the fixed `val` rows of the learning dynamics
    if layer_suffixes:
        dynamics_val_seqs = eval_seqs if learning_dynamics_eval_data == eval_dataset_name else (
            data.load_eval_sequences(learning_dynamics_eval_data, max_seq_len, vocab_size, eval_dataset_split,
                                     cache_dir=data_cache_dir))
    tokenizer = data.load_tokenizer(tokenizer_path or data.TOKENIZER_PATH)
except data.DataError as e:
    raise SystemExit(f"data error: {e}") from None
eval_set = f"{eval_dataset_name} ({eval_dataset_split})"
log(f"data: training on {dataset_name} ({dataset_split}), evaluating on {len(eval_seqs)} sequences of {eval_set}"
    + (f", learning dynamics on {learning_dynamics_eval_data}" if layer_suffixes else ""))

# -----------------------------------------------------------------------------
# the run folder (made only now that every start-up check has passed), logs, the effective config
if run_name is None:
    name = [datetime.now().strftime("pico_%Y-%m-%d_%H-%M-%S")]
    if is_dist:
        dist.broadcast_object_list(name)
    run_name = name[0]
run_dir = os.path.join(runs_dir, run_name)
config = {k: globals()[k] for k in config_keys}
refused, run_lock, set_aside = [None], None, None
if master:
    try:  # one run at a time in a run folder (a requeued job while the old one still runs): rank 0 holds a lock
        os.makedirs(runs_dir, exist_ok=True)
        run_lock = checkpoint.lock_run(run_dir)
        if auto_resume and (links := checkpoint.foreign_links(run_dir)):
            refused[0] = (f"{links[0]} is a symbolic link (to {os.readlink(links[0])}), which pico-train does not make "
                          f"there: it never writes or uploads through one. Replace it by the file itself, or remove it")
    except checkpoint.CheckpointError as e:
        refused[0] = str(e)
if is_dist:
    dist.broadcast_object_list(refused)
if refused[0]:
    raise SystemExit(f"cannot start: {refused[0]}")
if master and not auto_resume and os.path.isdir(run_dir) and os.listdir(run_dir):
    # auto_resume=False starts over, but never over a run: the old one is kept under a new name
    set_aside = next(f"{run_dir}.set-aside-{n}" for n in range(1, 10**6)
                     if not os.path.exists(f"{run_dir}.set-aside-{n}"))
    os.rename(run_dir, set_aside)
made_run_dir = master and not os.path.isdir(run_dir)
if master:
    os.makedirs(run_dir, exist_ok=True)
if is_dist:
    # rank 0 alone writes checkpoints, `latest` and the logs, and every rank reads them: runs_dir must
    # be one filesystem shared by every node. Each rank looks for a file rank 0 has just made there.
    mark = [f".rank0-{secrets.token_hex(8)}" if master else None]
    dist.broadcast_object_list(mark)
    mark = os.path.join(run_dir, mark[0])
    if master:
        open(mark, "w").close()
    barrier()
    for _ in range(20):  # a network filesystem may show a new file to other nodes a moment late
        if os.path.isdir(run_dir) and os.path.basename(mark) in os.listdir(run_dir):
            break
        time.sleep(0.5)
    unseen = int(all_ranks_sum(torch.tensor([0 if os.path.exists(mark) else 1], device=device)).item())
    if master:
        os.remove(mark)
        if unseen and made_run_dir:
            os.rmdir(run_dir)
    if unseen:
        raise SystemExit(f"config error: {unseen} of {world_size} ranks cannot see the run folder "
                         f"{os.path.abspath(run_dir)} that rank 0 made: runs_dir must be on a filesystem that "
                         f"every node shares (NFS, Lustre, ...)")
if master:
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    log_file = open(os.path.join(run_dir, "logs", "train.log"), "a")
log(f"run {run_dir}; settings (all of them in training_config.yaml):\n" + configurator.describe(config, __file__))
if ignored_from_yaml:
    log("from the run's YAML, not taken (where and whether a run writes or sends anything comes from the command "
        "line or train.py): " + ", ".join(ignored_from_yaml))
if set_aside:
    log(f"auto_resume=False: the run that was in {run_dir} is kept, untouched, in {set_aside}")


def log_metrics(row):
    if master:
        with open(os.path.join(run_dir, "logs", "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


uploader = None  # rank 0's background Hub uploader; the other ranks never wait on the Hub
if save_to_hf and master:
    import hub
    uploader = hub.Uploader(run_dir, hf_repo_id, run_name, hf_collection_slug, log_fn=log)
wandb_run = None
if save_to_wandb and master:
    wandb_run = wandb.init(project=wandb_project or None, entity=wandb_entity or None, name=run_name,
                           id=run_name.replace("/", "-"), resume="allow", dir=run_dir, config=config,
                           settings=wandb.Settings(init_timeout=60))

# -----------------------------------------------------------------------------
# resume: continue from checkpoints/latest (same weights, optimizer, data position, RNG), with any
# backend and any number of ranks: a checkpoint holds the full optimizer state in AdamW's own form
MUST_MATCH = {k for k, section in configurator.sections(__file__).items() if section == "model"} | {
    "dataset_name", "dataset_split"}
run_state = {**config, "backend": backend, "world_size": world_size}


def resume():
    """Everything a resume does, in order: find and check the checkpoint (rank 0, once for all
    ranks), read it without running any code, refuse settings that cannot go on with it, then put
    back the weights, the optimizer state (DeepSpeed's below, once it has made its shards), the
    data position and the metrics log. save_checkpoint()'s write_checkpoint() says what is read.
    Returns (the checkpoint folder, its training state), or (None, None) for a new run."""
    verdict = [None, None]  # (the checkpoint folder, or why it cannot be loaded)
    if master:
        for stale in checkpoint.clean_partial(run_dir):
            log(f"removed {stale}: a checkpoint that a crash interrupted mid-save")
        try:  # checked against its manifest (sizes and sha256) and for pickled code, without loading it
            verdict[0] = checkpoint.latest(run_dir, log=log)
            if verdict[0]:
                checkpoint.scan(verdict[0])
        except checkpoint.CheckpointError as e:
            verdict[1] = str(e)
    if is_dist:
        dist.broadcast_object_list(verdict)
    folder, error = verdict
    if not folder and not error:
        return None, None
    try:
        if error:
            raise checkpoint.CheckpointError(error)
        # read without running any code, on every rank; under ZeRO-2 each reads only its shards
        state_file = os.path.join(folder, "training_state.pt")
        state = checkpoint.load_state(state_file, mmap=True)
        checkpoint.check_training_state(state, state_file, int(os.path.basename(folder)[5:]))
        checkpoint.check_optimizer_state(state["optimizer"], len(decay + no_decay), state_file)
        try:
            weights = load_pretrained(folder).state_dict()
        except Exception as e:  # noqa: BLE001 - whatever safetensors or the config says of a damaged file
            raise checkpoint.CheckpointError(f"{folder}/model.safetensors (or config.json) cannot be read "
                                             f"({type(e).__name__}: {str(e)[:200]}); point checkpoints/latest "
                                             f"at another step_<N>") from None
        if not all(torch.isfinite(w).all() for w in weights.values()):
            raise checkpoint.CheckpointError(f"{folder}/model.safetensors holds NaN or inf weights, so it is "
                                             f"not resumed; point checkpoints/latest at an earlier step_<N>")
    except checkpoint.CheckpointError as e:
        raise SystemExit(f"cannot resume: {e}") from None
    bad, harmless = checkpoint.compare_configs(state["config"], run_state, MUST_MATCH)
    if bad:
        raise SystemExit(f"cannot resume {folder}: these settings differ from the saved run: " + ", ".join(
            f"{k} (saved {state['config'].get(k)!r}, now {run_state.get(k)!r})" for k in bad)
            + f". Use another run_name, or auto_resume=False to start over in {run_dir}.")
    if harmless:
        log("resuming with changed settings: " + ", ".join(
            f"{k}: {state['config'].get(k)!r} -> {run_state.get(k)!r}" for k in harmless))
    if state["step"] > max_steps:
        raise SystemExit(f"cannot resume {folder}: it is at step {state['step']}, past max_steps "
                         f"{max_steps}; set max_steps to at least {state['step']} to go on training this run")
    with torch.no_grad():
        for p, q in zip(raw_model.state_dict().values(), weights.values(), strict=True):
            p.copy_(q)
    if not use_deepspeed:  # DeepSpeed's is loaded once it has made its shards, below
        checkpoint.load_optimizer_state(optimizer, state["optimizer"], (decay, no_decay))
    try:
        train_data.load_state_dict(state["data"])
    except data.DataError as e:
        raise SystemExit(f"data error: {e}") from None
    log(f"resumed from {folder} at step {state['step']}")
    metric_rows, unreadable = checkpoint.read_metrics(run_dir) if master else ([], 0)  # rank 0's file
    if metric_rows or unreadable:  # drop rows of steps after the checkpoint (they are redone)
        metrics_path = os.path.join(run_dir, "logs", "metrics.jsonl")
        with open(metrics_path + ".tmp", "w") as f:  # then renamed over it: a crash leaves one or the other
            f.writelines(json.dumps(row) + "\n" for row in metric_rows if row["step"] <= state["step"])
        os.replace(metrics_path + ".tmp", metrics_path)
        if unreadable:
            log(f"{unreadable} line(s) of {metrics_path} were not rows (a crash mid-write?) and were dropped")
    return folder, state


resume_from, resumed_state = resume() if auto_resume else (None, None)
start_step = resumed_state["step"] if resumed_state else 0
if master:  # the settings of this run, written once it is known that they can go on with what is here
    nested = configurator.nested(config, __file__)
    nested["training"]["world_size"] = world_size
    with open(os.path.join(run_dir, "training_config.yaml.tmp"), "w") as f:
        yaml.safe_dump(nested, f, sort_keys=False)
    os.replace(os.path.join(run_dir, "training_config.yaml.tmp"), os.path.join(run_dir, "training_config.yaml"))

# -----------------------------------------------------------------------------
# wrap for data parallelism
if compile:
    model = torch.compile(model)  # before the DDP wrap, as DDP expects; raw_model stays uncompiled
if use_deepspeed:
    ds_config = {
        "train_batch_size": batch_size, "train_micro_batch_size_per_gpu": sub_batch,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": grad_clip,
        # DeepSpeed's own bf16 mode is off: it would cast the weights to bf16 and accumulate the
        # gradients in bf16. The weights, gradients and optimizer stay fp32, and bf16 comes from the
        # same autocast as under DDP (below), so every backend computes the same thing.
        "bf16": {"enabled": False},
        "timers": {"throughput": {"enabled": False}},  # it would synchronise the GPU at every forward
        # ZeRO-2 reduces the gradients at every micro-step; on GPUs, overlap that with the backward pass
        "zero_optimization": {"stage": 2, "overlap_comm": device_type == "cuda"},
        "steps_per_print": 2**31 - 1,
    }
    model, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if resume_from:  # the full AdamW state, shared out into this rank's ZeRO-2 shards
        checkpoint.load_optimizer_state(optimizer, resumed_state["optimizer"], (decay, no_decay), zero=True)
elif is_dist:
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device_type == "cuda" else None)
if resumed_state is not None:
    checkpoint.set_rng_state(resumed_state["rng"][rank % len(resumed_state["rng"])])
# bf16: fp32 weights, bf16 matmuls under autocast (norms, softmax and the loss stay fp32), on every backend
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


@torch.no_grad()
def evaluate():
    """Perplexity on the evaluation set. Rank r scores rows r, r + W, ...; the sums are added over
    ranks, so every rank returns the same numbers and no rank idles while rank 0 works."""
    raw_model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # sum of per-row ppl, rows, sum of token losses, tokens
    mine = eval_seqs[rank::world_size]
    for i in range(0, len(mine), eval_batch_size):
        chunk = torch.from_numpy(mine[i:i + eval_batch_size]).to(device)
        with autocast:
            _, losses = raw_model(chunk[:, :-1], chunk[:, 1:], reduction="none")  # (B, T)
        totals += dynamics.eval_sums(losses)
    all_ranks_sum(totals)
    raw_model.train()
    return eval_results(totals.tolist())


def eval_results(totals):
    """The evaluation's numbers from its sums over all rows (dynamics.eval_sums)."""
    ppl_sum, rows, loss_sum, n_tokens = totals
    loss = loss_sum / n_tokens
    return {"paloma": ppl_sum / rows, "loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "rows": int(rows), "dataset": eval_dataset_name}


def eval_path(step):
    return os.path.join(run_dir, "eval_results", f"step_{step}.json")


def report_eval(step, results):
    """Log and save an evaluation; one whose numbers overflow stops the run before it is saved."""
    if not all(math.isfinite(results[k]) for k in ("loss", "perplexity", "paloma")):
        fail(f"step {step}: eval loss {results['loss']:.4g}, perplexity {results['perplexity']:.4g}, paloma "
             f"{results['paloma']:.4g}: the model has diverged, so this step is not saved")
    log(f"step {step}: eval loss {results['loss']:.4f}, paloma (mean per-sequence perplexity) "
        f"{results['paloma']:.2f} on {results['rows']} sequences of {eval_set}")
    if master:
        os.makedirs(os.path.dirname(eval_path(step)), exist_ok=True)
        with open(eval_path(step), "w") as f:
            json.dump(results, f, indent=2)
    log_metrics({"step": step, "eval/loss": results["loss"], "eval/paloma": results["paloma"]})


def fail(reason, fix="lower lr (or check the data)"):
    """End a run that cannot go on, naming the checkpoint it can be resumed from."""
    link = os.path.join(checkpoint.checkpoints_dir(run_dir), "latest")
    last = os.path.realpath(link) if os.path.lexists(link) else None
    msg = (f"{reason}; stopping. The last good checkpoint is {last}: {fix} and run again "
           f"to resume from it." if last else f"{reason}; stopping, with no checkpoint saved.")
    log(msg, console=False)  # the console gets it once, from SystemExit
    raise SystemExit(msg)


wandb_previous_weights = {}  # the captured layers' weights at the last checkpoint, for their relative change


def capture_dynamics(step, fused):
    """The learning dynamics of the chosen layers on the fixed `val` rows and on the rows the next
    optimizer step trains on, every rank taking a share of the rows; fused: the evaluation is
    reported from the `val` capture's own forward pass. Returns {split: (rows, capture)}."""
    captured, t0 = {}, time.time()
    per_rank = -(-learning_dynamics_batch_size // world_size)  # the setting counts rows over all ranks
    args = dict(layer_suffixes=layer_suffixes, sequence_idx=sequence_idx, batch_size=per_rank,
                rank=rank, world_size=world_size, device=device, autocast=autocast)
    captured["val"] = (dynamics_val_seqs, dynamics.capture(raw_model, dynamics_val_seqs, **args, evaluate=fused))
    if fused:
        report_eval(step, eval_results(captured["val"][1]["eval"]))
    if step < max_steps:  # the rows the next optimizer step trains on (the stream does not move)
        try:
            rows = train_data.peek_global_batch()
            captured["train"] = (rows, dynamics.capture(raw_model, rows, **args))
        except data.DataError:  # this checkpoint stays good; the next step stops, naming the row
            log(f"step {step}: no train learning dynamics: the batch of step {step + 1} is bad")
    log(f"step {step}: learning dynamics of {len(captured['val'][1]['weights'])} layers on "
        + ", ".join(f"{len(r)} {s} rows" for s, (r, _) in captured.items()) + f" in {time.time() - t0:.1f}s"
        + (" (with the evaluation)" if fused else ""))
    if wandb_run is not None:  # per-layer numbers, as `python dynamics.py plot` draws them
        val, summary = captured["val"][1], {}
        if "train" in captured:
            summary.update(dynamics.summaries(*(captured["train"][1][k] for k in ("weights", "gradients")),
                                              split="train"))
        summary.update(dynamics.summaries(val["weights"], val["gradients"], wandb_previous_weights.get("val")))
        wandb_run.log({f"dynamics/{k}": v for k, v in summary.items()}, step=step)
        wandb_previous_weights["val"] = val["weights"]
    return captured


def write_checkpoint(folder, step, captured, optimizer_state, rng):
    """What a checkpoint holds, all of it; rank 0 writes it into a temporary folder that
    checkpoint.commit() renames to checkpoints/step_<step> (resume() reads it back):
      model.safetensors, config.json,   the weights as a plain Llama model (model.save_pretrained):
      generation_config.json            the training checkpoint IS the Hugging Face export
      tokenizer.json, tokenizer_config.json
      training_state.pt                 step, AdamW's state_dict, the data position, every rank's RNG
                                        state and the run's settings (tensors and plain types only)
      learning_dynamics/                activations, weights and gradients of the chosen layers per
                                        split, and the train rows they were taken on (dynamics.save)
      manifest.json                     every file's size and sha256, checked before a load"""
    for split, (rows, result) in captured.items():
        dynamics.save(result, os.path.join(folder, "learning_dynamics"), split)
        if split == "train":
            dynamics.save_rows(rows, os.path.join(folder, "learning_dynamics", "train_data"), tokenizer)
    save_pretrained(raw_model, folder)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                   "pad_token": "<|padding|>", "model_max_length": max_seq_len}, f, indent=2)
    torch.save({"step": step, "optimizer": optimizer_state, "data": train_data.state_dict(), "rng": rng,
                "config": run_state}, os.path.join(folder, "training_state.pt"))
    checkpoint.write_manifest(folder, step)


def save_checkpoint(step, evaluating=False):
    """Learning dynamics, then the checkpoint (write_checkpoint), atomically; evaluating: the
    evaluation too, from the dynamics' forward pass where they share rows. Collective: every rank."""
    t0 = time.time()
    if not torch.stack([torch.isfinite(p).all() for p in raw_model.parameters()]).all():
        fail(f"step {step}: the weights hold NaN or inf, so they are not saved")
    # the learning dynamics' val rows are the evaluation rows by default (the demo's and pico-train's
    # settings): their capture's forward pass then gives the evaluation's numbers, one pass for both
    fused = evaluating and eval_from_dynamics and bool(layer_suffixes) and dynamics_val_seqs is eval_seqs
    if evaluating and not fused:
        report_eval(step, evaluate())
    captured = capture_dynamics(step, fused) if layer_suffixes else {}
    folder = [checkpoint.begin(run_dir, step) if master else None]
    rng = [None] * world_size
    if is_dist:
        dist.broadcast_object_list(folder)
        dist.all_gather_object(rng, checkpoint.rng_state())
    else:
        rng = [checkpoint.rng_state()]
    # AdamW's state_dict on every backend (under ZeRO-2 gathered from the ranks' shards; rank 0 keeps it)
    optimizer_state = checkpoint.optimizer_state(optimizer, (decay, no_decay), zero=use_deepspeed, keep=master)
    failed = [None]  # rank 0 writes; a full disk (or any failed write) stops every rank with one line
    if master:
        try:
            write_checkpoint(folder[0], step, captured, optimizer_state, rng)
            checkpoint.commit(run_dir, step, folder[0])
        except (OSError, RuntimeError, SafetensorError) as e:  # (torch.save and safetensors wrap OSErrors)
            shutil.rmtree(folder[0], ignore_errors=True)
            free = shutil.disk_usage(run_dir).free / 2**30
            failed[0] = (f"step {step}: the checkpoint could not be written ({str(e).splitlines()[0][:200]}; "
                         f"{free:.1f} GiB free)")
        if uploader and not failed[0]:  # a sealed checkpoint is queued by being there: the uploader looks again
            uploader.nudge()
    if is_dist:
        dist.broadcast_object_list(failed)
    if failed[0]:
        fail(failed[0], fix=f"free space on the disk of {run_dir} (or make it writable)")
    log(f"step {step}: checkpoint saved to {checkpoint.step_dir(run_dir, step)} in {time.time() - t0:.1f}s")


# -----------------------------------------------------------------------------
# the training loop: its parts first, each small and named, then the loop, which reads
# "checkpoint if due; micro-steps: forward, backward; one check; the optimizer step"
def get_lr(step):
    """Learning rate for the optimizer step that takes the weights from `step` to `step + 1`.
    Linear warmup to lr over lr_warmup_steps, then linear decay to 0 at max_steps
    (linear_with_warmup, pico-train's) or cosine decay to lr * min_lr_ratio."""
    if step < lr_warmup_steps:
        return lr * (step + 1) / lr_warmup_steps
    progress = min(1.0, (step - lr_warmup_steps) / max(1, max_steps - lr_warmup_steps))
    if lr_scheduler == "linear_with_warmup":
        return lr * (1.0 - progress)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine


def is_save_step(step):
    """Checkpoints: step 0, every save_every_n_steps, the powers of two up to save_log_spaced_until
    (and the end, and a stop)."""
    return step % save_every_n_steps == 0 or (step <= save_log_spaced_until and step & (step - 1) == 0)


def is_eval_step(step):
    if eval_every_n_steps is None:
        return is_save_step(step)
    return bool(eval_every_n_steps) and step % eval_every_n_steps == 0


def pauses_after(step):
    """How many evaluations and checkpoints come after `step` (the last step's included)."""
    def multiples(n):  # of n in (step, max_steps]
        return max_steps // n - step // n
    every = [save_every_n_steps] + ([eval_every_n_steps] if eval_every_n_steps else [])
    count = sum(map(multiples, every)) - (multiples(math.lcm(*every)) if len(every) == 2 else 0)
    others = {2**k for k in range(63) if 2**k <= save_log_spaced_until} | {max_steps}  # off the grid of `every`
    return count + sum(step < s <= max_steps and all(s % n for n in every) for s in others)


def checkpoint_if_due(step, stopping):
    """A checkpoint at a save step, at the end and at a stop, with the evaluation where one is due
    (always at the end); an evaluation alone at an eval step. Returns whether it paused training."""
    evaluating = step >= max_steps or is_eval_step(step)
    if stopping or is_save_step(step):
        save_checkpoint(step, evaluating)  # evaluating there too, in the capture's pass where they share rows
    elif evaluating:
        report_eval(step, evaluate())
    return evaluating or is_save_step(step)


def next_batch(step):
    """This rank's micro-batches [(x, y), ...] for the optimizer step after `step`."""
    try:
        return train_data.next_batch()
    except data.DataError as e:
        raise SystemExit(f"data error in the batch of step {step + 1}: {e}") from None


def reduce_gradients_now(last_micro_step):
    """Gradients are summed across ranks at the last micro-step's backward only (told before the
    forward); the micro-steps before it accumulate locally."""
    if use_deepspeed:
        model.set_gradient_accumulation_boundary(last_micro_step)
    elif is_dist:
        model.require_backward_grad_sync = last_micro_step


def backward(loss):
    """Each sub-batch loss is a mean over its tokens; dividing by the number of micro-steps (and the
    mean over ranks in the reduction) makes the gradient the mean over the whole global batch."""
    if use_deepspeed:
        model.backward(loss)  # DeepSpeed's engine divides by gradient_accumulation_steps itself
    else:
        (loss / gradient_accumulation_steps).backward()


def check_step(step, loss_sum):
    """The one host sync of an optimizer step, before it is applied: the global mean loss, the
    gradient norm (clipped here; DeepSpeed clips inside its step) and whether any rank has been
    signalled to stop. A loss or norm that is not finite fails the run, so a diverged step never
    reaches the weights or a checkpoint. Returns (loss, norm, stop)."""
    grad_norm = torch.zeros((), device=device)
    if not use_deepspeed:
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    mean = all_ranks_sum(torch.stack([loss_sum / gradient_accumulation_steps,
                                      torch.tensor(float(bool(signalled)), device=device)])) / world_size
    step_loss, signal_share, norm = torch.cat([mean, grad_norm.float().view(1)]).tolist()
    if not (math.isfinite(step_loss) and math.isfinite(norm)):
        fail(f"step {step + 1}: loss {step_loss}, gradient norm {norm}: not finite, so the step was not applied")
    return step_loss, norm, signal_share > 0


def deepspeed_step(step, step_loss):
    """ZeRO-2's optimizer step: it finishes the gradient shards, clips, steps (and zeroes the
    gradients); it would skip a non-finite gradient, which fails the run. Returns the norm."""
    skipped = model.skipped_steps
    model.step()
    if model.skipped_steps > skipped:
        fail(f"step {step + 1}: loss {step_loss}, gradient norm not finite, so the step was not applied")
    return float(model.get_global_grad_norm() or 0.0)


signalled = []  # (name, time) of a SIGINT (Ctrl-C) or SIGTERM (a cluster scheduler's warning)


def on_signal(signum, frame):
    """The first signal asks for a stop: the current optimizer step finishes and is saved, and the
    ranks learn of it in that step's check. A second one (a second later or more: under torchrun
    one Ctrl-C reaches a worker twice, from the terminal and forwarded) stops at once."""
    name = signal.Signals(signum).name
    if not signalled:
        signalled.append((name, time.time()))
        if master:  # os.write, not log(): the signal may have come in the middle of a print or a log write,
            # which must not be entered again (the log file gets "stopped at step N by a signal")
            os.write(sys.stdout.fileno(), f"[{datetime.now():%H:%M:%S}] {name}: finishing this step, then saving a "
                     f"checkpoint ({name} again to stop at once)\n".encode())
    elif time.time() - signalled[0][1] > 1.0:
        raise SystemExit(f"{name} again: stopped at once; the run resumes from "
                         f"{checkpoint.checkpoints_dir(run_dir)}/latest")


signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)

step = start_step
t_start = t_last = time.time()
paused, pauses = 0.0, 0  # time spent in evaluations and checkpoints this session, and how many
steps_since_log = 0
stop_asked = False  # by a signal on any rank, known to every rank after the step's check
while True:
    stopping = step >= max_steps or stop_asked or (stop_at_step is not None and step >= stop_at_step)
    t_pause = time.time()
    if step > start_step or not resume_from:  # the step a run resumed from is saved already
        pauses += checkpoint_if_due(step, stopping)
    if stopping:
        break
    t_last += time.time() - t_pause  # tokens/s counts training time, not evaluation and checkpoints
    paused += time.time() - t_pause

    # one optimizer step = gradient_accumulation_steps micro-steps on this rank's sub-batches
    step_lr = get_lr(step)
    for group in optimizer.param_groups:
        group["lr"] = step_lr
    loss_sum = torch.zeros((), device=device)
    for micro_step, (x, y) in enumerate(next_batch(step)):
        reduce_gradients_now(micro_step == gradient_accumulation_steps - 1)
        with autocast:
            _, loss = model(x, y)  # mean cross-entropy of the sub-batch
        loss_sum += loss.detach()
        backward(loss)
    step_loss, norm, stop_asked = check_step(step, loss_sum)
    # the optimizer step
    if use_deepspeed:
        norm = deepspeed_step(step, step_loss)
    else:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step += 1
    steps_since_log += 1
    if step % log_every_n_steps == 0 or step == max_steps:
        now = time.time()
        tok_s = steps_since_log * tokens_per_step / (now - t_last)
        row = {"step": step, "loss": step_loss, "lr": step_lr, "grad_norm": norm, "tokens_per_s": tok_s}
        mfu = ""
        if peak_flops:
            row["mfu"] = flops_per_token * tok_s / (peak_flops * world_size)
            mfu = f", MFU {row['mfu']:.1%}"
        # what is left: the steps at this session's training speed, the pauses at their measured cost
        eta = ((now - t_start - paused) / (step - start_step) * (max_steps - step)
               + (paused / pauses if pauses else 0.0) * pauses_after(step))
        log(f"step {step}/{max_steps} | loss {step_loss:.4f} | lr {step_lr:.2e} | norm {norm:.3f} | "
            f"{tok_s:,.0f} tok/s{mfu} | elapsed {now - t_start:.0f}s | eta {eta:.0f}s")
        log_metrics(row)
        t_last, steps_since_log = now, 0


# -----------------------------------------------------------------------------
# the end
if master and sample_prompt and not stop_asked:
    prompt = torch.tensor([tokenizer.encode(sample_prompt, add_special_tokens=False).ids], device=device)
    torch.manual_seed(seed)
    with autocast:
        out = raw_model.eval().generate(prompt, max_new_tokens=min(60, max_seq_len - prompt.size(1)),
                                        temperature=0.8, top_k=50, eos_token_id=data.EOS_TOKEN_ID)
    log("sample: " + tokenizer.decode(out[0].tolist(), skip_special_tokens=True).replace("\n", " / "))
if stop_asked and step < max_steps:
    log(f"stopped at step {step} by a signal, with a checkpoint: run the same command again to continue"
        + (" (what is not on the Hub yet is uploaded first)" if uploader else ""))
if uploader:
    uploader.finish(0 if stop_asked else hf_wait_at_end_s)  # a scheduler's grace period is short
log(f"done: {step} steps in {run_dir} ({time.time() - t_start:.0f}s this session)")
if wandb_run is not None:
    wandb_run.finish()
if is_dist:
    barrier()  # every rank is done with the others before any lets go of the process group
    dist.destroy_process_group()
