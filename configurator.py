"""
Settings for train.py: a config file of plain assignments, then --key=value overrides.

    python train.py config/demo.py --lr=1e-3 --layer_suffixes=attention.v_proj,swiglu.w_2
    python train.py runs/demo/training_config.yaml --run_name=demo-again   # a run's own settings again

Every setting is declared once, in train.py's settings block: its name, default and comment, under
a `# <section>: ...` line that places it in training_config.yaml's nested layout (the one pico-train
writes and pico-analyze reads). Every value is checked against the type of its default; an unknown
name fails with the closest known ones; a value that cannot work (refuse_unworkable) fails with one
line. Also here: the .env file the guide asks users to create.
"""

import ast
import difflib
import math
import os
import re
import textwrap

import yaml

from schedules import SCHEDULES

TYPES = (bool, int, float, str, list, type(None))

RULE = "# " + "-" * 77 + "\n"  # the line above and below a script's settings block
WRITTEN_ONLY = ("model_type", "world_size")  # training_config.yaml has them for its readers; not settings
# where and whether a run writes or sends anything: a run's YAML (perhaps someone else's) never sets these;
# they come from the command line, a config/*.py file or train.py's defaults
NOT_FROM_YAML = ("runs_dir", "run_name", "auto_resume", "save_to_hf", "hf_repo_id", "hf_collection_slug",
                 "hf_wait_at_end_s", "save_to_wandb", "wandb_project", "wandb_entity", "data_cache_dir")
SCALARS = (bool, int, float, str, type(None))
WHOLE_NUMBERS = ("stop_at_step", "eval_every_n_steps", "eval_max_rows")  # settings whose default None stands for
# a whole number; every other setting whose default is None takes a name (text): --run_name=2024 is "2024"


def sections(script):
    """{setting: section of training_config.yaml} for every setting a script declares between its
    first two RULE lines, in order: a `# <section>: ...` comment line starts a section."""
    with open(script) as f:
        block = f.read().split(RULE)[1]
    out, section = {}, None
    for line in block.splitlines():
        if m := re.match(r"# ([a-z_]+): ", line):
            section = m.group(1)
        elif m := re.match(r"([a-z_0-9]+) = ", line):
            if section is None:
                raise SystemExit(f"{script}: the setting {m.group(1)} comes before any '# <section>: ...' line")
            out[m.group(1)] = section
    return out


def check_type(key, value, default):
    whole = type(default) is int or default is None and key in WHOLE_NUMBERS
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):  # (inf and nan: no setting works with them)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif whole:
        ok = isinstance(value, int) and not isinstance(value, bool) or default is None and value is None
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:  # a name: a default of "" or None
        ok = isinstance(value, str) or value is None
    if not ok:
        kind = ("a finite number" if isinstance(default, float) else "a whole number" if whole else
                "True or False" if isinstance(default, bool) else "a list of names" if isinstance(default, list)
                else "a name (text)")
        raise SystemExit(f"config error: {key} must be {kind}{' or None' if default is None else ''} (its default "
                         f"is {default!r}), got {value!r}")
    return float(value) if isinstance(default, float) else value


# names other trainers give some of these settings (nanoGPT, transformers' Trainer and Llama config, Lightning)
ELSEWHERE = {
    "lr": ["learning_rate", "max_lr"], "lr_warmup_steps": ["warmup_steps", "warmup_iters", "num_warmup_steps"],
    "max_steps": ["max_iters", "num_steps", "train_steps", "num_train_steps", "total_steps", "lr_decay_iters"],
    "min_lr_ratio": ["min_lr"], "lr_scheduler": ["lr_scheduler_type", "lr_schedule", "scheduler"],
    "adam_beta1": ["beta1"], "adam_beta2": ["beta2"], "adam_eps": ["adam_epsilon", "eps"],
    "grad_clip": ["max_grad_norm", "clip_grad", "gradient_clipping", "clip_grad_norm"],
    "gradient_accumulation_steps": ["grad_accum", "accumulate_grad_batches", "gradient_accumulation"],
    "batch_size": ["per_device_train_batch_size", "train_batch_size", "global_batch_size", "micro_batch_size"],
    "d_model": ["n_embd", "hidden_size", "dim", "d_embed"], "n_layers": ["n_layer", "num_hidden_layers", "num_layers"],
    "attention_n_heads": ["n_head", "n_heads", "num_attention_heads"],
    "attention_n_kv_heads": ["n_kv_head", "n_kv_heads", "num_key_value_heads"],
    "activation_hidden_dim": ["intermediate_size", "ffn_dim", "hidden_dim", "d_ff"],
    "max_seq_len": ["block_size", "seq_len", "context_length", "max_position_embeddings", "sequence_length"],
    "norm_eps": ["rms_norm_eps", "layer_norm_eps"], "position_emb_theta": ["rope_theta", "rope_base"],
    "runs_dir": ["out_dir", "output_dir"], "eval_every_n_steps": ["eval_interval", "eval_steps"],
    "log_every_n_steps": ["log_interval", "logging_steps"], "save_every_n_steps": ["save_steps", "checkpoint_every"],
    "save_to_wandb": ["wandb_log", "report_to"], "precision": ["dtype", "mixed_precision", "bf16"],
    "auto_resume": ["resume", "resume_from_checkpoint"], "dataset_name": ["dataset", "dataset_path"],
}


def unknown(key, names):
    here = [ours for ours, theirs in ELSEWHERE.items() if key.lower() in theirs]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    if here:
        hint = f"; here it is {here[0]} (python train.py --help says what each setting means)"
    elif close:
        hint = f"; did you mean {', '.join(close)}?"
    else:
        hint = "; see the settings at the top of train.py"
    return SystemExit(f"config error: unknown setting {key!r}{hint}")


def configure(argv, settings):
    """Apply config files and --key=value overrides, in order, to the dict `settings` (train.py's
    globals()); only names that already exist there can be set. Returns (the settings' names, the
    settings a run's YAML held but may not set: NOT_FROM_YAML)."""
    names = list(sections(settings["__file__"]))
    defaults = {k: settings[k] for k in names}  # types are checked against these, whatever set a value before
    ignored = []
    if "--help" in argv or "-h" in argv:
        print_help(settings["__file__"])
        raise SystemExit(0)
    for i, arg in enumerate(argv):
        if arg.startswith("--") and "=" not in arg:
            example = f"--{arg[2:]}={argv[i + 1]}" if i + 1 < len(argv) else f"{arg}=VALUE"
            raise SystemExit(f"config error: {arg} has no value; write it with '=', as {example}")
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise SystemExit(f"config error: no config file {arg!r} (settings are written --key=value)")
            namespace = {}
            if arg.endswith((".yaml", ".yml")):
                namespace = read_yaml(arg)
            else:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), namespace)
            for key, value in namespace.items():
                if key.startswith("_") or not isinstance(value, TYPES):
                    continue  # imports, helpers
                if key not in names:
                    raise unknown(key, names)
                if arg.endswith((".yaml", ".yml")) and key in NOT_FROM_YAML:
                    ignored.append(key)
                    continue
                settings[key] = check_type(key, value, defaults[key])
            continue
        key, _, text = arg[2:].partition("=")
        if key not in names:
            raise unknown(key, names)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string: --run_name=demo
        if isinstance(defaults[key], list) and isinstance(value, str):
            value = [v for v in value.split(",") if v]  # --layer_suffixes=a,b (empty: none)
        named = isinstance(defaults[key], str) or defaults[key] is None and key not in WHOLE_NUMBERS
        if named and value is not None and not isinstance(value, str):
            value = text  # --run_name=2024 stays a name
        settings[key] = check_type(key, value, defaults[key])
    return names, ignored


class PlainYaml(yaml.SafeLoader):
    """yaml.SafeLoader that refuses, as it reads, what no training_config.yaml has: aliases (*name,
    which can make a few bytes expand into gigabytes) and nesting deeper than MAX_DEPTH (a few KB of
    brackets would otherwise take hours to parse, or overflow Python's stack)."""
    MAX_DEPTH = 8

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("it uses YAML aliases (*name), which a training_config.yaml never has: they can "
                                 "make a few bytes expand into gigabytes")
        self.depth = getattr(self, "depth", 0) + 1
        if self.depth > self.MAX_DEPTH:
            raise yaml.YAMLError(f"it nests values more than {self.MAX_DEPTH} deep (a training_config.yaml is "
                                 f"section: setting: value)")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_plain_yaml(path, limit=1_000_000):
    """The value in a YAML file that no one can make this process hang on or run code with: a plain
    file (no link, FIFO or device) of at most `limit` bytes, read by PlainYaml. Raises
    checkpoint.CheckpointError or yaml.YAMLError, each with a message that says why."""
    import checkpoint  # (here: it loads torch, which the rest of this file does not need)
    text = checkpoint.read_plain(path, limit, "training_config.yaml").decode("utf-8", errors="replace")
    return yaml.load(text, Loader=PlainYaml)  # noqa: S506 - PlainYaml is a SafeLoader


def read_yaml(path):
    """The settings in a training_config.yaml (the layout train.py writes: {section: {setting: value}}),
    read by load_plain_yaml: a file from someone else's run cannot run code or make this hang."""
    import checkpoint
    try:
        tree = load_plain_yaml(path)
    except checkpoint.CheckpointError as e:
        raise SystemExit(f"config error: {e}") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"config error: {path} is not plain YAML ({str(e).splitlines()[0]}); a run's "
                         f"training_config.yaml holds only sections of settings and values") from None
    if not isinstance(tree, dict) or not all(isinstance(v, dict) for v in tree.values()):
        raise SystemExit(f"config error: {path} is not laid out as training_config.yaml is (section: setting: value)")
    out = {}
    for section, values in tree.items():
        for key, value in values.items():
            if isinstance(value, dict):
                raise SystemExit(f"config error: {path}: {section}.{key} is nested deeper than training_config.yaml "
                                 f"(section: setting: value); train.py's settings have flat names (python train.py "
                                 f"--help lists them): write them in a config/*.py file")
            if key not in WRITTEN_ONLY:
                out[key] = value
    return out


def print_help(script):
    """Every setting with its default and comment, grouped as the script declares them (the block
    between its first two `# ----` lines is printed as it stands)."""
    with open(script) as f:
        block = f.read().split(RULE)[1]
    print(f"usage: python {os.path.basename(script)} [config/<file>.py | <run>/training_config.yaml ...] "
          f"[--key=value ...]\n"
          f"       torchrun --nproc_per_node=N {os.path.basename(script)} [the same]\n\n"
          f"Config files (plain assignments, or a run's training_config.yaml) and --key=value overrides apply in "
          f"order; each value must have the type of its default.\nThe settings and their defaults:\n")
    print(block.rstrip())


def nested(config, script):
    """training_config.yaml's layout: {section: {name: value}}, sections in the script's order."""
    out = {}
    for name, section in sections(script).items():
        out.setdefault(section, {})[name] = config[name]
    out["model"]["model_type"] = "pico_decoder"
    return out


def write_yaml(config, script, path, **written_only):
    """training_config.yaml (nested(), plus the WRITTEN_ONLY values given), replaced atomically."""
    tree = nested(config, script)
    tree["training"].update(written_only)
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump(tree, f, sort_keys=False)
    os.replace(path + ".tmp", path)


def describe(config, script):
    """The settings as a person reads them: a few lines per section of training_config.yaml."""
    lines = []
    for section, values in nested(config, script).items():
        text = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                         for k, v in values.items() if k != "model_type")
        lines += textwrap.wrap(text, 116, initial_indent=f"  {section}: ", subsequent_indent=" " * (len(section) + 4))
    return "\n".join(lines)


def load_dotenv(path):
    """Honour the guide's .env (`export WANDB_API_KEY=...`) without printing any value."""
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip().removeprefix("export ").strip()
                if line and not line.startswith("#") and "=" in line:
                    key, value = line.split("=", 1)
                    os.environ.setdefault(key.strip(), value.strip().strip("'\""))


def batch_split(batch_size, gradient_accumulation_steps, world_size):
    """The sub-batch each rank feeds per micro-step: batch_size = accumulation steps x world_size x
    sub-batch. A split that does not divide raises ValueError naming the accumulation steps that
    would, for this world size, with the sub-batch each gives."""
    if batch_size % (gradient_accumulation_steps * world_size) == 0:
        return batch_size // (gradient_accumulation_steps * world_size)
    msg = (f"batch_size {batch_size} is not divisible by gradient_accumulation_steps {gradient_accumulation_steps} "
           f"x world_size {world_size} = {gradient_accumulation_steps * world_size}")
    if batch_size % world_size:
        raise ValueError(f"{msg}; no gradient_accumulation_steps can split it over {world_size} ranks: make "
                         f"batch_size a multiple of {world_size} (or use a number of processes that divides it)")
    per_rank = batch_size // world_size
    choices = [a for a in range(1, per_rank + 1) if per_rank % a == 0]
    raise ValueError(f"{msg}; with {world_size} rank(s), gradient_accumulation_steps can be " +
                     ", ".join(f"{a} (sub-batch {per_rank // a})" for a in choices))


def auto_backend(n_params, world_size, gpu_bytes=None):
    """backend="auto": DDP, unless the fp32 weights, gradients and AdamW state (16 bytes a parameter)
    would take more than half of each GPU (gpu_bytes; None: not on GPUs), where ZeRO-2 shards the
    gradients and AdamW state across the ranks. DDP sends the gradient once an optimizer step,
    overlapped with the backward pass; ZeRO-2 (DeepSpeed 0.19.8) reduces it at every micro-step and
    gathers the weights after the step: 8.5x DDP's bytes at 8 micro-steps (docs/clusters.md#backends)."""
    return "deepspeed" if gpu_bytes and world_size > 1 and 16 * n_params > gpu_bytes / 2 else "ddp"


def refuse_unworkable(s):
    """Settings that cannot work, refused with one line each (SystemExit) before train.py makes or
    loads anything. s: train.py's settings (its globals())."""
    adam_eps, stop_at_step, max_steps, max_seq_len = s["adam_eps"], s["stop_at_step"], s["max_steps"], s["max_seq_len"]
    sequence_idx, run_name, device = s["sequence_idx"], s["run_name"], s["device"]
    precision, lr_scheduler = s["precision"], s["lr_scheduler"]
    for name, least, hint in (("batch_size", 1, ""), ("gradient_accumulation_steps", 1, ""),
                              ("save_every_n_steps", 1, ""), ("log_every_n_steps", 1, ""), ("eval_batch_size", 1, ""),
                              ("learning_dynamics_batch_size", 1, ""),
                              ("eval_max_rows", 1, " (None: the whole evaluation set)"), ("stop_at_step", 0, ""),
                              ("save_log_spaced_until", 0, ""),
                              ("max_steps", 0, " (the run's length in optimizer steps)"),
                              ("eval_every_n_steps", 0, " (0: evaluate at the end only)"), ("lr_warmup_steps", 0, ""),
                              ("lr", 0, ""), ("grad_clip", 0, " (0: no clipping)"), ("data_cache_gb", 0, ""),
                              ("weight_decay", 0, " (0: none)"),
                              ("dist_timeout_min", 1, " (minutes a rank waits for the others)")):
        value = s[name]
        if value is not None and (isinstance(value, (bool, str, list)) or value < least):
            raise SystemExit(f"config error: {name} must be a number of at least {least}, got {value!r}{hint}")
    for name in ("adam_beta1", "adam_beta2", "min_lr_ratio", "lr_decay_fraction"):
        value = s[name]
        if not 0 <= value <= 1 or (name.startswith("adam") and value == 1):
            bound = "below" if name.startswith("adam") else "at most"
            raise SystemExit(f"config error: {name} must be at least 0 and {bound} 1, got {value!r}")
    if not adam_eps > 0:
        raise SystemExit(f"config error: adam_eps must be above 0 (it keeps AdamW's division finite), got {adam_eps!r}")
    if s["dist_timeout_min"] > 10080:
        raise SystemExit(f"config error: dist_timeout_min must be at most 10080 (a week), got {s['dist_timeout_min']}"
                         f": a rank that waits longer for the others has lost them")
    if stop_at_step is not None and stop_at_step > max_steps:
        raise SystemExit(f"config error: stop_at_step {stop_at_step} is past max_steps {max_steps}, so it would "
                         f"never be reached: the run ends at max_steps")
    if not -max_seq_len <= sequence_idx < max_seq_len:
        raise SystemExit(f"config error: sequence_idx {sequence_idx} is not a token position of a {max_seq_len}-token "
                         f"sequence (0 to {max_seq_len - 1}, or -1 to -{max_seq_len} from the end)")
    if run_name is not None and (run_name in ("", ".") or ".." in run_name or "/" in run_name or os.sep in run_name):
        raise SystemExit(f"config error: run_name {run_name!r} must be a plain folder name (no '/', no '..', not "
                         f"empty): the run is written to runs_dir/run_name")
    if s["save_to_hf"] and not s["hf_repo_id"]:
        raise SystemExit("config error: save_to_hf=True needs hf_repo_id (e.g. 'your-name/pico-decoder-tiny')")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise SystemExit(f"config error: device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")
    if precision not in ("auto", "bf16", "fp32"):
        raise SystemExit(f"config error: precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if lr_scheduler not in SCHEDULES:
        raise SystemExit(f"config error: lr_scheduler must be one of {', '.join(map(repr, SCHEDULES))} (schedules.py), "
                         f"got {lr_scheduler!r}")
