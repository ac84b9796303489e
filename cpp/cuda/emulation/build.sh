#!/usr/bin/env bash
# Builds the gmattn CUDA kernels as a shared library for the ctypes tests (test_emulated.py).
#   cpp/cuda/emulation/build.sh [OUT_DIR]          CPU emulation, g++ (default OUT_DIR build/emulation)
#   cpp/cuda/emulation/build.sh --cuda [OUT_DIR]   the real kernels, nvcc -arch=native (needs a GPU)
set -euo pipefail
mode=emulated
if [[ "${1:-}" == "--cuda" ]]; then mode=cuda; shift; fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cuda_dir="$(dirname "$here")"
root="$(cd "$cuda_dir/../.." && pwd)"
out="${1:-$root/build/$mode}"
mkdir -p "$out"
cuda_home="${CUDA_HOME:-/usr/local/cuda}"
if [[ "$mode" == cuda ]]; then
  nvcc="${NVCC:-$cuda_home/bin/nvcc}"
  flags=(-std=c++17 -O3 --expt-relaxed-constexpr -arch="${GMATTN_TEST_ARCH:-native}" -Xcompiler -fPIC
         -I"$root/cpp/include" -I"$cuda_dir")
  objs=()
  for src in dispatch gma_f16 gma_bf16 gma_f32 gma_f64; do
    "$nvcc" "${flags[@]}" -c "$cuda_dir/$src.cu" -o "$out/$src.o" &
    objs+=("$out/$src.o")
  done
  "$nvcc" "${flags[@]}" -x cu -c "$here/emulation_api.cpp" -o "$out/emulation_api.o"
  wait
  "$nvcc" -shared -cudart static -o "$out/libgmattn_cuda_test.so" "${objs[@]}" "$out/emulation_api.o"
  echo "$out/libgmattn_cuda_test.so"
  exit 0
fi
flags=(-std=c++17 -O2 -g -fPIC -DGMATTN_CUDA_EMULATION -Wall -Wextra -Wno-unused-parameter -Wno-unknown-pragmas
       -I"$root/cpp/include" -I"$cuda_dir" -I"$cuda_home/include")
objs=()
for src in dispatch gma_f16 gma_bf16 gma_f32 gma_f64; do
  g++ "${flags[@]}" -x c++ -c "$cuda_dir/$src.cu" -o "$out/$src.o" &
  objs+=("$out/$src.o")
done
g++ "${flags[@]}" -c "$here/emulation_api.cpp" -o "$out/emulation_api.o"
wait
g++ -shared -o "$out/libgmattn_cuda_emulated.so" "${objs[@]}" "$out/emulation_api.o"
echo "$out/libgmattn_cuda_emulated.so"
