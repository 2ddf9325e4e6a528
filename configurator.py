"""
Settings for train.py: a config file of plain assignments, then --key=value overrides.

    python train.py config/demo.py --lr=1e-3 --layer_suffixes=attention.v_proj,swiglu.w_2

Every value is checked against the type of its default in train.py; an unknown name fails with
the closest known ones. Also here: the .env file the guide asks users to create, and the nested
layout of training_config.yaml that pico-train (and pico-analyze) use.
"""

import ast
import difflib
import os
import textwrap

TYPES = (bool, int, float, str, list, type(None))

YAML_SECTIONS = {  # pico-analyze reads model.{d_model, attention_n_heads, attention_n_kv_heads} and checkpointing.run_name
    "model": "d_model n_layers vocab_size max_seq_len attention_n_heads attention_n_kv_heads activation_hidden_dim "
             "norm_eps position_emb_theta",
    "checkpointing": "run_name runs_dir save_every_n_steps save_log_spaced_until auto_resume stop_at_step save_to_hf "
                     "hf_repo_id hf_collection_slug hf_wait_at_end_s layer_suffixes sequence_idx learning_dynamics_batch_size "
                     "learning_dynamics_eval_data",
    "data": "dataset_name dataset_split tokenizer_path batch_size",
    "training": "max_steps gradient_accumulation_steps lr lr_scheduler lr_warmup_steps min_lr_ratio weight_decay "
                "adam_beta1 adam_beta2 adam_eps grad_clip device precision backend compile seed",
    "evaluation": "eval_dataset_name eval_dataset_split eval_every_n_steps eval_batch_size eval_max_rows sample_prompt",
    "monitoring": "log_every_n_steps save_to_wandb wandb_project wandb_entity",
}


def setting_names(namespace):
    """The settings of a module: its public globals of a plain type (imports and functions are not)."""
    return [k for k, v in namespace.items() if not k.startswith("_") and isinstance(v, TYPES)]


def check_type(key, value, default):
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif isinstance(default, str):
        ok = isinstance(value, str) or value is None
    else:  # a default of None takes any plain value
        ok = isinstance(value, TYPES)
    if not ok:
        raise SystemExit(f"config error: {key} must be {type(default).__name__} (like its default "
                         f"{default!r}), got {value!r}")
    return float(value) if isinstance(default, float) else value


def unknown(key, names):
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see the settings at the top of train.py"
    return SystemExit(f"config error: unknown setting {key!r}{hint}")


def configure(argv, settings):
    """Apply config files and --key=value overrides, in order, to the dict `settings` (train.py's
    globals()); only names that already exist there can be set."""
    names = setting_names(settings)
    defaults = {k: settings[k] for k in names}  # types are checked against these, whatever set a value before
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
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), namespace)
            for key, value in namespace.items():
                if key.startswith("_") or not isinstance(value, TYPES):
                    continue  # imports, helpers
                if key not in names:
                    raise unknown(key, names)
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
        if isinstance(defaults[key], str) and isinstance(value, (int, float)):
            value = text  # --run_name=2024 stays a string
        settings[key] = check_type(key, value, defaults[key])
    return names


def print_help(script):
    """Every setting with its default and comment, grouped as the script declares them (the block
    between its first two `# ----` lines is printed as it stands)."""
    with open(script) as f:
        block = f.read().split("# " + "-" * 77 + "\n")[1]
    print(f"usage: python {os.path.basename(script)} [config/<file>.py ...] [--key=value ...]\n"
          f"       torchrun --nproc_per_node=N {os.path.basename(script)} [the same]\n\n"
          f"Config files (plain assignments) and --key=value overrides apply in order; each value must have "
          f"the type of its default.\nThe settings and their defaults:\n")
    print(block.rstrip())


def describe(config):
    """The settings as a person reads them: a few lines per section of training_config.yaml."""
    lines = []
    for section, keys in YAML_SECTIONS.items():
        text = ", ".join(f"{k}={config[k]!r}" if isinstance(config[k], str) else f"{k}={config[k]}" for k in keys.split())
        lines += textwrap.wrap(text, 116, initial_indent=f"  {section}: ", subsequent_indent=" " * (len(section) + 4))
    return "\n".join(lines)


def nested(config):
    """training_config.yaml's layout: {section: {name: value}}."""
    out = {section: {k: config[k] for k in keys.split()} for section, keys in YAML_SECTIONS.items()}
    out["model"]["model_type"] = "pico_decoder"
    return out


def load_dotenv(path):
    """Honour the guide's .env (`export WANDB_API_KEY=...`) without printing any value."""
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip().removeprefix("export ").strip()
                if line and not line.startswith("#") and "=" in line:
                    key, value = line.split("=", 1)
                    os.environ.setdefault(key.strip(), value.strip().strip("'\""))
