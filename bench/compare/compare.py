"""bench/compare orchestrator: runs every workload through LMCache 0.5.6 and kvtier, each
(system, workload, shape) in its own Python process so neither distorts the other, plus the
hardware baselines and the native `kvtier bench`, then writes results.json, results.md and
plots to the output directory and prints PASS/FAIL acceptance lines.

Usage (normally through run.sh, which prepares the venv):
    python compare.py [--quick] [--out DIR] [--disk-dir DIR] [--kvtier-bin PATH]
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import GIB, MIB, SHAPES  # noqa: E402

MAX_POOL_BYTES = 8 * GIB  # brief: keep total pools <= ~8 GiB (24 GiB machine)


def plan(quick):
    """Sizes per workload and shape. Full mode matches baselines.md 3c's set sizes."""
    q = quick
    p = {"reps": 3 if q else 5, "shapes": list(SHAPES)}
    # L1: every shape, ~128 MiB (quick) / 0.5-1 GiB (full) per repetition.
    p["l1"] = {"1MiB": dict(chunks=128 if q else 512), "4MiB": dict(chunks=32 if q else 128),
               "16MiB": dict(chunks=8 if q else 48), "32MiB": dict(chunks=8 if q else 32),
               "80MiB": dict(chunks=2 if q else 12)}
    for s, c in p["l1"].items():
        c["budget_gib"] = 1.0 if q else 2.0
    p["lookup"] = {"4MiB": dict(prompt_tokens=131072)}  # 512 chunks = 2 GiB; 32 MiB would need 16
    p["disk"] = {"4MiB": dict(chunks=32 if q else 128, doc_chunks=8 if q else 32),
                 "32MiB": dict(chunks=8 if q else 32, doc_chunks=4 if q else 8)}
    p["prefetch"] = {"4MiB": dict(chunks=16 if q else 64), "32MiB": dict(chunks=4 if q else 16)}
    p["ldqa"] = {"4MiB": dict(doc_chunks=8 if q else 32, budget_gib=0.5 if q else 1.0),
                 "32MiB": dict(doc_chunks=4 if q else 8, budget_gib=0.5 if q else 1.0)}
    for w in ("disk", "prefetch"):
        for s, c in p[w].items():
            # CPU pool, equal for both systems: twice the data plus slack. kvtier caps its
            # disk write queue at half of L1 and skips (does not block) stores beyond it, so
            # a smaller pool would drop writes of a store burst this size; the workers fail
            # loudly if any chunk is missing on disk.
            c["budget_gib"] = (2 * c["chunks"] * SHAPES[s]["bytes"] + 256 * MIB) / GIB
    for w in ("l1", "disk", "prefetch", "ldqa"):
        for c in p[w].values():
            assert c["budget_gib"] * GIB <= MAX_POOL_BYTES
    return p


class Runner:
    def __init__(self, a):
        self.a = a
        self.py = sys.executable
        self.log = open(os.path.join(a.out, "run.log"), "a")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", LMCACHE_LOG_LEVEL="WARNING",
                        KVTIER_LOG=os.environ.get("KVTIER_LOG", "warn"))
        self.failures = []

    def run(self, label, argv, timeout=900):
        """Runs a worker; returns its JSON (last stdout line) or None after logging why."""
        t0 = time.time()
        print(f"  - {label} ...", end="", flush=True)
        self.log.write(f"\n=== {label}: {' '.join(argv)}\n")
        self.log.flush()
        try:
            p = subprocess.run(argv, cwd=HERE, env=self.env, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f" TIMEOUT after {timeout} s")
            self.failures.append(f"{label}: timed out")
            return None
        self.log.write(p.stdout[-20000:] + "\n--- stderr\n" + p.stderr[-20000:] + "\n")
        self.log.flush()
        parsed = parse_json(p.stdout)
        if p.returncode != 0 or parsed is None:
            tail = (p.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            print(f" FAILED (exit {p.returncode}): {tail}")
            self.failures.append(f"{label}: exit {p.returncode}: {tail}")
            return None
        print(f" {time.time() - t0:.0f} s")
        return parsed

    def worker(self, system, workload, shape, **kw):
        argv = [self.py, f"w_{system}.py", "--workload", workload, "--shape", shape,
                "--reps", str(kw.pop("reps")), "--disk-dir", self.a.disk_dir]
        for k, v in kw.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        return self.run(f"{system} {workload} {shape}", argv)


def parse_json(text):
    """A worker prints one JSON line last; the native CLI prints one pretty JSON document."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def load_avg():
    try:
        return os.getloadavg()
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer reps, smaller sets (development)")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--disk-dir", default=None,
                    help="directory for disk workloads (default: OUT/disk; same filesystem as the baselines)")
    ap.add_argument("--kvtier-bin", default=None, help="native `kvtier` binary (skip native rows if absent)")
    ap.add_argument("--only", default=None,
                    help="comma list of workloads: baseline,l1,lookup,disk,prefetch,ldqa,native")
    ap.add_argument("--render-only", action="store_true", help="re-render results.json into md/plots")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when an acceptance line FAILs (default: FAIL lines are results, exit 0)")
    a = ap.parse_args()
    a.out = os.path.abspath(a.out)
    os.makedirs(a.out, exist_ok=True)
    a.disk_dir = os.path.abspath(a.disk_dir or os.path.join(a.out, "disk"))
    os.makedirs(a.disk_dir, exist_ok=True)
    import report

    if a.render_only:
        res = json.load(open(os.path.join(a.out, "results.json")))
        ok = report.write_all(res, a.out)
        return 0 if ok or not a.strict else 1

    p = plan(a.quick)
    only = set(a.only.split(",")) if a.only else None
    want = lambda w: only is None or w in only  # noqa: E731
    r = Runner(a)
    started = time.time()
    res = {"meta": {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(), "kernel": platform.release(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "loadavg_start": load_avg(), "quick": a.quick, "plan": p,
        "disk_dir": a.disk_dir}, "raw": {}}
    try:
        import lmcache  # noqa: F401
        from importlib.metadata import version

        res["meta"]["versions"] = {k: version(k) for k in ("lmcache", "torch", "kvtier", "numpy")}
    except Exception as e:  # versions are informative only
        res["meta"]["versions"] = {"error": str(e)}
    raw = res["raw"]
    reps = p["reps"]
    for shape in p["shapes"]:
        print(f"== shape {shape} ({SHAPES[shape]['bytes'] // MIB} MiB chunks)")
        if want("baseline"):
            # Disk baselines only for the shapes the disk rows use.
            disk_chunks = p["disk"][shape]["chunks"] if shape in p["disk"] else 0
            raw[f"baseline/{shape}"] = r.run(
                f"baseline {shape}",
                [sys.executable, "w_baseline.py", "--shape", shape, "--reps", str(max(3, reps // 2 + 1)),
                 "--disk-dir", a.disk_dir, "--disk-chunks", str(disk_chunks)])
        for w in ("l1", "lookup", "disk", "prefetch", "ldqa"):
            if not want(w) or shape not in p[w]:
                continue
            # long-doc-qa: one shuffle of the query order per repetition, the same shuffles
            # for both systems. Its hit rate moves in steps of 1/16 with the order, so 3
            # shuffles cannot tell the systems apart (docs/benchmarks.md); 21 can.
            wreps = {"l1": reps, "lookup": 4 * reps, "ldqa": 3 if a.quick else 21}.get(w, 3)
            for system in ("lmcache", "kvtier"):
                raw[f"{w}/{system}/{shape}"] = r.worker(system, w, shape, reps=wreps, **p[w][shape])
        if want("native") and a.kvtier_bin and shape in p["disk"]:
            s = SHAPES[shape]
            common = [a.kvtier_bin, "bench", "--json", "--layers", str(s["layers"]), "--kv-heads",
                      str(s["kv_heads"]), "--head-dim", str(s["head_dim"]), "--dtype", "bf16"]
            d = p["disk"][shape]
            nd = []
            for i in range(3):
                ddir = os.path.join(a.disk_dir, f"native-{i}")
                shutil.rmtree(ddir, ignore_errors=True)
                nd.append(r.run(f"kvtier native disk {shape} #{i + 1}", common + [
                    "disk", "--disk-dir", ddir, "--doc-tokens", str(d["doc_chunks"] * 256),
                    "--docs", str(d["chunks"] // d["doc_chunks"])]))
                shutil.rmtree(ddir, ignore_errors=True)
            raw[f"native_disk/{shape}"] = [x for x in nd if x]
            lq = p["ldqa"][shape]
            docs = max(2, int(2.0 * lq["budget_gib"] * GIB) // (lq["doc_chunks"] * s["bytes"]))
            nl = []
            for i in range(3 if not a.quick else 1):
                nl.append(r.run(f"kvtier native long-doc-qa {shape} #{i + 1}", common + [
                    "long-doc-qa", "--l1-gb", str(lq["budget_gib"]), "--docs", str(docs),
                    "--doc-tokens", str(lq["doc_chunks"] * 256), "--queries", "2", "--seed", str(42 + i)]))
            raw[f"native_ldqa/{shape}"] = [x for x in nl if x]
    if want("native") and a.kvtier_bin:
        # The native L1 sweep: one chunk per call at every size, against same-run memcpy in
        # alternating rounds (no Python in the path).
        raw["native_l1"] = r.run("kvtier native bench l1 (all sizes)", [
            a.kvtier_bin, "bench", "l1", "--json", "--reps", "3" if a.quick else "5",
            "--chunk-mib", ",".join(str(SHAPES[s]["bytes"] // MIB) for s in p["shapes"])])
    res["meta"]["loadavg_end"] = load_avg()
    res["meta"]["wall_secs"] = time.time() - started
    res["meta"]["failures"] = r.failures
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    ok = report.write_all(res, a.out)
    shutil.rmtree(a.disk_dir, ignore_errors=True)
    if r.failures:
        print("\nWORKER FAILURES (rows missing):\n  " + "\n  ".join(r.failures))
        return 2
    return 0 if ok or not a.strict else 1


if __name__ == "__main__":
    sys.exit(main())
