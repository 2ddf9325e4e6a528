"""bench.py's GPU table is measured only where a GPU is lent, for a few minutes: its code must not
be the thing that fails there. The same code runs here at toy size on CPU, compile included."""

import re
import subprocess
import sys

import pytest
import torch

from helpers import ROOT


@pytest.mark.slow  # bench.py's GPU code, torch.compile included: ~40 s
def test_gpu_bench_code_runs_at_toy_size():
    proc = subprocess.run([sys.executable, "bench.py", "--gpu", "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("pico-decoder-")]
    assert len(rows) == 2 and not any("FAILED" in r for r in rows), proc.stdout
    for row, compiled in zip(rows, ("False", "True"), strict=True):
        assert f"compile={compiled}" in row
        assert float(re.search(r"([\d,]+) tok/s", row).group(1).replace(",", "")) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU: --gpu would measure it")
def test_gpu_bench_refuses_without_a_gpu():
    proc = subprocess.run([sys.executable, "bench.py", "--gpu"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr


def test_a_failed_gpu_row_fails_the_bench(monkeypatch, capsys):
    import bench

    def broken(*args, **kwargs):
        raise RuntimeError("planted: out of memory")
    monkeypatch.setattr(bench, "train_step_rate", broken)
    with pytest.raises(SystemExit, match=r"bench.py --gpu: 2 of 2 rows failed \(pico-decoder-smoke compile=False, "
                                         r"pico-decoder-smoke compile=True\)"):
        bench.gpu_bench(smoke=True)
    assert capsys.readouterr().out.count("FAILED: RuntimeError: planted: out of memory") == 2
