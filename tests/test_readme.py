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


def next_steps_commands() -> list[list[str]]:
    """The README's "Next steps" block as argument lists (continuation lines joined, comments dropped)."""
    import shlex

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"Next steps:\n\n```bash\n(.*?)```", text, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_readme_chain_runs_end_to_end(data_dir, tmp_path, capsys, monkeypatch):
    """Pre-train -> evaluate -> phase II -> demo task -> fine-tune above chance -> export, each line as the
    README writes it, at test size: 60 and 6 pre-training steps at batch 16 and a learning rate of 1e-3
    (the flags that matter kept: phase II's --init-from, sequence length 512 and its short --steps,
    whose warmup must not round to zero), the test corpus, fp32."""
    from ipu_app.__main__ import main as app_main
    from ipu_app.train.cli import main as train_main

    monkeypatch.chdir(tmp_path)
    _, train_line = quick_start_lines()[0].split("&&", 1)
    commands = [shlex_split(train_line)] + [c for c in next_steps_commands() if _in_chain(c)]
    test_size = {"--steps": {"2000": "60", "500": "6"}}
    common = ["--set", f"data.dir={data_dir}", "--set", "training.precision=fp32", "--set",
              "data.validation_sequences=8", "--no-progress"]
    ran = []
    for args in commands:
        args = [test_size.get(prev, {}).get(arg, arg) for prev, arg in zip([""] + args, args)]
        if args[1] == "run_pretraining.py":
            # at 60 steps, auto's peak rate collapses Tiny (not so over the README's 2,000): 1e-3 for both phases
            assert train_main(args[2:] + common + ["--set", "training.batch_size=16", "--set",
                                                   "training.learning_rate=1e-3"]) == 0, args
        elif args[3] == "finetune":
            assert app_main(args[3:] + ["--no-progress"]) == 0, args
        else:
            assert app_main(args[3:]) == 0, args
        ran.append(args[1] if args[1] == "run_pretraining.py" else args[3])
    assert ran == ["run_pretraining.py", "evaluate", "run_pretraining.py", "demo-task", "finetune", "export"]
    phase2 = json.loads((tmp_path / "runs" / "tiny_512" / "summary.json").read_text())
    assert phase2["init_from"]["kind"] == "run" and phase2["steps"] == 6
    results = json.loads((tmp_path / "runs" / "ft" / "results.json").read_text())
    assert results["dev"]["accuracy"] > 0.6  # chance: 0.5 on 500 balanced sentences (sd 0.022)
    assert (tmp_path / "hf_model" / "config.json").is_file()


def shlex_split(line: str) -> list[str]:
    import shlex

    return shlex.split(line, comments=True)


def _in_chain(args: list[str]) -> bool:
    """The chain's lines: phase II, evaluate, the demo task, fine-tuning, export (not --describe,
    --resume, sweeps or reports, which other tests run)."""
    if args[1] == "run_pretraining.py":
        return "--init-from" in args
    return args[3] in ("evaluate", "demo-task", "finetune", "export")
