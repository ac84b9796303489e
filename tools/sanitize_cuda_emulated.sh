#!/usr/bin/env bash
# Builds the CUDA kernels for the CPU emulator with AddressSanitizer + UndefinedBehaviorSanitizer
# (cpp/cuda/emulation/build.sh --sanitize) into a private folder and runs
# cpp/cuda/emulation/test_emulated.py against it: the host side (argument checks, workspace and
# shared-memory sizing, launch geometry) and every memory access of the kernels, in every dtype.
# Exit status is non-zero on any sanitizer report or failed case.
# Usage: tools/sanitize_cuda_emulated.sh [--no-build] [-k FILTER]
#   -k FILTER    only the cases whose name contains FILTER (test_emulated.py's own option)
#   --no-build   reuse the last build in the folder
# Environment: GMATTN_SANITIZE_CUDA_DIR (default /tmp/gmattn-sanitize-cuda), GMATTN_EMU_ORDER,
# GMATTN_BUILD_JOBS (parallel compiler runs).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${GMATTN_SANITIZE_CUDA_DIR:-/tmp/gmattn-sanitize-cuda}"
build=1
if [[ "${1:-}" == "--no-build" ]]; then build=0; shift; fi
mkdir -p "$work"
lib="$work/build/libgmattn_cuda_emulated.so"
if [[ $build == 1 ]]; then
  bash "$repo/cpp/cuda/emulation/build.sh" --sanitize "$work/build" >"$work/build.log" 2>&1 ||
    { cat "$work/build.log"; echo "build failed: see $work/build.log"; exit 1; }
fi
[[ -f "$lib" ]] || { echo "no sanitized library at $lib (run without --no-build)"; exit 1; }
asan="$(gcc -print-file-name=libasan.so)"
ubsan="$(gcc -print-file-name=libubsan.so)"
# Python and torch allocate at exit without freeing: leak checking would report them, not us.
# detect_stack_use_after_return exercises the emulator's fiber-switch annotations (fake stacks).
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
cd "$repo"
start=$SECONDS
set +e
LD_PRELOAD="$asan $ubsan" python3.11 cpp/cuda/emulation/test_emulated.py "$lib" "$@" 2>&1 | tee "$work/log.txt"
status=${PIPESTATUS[0]}
set -e
elapsed=$((SECONDS - start))
# (ASan's one-time "WARNING: ASan doesn't fully support makecontext/swapcontext" is expected:
# the emulator announces its fiber switches with __sanitizer_start/finish_switch_fiber.)
reports=$(grep -cE "ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$work/log.txt" || true)
summary=$(grep -E "^[0-9]+ passed, [0-9]+ failed$" "$work/log.txt" | tail -1 || true)
echo "sanitize_cuda_emulated: ${summary:-no summary (crashed?)}, $reports sanitizer report lines, ${elapsed} s," \
  "order ${GMATTN_EMU_ORDER:-ascending}${*:+, args: $*} ($(date -u +%Y-%m-%d))"
if [[ $reports -gt 0 ]]; then
  echo "sanitizer reports found: see $work/log.txt"
  exit 1
fi
[[ -n "$summary" ]] || exit 1
exit "$status"
