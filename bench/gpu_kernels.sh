#!/usr/bin/env bash
# The GPU check of the Triton kernels, in one go (a machine with a CUDA GPU, torch with CUDA, triton):
# correctness against the reference op on the GPU, then the kernel benchmark in bf16 (and fp16) at the
# default grid. Results go to ${OUT:-bench_results}/gpu_*.
#   bash bench/gpu_kernels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench_results}"
python -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
python -m pytest -q tests/ops/test_triton_kernels.py
python -m ipu_app bench kernels --device cuda --dtype bf16 --output "$out/gpu_bf16"
python -m ipu_app bench kernels --device cuda --dtype fp16 --block-size 16 32 --sparsity 0.9 --output "$out/gpu_fp16"
