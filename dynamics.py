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

import os

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


def capture(model, seqs, layer_suffixes, sequence_idx=-1, batch_size=8, rank=0, world_size=1,
            device="cpu", autocast=None, full_weight=None):
    """Activations, weights and gradients of the chosen layers over the rows of `seqs` (an (N, L)
    int64 array: inputs row[:-1], targets row[1:]). Rows are split into contiguous blocks over
    the ranks and processed batch_size at a time; every rank returns the full result in row order.
    full_weight(param) may supply the full fp32 weight (DeepSpeed's copy) instead of param."""
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
    try:
        for i in range(lo, hi, batch_size):
            rows = torch.from_numpy(seqs[i:min(i + batch_size, hi)]).to(device)
            with autocast or torch.autocast("cpu", enabled=False):
                _, loss = model(rows[:, :-1], rows[:, 1:])
            # weight each sub-batch mean by its share of all N rows' tokens: the sum over
            # sub-batches and ranks is the gradient of the mean over all N rows
            share = rows[:, 1:].numel() / n_tokens
            for g, gw in zip(grads, torch.autograd.grad(loss * share, weights)):
                g += gw.float()
    finally:
        for h in hooks:
            h.remove()

    out_dims = [w.shape[0] for w in weights]
    local = torch.cat([torch.cat(acts[n]) if acts[n] else torch.zeros(0, d, device=weights[0].device)
                       for n, d in zip(names, out_dims)], dim=1) if names else None  # (rows here, sum of out)
    if world_size > 1:
        for g in grads:
            dist.all_reduce(g)
        blocks = [None] * world_size
        dist.all_gather_object(blocks, local.cpu())  # blocks arrive in rank order = row order
        local = torch.cat(blocks)
    activations = dict(zip(names, local.cpu().split(out_dims, dim=1))) if names else {}
    result = {
        "activations": {n: a.contiguous() for n, a in activations.items()},
        "weights": {n: (full_weight(w) if full_weight else w).detach().float().cpu().clone()
                    for n, w in zip(names, weights)},
        "gradients": {n: g.cpu() for n, g in zip(names, grads)},
    }
    assert all(a.shape[0] == n_rows for a in result["activations"].values())
    return result


def save(result, folder, split):
    """Write {split}_{activations,weights,gradients}.pt into folder."""
    os.makedirs(folder, exist_ok=True)
    for kind in KINDS:
        torch.save(result[kind], os.path.join(folder, f"{split}_{kind}.pt"))


def save_rows(seqs, folder, tokenizer=None):
    """The captured rows as a Dataset.save_to_disk folder (input_ids as LargeList, which older
    `datasets` versions such as pico-analyze's can read; text where a tokenizer exists)."""
    import datasets
    datasets.disable_progress_bars()
    rows = np.asarray(seqs).astype(np.int32)
    columns = {"input_ids": [r.tolist() for r in rows]}
    features = {"input_ids": datasets.LargeList(datasets.Value("int32"))}
    if tokenizer is not None:
        columns["text"] = tokenizer.decode_batch([r.tolist() for r in rows], skip_special_tokens=False)
        features["text"] = datasets.Value("string")
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(folder)


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
                                + (" (a run's final step has no 'train' split: no next batch)" if split == "train" else ""))
    return tuple(torch.load(os.path.join(folder, f"{split}_{kind}.pt"), weights_only=True) for kind in KINDS)
