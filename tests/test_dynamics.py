"""dynamics.py: captured activations and gradients against a plain forward/backward of a fresh
model, 1 vs 2 processes (DDP and ZeRO-2), capture on vs off, and a pico-analyze-style reader."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dynamics
from helpers import max_diff, metrics, run_train, weights
from model import load_pretrained

SUFFIXES = ["attention.v_proj", "attention.o_proj", "swiglu.w_2"]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def reference(model, seqs, sequence_idx=-1):
    """One plain forward + backward over all rows at once, with F.cross_entropy on full logits."""
    model.zero_grad()
    outs, hooks = {}, []
    for name, m in model.named_modules():
        if any(name.endswith(s) for s in SUFFIXES):
            hooks.append(m.register_forward_hook(lambda m, i, o, name=name: outs.__setitem__(name, o[:, sequence_idx])))
    x = torch.from_numpy(np.asarray(seqs))
    logits, _ = model(x[:, :-1])
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)).backward()
    for h in hooks:
        h.remove()
    grads = {n: m.weight.grad for n, m in model.named_modules() if n in outs}
    return outs, grads


def read_like_pico_analyze(folder, split, n_layers):
    """pico-analyze's reading: the common prefix of the activation keys, then <prefix><i>.<suffix>
    in all three files for every layer; every tensor float32 and SVD-able."""
    files = {k: torch.load(os.path.join(folder, f"{split}_{k}.pt"), weights_only=True) for k in dynamics.KINDS}
    keys = list(files["activations"])
    prefix = os.path.commonprefix(keys)
    prefix = prefix[:prefix.rfind(".") + 1] if not prefix.endswith(".") else prefix
    prefix = prefix.rstrip("0123456789")
    assert set(files["activations"]) == set(files["weights"]) == set(files["gradients"])
    for i in range(n_layers):
        for suffix in SUFFIXES:
            for d in files.values():
                t = d[f"{prefix}{i}.{suffix}"]
                assert t.dtype == torch.float32 and t.device.type == "cpu"
                torch.linalg.svdvals(t)
    assert len(keys) == n_layers * len(SUFFIXES)  # nothing else in the files
    return files


def test_capture_matches_plain_forward_and_backward(reference_run):
    run = reference_run() / "ref"
    step_dir = run / "checkpoints" / "step_2"
    fresh = load_pretrained(step_dir)
    import datasets
    train_rows = np.array(datasets.load_from_disk(str(step_dir / "learning_dynamics" / "train_data"))["input_ids"])
    import data
    val_rows = data.load_eval_sequences("data/demo", 64, 50304, "validation", max_rows=1)
    for split, rows in (("train", train_rows), ("val", val_rows)):
        acts, w, grads = dynamics.load(run, 2, split)
        ref_acts, ref_grads = reference(fresh, rows)
        assert len(acts) == 6
        for name in acts:
            assert acts[name].shape == (len(rows), ref_acts[name].shape[-1])
            assert rel_err(acts[name], ref_acts[name].detach()) <= 1e-5, (split, name)
            assert rel_err(grads[name], ref_grads[name]) <= 1e-5, (split, name)
            assert torch.equal(w[name], dict(fresh.named_modules())[name].weight.detach())
    # the train rows are the rows step 3 trains on: the data position saved at step 2
    state = torch.load(step_dir / "training_state.pt", weights_only=True)
    stream = data.TrainStream("data/demo", 64, 50304, 8, 4)
    stream.load_state_dict(state["data"])
    assert np.array_equal(stream.peek_global_batch(), train_rows)
    read_like_pico_analyze(step_dir / "learning_dynamics", "train", 2)
    read_like_pico_analyze(step_dir / "learning_dynamics", "val", 2)
    with pytest.raises(FileNotFoundError,
                       match="no train learning dynamics at step 4 .* the steps that have them: 0, 2 "):
        dynamics.load(run, 4, "train")  # the final step has no next batch


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_two_processes_write_the_same_files_as_one(tmp_path, reference_run, backend):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    args = ("--max_steps=2", "--learning_dynamics_batch_size=3")  # 3 does not divide the rows per rank
    one_run = reference_run(*args) / "ref"
    run_train(tmp_path, "--run_name=two", *args, f"--backend={backend}", "--gradient_accumulation_steps=1", nproc=2)
    for step, splits in ((0, ("train", "val")), (2, ("val",))):
        for split in splits:
            one, two = dynamics.load(one_run, step, split), dynamics.load(tmp_path / "two", step, split)
            for a, b in zip(one, two, strict=True):
                assert list(a) == list(b)
                for k in a:
                    assert a[k].shape == b[k].shape and rel_err(b[k], a[k]) <= 1e-5, (step, split, k)


def test_capture_on_and_off_train_identically(tmp_path, reference_run):
    # (two runs of one seed: this is also the test that a run is deterministic)
    on = reference_run()  # captures the default layers
    run_train(tmp_path, "--run_name=off", "--max_steps=4", "--layer_suffixes=")
    assert not os.path.exists(tmp_path / "off" / "checkpoints" / "step_2" / "learning_dynamics")
    final = sorted(os.listdir(on / "ref" / "checkpoints" / "step_4" / "learning_dynamics"))
    assert final == ["val_activations.pt", "val_gradients.pt", "val_weights.pt"]
    assert max_diff(weights(on, "ref", 4), weights(tmp_path, "off", 4)) == 0.0

    def logged(runs, run):  # every logged number but the speed
        return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in metrics(runs, run)]
    a, b = logged(on, "ref"), logged(tmp_path, "off")
    assert [m for m in a if "loss" in m] == [m for m in b if "loss" in m]  # training, to the bit
    # the evaluation: from the capture's pass with it on, a pass of its own with it off (other batches)
    evals = [(m, n) for m, n in zip(a, b, strict=True) if "eval/loss" in m]
    assert len(evals) == 3 and all(m.keys() == n.keys() and all(
        math.isclose(m[k], n[k], rel_tol=1e-6, abs_tol=1e-12) for k in m if k != "step") for m, n in evals)
    assert {"eval/loss", "eval/paloma", "eval/top1_accuracy"} <= evals[0][0].keys()


def test_unknown_suffix_fails_at_start(tmp_path):
    proc = run_train(tmp_path, "--run_name=typo", "--layer_suffixes=attention.v_projj", check=False)
    assert proc.returncode != 0 and "match no linear layer" in proc.stderr


def test_the_train_rows_folder_is_the_one_datasets_writes(tmp_path):
    """dynamics.save_rows writes Dataset.save_to_disk's folder with pyarrow alone: datasets reads it
    back as the same rows and features, and the files match datasets' own, byte for byte in the
    Arrow data and field for field in the JSON (the fingerprint aside)."""
    datasets = pytest.importorskip("datasets")
    import json

    import data
    rows = np.random.default_rng(0).integers(0, 50280, (3, 9))
    tok = data.load_tokenizer()
    dynamics.save_rows(rows, tmp_path / "ours", tok)
    text = tok.decode_batch(rows.tolist(), skip_special_tokens=False)
    features = datasets.Features({"input_ids": datasets.LargeList(datasets.Value("int32")),
                                  "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"input_ids": rows.tolist(), "text": text},
                               features=features).save_to_disk(str(tmp_path / "theirs"))
    ours, theirs = (datasets.load_from_disk(str(tmp_path / d)) for d in ("ours", "theirs"))
    assert ours.features == theirs.features == features and ours[:] == theirs[:]
    assert ours["input_ids"] == rows.tolist() and ours["text"] == text
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(tmp_path / "theirs"))
    arrow = "data-00000-of-00001.arrow"
    assert (tmp_path / "ours" / arrow).read_bytes() == (tmp_path / "theirs" / arrow).read_bytes()
    for name in ("dataset_info.json", "state.json"):
        mine, reference = (json.load(open(tmp_path / d / name)) for d in ("ours", "theirs"))
        mine.pop("_fingerprint", None), reference.pop("_fingerprint", None)
        assert mine == reference, name


@pytest.mark.parametrize("nproc,args", [(1, ()), (2, ("--max_steps=12", "--save_every_n_steps=5",
                                                        "--gradient_accumulation_steps=1"))])
def test_one_pass_per_checkpoint_gives_the_same_evaluation_and_dynamics(tmp_path, reference_run, nproc, args):
    """At a checkpoint whose learning-dynamics val rows are the evaluation rows (the default), the
    evaluation comes from the capture's forward pass: the same numbers as a pass of its own (to
    1e-6), and the dynamics files are the same bytes, on one process and on 2 (DDP)."""
    import hashlib
    import json
    fused = reference_run(*args, nproc=nproc) / "ref"
    proc = run_train(tmp_path, "--run_name=apart", *args, "--eval_from_dynamics=False", nproc=nproc)
    apart = tmp_path / "apart"
    assert "(with the evaluation)" in (fused / "logs" / "train.log").read_text()
    assert "(with the evaluation)" not in proc.stdout
    names = sorted(os.listdir(fused / "eval_results"))
    assert names == sorted(os.listdir(apart / "eval_results")) and len(names) >= 3
    for name in names:
        a, b = (json.loads((run / "eval_results" / name).read_text()) for run in (fused, apart))
        assert a["rows"] == b["rows"] and a["dataset"] == b["dataset"]
        for key in ("loss", "paloma", "perplexity"):
            assert abs(a[key] / b[key] - 1) <= 1e-6, (name, key, a[key], b[key])
    files = sorted(p.relative_to(fused) for p in fused.glob("checkpoints/step_*/learning_dynamics/**/*") if p.is_file())
    made = apart.glob("checkpoints/step_*/learning_dynamics/**/*")
    assert files and files == sorted(p.relative_to(apart) for p in made if p.is_file())
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    assert [f for f in files if digest(fused / f) != digest(apart / f)] == []


def test_both_evaluation_paths_give_the_numbers_of_plain_logits():
    """The evaluation's numbers, by name, from its own pass (the model's per-token results added up
    batch by batch, as train.py's evaluate()) and from the capture's pass (capture(evaluate=True)),
    against full logits: mean token cross-entropy, mean per-row perplexity, argmax accuracy."""
    from model import ModelConfig, PicoDecoder
    torch.manual_seed(0)
    model = PicoDecoder(ModelConfig(d_model=32, n_layers=2, vocab_size=50, max_seq_len=24, attention_n_heads=4,
                                    attention_n_kv_heads=2, activation_hidden_dim=48)).eval()
    seqs = np.random.default_rng(0).integers(0, 50, (6, 17))
    x, y = torch.from_numpy(seqs[:, :-1]), torch.from_numpy(seqs[:, 1:])
    with torch.no_grad():
        logits, _ = model(x)
    losses = F.cross_entropy(logits.reshape(-1, 50), y.reshape(-1), reduction="none").view(6, 16)
    expected = {"loss": losses.mean().item(), "paloma": losses.mean(1).exp().mean().item(),
                "top1_accuracy": (logits.argmax(-1) == y).double().mean().item(), "rows": 6, "dataset": "d"}
    expected["perplexity"] = math.exp(expected["loss"])
    assert 0 < expected["top1_accuracy"] < 1  # a number that can be wrong either way

    apart = {}
    for rows in (seqs[:4], seqs[4:]):
        rows = torch.from_numpy(rows)
        with torch.no_grad():
            _, per_token = model(rows[:, :-1], rows[:, 1:], reduction="none", top1=True)
        apart = dynamics.add_sums(apart, dynamics.eval_sums(per_token))
    fused = dynamics.capture(model, seqs, SUFFIXES, batch_size=4, evaluate=True)["eval"]
    for totals in (apart, fused):
        results = dynamics.eval_results(totals, "d")
        assert results.keys() == expected.keys() and results["rows"] == 6
        for k in ("loss", "paloma", "top1_accuracy", "perplexity"):
            assert results[k] == pytest.approx(expected[k], rel=1e-5), k
