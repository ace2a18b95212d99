#!/usr/bin/env bash
# One command for the kvtier vs LMCache comparison (issue #7):
#   bench/compare/run.sh [--quick] [--out DIR] [--disk-dir DIR] [--only l1,lookup,...]
# 1. makes (or reuses) a cached venv with lmcache==0.5.6, matplotlib, maturin from PyPI
#    (~/.cache/kvtier-compare/venv-<hash of requirements.txt>; first time ~4-6 min, ~6 GB),
# 2. builds kvtier's Python module from this checkout into it (maturin develop --release)
#    and the native `kvtier` CLI (cargo build --release),
# 3. runs compare.py: every workload through LMCache and kvtier, each in its own process,
#    plus same-run hardware baselines; writes results.md / results.json / *.png to
#    bench/compare/out/ (or --out) and prints PASS/FAIL acceptance lines.
# Environment: PYTHON (interpreter for the venv, default python3.11 or python3),
# KVTIER_COMPARE_VENV (use this venv path instead), CARGO_TARGET_DIR (honoured).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

py=${PYTHON:-$(command -v python3.11 || command -v python3)}
hash=$(sha256sum "$here/requirements.txt" | cut -c1-16)
venv=${KVTIER_COMPARE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvtier-compare/venv-$hash}
marker="$venv/.kvtier-compare-complete"

if [[ ! -f "$marker" ]]; then
  echo "== creating venv $venv (lmcache==0.5.6 pulls torch; this takes minutes)" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  # PyPI only (the standard registry, pip's default index): no other index, no fallback.
  "$venv/bin/pip" install -q -r "$here/requirements.txt"
  touch "$marker"
fi

echo "== building kvtier (Python module into the venv, native CLI)" >&2
# maturin develop needs VIRTUAL_ENV to find the target environment.
VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" "$venv/bin/maturin" develop --release -q >&2
cargo build --release -q -p kvtier-cli
bin="${CARGO_TARGET_DIR:-$root/target}/release/kvtier"
[[ -x "$bin" ]] || { echo "native kvtier binary not found at $bin" >&2; exit 1; }
"$venv/bin/python" -c 'import kvtier, lmcache, torch' || { echo "venv is missing kvtier/lmcache/torch" >&2; exit 1; }

exec "$venv/bin/python" "$here/compare.py" --kvtier-bin "$bin" "$@"
