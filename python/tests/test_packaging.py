"""What an installed kvtier package tells its user: its version, and what to install for
the vLLM connector when PyTorch or vLLM is missing."""

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
    assert f"'{missing}' is not installed" in last, out.stderr
    assert "pip install 'kvtier[vllm]'" in last, out.stderr


def test_the_engine_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; sys.modules['vllm'] = None\nimport kvtier; print(kvtier.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == kvtier.__version__
