"""
Learning dynamics: what chosen layers compute and how they are being pushed, at every checkpoint.

For each nn.Linear whose name ends with one of `layer_suffixes` (pico-train's defaults are the
layers that write into the residual stream: attention.v_proj, attention.o_proj, swiglu.w_2) we save

    activations  the layer's output at token position `sequence_idx`, one row per sequence  [N, out]
    weights      the layer's weight                                                        [out, in]
    gradients    d(mean token cross-entropy over the N sequences) / d(weight)              [out, in]

for two splits: `train`, the global batch the next optimizer step trains on, and `val`, a fixed
set that is the same at every step. Files (pico-analyze reads them):

    checkpoints/step_<N>/learning_dynamics/{split}_{activations,weights,gradients}.pt
    checkpoints/step_<N>/learning_dynamics/train_data/   (the train rows, Dataset.save_to_disk)

Each .pt is a dict {"layers.<i>.<suffix>": float32 CPU tensor}, the same keys in all three.

Capture never touches training: gradients come from torch.autograd.grad, which returns them
without writing any parameter's .grad (so no DDP or DeepSpeed hook fires and the next step's
gradients are untouched), rows are read without moving the data stream, and nothing is random.
"""

import json
import math
import os
import shutil

import numpy as np
import torch
import torch.distributed as dist

import checkpoint

KINDS = ("activations", "weights", "gradients")


def find_layers(model, layer_suffixes):
    """{name: module} of the nn.Linear layers whose names end with one of the suffixes."""
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and any(name.endswith(s) for s in layer_suffixes)}
    if layer_suffixes and not layers:
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:6]
        raise ValueError(f"layer_suffixes {layer_suffixes} match no linear layer of the model "
                         f"(its layers are named like {names})")
    return layers


def eval_sums(per_token):
    """An evaluation's numbers for one batch, by name, from its per-token results (the model's
    reduction="none" with top1=True): each a float64 [sum, count], so that batches and ranks add
    up and the number reported is sum / count (eval_results). A metric that needs only the losses
    is one line here; one that needs the logits is also a flag in model.head_losses, as top1 is."""
    losses = per_token["loss"]  # (B, T)
    sums = {"loss": (losses.sum(), losses.numel()),  # cross-entropy per token
            "paloma": (losses.mean(1).exp().sum(), len(losses)),  # mean per-sequence perplexity (pico-train's)
            "top1_accuracy": (per_token["top1"].sum(), losses.numel())}  # the target was the most likely token
    return {k: torch.stack([s.double(), torch.tensor(n, dtype=torch.float64, device=s.device)])
            for k, (s, n) in sums.items()}


def add_sums(totals, sums):
    """Two sets of eval_sums() added by name ({} adds nothing)."""
    return {k: totals.get(k, 0) + sums.get(k, 0) for k in {**totals, **sums}}


def eval_results(totals, dataset):
    """What an evaluation reports: eval_sums() added up over this rank's rows, then over the ranks
    (a collective: every rank calls it; a rank that had no rows brings {}), as sum / count per
    number, with the perplexity exp(loss), the rows and the data set's name."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, {k: v.cpu() for k, v in totals.items()})
        totals = {}
        for theirs in everyone:
            totals = add_sums(totals, theirs)
    sums = dict(zip(totals, torch.stack(list(totals.values())).tolist(), strict=True))  # {name: [sum, count]}
    loss = sums["loss"][0] / sums["loss"][1]
    return {**{k: s / n for k, (s, n) in sums.items()}, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "rows": int(sums["paloma"][1]), "dataset": dataset}


def capture(model, seqs, layer_suffixes, sequence_idx=-1, batch_size=8, rank=0, world_size=1,
            device="cpu", autocast=None, evaluate=False):
    """Activations, weights and gradients of the chosen layers over the rows of `seqs` (an (N, L)
    int64 array: inputs row[:-1], targets row[1:]). Rows are split into contiguous blocks over
    the ranks and processed batch_size at a time; every rank returns the full result in row order.
    evaluate: also result["eval"], this rank's eval_sums() of its rows from the same forward pass
    (eval_results() adds them over the ranks and gives the evaluation's numbers)."""
    layers = find_layers(model, layer_suffixes)
    names = list(layers)
    weights = [layers[n].weight for n in names]
    seqs = np.asarray(seqs)
    n_rows, n_tokens = len(seqs), seqs.shape[0] * (seqs.shape[1] - 1)
    lo, hi = n_rows * rank // world_size, n_rows * (rank + 1) // world_size  # this rank's block

    acts = {n: [] for n in names}
    hooks = [layers[n].register_forward_hook(
        lambda m, inp, out, n=n: acts[n].append(out[:, sequence_idx].detach().float()))
        for n in names]
    grads = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
    totals = {}  # eval_sums of this rank's rows, as train.py's evaluate() adds them
    head_grad = any(w is model.de_embedding_proj.weight for w in weights)  # else the head's weight gradient is waste
    try:
        for i in range(lo, hi, batch_size):
            rows = torch.from_numpy(seqs[i:min(i + batch_size, hi)]).to(device)
            with autocast or torch.autocast("cpu", enabled=False):
                _, (loss, per_token) = model(rows[:, :-1], rows[:, 1:], reduction="both", head_grad=head_grad,
                                             top1=evaluate)
            if evaluate:
                totals = add_sums(totals, eval_sums(per_token))
            # weight each sub-batch mean by its share of all N rows' tokens: the sum over
            # sub-batches and ranks is the gradient of the mean over all N rows
            share = rows[:, 1:].numel() / n_tokens
            for g, gw in zip(grads, torch.autograd.grad(loss * share, weights), strict=True):
                g += gw.float()
    finally:
        for h in hooks:
            h.remove()

    out_dims = [w.shape[0] for w in weights]
    # local: (rows on this rank, the chosen layers' output features side by side)
    local = torch.cat([torch.cat(acts[n]) if acts[n] else torch.zeros(0, d, device=weights[0].device)
                       for n, d in zip(names, out_dims, strict=True)], dim=1) if names else None
    if world_size > 1:
        for g in grads:
            dist.all_reduce(g)
        blocks = [None] * world_size
        dist.all_gather_object(blocks, local.cpu())  # blocks arrive in rank order = row order
        local = torch.cat(blocks)
    activations = dict(zip(names, local.cpu().split(out_dims, dim=1), strict=True)) if names else {}
    result = {
        "activations": {n: a.contiguous() for n, a in activations.items()},
        "weights": {n: w.detach().float().cpu().clone() for n, w in zip(names, weights, strict=True)},
        "gradients": {n: g.cpu() for n, g in zip(names, grads, strict=True)},
    }
    if evaluate:
        result["eval"] = totals
    assert all(a.shape[0] == n_rows for a in result["activations"].values())
    return result


def save(result, folder, split):
    """Write {split}_{activations,weights,gradients}.pt into folder."""
    os.makedirs(folder, exist_ok=True)
    for kind in KINDS:
        torch.save(result[kind], os.path.join(folder, f"{split}_{kind}.pt"))


def save_rows(seqs, folder, tokenizer=None):
    """The captured rows as the folder `datasets` writes with Dataset.save_to_disk, which pico-analyze
    reads with datasets.load_from_disk: one Arrow stream whose schema metadata holds the features,
    then dataset_info.json and state.json. Written here with pyarrow (importing `datasets` would
    cost every checkpoint 0.7 s). input_ids are a LargeList, which older `datasets` versions read too."""
    import pyarrow as pa
    rows = np.asarray(seqs).astype(np.int32)
    features = {"input_ids": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "LargeList"}}
    columns = {"input_ids": pa.array(list(rows), type=pa.large_list(pa.int32()))}
    if tokenizer is not None:
        features["text"] = {"dtype": "string", "_type": "Value"}
        columns["text"] = pa.array(tokenizer.decode_batch(rows.tolist(), skip_special_tokens=False), type=pa.string())
    table = pa.table(columns).replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    os.makedirs(folder, exist_ok=True)
    arrow = os.path.join(folder, "data-00000-of-00001.arrow")
    with pa.OSFile(arrow, "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)
    info = {"citation": "", "description": "", "features": features, "homepage": "", "license": ""}
    state = {"_data_files": [{"filename": os.path.basename(arrow)}], "_fingerprint": checkpoint.file_sha256(arrow)[:16],
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    for name, content in (("dataset_info.json", info), ("state.json", state)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2, sort_keys=True)


def load(run_dir, step, split="val"):
    """(activations, weights, gradients) of one checkpoint's split, for analysis notebooks:
        acts, weights, grads = dynamics.load("runs/demo", 100, "val")"""
    folder = os.path.join(checkpoint.step_dir(run_dir, step), "learning_dynamics")
    if not os.path.exists(os.path.join(folder, f"{split}_activations.pt")):
        name = os.path.join("learning_dynamics", f"{split}_activations.pt")
        have = [s for s in checkpoint.saved_steps(run_dir)
                if os.path.exists(os.path.join(checkpoint.step_dir(run_dir, s), name))]
        raise FileNotFoundError(f"no {split} learning dynamics at step {step} in {run_dir}; the steps that have "
                                f"them: {', '.join(map(str, have)) or 'none'}"
                                + (" (a run's final step has no 'train' split: no next batch)"
                                   if split == "train" else ""))
    checkpoint.scan(folder)  # as a resume loads: no pickled code, no compressed members
    return tuple(checkpoint.load_state(os.path.join(folder, f"{split}_{kind}.pt")) for kind in KINDS)


# ----------------------------------------------------------------------------------------------
# across checkpoints: per-layer summaries, and `python dynamics.py plot runs/<run>`

def linear_cka(x, y):
    """Linear CKA (Kornblith et al. 2019) of two activation matrices over the same N rows, as
    pico-analyze defines it: column-centred, ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F); 1 for x with itself."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return ((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())).item()


def summaries(weights, gradients, previous_weights=None, split="val"):
    """{"<layer>/<what>": number} for one checkpoint: weight norm, relative change from the
    previous checkpoint's weights, gradient norm of the split. What the plot command draws and
    wandb logs at each checkpoint."""
    out = {}
    for name, w in weights.items():
        out[f"{name}/weight_norm"] = w.norm().item()
        if previous_weights is not None:
            before = previous_weights[name]
            out[f"{name}/weight_rel_change"] = ((w - before).norm() / before.norm()).item()
        out[f"{name}/grad_norm_{split}"] = gradients[name].norm().item()
    return out


def layer_table(run_dir):
    """One row per checkpoint that has `val` dynamics: {"step", "<layer>/weight_norm",
    "<layer>/weight_rel_change", "<layer>/grad_norm_val", "<layer>/grad_norm_train",
    "<layer>/cka_to_final"} (the val activations' CKA to the last checkpoint's)."""
    name = os.path.join("learning_dynamics", "val_activations.pt")
    steps = [s for s in checkpoint.saved_steps(run_dir)
             if os.path.exists(os.path.join(checkpoint.step_dir(run_dir, s), name))]
    if not steps:
        return []
    final_acts = load(run_dir, steps[-1], "val")[0]
    rows, previous = [], None
    for step in steps:
        acts, weights, grads = load(run_dir, step, "val")
        row = {"step": step, **summaries(weights, grads, previous)}
        if os.path.exists(os.path.join(checkpoint.step_dir(run_dir, step), "learning_dynamics", "train_gradients.pt")):
            row.update(summaries(*load(run_dir, step, "train")[1:], split="train"))
        row.update({f"{n}/cka_to_final": linear_cka(a, final_acts[n]) for n, a in acts.items()})
        rows.append(row)
        previous = weights
    return rows


def write_csv(path, rows):
    import csv
    first = [k for k in ("run", "step") if any(k in r for r in rows)]
    columns = first + sorted({k for r in rows for k in r} - set(first))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


# how the plot draws an evaluation's numbers: (axis label, scale); another number gets its name, linear
EVAL_AXES = {"paloma": ("paloma (mean per-sequence perplexity)", "log"),  # falls by orders of magnitude
             "top1_accuracy": ("top-1 accuracy (the next token ranked first)", "linear")}


def read_run(run_dir, notes):
    """(the training rows of logs/metrics.jsonl, the evaluations {"step", name: number}), read as
    plain files; what cannot be read is passed over with a note."""
    import json
    import re
    train, bad = checkpoint.read_metrics(run_dir)
    if bad:
        notes.append(f"{bad} line(s) of {run_dir}/logs/metrics.jsonl are not rows of numbers (a crash mid-write?) "
                     f"and were passed over")
    eval_dir = os.path.join(run_dir, "eval_results")
    evals = []
    for step in sorted(int(n[5:-5]) for n in (os.listdir(eval_dir) if os.path.isdir(eval_dir) else [])
                       if re.fullmatch(r"step_\d+\.json", n)):
        try:
            results = json.loads(checkpoint.read_plain(os.path.join(eval_dir, f"step_{step}.json"), 2**20, "result"))
        except (ValueError, RecursionError):
            results = notes.append(f"{eval_dir}/step_{step}.json is not a JSON object of numbers: passed over")
        if isinstance(results, dict):
            evals.append({"step": step, **{k: v for k, v in results.items() if isinstance(v, float)}})
    return [r for r in train if "loss" in r], evals


def x_axis(run_dirs):
    """How a figure's step axis is scaled: symlog where a run has log-spaced checkpoints (early
    steps get room), linear otherwise; from 0."""
    log_axis = any(1 in (s := checkpoint.saved_steps(r)) and 2 in s for r in run_dirs)

    def scale(ax):
        if log_axis:
            ax.set_xscale("symlog", linthresh=1)  # linear from 0 to 1, logarithmic after
        ax.set_xlim(left=0)
    return scale


def plot(run_dir):
    """PNG figures and the CSV behind each into runs/<run>/plots/, from the run folder alone."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out = os.path.join(run_dir, "plots")
    os.makedirs(out, exist_ok=True)
    written, notes = [], []
    train, evals = read_run(run_dir, notes)
    scale = x_axis([run_dir])

    by_step = {}
    for r in train:
        by_step.setdefault(r["step"], {}).update(train_loss=r["loss"], lr=r["lr"])
    for e in evals:
        by_step.setdefault(e["step"], {}).update({f"eval_{k}": v for k, v in e.items() if k != "step"})
    write_csv(os.path.join(out, "loss.csv"), [{"step": s, **v} for s, v in sorted(by_step.items())])
    # the loss, then a panel for each other number the evaluations have (dynamics.eval_sums names them)
    others = list(dict.fromkeys(k for e in evals for k in e if k not in ("step", "loss", "perplexity")))
    fig, axes = plt.subplots(1, 1 + len(others), figsize=(5.5 * (1 + len(others)), 4), squeeze=False)
    ax1 = axes[0][0]
    if train:
        ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss")
        lr_ax = ax1.twinx()
        lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="grey", ls=":", label="learning rate")
        lr_ax.set_ylabel("learning rate")
    if evals:
        ax1.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="evaluation loss")
    ax1.set(xlabel="step", ylabel="loss (nats per token)", title="loss")
    ax1.legend(loc="lower left")
    for ax, name in zip(axes[0][1:], others, strict=True):
        ax.plot(*zip(*[(e["step"], e[name]) for e in evals if name in e], strict=True), "o-", color="C2")
        label, yscale = EVAL_AXES.get(name, (name.replace("_", " "), "linear"))
        ax.set(xlabel="step", ylabel=label, yscale=yscale, title=f"evaluation: {name}")
    for ax in axes[0]:
        scale(ax)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=100)
    plt.close(fig)
    written += ["loss.png", "loss.csv"]

    table = layer_table(run_dir)
    if not table:
        notes.append("no learning dynamics in this run (layer_suffixes was empty?): only the loss plots")
    else:
        write_csv(os.path.join(out, "layers.csv"), table)
        layers = sorted({k.rsplit("/", 1)[0] for k in table[0] if k != "step"},
                        key=lambda n: (n.split(".", 2)[-1], int(n.split(".")[1])))
        suffixes = list(dict.fromkeys(n.split(".", 2)[-1] for n in layers))
        depth = max(int(n.split(".")[1]) for n in layers) or 1
        panels = [("weight_norm", "weight norm"), ("weight_rel_change", "change since the last checkpoint"),
                  ("grad_norm", "gradient norm (val -, train --)"), ("cka_to_final", "val activations: CKA to final")]
        fig, axes = plt.subplots(len(suffixes), len(panels), figsize=(4.2 * len(panels), 3.2 * len(suffixes)),
                                 squeeze=False)
        colour = plt.get_cmap("viridis")
        for i, suffix in enumerate(suffixes):
            for j, (what, title) in enumerate(panels):
                ax = axes[i][j]
                for name in (n for n in layers if n.endswith(suffix)):
                    c = colour(int(name.split(".")[1]) / depth)
                    for key, ls in ((f"{name}/{what}", "-"),) if what != "grad_norm" else \
                            ((f"{name}/grad_norm_val", "-"), (f"{name}/grad_norm_train", "--")):
                        points = [(r["step"], r[key]) for r in table if key in r]
                        if points:
                            ax.plot(*zip(*points, strict=True), ls, color=c, marker=".",
                                    label=f"layer {name.split('.')[1]}" if ls == "-" else None)
                ax.set(title=title if i == 0 else "", xlabel="step", ylabel=suffix if j == 0 else "")
                scale(ax)
            axes[i][0].legend(fontsize="small", title="colour = depth")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "layers.png"), dpi=80)
        plt.close(fig)
        written += ["layers.png", "layers.csv"]
    return [os.path.join(out, w) for w in written], notes


def compare(run_dirs, out):
    """Runs side by side on one picture (a fork beside its parent): training and evaluation loss and
    the learning rate, then for each kind of captured layer (v_proj, w_2, ...) its weight norm, its
    change since the last checkpoint and its val gradient norm, each the mean over the layers of that
    kind, a colour per run. Writes `out` (PNG) and the numbers beside it (the same name, .csv)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    notes, names = [], [os.path.basename(os.path.normpath(r)) for r in run_dirs]
    runs = [read_run(r, notes) for r in run_dirs]
    tables = [layer_table(r) for r in run_dirs]
    kinds = list(dict.fromkeys(k.rsplit("/", 1)[0].split(".", 2)[-1] for t in tables for row in t for k in row
                               if k != "step"))
    metrics = [("weight_norm", "weight norm"), ("weight_rel_change", "change since the last checkpoint"),
               ("grad_norm_val", "gradient norm (val)")]
    mean_rows = []  # per run and step: the mean over the layers of each kind
    for name, table in zip(names, tables, strict=True):
        for row in table:
            means = {}
            for kind in kinds:
                for what, _ in metrics:
                    values = [v for k, v in row.items() if k.endswith(f".{kind}/{what}")]
                    if values:
                        means[f"{kind}/{what}"] = sum(values) / len(values)
            mean_rows.append({"run": name, "step": row["step"], **means})
    fig, axes = plt.subplots(1 + len(kinds), 3, figsize=(13.5, 3.3 * (1 + len(kinds))), squeeze=False)
    scale, colours = x_axis(run_dirs), [f"C{i}" for i in range(len(run_dirs))]
    for (train, evals), name, c in zip(runs, names, colours, strict=True):
        axes[0][0].plot([r["step"] for r in train], [r["loss"] for r in train], color=c, alpha=0.8, label=name)
        axes[0][1].plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", color=c, label=name)
        axes[0][2].plot([r["step"] for r in train], [r["lr"] for r in train], color=c, label=name)
    for ax, title in zip(axes[0], ("training loss", "evaluation loss", "learning rate"), strict=True):
        ax.set(title=title, xlabel="step")
        ax.legend(fontsize="small")
    for i, kind in enumerate(kinds, start=1):
        for j, (what, title) in enumerate(metrics):
            ax = axes[i][j]
            for name, c in zip(names, colours, strict=True):
                points = [(r["step"], r[f"{kind}/{what}"]) for r in mean_rows if r["run"] == name and
                          f"{kind}/{what}" in r]
                if points:
                    ax.plot(*zip(*points, strict=True), ".-", color=c, label=name)
            ax.set(title=f"{kind}: {title}", xlabel="step", ylabel="mean over its layers" if j == 0 else "")
    for ax in axes.flat:
        scale(ax)
    fig.suptitle("  vs  ".join(names))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    rows = {(r["run"], r["step"]): r for r in mean_rows}  # one row per run and step, its evaluation too
    for name, (_, evals) in zip(names, runs, strict=True):
        for e in evals:
            rows.setdefault((name, e["step"]), {"run": name, "step": e["step"]})["eval_loss"] = e["loss"]
    write_csv(os.path.splitext(out)[0] + ".csv", [rows[k] for k in sorted(rows)])
    if not kinds:
        notes.append("no learning dynamics in these runs (layer_suffixes was empty?): only the losses")
    return [out, os.path.splitext(out)[0] + ".csv"], notes


if __name__ == "__main__":
    import argparse
    import time
    parser = argparse.ArgumentParser(description="Pictures of a run's learning, offline, from its folder alone.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plot", help="write PNG figures and their CSV numbers into runs/<run>/plots/; given several "
                                    "runs, one picture of them side by side (the last run's plots/compare.png)")
    p.add_argument("run_dirs", nargs="+", metavar="run_dir")
    p.add_argument("--out", help="with several runs: where the picture goes (default <last run>/plots/compare.png)")
    args = parser.parse_args()
    for run_dir in args.run_dirs:
        if not os.path.isdir(checkpoint.checkpoints_dir(run_dir)):
            raise SystemExit(f"{run_dir}: not a run folder (no checkpoints/ in it)")
        if problem := checkpoint.run_folder_problem(run_dir):  # plots/ would be written through a link, say
            raise SystemExit(f"cannot plot {run_dir}: {problem}")
    where, t0 = args.run_dirs[-1], time.time()
    try:
        files, notes = plot(where) if len(args.run_dirs) == 1 else compare(
            args.run_dirs, args.out or os.path.join(where, "plots", "compare.png"))
    except checkpoint.CheckpointError as e:
        raise SystemExit(f"cannot plot {', '.join(args.run_dirs)}: {e}") from None
    except OSError as e:  # a read-only or full disk
        raise SystemExit(f"cannot plot {where}: {e.strerror} writing {e.filename or 'its plots/'} "
                         f"({shutil.disk_usage(where).free / 2**30:.1f} GiB free there)") from None
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {', '.join(files)} in {time.time() - t0:.1f}s")
