"""The README's quick start and the docs' Python API example run as written."""

import json
import re
from pathlib import Path


def test_python_api_example_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "docs" / "sparsity.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "docs/sparsity.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 7  # n = 8 segments: 7 updates
    assert printed[0].startswith("25 ")


def quick_start_lines():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_lines_and_ci_runs_the_test_line():
    train, test = quick_start_lines()
    assert "run_pretraining.py --config" in train and "--steps" in train
    assert test.endswith("python -m pytest -q")
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "## Quick start" in ci and 'eval "$test_line"' in ci  # .ci/run takes the line from the README


def test_quick_start_training_line_is_a_valid_command(capsys):
    """The training line's arguments parse and describe a valid run (the run itself takes minutes)."""
    import shlex

    from ipu_app.train.cli import main

    train, _ = quick_start_lines()
    args = shlex.split(train.split("&&", 1)[1])
    assert args[:2] == ["python", "run_pretraining.py"]
    assert main(args[2:] + ["--describe", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # a sound DynSparse run: it updates the pattern, with segments no shorter than min_segment_steps
    assert info["config"]["training"]["steps"] == 2000 and info["config"]["sparsity"]["mode"] == "dynamic"
    assert info["pattern_updates"] >= 1 and info["schedule_warning"] is None
    assert info["steps_between_updates"] >= info["config"]["sparsity"]["min_segment_steps"]
