#!/usr/bin/env bash
# GPU check of kvtier's transfer path on a machine with CUDA torch and nothing else (no vLLM,
# no network): installs a kvtier wheel built beforehand into a private directory (never into
# the system's site-packages), then runs e2e/gpu/check.py, which writes a JSON report.
#
#   e2e/gpu/check.sh [WHEEL] [check.py options...]
#
# WHEEL defaults to the newest target/gpu-wheel/kvtier-*.whl. Build it on the development
# machine (abi3: one wheel for CPython >= 3.10), then carry it to the GPU machine:
#   maturin build --release --out target/gpu-wheel
# The report goes to $OUT/gpu-report.json when OUT is set, else ./gpu-report.json
# (override with --out). Exit codes are check.py's: 0 all good, 1 a correctness failure,
# 2 the environment cannot run the check (no CUDA torch, wheel not installable), 3 correct
# but below the bandwidth target. The whole run takes under 5 minutes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
py="${PYTHON:-python3}"

wheel=""
if [[ $# -gt 0 && "$1" == *.whl ]]; then
  wheel="$1"
  shift
else
  wheel="$(ls -t "$repo"/target/gpu-wheel/kvtier-*.whl 2>/dev/null | head -1 || true)"
fi
if [[ -z "$wheel" || ! -f "$wheel" ]]; then
  echo "[gpu-check] no kvtier wheel: pass its path, or build one into target/gpu-wheel" >&2
  exit 2
fi
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "[gpu-check] $py cannot import torch (set PYTHON to an interpreter with CUDA torch)" >&2
  exit 2
fi

site="$(mktemp -d "${TMPDIR:-/tmp}/kvtier-gpu-check.XXXXXX")"
trap 'rm -rf "$site"' EXIT
# pip checks the wheel's tags against this interpreter (abi3, glibc) with a clear message;
# without pip, a wheel is a zip archive whose files go straight onto the path.
if "$py" -m pip --version >/dev/null 2>&1; then
  if ! "$py" -m pip install --quiet --no-deps --no-index --target "$site" "$wheel"; then
    echo "[gpu-check] the wheel $(basename "$wheel") does not install on $("$py" -V) here" >&2
    exit 2
  fi
else
  "$py" -m zipfile -e "$wheel" "$site"
fi
echo "[gpu-check] $(basename "$wheel") on $("$py" -V 2>&1), torch $("$py" -c 'import torch; print(torch.__version__)')"
rc=0
PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$py" "$here/check.py" "$@" || rc=$?
exit $rc
