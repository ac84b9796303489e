#!/usr/bin/env bash
# Builds the CPU core with AddressSanitizer + UndefinedBehaviorSanitizer (CMake option
# GMATTN_SANITIZE=ON) into a private folder and runs the kernel tests against it. Exit status is
# non-zero on any sanitizer report. Usage: tools/sanitize.sh [pytest args...]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${GMATTN_SANITIZE_DIR:-/tmp/gmattn-sanitize}"
rm -rf "$work/pkg" && mkdir -p "$work/pkg"
cmake -S "$repo" -B "$work/build" -DGMATTN_SANITIZE=ON -DGMATTN_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DSKBUILD_PROJECT_VERSION="$(python3 -c 'import tomllib,sys;print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' "$repo/pyproject.toml")" \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" >/dev/null
cmake --build "$work/build" -j"$(nproc)" --target _core >/dev/null
cp -r "$repo/python/gmattn" "$work/pkg/"
cp "$work/build"/_core*.so "$work/pkg/gmattn/"
asan="$(gcc -print-file-name=libasan.so)"
ubsan="$(gcc -print-file-name=libubsan.so)"
# Python and torch allocate at exit without freeing: leak checking would report them, not us.
# Reports go to files as well as stderr: pytest captures stderr, and an abort loses what it held.
rm -f "$work"/report.*
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:log_path=$work/report"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$work/report"
cd "$repo"
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(tests/test_core.py tests/test_errors.py tests/test_hardening.py)
# An editable install's import hook would shadow PYTHONPATH: drop it so the sanitized build loads.
LD_PRELOAD="$asan $ubsan" PYTHONPATH="$work/pkg" python3 - "${tests[@]}" <<'PY' 2>&1 | tee "$work/log.txt"
import os, sys
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__name__.startswith("ScikitBuild")]
import pytest
import gmattn._core as core
expected = os.path.join(os.environ["PYTHONPATH"], "gmattn")
assert os.path.dirname(core.__file__) == expected, f"loaded {core.__file__}, not the sanitized build"
print("sanitized core:", core.__file__)
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
PY
status=${PIPESTATUS[0]}
if compgen -G "$work/report.*" >/dev/null || grep -qE "ERROR: AddressSanitizer|runtime error:" "$work/log.txt"; then
  cat "$work"/report.* 2>/dev/null | head -40
  echo "sanitizer reports found: see $work/report.* and $work/log.txt"
  exit 1
fi
exit "$status"
