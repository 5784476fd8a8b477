"""The README's researcher chain, run as written at test size: the quick start's training line, phase II
(--init-from, sequence length 512), the demo task and the fine-tuning line. The ``pipeline`` fixture
(tests/conftest.py) runs it once per session; the README and fine-tuning tests read its outputs."""

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
# Test size: 60 steps at batch 16 for the quick start, 4 at batch 4 for phase II, both at a learning
# rate of 1e-3 (at 60 steps auto's peak rate collapses Tiny; not so over the README's 2,000).
STEPS = {"2000": "60", "500": "4"}
BATCH = {"2000": "16", "500": "4"}


def quick_start_lines() -> list[str]:
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", README.read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def next_steps_commands() -> list[list[str]]:
    """The README's "Next steps" block as argument lists (continuation lines joined, comments dropped)."""
    block = re.search(r"Next steps:\n\n```bash\n(.*?)```", README.read_text(), re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def chain() -> dict[str, list[str]]:
    """The chain's commands by role: pretrain, phase2, demo_task, finetune, evaluate, export."""
    found = {"pretrain": shlex.split(quick_start_lines()[0].split("&&", 1)[1], comments=True)}
    for args in next_steps_commands():
        if args[1] == "run_pretraining.py" and "--init-from" in args:
            found["phase2"] = args
        elif args[1] == "-m" and args[3] in ("demo-task", "finetune", "evaluate", "export"):
            found[args[3].replace("-", "_")] = args
    return found


def run_chain(root: Path, data_dir: Path) -> dict[str, list[str]]:
    """Run the chain into ``root`` (the README's ``runs/`` and ``tasks/`` paths under it); the
    commands as run."""
    from ipu_app.__main__ import main as app_main
    from ipu_app.commands.train import main as train_main

    commands = chain()
    ran = {}
    for role in ("pretrain", "phase2", "demo_task", "finetune"):
        args = _at_test_size(commands[role], root)
        if role in ("pretrain", "phase2"):
            steps = args[args.index("--steps") + 1]
            args = args[:args.index("--steps") + 1] + [STEPS[steps]] + args[args.index("--steps") + 2:]
            args += ["--set", f"training.batch_size={BATCH[steps]}", "--set", "training.learning_rate=1e-3",
                     "--set", f"data.dir={data_dir}", "--set", "training.precision=fp32",
                     "--set", "data.validation_sequences=8", "--no-progress"]
            if "--output-dir" not in args:
                args += ["--output-dir", str(root / "runs" / args[args.index("--config") + 1])]
            assert train_main(args[2:]) == 0, args
        else:
            extra = ["--no-progress"] if role == "finetune" else []
            assert app_main(args[3:] + extra) == 0, args
        ran[role] = args
    return ran


def _at_test_size(args: list[str], root: Path) -> list[str]:
    """The README's relative paths (runs/..., tasks/...) under ``root``."""
    return [str(root / a) if a.startswith(("runs/", "tasks/")) else a for a in args]
