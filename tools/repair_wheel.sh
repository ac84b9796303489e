#!/usr/bin/env bash
# Repairs a Linux gmattn wheel to a manylinux tag with auditwheel, handling the OpenMP runtime
# as docs/install.md explains. tools/build_wheels.sh and cibuildwheel's repair step run it.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tools/repair_wheel.sh [--openmp shared|private] -w DEST_DIR WHEEL

  --openmp shared   (default) libgomp.so.1 ships in the wheel under its own SONAME, next to the
                    modules (gmattn/libgomp.so.1, found through RUNPATH $ORIGIN). A process that
                    loads torch too (torch ships libgomp.so.1 the same way) maps one copy,
                    whichever is imported first: one OpenMP runtime, one thread pool.
  --openmp private  auditwheel's default: a renamed private copy in gmattn.libs/ (two OpenMP
                    runtimes in a process with torch).
needs auditwheel and patchelf on PATH and, for shared, the 'wheel' package in the Python that
runs this (PYTHON, default python3).
EOF
}

die() { echo "repair_wheel.sh: $*" >&2; exit 2; }

OPENMP=shared DEST= WHEEL=
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --openmp) [ $# -ge 2 ] || die "--openmp needs a value (shared or private)"; OPENMP=$2; shift 2 ;;
    -w) [ $# -ge 2 ] || die "-w needs a directory"; DEST=$2; shift 2 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) [ -z "$WHEEL" ] || die "one WHEEL expected, got '$WHEEL' and '$1'"; WHEEL=$1; shift ;;
  esac
done
[ -n "$DEST" ] && [ -n "$WHEEL" ] || { usage >&2; die "-w DEST_DIR and WHEEL are required"; }
case "$OPENMP" in shared|private) ;; *) die "--openmp must be 'shared' or 'private', got '$OPENMP'" ;; esac
[ -f "$WHEEL" ] || die "no such wheel: $WHEEL"
for tool in auditwheel patchelf unzip; do command -v "$tool" >/dev/null || die "'$tool' is not on PATH"; done

mkdir -p "$DEST"
if [ "$OPENMP" = private ]; then
  auditwheel repair -w "$DEST" "$WHEEL"
  exit 0
fi

PY=${PYTHON:-python3}
"$PY" -m wheel version >/dev/null 2>&1 || die "the 'wheel' package is missing in $PY (pip install wheel)"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gmattn-repair.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# The runtime the modules were linked against, resolved as the loader would here.
unzip -q -d "$WORK/raw" "$WHEEL"
LIBGOMP=
for module in "$WORK"/raw/gmattn/_*.so; do
  found=$(ldd "$module" | awk '$1 == "libgomp.so.1" {print $3}')
  [ -z "$found" ] || LIBGOMP=$found
done
[ -n "$LIBGOMP" ] && [ -f "$LIBGOMP" ] || die "no module of $WHEEL links libgomp.so.1"

auditwheel repair --exclude libgomp.so.1 -w "$WORK/repaired" "$WHEEL"
"$PY" -m wheel unpack -d "$WORK/unpacked" "$WORK"/repaired/*.whl
ROOT=$(ls -d "$WORK"/unpacked/gmattn-*)
install -m 755 "$LIBGOMP" "$ROOT/gmattn/libgomp.so.1"
for module in "$ROOT"/gmattn/_*.so; do
  if patchelf --print-needed "$module" | grep -qx libgomp.so.1; then
    patchelf --add-rpath '$ORIGIN' "$module"
  fi
done
"$PY" -m wheel pack -d "$DEST" "$ROOT"  # rewrites RECORD
echo "repair_wheel.sh: shipped $LIBGOMP as gmattn/libgomp.so.1 (SONAME libgomp.so.1)"
