#!/usr/bin/env bash
# moeflow GPU check (NVIDIA; written for an H200). From the repository root:
#   bash bench/gpu_check.sh            # PYTHON=/path/to/python to use another interpreter
# 1. the kernel tests, compiled (not interpreted), on the GPU: every op's opcheck (torch.library custom
#    ops: fake implementations against the kernels), the unpadded MoE (idle experts, one busy expert);
# 2. copy bandwidth, bf16 / FP8 GEMM peaks and the issue's GPU goals (one table, bench/gpu_check.py),
#    the MoE layer with one busy expert, and the compiled (inductor) training step against eager;
# 3. every op against torch eager, torch.compile and Liger-Kernel (if importable or pip-installable),
#    table in bench/results/kernels_cuda.md.
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

echo "== 1/3 kernel tests, compiled on the GPU"
unset TRITON_INTERPRET
MOEFLOW_KERNEL_TESTS_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/kernels || status=1

echo "== 2/3 peaks and goals"
"$PY" -m bench.gpu_check || status=1

echo "== 3/3 per-op benchmarks (eager, torch.compile, Liger)"
"$PY" -m bench.kernels --device cuda || status=1
cat bench/results/kernels_cuda.md

exit $status
