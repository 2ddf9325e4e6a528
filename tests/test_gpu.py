"""The GPU check: what only a CUDA GPU can show, in one go (under 10 minutes on one GPU):

    python -m pytest -m gpu -v && python bench.py --gpu

bf16 flash attention (forward and backward) against an fp32 reference; a few steps of
pico-decoder-small with DeepSpeed (a world of one) and with DDP + torch.compile, each saved,
resumed, captured (learning dynamics) and ending with a sample; bf16 ZeRO-2 against bf16 DDP at
8 accumulation steps; then bench.py prints tokens/s and MFU for small and medium. Skipped on
machines without CUDA, where the CPU suite covers the same code at toy size."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# pico-decoder-small on the demo corpus (2049-token rows serve seq 2048), 16 sequences per step
SMALL = ["config/pico_decoder_small.py", "--dataset_name=data/demo", "--eval_dataset_name=None",
         "--learning_dynamics_eval_data=None", "--eval_max_rows=8", "--learning_dynamics_batch_size=4",
         "--batch_size=16", "--gradient_accumulation_steps=2", "--max_steps=4", "--save_every_n_steps=2",
         "--log_every_n_steps=1", "--lr_warmup_steps=2"]


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
    assert rel(fast, ref) <= 2e-2  # bf16 keeps 8 bits of mantissa: about 0.4% per operation
    for name in ref_grads:
        assert rel(fast_grads[name], ref_grads[name]) <= 5e-2, name


@pytest.mark.parametrize("backend,extra", [("deepspeed", []), ("ddp", ["--compile=True"])])
def test_small_trains_saves_resumes_and_captures(tmp_path, backend, extra):
    cmd = [sys.executable, "train.py", *SMALL, f"--runs_dir={tmp_path}", f"--backend={backend}", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(cmd + ["--run_name=gpu", "--stop_at_step=3"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=240)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "cuda:0, bf16" in first.stdout, first.stdout[-2000:]
    from model import gpu_peak_flops
    assert ("MFU" in first.stdout) == bool(gpu_peak_flops(torch.cuda.get_device_name())), first.stdout[-2000:]
    second = subprocess.run(cmd + ["--run_name=gpu", "--sample_prompt=And God said"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step_3" in second.stdout
    assert "sample: And God said" in second.stdout, second.stdout[-2000:]  # generate() on the GPU, under bf16
    losses = [m["loss"] for m in metrics(tmp_path, "gpu") if "loss" in m]
    assert len(losses) == 4 and all(0 < x < 12 for x in losses), losses
    import dynamics
    for step, split in ((2, "train"), (2, "val"), (4, "val")):
        acts, weights, grads = dynamics.load(tmp_path / "gpu", step, split)
        for saved in (acts, weights, grads):
            assert saved and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in saved.values())


def test_bf16_zero2_equals_ddp_at_eight_accumulation_steps(tmp_path):
    # the published shape's accumulation: DeepSpeed's own bf16 mode would accumulate the gradients in
    # bf16 and keep bf16 weights; train.py's autocast keeps both in fp32 on every backend
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for backend in ("ddp", "deepspeed"):
        proc = subprocess.run([sys.executable, "train.py", *SMALL, f"--runs_dir={tmp_path}", f"--run_name={backend}",
                               f"--backend={backend}", "--gradient_accumulation_steps=8", "--layer_suffixes=",
                               "--max_steps=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "bf16" in proc.stdout and "8 micro-steps x 1 ranks x sub-batch 2" in proc.stdout, proc.stdout[-2000:]
    from safetensors.torch import load_file
    ddp, ds = (load_file(tmp_path / b / "checkpoints" / "step_2" / "model.safetensors") for b in ("ddp", "deepspeed"))
    assert {w.dtype for w in list(ddp.values()) + list(ds.values())} == {torch.float32}
    # the same kernels in the same order; GPU reductions may still differ in their last bits
    worst = max(((ddp[k] - ds[k]).abs().max() / ddp[k].abs().max()).item() for k in ddp)
    assert worst <= 1e-4, worst
