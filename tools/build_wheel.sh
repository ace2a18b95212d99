#!/usr/bin/env bash
# Builds kvtier's wheel: the Python extension (abi3: one wheel for every CPython >= 3.10) with
# the `kvtier` command line (serve, bench, inspect) inside, so `pip install` needs no Rust
# toolchain. maturin's auditwheel check tags the wheel manylinux_2_N from the glibc symbols
# the extension uses; this script also checks the bundled binary against that N.
#
# Usage: tools/build_wheel.sh [--profile release|dev] [--out DIR] [--cli-binary PATH]
#   --profile     release (default; what to publish) or dev (CI: reuses `cargo test`'s artifacts)
#   --out         where the wheel goes (default target/wheels); the path is printed last
#   --cli-binary  bundle this already-built `kvtier` binary instead of building one (CI passes
#                 the one `cargo test --workspace` just built: `cargo build -p kvtier-cli`
#                 alone resolves other dependency features and would rebuild them)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
out=target/wheels
cli_binary=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --cli-binary) cli_binary="$2"; shift 2 ;;
    *) echo "usage: tools/build_wheel.sh [--profile release|dev] [--out DIR] [--cli-binary PATH]" >&2; exit 2 ;;
  esac
done
case "$profile" in
  release) bindir=release ;;
  dev) bindir=debug ;;
  *) echo "--profile must be release or dev, not $profile" >&2; exit 2 ;;
esac
target="${CARGO_TARGET_DIR:-target}"

venv="$target/wheel-build-venv"
if ! "$venv/bin/maturin" --version >/dev/null 2>&1; then
  echo "== installing maturin into $venv" >&2
  if ! (python3 -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check "maturin>=1.5,<2"); then
    echo "ERROR: could not install maturin (python3 -m venv + pip install maturin)" >&2
    exit 1
  fi
fi

if [[ -z "$cli_binary" ]]; then
  echo "== building the kvtier command line ($profile)" >&2
  cargo build --profile "$profile" -q -p kvtier-cli --bin kvtier
  cli_binary="$target/$bindir/kvtier"
fi
if ! "$cli_binary" --version >/dev/null; then
  echo "ERROR: $cli_binary does not run" >&2
  exit 1
fi
staged=python/kvtier/_bin
rm -rf "$staged"
mkdir -p "$staged"
trap 'rm -rf "$staged"' EXIT
install -m 0755 "$cli_binary" "$staged/kvtier"

echo "== building the wheel ($profile)" >&2
rm -rf "$out"
mkdir -p "$out"
"$venv/bin/maturin" build --profile "$profile" --auditwheel check -i python3 --out "$out" >&2
wheel="$(ls "$out"/kvtier-*.whl)"

# The wheel's manylinux_2_N tag promises glibc >= 2.N suffices; the binary must keep it too.
tag_glibc="$(basename "$wheel" | sed -n 's/.*manylinux_2_\([0-9]*\)_.*/\1/p')"
bin_glibc="$(objdump -T "$staged/kvtier" | sed -n 's/.*GLIBC_2\.\([0-9]*\).*/\1/p' | sort -n | tail -1)"
if [[ -z "$tag_glibc" || -z "$bin_glibc" ]]; then
  echo "ERROR: could not read the manylinux tag of $wheel or the glibc versions of the binary" >&2
  exit 1
fi
if (( bin_glibc > tag_glibc )); then
  echo "ERROR: the bundled kvtier binary needs glibc 2.$bin_glibc, above the wheel's manylinux_2_$tag_glibc tag" >&2
  exit 1
fi
if ! python3 -c "import sys, zipfile; n = zipfile.ZipFile(sys.argv[1]).namelist(); sys.exit(0 if 'kvtier/_bin/kvtier' in n else 1)" "$wheel"; then
  echo "ERROR: $wheel lacks kvtier/_bin/kvtier" >&2
  exit 1
fi
echo "$wheel"
