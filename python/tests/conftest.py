import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def repo_root():
    return REPO


@pytest.fixture
def small_cfg():
    # 16 MiB of L1, small chunks, no huge pages: fast to set up in tests.
    return {"chunk_size": 16, "max_local_cpu_size": 0.015625, "local_cpu_huge_pages": False}


@pytest.fixture
def kvtier_serve(tmp_path):
    """Starts `kvtier serve` (the binary in KV_SERVE_BIN, or `kvtier` on PATH) for a test and
    stops it after: ``start(config_yaml, *args)`` -> (unix socket path, the ready file's
    contents). Skips without a binary, fails where KVTIER_REQUIRE_TEST_SERVERS is set."""
    import json
    import os
    import shutil
    import subprocess
    import time

    procs = []

    def start(config: str, *args: str):
        b = os.environ.get("KV_SERVE_BIN") or shutil.which("kvtier")
        if not b or not os.path.exists(b):
            if os.environ.get("KVTIER_REQUIRE_TEST_SERVERS", "") not in ("", "0"):
                pytest.fail("no kvtier binary: set KV_SERVE_BIN (required: KVTIER_REQUIRE_TEST_SERVERS is set)")
            pytest.skip("no kvtier binary (set KV_SERVE_BIN)")
        n = len(procs)
        cfg = tmp_path / f"serve{n}.yaml"
        cfg.write_text(config)
        sock, ready = tmp_path / f"kvtier{n}.sock", tmp_path / f"ready{n}.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
        proc = subprocess.Popen([b, "serve", "--config", str(cfg), "--socket", str(sock), "--ready-file", str(ready),
                                 *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        for _ in range(400):
            if ready.exists() and ready.read_text().strip():
                return str(sock), json.loads(ready.read_text())
            if proc.poll() is not None:
                pytest.fail(f"kvtier serve exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        pytest.fail("kvtier serve did not write its ready file within 20 s")

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
