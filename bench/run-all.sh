#!/usr/bin/env bash
# Runs every `kvtier bench` workload once (JSON + SVG plots under bench-out/) and prints a
# Markdown table of the ratios to the same-run baselines. Usage: bench/run-all.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-out}
mkdir -p "$out"
cargo build --release -q
bin=target/release/kvtier
export KVTIER_LOG=${KVTIER_LOG:-warn}

run() { # name, args... (the disk and remote workloads draw no plots)
  local name=$1; shift
  local plot=(--plot "$out/$name")
  [[ $name == disk || $name == remote ]] && plot=()
  echo "== kvtier bench $*" >&2
  "$bin" bench "$@" --json "${plot[@]}" > "$out/$name.json"
}
run long-doc-qa long-doc-qa
run random random
run disk disk
if command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null; then
  run remote remote
else
  echo "redis-server / redis-benchmark not installed: remote workload skipped" >&2
fi
run sweep sweep

python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(n):
    p = os.path.join(out, n + ".json")
    return json.load(open(p)) if os.path.exists(p) else None
rows = []
l = load("long-doc-qa")
if l:
    b = l["baseline"]["memcpy_gbps"]; r = l["results"]
    rows += [("L1 store (32 MiB chunks)", r["store_gbps"], "memcpy", b, l["ratios"]["store"]),
             ("L1 retrieve", r["retrieve_gbps"], "memcpy", b, l["ratios"]["retrieve"])]
    print(f"lookup of 8K tokens p50/p99: {r['lookup_p50_us']:.0f}/{r['lookup_p99_us']:.0f} us; "
          f"128K tokens p50/p99: {r['lookup_128k_p50_us']:.0f}/{r['lookup_128k_p99_us']:.0f} us; "
          f"index probe of 512 keys p50: {r['probe_512_p50_us']:.1f} us; hit rate {r['hit_rate']:.3f}")
rnd = load("random")
if rnd:
    print(f"random (no reuse): store {rnd['results']['store_gbps']:.2f} GB/s, "
          f"overhead {rnd['results'].get('overhead_ms_per_gb', 0):.1f} ms per GB stored")
d = load("disk")
if d:
    rows += [("disk durable write", d["results"]["disk_write_gbps"], "O_DIRECT write", d["baseline"]["disk_write_gbps"], d["ratios"]["disk_write"]),
             ("disk durable write", d["results"]["disk_write_gbps"], "O_DIRECT write+fdatasync", d["baseline"]["disk_write_durable_gbps"], d["ratios"]["disk_write_vs_durable"]),
             ("disk read after restart", d["results"]["disk_read_gbps"], "O_DIRECT read", d["baseline"]["disk_read_gbps"], d["ratios"]["disk_read"])]
rm = load("remote")
if rm:
    rows += [("Redis tier store (4 MiB)", rm["results"]["remote_store_gbps"], "redis-benchmark SET", rm["baseline"]["redis_set_gbps"], rm["ratios"]["remote_store"]),
             ("Redis tier retrieve", rm["results"]["remote_retrieve_gbps"], "redis-benchmark GET", rm["baseline"]["redis_get_gbps"], rm["ratios"]["remote_retrieve"])]
print()
print("| path | GB/s | baseline | baseline GB/s | ratio |")
print("|---|---|---|---|---|")
for name, v, bn, bv, ratio in rows:
    print(f"| {name} | {v:.2f} | {bn} | {bv:.2f} | {ratio:.2f} |")
s = load("sweep")
if s:
    print()
    print("| set / L1 | hit rate, L1 only | hit rate, L1 + disk |")
    print("|---|---|---|")
    pts = s["points"]
    for f in sorted({p["factor"] for p in pts}):
        a = next(p["hit_rate"] for p in pts if p["factor"] == f and not p["disk"])
        b = next(p["hit_rate"] for p in pts if p["factor"] == f and p["disk"])
        print(f"| {f} | {a:.3f} | {b:.3f} |")
PY
