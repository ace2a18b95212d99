"""What an installed kvtier package tells its user: its version, and what to install for
the vLLM connector when PyTorch or vLLM is missing."""

import importlib.util
import re
import subprocess
import sys

import pytest

import kvtier


def test_version_is_the_workspace_version(repo_root):
    manifest = (repo_root / "Cargo.toml").read_text()
    m = re.search(r'^\[workspace\.package\]\n(?:.*\n)*?version = "([^"]+)"', manifest, re.M)
    assert m, "no [workspace.package] version in Cargo.toml"
    assert kvtier.__version__ == m.group(1)
    assert "__version__" in kvtier.__all__


@pytest.mark.parametrize("missing", ["torch", "vllm"])
def test_kvtier_vllm_without_torch_or_vllm_names_what_to_install(missing):
    # `sys.modules[name] = None` makes `import name` fail as if it were not installed,
    # whether or not this environment has it.
    code = f"import sys; sys.modules[{missing!r}] = None\nimport kvtier.vllm"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: kvtier.vllm needs PyTorch and vLLM"), out.stderr
    # Without torch installed at all, torch is what is named first, whichever we hid.
    named = missing
    if missing == "vllm" and importlib.util.find_spec("torch") is None:
        named = "torch"
    assert f"'{named}' is not installed" in last, out.stderr
    assert "pip install 'kvtier[vllm]'" in last, out.stderr


def test_the_engine_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; sys.modules['vllm'] = None\nimport kvtier; print(kvtier.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == kvtier.__version__


def test_the_kvtier_command_runs_the_bundled_binary_with_its_arguments(tmp_path):
    fake = tmp_path / "kvtier"
    fake.write_text('#!/bin/sh\necho "argv0=$0 args=$*"\n')
    fake.chmod(0o644)  # as a tool that drops permission bits would leave it
    code = (
        "import sys, pathlib, kvtier._cli as c\n"
        f"c.bundled_binary = lambda: pathlib.Path({str(fake)!r})\n"
        "sys.argv = ['kvtier', 'bench', '--model', 'tiny']\n"
        "c.main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("args=bench --model tiny"), out.stdout


def test_the_kvtier_command_without_a_bundled_binary_says_how_to_get_one(tmp_path):
    code = (
        "import pathlib, kvtier._cli as c\n"
        f"c.bundled_binary = lambda: pathlib.Path({str(tmp_path / 'absent')!r})\n"
        "c.main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "cargo install --path crates/kvtier-cli" in out.stderr, out.stderr
