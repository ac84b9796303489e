#!/usr/bin/env bash
# Builds the gmattn CUDA kernels as a shared library for the ctypes tests (test_emulated.py).
#   cpp/cuda/emulation/build.sh [OUT_DIR]             CPU emulation, g++ (default OUT_DIR build/emulated)
#   cpp/cuda/emulation/build.sh --sanitize [OUT_DIR]  the same with AddressSanitizer + UBSan (load it
#                                                     with the runtimes preloaded: tools/sanitize_cuda_emulated.sh)
#   cpp/cuda/emulation/build.sh --cuda [OUT_DIR]      the real kernels, nvcc -arch=native (needs a GPU)
#   cpp/cuda/emulation/build.sh --module [OUT_DIR]    also the Python module gmattn._cuda (bindings and
#                                                     host code as built for a GPU) on the emulated kernels,
#                                                     as _cuda_emulated<ext> ($PYTHON: the interpreter, python3)
# GMATTN_BUILD_JOBS limits the parallel compiler runs (default: the number of CPUs).
set -euo pipefail
mode=emulated
sanitize=0
module=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cuda) mode=cuda; shift ;;
    --sanitize) sanitize=1; shift ;;
    --module) module=1; shift ;;
    -*) echo "build.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ "$mode" == cuda && ( "$sanitize" == 1 || "$module" == 1 ) ]]; then
  echo "build.sh: --sanitize and --module are for the emulated build only" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cuda_dir="$(dirname "$here")"
root="$(cd "$cuda_dir/../.." && pwd)"
out="${1:-$root/build/$mode}"
mkdir -p "$out"
cuda_home="${CUDA_HOME:-/usr/local/cuda}"
jobs="${GMATTN_BUILD_JOBS:-$(nproc)}"

# Runs the compile commands queued with `compile`, at most $jobs at a time; fails if any fails
# (a plain `wait` would ignore a failed background job and link a stale object file).
pids=()
failed=0
compile() {
  while [[ $(jobs -rp | wc -l) -ge $jobs ]]; do wait -n || failed=1; done
  "$@" &
  pids+=($!)
}
finish() {
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  pids=()
  if [[ $failed != 0 ]]; then echo "build.sh: compilation failed" >&2; exit 1; fi
}

if [[ "$mode" == cuda ]]; then
  nvcc="${NVCC:-$cuda_home/bin/nvcc}"
  flags=(-std=c++17 -O3 --expt-relaxed-constexpr -arch="${GMATTN_TEST_ARCH:-native}" -Xcompiler -fPIC
         -I"$root/cpp/include" -I"$cuda_dir")
  rm -f "$out/libgmattn_cuda_test.so"
  objs=()
  for src in dispatch gma_f16 gma_bf16 gma_f32 gma_f64; do
    rm -f "$out/$src.o"
    compile "$nvcc" "${flags[@]}" -c "$cuda_dir/$src.cu" -o "$out/$src.o"
    objs+=("$out/$src.o")
  done
  compile "$nvcc" "${flags[@]}" -x cu -c "$here/emulation_api.cpp" -o "$out/emulation_api.o"
  finish
  "$nvcc" -shared -cudart static -o "$out/libgmattn_cuda_test.so" "${objs[@]}" "$out/emulation_api.o"
  echo "$out/libgmattn_cuda_test.so"
  exit 0
fi
flags=(-std=c++17 -O2 -g -fPIC -DGMATTN_CUDA_EMULATION -Wall -Wextra -Wno-unused-parameter -Wno-unknown-pragmas
       -I"$root/cpp/include" -I"$cuda_dir" -I"$cuda_home/include")
ldflags=()
if [[ "$sanitize" == 1 ]]; then
  flags+=(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
  ldflags+=(-fsanitize=address,undefined)
fi
rm -f "$out/libgmattn_cuda_emulated.so"
objs=()
for src in dispatch gma_f16 gma_bf16 gma_f32 gma_f64; do
  rm -f "$out/$src.o"
  compile g++ "${flags[@]}" -x c++ -c "$cuda_dir/$src.cu" -o "$out/$src.o"
  objs+=("$out/$src.o")
done
compile g++ "${flags[@]}" -c "$here/emulation_api.cpp" -o "$out/emulation_api.o"
if [[ "$module" == 1 ]]; then
  python="${PYTHON:-python3}"
  ext="$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
  read -r -a py_includes <<< "$("$python" -m pybind11 --includes)"
  rm -f "$out/module.o" "$out/_cuda_emulated$ext"
  compile g++ "${flags[@]}" "${py_includes[@]}" -fvisibility=hidden -DGMATTN_BACKEND_CUDA \
    -DGMATTN_MODULE_NAME=_cuda_emulated -DGMATTN_BUILD_ID='"emulated"' -I"$root/cpp/bindings" -c "$root/cpp/bindings/module.cpp" -o "$out/module.o"
fi
finish
g++ -shared "${ldflags[@]}" -o "$out/libgmattn_cuda_emulated.so" "${objs[@]}" "$out/emulation_api.o"
echo "$out/libgmattn_cuda_emulated.so"
if [[ "$module" == 1 ]]; then
  g++ -shared "${ldflags[@]}" -o "$out/_cuda_emulated$ext" "$out/module.o" "${objs[@]}" "$out/emulation_api.o"
  echo "$out/_cuda_emulated$ext"
fi
