"""The GPU check script (e2e/gpu/check.py) in its CPU smoke mode: the same round trips,
concurrency steps and bandwidth code as on a GPU, on CPU caches, through the installed
kvtier; and its exit code when CUDA is missing. Skipped where torch is not installed."""

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")


def run_check(repo_root, tmp_path, *args):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(repo_root / "e2e" / "gpu" / "check.py"), "--out", str(out), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


@pytest.mark.parametrize("gpu_path", [False, True], ids=["cpu-path", "device-staging-path"])
def test_cpu_smoke_run_passes_and_reports_every_part(repo_root, tmp_path, gpu_path):
    """Both code paths of the pipeline: CPU caches copied directly, and (as on CUDA) through
    'device' buffers with one copy per run of host chunks, in groups when they do not fit."""
    extra = ["--cpu-device-staging"] if gpu_path else []
    proc, rep = run_check(repo_root, tmp_path, "--device", "cpu", "--iterations", "10", "--sizes", "0.25",
                          "--rounds", "1", *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert rep["ok"] and rep["exit_code"] == 0
    assert rep["env"]["kvtier_native"].endswith(".abi3.so")
    assert all(v["bytes_equal"] and v["other_blocks_untouched"] for k, v in rep["round_trip"].items() if k != "cpu_layout_to_device_and_back")
    assert rep["round_trip"]["cpu_layout_to_device_and_back"] == {"to_device": True, "back": True}
    for mode in ("pinned", "pool"):
        c = rep["concurrency"][mode]
        assert c["iterations"] == 10 and c["mismatches"] == 0
        # Through device buffers, every other step's saves do not fit: staged after the pass.
        assert c["layers_staged_in_the_forward_pass"] == (5 if gpu_path else 10) * 4
    rows = {r["mode"]: r for r in rep["bandwidth"]}
    assert set(rows) == {"pinned", "pool"}
    for r in rows.values():
        for k in ("d2h_gbps", "h2d_gbps", "store_gbps", "load_gbps", "base_d2h_gbps", "base_h2d_gbps"):
            assert r[k]["median"] > 0
    assert "[gpu-check] report:" in proc.stdout


def test_without_cuda_the_check_says_so_with_exit_code_2(repo_root, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc, rep = run_check(repo_root, tmp_path, "--device", "cuda")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "CUDA is not available" in rep["env"]["error"] and rep["exit_code"] == 2
