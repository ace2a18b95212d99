#!/usr/bin/env bash
# End-to-end test of kvtier's vLLM connector on a real vLLM (CPU build), self-contained:
#   1. creates/reuses the cached venv (e2e/setup_venv.sh, ~/.cache/kvtier-e2e),
#   2. builds kvtier's wheel (maturin, release) and installs it into that venv,
#   3. runs the Python binding tests in the venv (torch tests included),
#   4. generates a tiny random Llama locally (no downloads),
#   5. runs the vLLM scenarios (e2e/vllm_e2e.py) and prints "N passed, M failed".
# Env: KVE2E_CACHE (venv cache), KVE2E_WORK (scratch dir), KVE2E_WHEEL (use this
# wheel instead of building), KVE2E_TOKENS (prompt length, default 8192), KVE2E_SUITES
# (scenario groups, default all of them, fp8 only on AVX-512/AMX CPUs; see e2e/vllm_e2e.py),
# CARGO_TARGET_DIR (default target/ of the repo), KVE2E_PROFILE (release, the default, or
# dev: CI builds the wheel and binary in the dev profile to reuse `cargo test`'s artifacts).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
t0=$(date +%s)
venv="$(bash "$here/setup_venv.sh" | tail -1)"
py="$venv/bin/python"
echo "[e2e] venv: $venv ($(( $(date +%s) - t0 ))s)"

work="${KVE2E_WORK:-$(mktemp -d /tmp/kvtier-e2e.XXXXXX)}"
mkdir -p "$work"
if [[ -n "${KVE2E_WHEEL:-}" ]]; then
  wheel="$KVE2E_WHEEL"
else
  rm -rf "$work/wheels"
  profile_flag="--release"
  [[ "${KVE2E_PROFILE:-release}" == "dev" ]] && profile_flag=""
  (cd "$repo" && "$venv/bin/maturin" build $profile_flag -i "$py" --out "$work/wheels" >&2)
  wheel="$(ls "$work"/wheels/kvtier-*.whl | head -1)"
fi
"$venv/bin/pip" install -q --force-reinstall --no-deps "$wheel"
echo "[e2e] installed $(basename "$wheel") ($(( $(date +%s) - t0 ))s)"

# The `kvtier serve` binary for the server-mode scenario (and the server binding test).
if [[ -z "${KV_SERVE_BIN:-}" ]]; then
  if (cd "$repo" && cargo build --release -q -p kvtier-cli --bin kvtier >&2); then
    export KV_SERVE_BIN="${CARGO_TARGET_DIR:-$repo/target}/release/kvtier"
  else
    echo "[e2e] building the kvtier binary failed: the server-mode scenario will fail" >&2
  fi
fi
echo "[e2e] kvtier binary: ${KV_SERVE_BIN:-none} ($(( $(date +%s) - t0 ))s)"

fail=0
# Binding tests with torch available (run from outside the repo so the installed package is used).
(cd "$work" && "$py" -m pytest -q -p no:cacheprovider "$repo/python/tests") || fail=1
# `kvtier serve`'s KV events, every batch decoded by vLLM's own msgspec types (required here).
(cd "$repo" && KVTIER_VLLM_PYTHON="$py" cargo test -q -p kvtier-server --test events) || fail=1

model="$work/tiny-llama"
[[ -f "$model/config.json" ]] || "$py" "$here/make_tiny_model.py" "$model" >/dev/null

export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-1}"
export VLLM_TARGET_DEVICE=cpu
export TOKENIZERS_PARALLELISM=false
set +e
(cd "$work" && "$py" "$here/vllm_e2e.py" "$work" "$model")
rc=$?
set -e
echo "[e2e] total $(( $(date +%s) - t0 ))s; logs in $work"
if [[ $fail -ne 0 ]]; then
  echo "[e2e] python binding tests failed"
  exit 1
fi
exit $rc
