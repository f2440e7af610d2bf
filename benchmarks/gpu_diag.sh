#!/usr/bin/env bash
# Toolchain facts and a C++ backtrace for an error raised inside fastres._C (cuda-gdb works as a
# host debugger on the GPU image, which has no gdb). Usage: bash benchmarks/gpu_diag.sh OUTFILE
out=${1:-/dev/stdout}
{
  echo "## toolchain"; for c in "${CXX:-g++}" /opt/gcc/bin/g++ g++ gcc; do command -v "$c" >/dev/null && echo "$c: $("$c" --version | head -1)"; done
  env | grep -E '^(CC|CXX|LD_LIBRARY_PATH|TORCH_CUDA_ARCH_LIST|CUDA_HOME)=' || true
  echo "## libraries of fastres._C"; ldd fastres/_C*.so 2>&1 | grep -E 'stdc|gcc_s|cublas|c10|not found' || true
  echo "## errors raised from fastres._C, each caught in Python in its own process"
  for call in \
      "stem(torch.randn(1, 3, 9, 9), torch.randn(4, 3, 7, 7), torch.randn(4).half())" \
      "stem(torch.randn(1, 3, 9, 9), torch.randn(4, 3, 5, 5), torch.randn(4))" \
      "avgpool_linear(torch.randn(1, 4, 2, 2), torch.randn(3, 5), torch.randn(3), False)" \
      "stem(torch.randn(1, 3, 9, 9, device='cuda'), torch.randn(4, 3, 5, 5, device='cuda'), torch.randn(4, device='cuda'))"; do
    timeout 60 python3 -c "
import torch, fastres._C
try:
    torch.ops.fastres_C.$call
    print('no error raised: wrong')
except RuntimeError as exc:
    print('caught:', str(exc).splitlines()[0])
" 2>&1 | tail -3
    echo "  -> exit status ${PIPESTATUS[0]} for $call"
  done
  echo "## the first one under cuda-gdb"
  timeout 60 cuda-gdb -q -batch -ex run -ex bt --args python3 -c "import torch, fastres._C; torch.ops.fastres_C.stem(torch.randn(1, 3, 9, 9), torch.randn(4, 3, 7, 7), torch.randn(4).half())" 2>&1 | grep -v '^\[New Thread\|^\[Thread\|^\[Detaching' | tail -40
} > "$out" 2>&1
