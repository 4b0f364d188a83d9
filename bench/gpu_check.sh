#!/usr/bin/env bash
# moeflow GPU check (NVIDIA; written for an H200). From the repository root:
#   bash bench/gpu_check.sh            # PYTHON=/path/to/python to use another interpreter
# 1. the kernel tests, compiled (not interpreted), on the GPU: every op's opcheck (torch.library custom
#    ops: fake implementations against the kernels), the unpadded MoE (idle experts, one busy expert);
# 2. copy bandwidth, bf16 / FP8 GEMM peaks and the issue's GPU goals (one table, bench/gpu_check.py),
#    the MoE layer with one busy expert, the compiled (inductor) training step and decoding against eager;
# 3. every op against torch eager, torch.compile and Liger-Kernel (if importable or pip-installable),
#    table in bench/results/kernels_cuda.md;
# 4. expert parallelism over NCCL (needs >= 2 GPUs, one process each): the same model at EP 1/2/4/8 in fp32
#    (first-step losses within 1e-4), then tokens/s in bf16, table in bench/results/ep_cuda.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
status=0

"$PY" - <<'PY' || { echo "gpu_check: needs torch with CUDA and an NVIDIA GPU"; exit 2; }
import torch, triton
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()} "
      f"(sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
PY

if ! "$PY" -c "import liger_kernel" 2>/dev/null; then
  timeout 120 "$PY" -m pip install -q liger-kernel >/dev/null 2>&1 \
    && echo "installed liger-kernel" || echo "liger-kernel not installable here: its rows are skipped"
fi

echo "== 1/4 kernel tests, compiled on the GPU"
unset TRITON_INTERPRET
MOEFLOW_KERNEL_TESTS_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/kernels || status=1

echo "== 2/4 peaks and goals"
"$PY" -m bench.gpu_check || status=1

echo "== 3/4 per-op benchmarks (eager, torch.compile, Liger)"
"$PY" -m bench.kernels --device cuda || status=1
cat bench/results/kernels_cuda.md

echo "== 4/4 expert parallelism over NCCL"
ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -ge 2 ]; then
  sizes=1,2; [ "$ngpu" -ge 4 ] && sizes=$sizes,4; [ "$ngpu" -ge 8 ] && sizes=$sizes,8
  "$PY" -m bench.ep --device cuda --ep $sizes --precision fp32 --reps 1 --check 1e-4 \
    --out bench/results/ep_cuda_fp32_check.md || status=1
  "$PY" -m bench.ep --device cuda --ep $sizes --reps 10 || status=1
  cat bench/results/ep_cuda.md
else
  echo "EP over NCCL needs >= 2 GPUs (one process per GPU), this machine has $ngpu: skipped"
fi

exit $status
