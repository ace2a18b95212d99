"""The README's Python API example runs as written (a newcomer's first contact)."""

import re


def test_the_readme_python_api_example_runs(repo_root, capsys):
    text = (repo_root / "README.md").read_text()
    at = text.index("**Python API**")
    m = re.compile(r"```python\n(.*?)```", re.S).search(text, at)
    assert m, "no python block after **Python API** in README.md"
    exec(compile(m.group(1), "README.md (Python API example)", "exec"), {})
    assert capsys.readouterr().out.startswith("1024 (0, 256, ")
