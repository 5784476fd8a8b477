"""A run directory: the one place its layout, its state and its rules are written down.

Training writes a run into one directory; the CLI, the trainer, sweeps, reports, export and
revalidation all find its parts through :class:`RunDir`::

    RUN_DIR/
      config.yaml            the resolved config (written before the first step)
      metrics.jsonl          one JSON object per logged event (train, val, update)
      tensorboard/           the same scalars for TensorBoard
      checkpoints/step_N/    the kept checkpoints (train/checkpoint.py)
      model/                 the final weights (written at the end)
      tokenizer/             the data's tokenizer (written at the end)
      explored.safetensors   DynSparse: the ever-active block maps (written at the end)
      summary.json           the final numbers; its presence means "finished"
      kernels.json           backend auto on a CPU: the kernels measured fastest per layer kind (a resume uses them)
      .lock                  held (flock) while a process trains the run

Importing this module imports neither torch nor the CLI, so sweeps and reports stay light.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import RunConfig

RUN_STATES = ("new", "finished", "resumable", "partial")
_CHECKPOINT = re.compile(r"^step_(\d+)$")


class RunDir:
    """Paths and state of one run directory (it need not exist yet)."""

    CONFIG = "config.yaml"
    SUMMARY = "summary.json"
    KERNELS = "kernels.json"
    METRICS = "metrics.jsonl"
    TENSORBOARD = "tensorboard"
    CHECKPOINTS = "checkpoints"
    MODEL = "model"
    TOKENIZER = "tokenizer"
    EXPLORED = "explored.safetensors"
    LOCK = ".lock"
    # Folders inside a run that are never run directories themselves (report discovery skips them).
    PARTS = (TENSORBOARD, CHECKPOINTS, MODEL, TOKENIZER)

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # ------------------------------------------------------------------------------ the parts
    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def summary_path(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def model_dir(self) -> Path:
        return self.path / self.MODEL

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / self.TOKENIZER

    @property
    def explored_path(self) -> Path:
        return self.path / self.EXPLORED

    @property
    def kernels_path(self) -> Path:
        return self.path / self.KERNELS

    @property
    def lock_path(self) -> Path:
        return self.path / self.LOCK

    # ------------------------------------------------------------------------------ the state
    def is_empty(self) -> bool:
        """It does not exist, or is an empty directory: a new run may start here."""
        return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))

    def is_finished(self) -> bool:
        return self.summary_path.is_file()

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"step_{step:08d}"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """The complete checkpoints ``(step, path)``, oldest first (a write in progress is a hidden
        temporary, never listed)."""
        root = self.checkpoints_dir
        if not root.is_dir():
            return []
        found = []
        for path in root.iterdir():
            match = _CHECKPOINT.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def has_checkpoint(self) -> bool:
        return bool(self.checkpoints())

    def is_run(self) -> bool:
        """Training wrote here: a config next to metrics or a summary (what reports look for)."""
        return self.config_path.is_file() and (self.summary_path.is_file() or self.metrics_path.is_file())

    def state(self) -> str:
        """``new`` | ``finished`` | ``resumable`` (has a checkpoint) | ``partial`` (died before one)."""
        if self.is_empty():
            return "new"
        if self.is_finished():
            return "finished"
        if self.has_checkpoint():
            return "resumable"
        return "partial"

    # ------------------------------------------------------------------------------ the config
    def load_config(self) -> "RunConfig":
        """The resolved config the run saved (validated); a one-line ``ConfigError`` otherwise."""
        from .config import ConfigError, from_dict, read_yaml

        if not self.config_path.is_file():
            raise ConfigError(f"{self.path} is not a run directory (no {self.CONFIG}); start it with --config")
        raw = read_yaml(self.config_path)
        name = raw.pop("name", "")
        config = from_dict(raw)
        config.name = name
        return config.validate()

    def write_config(self, config: "RunConfig") -> None:
        from .io import atomic_write_bytes

        atomic_write_bytes(self.config_path, config.to_yaml().encode())

    def write_summary(self, text: str) -> None:
        from .io import atomic_write_bytes

        atomic_write_bytes(self.summary_path, text.encode())

    # ------------------------------------------------------------------------------ life cycle
    def check_new(self) -> None:
        """A new run may start here: the path does not exist or is an empty directory."""
        from .config import ConfigError

        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--output-dir {self.path} exists and is not a directory")
        if not self.is_empty():
            raise ConfigError(f"{self.path} already holds a run; continue it with --resume {self.path} "
                              "or choose another --output-dir")

    def prepare(self) -> None:
        """Create the directory of a new run, refusing one that holds anything (it would be overwritten)."""
        from .config import ConfigError

        self.check_new()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write to {self.path}: {exc.strerror or exc}; choose another --output-dir") \
                from None

    def remove_new(self, created: bool) -> None:
        """Empty a run directory this process made (it was new or empty, so nothing else is lost)."""
        for child in self.path.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        if created:
            self.path.rmdir()

    def forget_progress(self) -> None:
        """A run stopped before its first checkpoint restarts in place: its curves go, its config stays."""
        self.metrics_path.unlink(missing_ok=True)
        shutil.rmtree(self.tensorboard_dir, ignore_errors=True)

    def lock(self) -> "RunLock":
        return RunLock(self)


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock`` for as long as a process trains the run: a second
    start or ``--resume`` of the same directory is refused in one line (the lock holder's pid in it).
    The kernel drops the lock when the process dies, so a crash never leaves the directory locked."""

    NAME = RunDir.LOCK

    def __init__(self, run_dir: str | os.PathLike | RunDir) -> None:
        import fcntl

        from .config import ConfigError

        run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.path = run.lock_path
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(self._fd, 64).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise ConfigError(f"{run.path} is being trained by another process (pid {holder}); wait for it to end "
                              "or stop it (it writes a checkpoint), then --resume") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays (removing it would race a new holder)
            self._fd = None
