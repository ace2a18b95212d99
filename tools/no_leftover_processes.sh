#!/usr/bin/env bash
# Runs a command, then fails if it left any of this project's processes running.
#
#   tools/no_leftover_processes.sh cargo test --workspace
#
# "This project's processes" are those whose executable or working directory lies under the
# cargo target directory ($CARGO_TARGET_DIR, default <repo>/target): the kvtier and
# kvtier-server binaries, re-executed test binaries, and the redis-servers the test harness
# starts (their directories are under target/tmp). Processes that were already running before
# the command are not counted, so other checkouts and earlier runs do not interfere. A process
# still alive a few seconds after the command exits is a leak: each test must stop what it
# started, even when it fails. Exit status: the command's when it failed, else 1 on a leak.
set -uo pipefail

if [[ $# -eq 0 ]]; then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
mkdir -p "$target"
target="$(cd "$target" && pwd -P)"

# One line per matching process: "<pid>:<start time in clock ticks since boot>".
snapshot() {
  local p pid exe cwd stat rest
  for p in /proc/[0-9]*; do
    pid="${p#/proc/}"
    exe="$(readlink "$p/exe" 2>/dev/null)" || exe=""
    cwd="$(readlink "$p/cwd" 2>/dev/null)" || cwd=""
    [[ "$exe" == "$target"/* || "$cwd" == "$target"/* ]] || continue
    stat="$(cat "$p/stat" 2>/dev/null)" || continue
    rest="${stat##*) }" # the fields after "pid (comm) ", which may hold spaces
    read -r -a f <<<"$rest"
    echo "$pid:${f[19]}"
  done | sort
}

before="$(snapshot)"
"$@"
rc=$?

# Processes started during the command and still alive, after a grace period for exits in
# progress (a signalled server finishing its shutdown).
left=""
for _ in $(seq 1 20); do
  left="$(comm -13 <(echo "$before") <(snapshot))"
  [[ -z "$left" ]] && break
  sleep 0.5
done
if [[ -n "$left" ]]; then
  echo "LEFTOVER PROCESSES: '$*' left these processes of the project running:" >&2
  for e in $left; do
    ps -o pid=,ppid=,etime=,args= -p "${e%%:*}" >&2 || true
    echo "  cwd: $(readlink "/proc/${e%%:*}/cwd" 2>/dev/null)" >&2
  done
  echo "Each test must stop the processes it starts (a guard that kills on drop, not a static)." >&2
  [[ $rc -ne 0 ]] || rc=1
fi
exit $rc
