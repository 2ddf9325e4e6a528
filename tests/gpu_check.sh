#!/usr/bin/env bash
# The GPU check (docs/clusters.md#the-gpu-check): what only a CUDA GPU can show, in steps of under
# 10 minutes each on one H100 or H200, so that each fits one call of a lent machine.
#   bash tests/gpu_check.sh          # every step, one after the other
#   bash tests/gpu_check.sh 2        # step 2 alone
# Steps: 1 kernels and the ZeRO-2 comparison; 2 pico-decoder-small trains, saves, resumes, captures,
# samples (with DeepSpeed, and without it + torch.compile); 3 bench.py --gpu (tokens/s, MFU).
# Each step prints what a reader needs to judge it and exits non-zero if anything failed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
echo "== $(date -u +%FT%TZ) $(hostname)"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not found"
$PY -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA',
torch.version.cuda, '| cuDNN', torch.backends.cudnn.version(), '| GPUs', torch.cuda.device_count())" || exit 1
$PY -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'" || exit 1
steps=${*:-1 2 3}
failed=()
for step in $steps; do
    echo "== step $step"
    case $step in
        1) timeout 570 $PY -m pytest -n 0 -m gpu -rA -s tests/test_gpu.py \
               -k "flash_attention or zero2_equals" -p no:cacheprovider ;;
        2) timeout 570 $PY -m pytest -n 0 -m gpu -rA tests/test_gpu.py -k "trains_saves" -p no:cacheprovider ;;
        3) timeout 570 $PY bench.py --gpu ;;
        *) echo "no step $step (1, 2 or 3)"; false ;;
    esac
    code=$?
    [ $code -eq 124 ] && echo "step $step: stopped at its 570 s limit"
    [ $code -ne 0 ] && failed+=("$step")
done
if [ ${#failed[@]} -ne 0 ]; then
    echo "== the GPU check FAILED at step(s): ${failed[*]}"
    exit 1
fi
echo "== the GPU check passed: step(s) $steps"
