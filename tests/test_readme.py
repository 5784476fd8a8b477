"""The README's quick start and the docs' Python API example run as written."""

import json
import re
from pathlib import Path

from tests.readme_chain import quick_start_lines


def test_python_api_example_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "docs" / "sparsity.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "docs/sparsity.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 7  # n = 8 segments: 7 updates
    assert printed[0].startswith("25 ")


def test_quick_start_is_two_lines_and_ci_runs_the_test_line():
    train, test = quick_start_lines()
    assert "run_pretraining.py --config" in train and "--steps" in train
    assert test.endswith("python -m pytest -q")
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "## Quick start" in ci and 'eval "$test_line"' in ci  # .ci/run takes the line from the README


def test_quick_start_training_line_is_a_valid_command(capsys):
    """The training line's arguments parse and describe a valid run (the run itself takes minutes)."""
    import shlex

    from ipu_app.commands.train import main

    train, _ = quick_start_lines()
    args = shlex.split(train.split("&&", 1)[1])
    assert args[:2] == ["python", "run_pretraining.py"]
    assert main(args[2:] + ["--describe", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # a sound DynSparse run: it updates the pattern, with segments no shorter than min_segment_steps
    assert info["config"]["training"]["steps"] == 2000 and info["config"]["sparsity"]["mode"] == "dynamic"
    assert info["pattern_updates"] >= 1 and info["schedule_warning"] is None
    assert info["steps_between_updates"] >= info["config"]["sparsity"]["min_segment_steps"]



def test_the_readme_chain_runs_end_to_end(pipeline, capsys):
    """Pre-train -> phase II -> demo task -> fine-tune above chance (the ``pipeline`` fixture runs those
    README lines at test size: tests/readme_chain.py), then the README's evaluate and export lines."""
    from ipu_app.__main__ import main as app_main
    from tests.readme_chain import _at_test_size, chain

    commands = chain()
    assert set(commands) == {"pretrain", "phase2", "demo_task", "finetune", "evaluate", "export"}
    assert "--steps" in commands["phase2"]  # a short phase II says how short (its warmup cannot round to 0)
    phase2 = json.loads((pipeline / "runs" / "tiny_512" / "summary.json").read_text())
    assert phase2["init_from"]["kind"] == "run" and phase2["steps"] == 4
    results = json.loads((pipeline / "runs" / "ft" / "results.json").read_text())
    assert results["dev"]["accuracy"] > 0.6  # chance: 0.5 on 500 balanced sentences (sd 0.022)
    for role in ("evaluate", "export"):
        args = _at_test_size(commands[role], pipeline)
        if role == "export":
            args[args.index("--output") + 1] = str(pipeline / "hf_model")
        assert app_main(args[3:]) == 0, args
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    summary = json.loads((pipeline / "runs" / "bert_tiny_sparse" / "summary.json").read_text())
    assert evaluated["mlm_loss"] == summary["final_val_mlm_loss"]
    assert (pipeline / "hf_model" / "config.json").is_file()
