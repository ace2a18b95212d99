"""A/B of vLLM with and without the kvtier connector on a workload with nothing to reuse.

Usage (in the e2e venv, after e2e/run_vllm_e2e.sh has made the tiny model; the variables
run_vllm_e2e.sh exports apply):

    python e2e/no_reuse_ab.py WORKDIR MODEL_DIR [ROUNDS=5] [PROMPTS=8] [TOKENS=2000]

Each round runs one vLLM process without a connector and one with kvtier (embedded L1),
alternating which goes first, each on fresh random prompts (a different set per round, the
same set for both processes of a round). Reports per arm the median and spread of the
workload's wall time, their ratio, and the in-process share of the forward passes spent in
kvtier's hooks. End-to-end times of separate processes differ by +-25% on a shared 2-core VM:
the in-process share is the figure to trust; the A/B says whether anything shows end to end.
Not part of CI (about 1 minute per process).
"""

import json
import os
import random
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vllm_e2e  # noqa: E402


def main():
    work, model = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    n_prompts = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    n_tokens = int(sys.argv[5]) if len(sys.argv) > 5 else 2000
    os.makedirs(work, exist_ok=True)
    walls = {"none": [], "kvtier": []}
    shares = []
    for r in range(rounds):
        rng = random.Random(1000 + r)
        prompts = {f"F{i}": [rng.randrange(4, 4096) for _ in range(n_tokens)] for i in range(n_prompts)}
        steps = [[name, name, 8] for name in prompts]
        order = ["none", "kvtier"] if r % 2 == 0 else ["kvtier", "none"]
        for arm in order:
            spec = {"model": model, "connector": arm, "prompts": prompts, "steps": steps}
            if arm == "kvtier":
                spec["engine_id"] = f"ab-{r}"
                spec["extra"] = {"kvtier.max_local_cpu_size": 1, "kvtier.lookup_socket_dir": work}
            res = vllm_e2e.run_case(work, f"ab-{r}-{arm}", spec)
            if res is None:
                print(f"[ab] round {r} {arm}: failed", flush=True)
                continue
            wall = sum(s["seconds"] for s in res["steps"])
            walls[arm].append(wall)
            line = f"[ab] round {r} {arm}: {wall:.2f} s"
            t = (res.get("connector") or {}).get("timing")
            if t:
                shares.append(100.0 * t["connector_fraction"])
                line += f", kvtier hooks {100.0 * t['connector_fraction']:.2f}% of {t['steps']} forward passes"
            print(line, flush=True)

    def summary(xs):
        return f"median {statistics.median(xs):.2f} s, min {min(xs):.2f}, max {max(xs):.2f} (n={len(xs)})"

    report = {"rounds": rounds, "prompts": n_prompts, "tokens": n_tokens, "wall_s": walls, "hook_share_pct": shares}
    if walls["none"] and walls["kvtier"]:
        ratio = statistics.median(walls["kvtier"]) / statistics.median(walls["none"])
        report["median_ratio_kvtier_over_none"] = ratio
        print(f"[ab] no connector: {summary(walls['none'])}")
        print(f"[ab] kvtier:       {summary(walls['kvtier'])}")
        print(f"[ab] kvtier / none (medians): {ratio:.3f}")
    if shares:
        print(f"[ab] kvtier hooks, share of forward time: median {statistics.median(shares):.2f}%, "
              f"min {min(shares):.2f}%, max {max(shares):.2f}%")
    with open(os.path.join(work, "no_reuse_ab.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
