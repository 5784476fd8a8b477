"""The README's quick start runs as written."""

import re
from pathlib import Path


def test_readme_quick_start_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Quick start \(Python\)\n\n```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 7  # n = 8 segments: 7 updates
    assert printed[0].startswith("25 ")
