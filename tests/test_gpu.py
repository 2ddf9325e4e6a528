"""The GPU check: what only a CUDA GPU can show, run by tests/gpu_check.sh in steps of under 10
minutes each on one GPU (docs/clusters.md#the-gpu-check):

bf16 flash attention (forward and backward) against an fp32 reference; a few steps of
pico-decoder-small with DeepSpeed and without it (+ torch.compile), each saved, resumed, captured
(learning dynamics) and ending with a sample; bf16 ZeRO-2 against the same training without it at 8
accumulation steps, with deterministic kernels; then bench.py --gpu prints tokens/s and MFU. DDP
needs two GPUs: on one, the run without DeepSpeed is the plain model, and the check says that DDP's
reduction is not shown (the CPU suite runs DDP on gloo). Skipped on machines without CUDA, where the
CPU suite covers the same code at toy size; the comparison itself is checked on CPU here too (a
planted wrong gradient fails it)."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, TINY, edited_repo, metrics

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

# pico-decoder-small on the demo corpus (2049-token rows serve seq 2048), 16 sequences per step
SMALL = ["config/pico_decoder_small.py", "--dataset_name=data/demo", "--eval_dataset_name=None",
         "--learning_dynamics_eval_data=None", "--eval_max_rows=8", "--learning_dynamics_batch_size=4",
         "--batch_size=16", "--gradient_accumulation_steps=2", "--max_steps=4", "--save_every_n_steps=2",
         "--log_every_n_steps=1", "--lr_warmup_steps=2"]

# train.py with deterministic kernels: cuBLAS's fixed-order workspace, the math attention kernel (flash
# and the memory-efficient kernel sum in a varying order in their backward), torch's deterministic ops
# (an op that has none warns, naming itself, rather than stopping the check: the tolerance below holds
# against the last bits such an op moves, not against a wrong gradient)
DETERMINISTIC = """import os, runpy, sys, torch
torch.use_deterministic_algorithms(True, warn_only=True)
torch.backends.cudnn.benchmark = False
for kernel in ("flash", "mem_efficient", "cudnn"):
    getattr(torch.backends.cuda, f"enable_{kernel}_sdp")(False)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def train(repo, args, nproc=1, deterministic=False, timeout=300):
    """train.py of `repo` (one process, or torchrun with nproc); deterministic: DETERMINISTIC's kernels."""
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}", "--no-python", sys.executable]
    cmd = launch + (["-c", DETERMINISTIC] if deterministic else []) + ["train.py", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


# With deterministic kernels the two trainings run the same kernels on the same rows; what differs is
# the order of a few sums (ZeRO-2 accumulates the micro-steps' gradients in its own fp32 buffer and
# computes the clipping norm by partitions), which moves the last bits. On CPU: 0 on the same number of
# threads, and 1.7e-5 of the change after 4 steps between runs on 1 and on 2 threads (other sums'
# orders). A gradient that misses one micro-batch of 8, or one layer's gradient gone wrong, changes
# that layer's update by 5% or more (on CPU one micro-batch of 2 missing: 0.75). Between them:
CHANGE_TOLERANCE = 1e-3


def change_gap(run_a, run_b, step):
    """The largest difference, over the weight tensors, between the change two runs made from their
    step-0 weights to `step`, relative to the change itself: ||dA - dB|| / ||dA||; and its tensor."""
    from safetensors.torch import load_file
    w = {(r, s): load_file(os.path.join(r, "checkpoints", f"step_{s}", "model.safetensors"))
         for r in (run_a, run_b) for s in (0, step)}
    assert all(torch.equal(w[run_a, 0][k], w[run_b, 0][k]) for k in w[run_a, 0])  # the same start
    gaps = {}
    for k in w[run_a, 0]:
        da, db = (w[r, step][k].double() - w[r, 0][k].double() for r in (run_a, run_b))
        gaps[k] = ((da - db).norm() / da.norm()).item()
    worst = max(gaps, key=gaps.get)
    return gaps[worst], worst


def test_the_backend_comparison_passes_equal_training_and_fails_a_wrong_gradient(tmp_path, reference_run):
    """The GPU check's ZeRO-2 comparison, on CPU at toy size (2 micro-steps): ZeRO-2 against training
    without it (the suite's shared reference run; on CPU every kernel is deterministic) passes; the same
    with a planted wrong gradient (the path without DeepSpeed drops the first micro-batch's) fails."""
    pytest.importorskip("deepspeed")
    runs = {"plain": str(reference_run() / "ref")}
    backward = "        (loss / gradient_accumulation_steps).backward()"  # train.py's, without DeepSpeed
    dropped = backward.replace(").backward()", " * (loss_sum.item() != loss.item())).backward()")  # micro-step 0's
    planted = edited_repo(tmp_path, "planted", "train.py", [(backward, dropped)])
    for name, repo in (("zero2", ROOT), ("planted", planted)):
        train(repo, [*TINY, f"--runs_dir={tmp_path}", f"--run_name={name}", "--layer_suffixes=",
                     f"--backend={'deepspeed' if name == 'zero2' else 'ddp'}"], deterministic=True)
        runs[name] = str(tmp_path / name)
    gap, where = change_gap(runs["plain"], runs["zero2"], 4)
    assert gap <= CHANGE_TOLERANCE, (gap, where)
    planted, where = change_gap(runs["zero2"], runs["planted"], 4)
    assert planted > 10 * CHANGE_TOLERANCE, (planted, where)
    print(f"ZeRO-2 vs without: {gap:.1e} of the change ({where}); planted wrong gradient: {planted:.2f}")


@gpu
@pytest.mark.gpu
def test_bf16_flash_attention_matches_fp32_forward_and_backward():
    from model import ModelConfig, PicoDecoder
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=384, n_layers=2, attention_n_heads=12, attention_n_kv_heads=4,
                      activation_hidden_dim=1536, max_seq_len=2048)
    model = PicoDecoder(cfg).cuda()
    ids = torch.randint(0, cfg.vocab_size, (2, 2049), device="cuda")

    def run(fast):
        model.zero_grad(set_to_none=True)
        # fast: bf16 with the flash kernel only (it fails if flash cannot take these shapes: GQA,
        # causal; forward or backward); else fp32 and the math kernel (flash needs 16-bit inputs)
        kernel = torch.nn.attention.SDPBackend.FLASH_ATTENTION if fast else torch.nn.attention.SDPBackend.MATH
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=fast), torch.nn.attention.sdpa_kernel(kernel):
            with torch.no_grad():
                logits, _ = model(ids[:, :-1])
            _, loss = model(ids[:, :-1], ids[:, 1:])
            loss.backward()
        return logits.float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}

    (ref, ref_grads), (fast, fast_grads) = run(False), run(True)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    worst = max(rel(fast_grads[name], ref_grads[name]) for name in ref_grads)
    print(f"bf16 flash vs fp32 math: logits {rel(fast, ref):.1e}, gradients at most {worst:.1e} (relative norms)")
    assert rel(fast, ref) <= 2e-2  # bf16 keeps 8 bits of mantissa: about 0.4% per operation
    assert worst <= 5e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend,extra", [("deepspeed", []), ("ddp", ["--compile=True"])],
                         ids=["deepspeed", "no-deepspeed-compiled"])
def test_small_trains_saves_resumes_and_captures(tmp_path, backend, extra):
    # one process: "ddp" is the plain model here (DDP wraps it only with 2 or more ranks)
    args = [*SMALL, f"--runs_dir={tmp_path}", f"--backend={backend}", *extra, "--run_name=gpu"]
    first = train(ROOT, args + ["--stop_at_step=3"], timeout=240)
    assert "cuda:0, bf16" in first.stdout, first.stdout[-2000:]
    from model import gpu_peak_flops
    assert ("MFU" in first.stdout) == bool(gpu_peak_flops(torch.cuda.get_device_name())), first.stdout[-2000:]
    second = train(ROOT, args + ["--sample_prompt=And God said"], timeout=240)
    assert "resumed from" in second.stdout and "step_3" in second.stdout
    assert "sample: And God said" in second.stdout, second.stdout[-2000:]  # generate() on the GPU, under bf16
    losses = [m["loss"] for m in metrics(tmp_path, "gpu") if "loss" in m]
    assert len(losses) == 4 and all(0 < x < 12 for x in losses), losses
    import dynamics
    for step, split in ((2, "train"), (2, "val"), (4, "val")):
        acts, weights, grads = dynamics.load(tmp_path / "gpu", step, split)
        for saved in (acts, weights, grads):
            assert saved and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in saved.values())


@gpu
@pytest.mark.gpu
def test_bf16_zero2_equals_training_without_it_at_eight_accumulation_steps(tmp_path):
    """The published shape's accumulation, bf16, deterministic kernels (DETERMINISTIC): ZeRO-2's change
    to the weights equals the one without DeepSpeed within CHANGE_TOLERANCE. With 2 GPUs or more both
    run on 2 ranks, so the run without DeepSpeed is DDP; on one GPU it is the plain model, and DDP's
    reduction across GPUs is not shown here."""
    nproc = 2 if GPUS >= 2 else 1
    for backend in ("ddp", "deepspeed"):
        proc = train(ROOT, [*SMALL, f"--runs_dir={tmp_path}", f"--run_name={backend}", f"--backend={backend}",
                            "--gradient_accumulation_steps=8", "--layer_suffixes=", "--max_steps=2",
                            "--batch_size=32"], nproc=nproc, deterministic=True, timeout=240)
        assert "bf16" in proc.stdout and f"8 micro-steps x {nproc} ranks" in proc.stdout, proc.stdout[-2000:]
        assert ("a world of one" in proc.stdout) == (nproc == 1 and backend == "ddp")
    from safetensors.torch import load_file
    assert {w.dtype for w in load_file(tmp_path / "deepspeed" / "checkpoints" / "step_2" / "model.safetensors")
            .values()} == {torch.float32}  # (DeepSpeed's own bf16 mode would have kept bf16 weights)
    gap, where = change_gap(str(tmp_path / "ddp"), str(tmp_path / "deepspeed"), 2)
    print(f"ZeRO-2 vs {'DDP on 2 GPUs' if nproc == 2 else 'the plain model (DDP not shown: 1 GPU)'}, bf16, "
          f"deterministic: {gap:.1e} of the change (worst: {where}); tolerance {CHANGE_TOLERANCE:g}")
    assert gap <= CHANGE_TOLERANCE, (gap, where)
