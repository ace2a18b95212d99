#!/usr/bin/env bash
# Installs a kvtier wheel into a fresh venv with no Rust toolchain on PATH, as a user without
# Rust would, and runs from it: `kvtier --version`, a short bench, the Python binding tests
# (those that need neither PyTorch nor vLLM) and the README's Python example.
# Usage: tools/check_wheel.sh WHEEL
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
wheel="$(realpath "${1:?usage: tools/check_wheel.sh WHEEL}")"
work="$(mktemp -d /tmp/kvtier-wheel-check.XXXXXX)"
trap 'rm -rf "$work"' EXIT

python3 -m venv "$work/venv"
if ! "$work/venv/bin/pip" install -q --disable-pip-version-check "$wheel" numpy pytest; then
  echo "ERROR: pip could not install $wheel with numpy and pytest" >&2
  exit 1
fi

# PATH without any directory holding cargo or rustc.
clean="$work/venv/bin"
IFS=: read -ra dirs <<<"$PATH"
for d in "${dirs[@]}"; do
  [[ -z "$d" || -x "$d/cargo" || -x "$d/rustc" ]] && continue
  clean="$clean:$d"
done
run() { (cd "$work" && env -u CARGO_HOME -u RUSTUP_HOME -u CARGO_TARGET_DIR -u KV_SERVE_BIN PATH="$clean" "$@"); }
if run sh -c 'command -v cargo || command -v rustc' >/dev/null; then
  echo "ERROR: a Rust toolchain is still on PATH ($clean)" >&2
  exit 1
fi

echo "== kvtier --version (from the wheel)"
got="$(run kvtier --version)"
echo "$got"
[[ "$(run sh -c 'command -v kvtier')" == "$work/venv/bin/kvtier" ]] || { echo "ERROR: kvtier is not the venv's" >&2; exit 1; }
want="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml")"
[[ "$got" == *"$want"* ]] || { echo "ERROR: kvtier --version says '$got', the workspace is $want" >&2; exit 1; }

echo "== kvtier bench long-doc-qa --model tiny (from the wheel)"
t0=$(date +%s.%N)
run timeout 300 kvtier bench long-doc-qa --model tiny >"$work/bench.txt"
t1=$(date +%s.%N)
tail -5 "$work/bench.txt"
python3 -c "import sys; print(f'bench took {float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" "$t0" "$t1"

echo "== Python binding tests and the README example (from the wheel, no torch or vLLM)"
run python -c "import kvtier, sys; assert kvtier.__file__.startswith(sys.prefix), kvtier.__file__"
run python -m pytest -q -p no:cacheprovider \
  "$repo/python/tests/test_bindings.py" "$repo/python/tests/test_packaging.py" \
  "$repo/python/tests/test_readme.py"
