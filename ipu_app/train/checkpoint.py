"""Training checkpoints: atomic directories, keep-last-k, loaded without executing code.

Layout: ``RUN_DIR/checkpoints/step_00001000/`` holding

* ``model.safetensors`` -- every parameter and buffer (values, block patterns, frozen values);
* ``state.pt`` -- optimizer, LR scheduler, loss scaler, pattern updater (explored-DOF unions,
  counters), RNG states, data position, step and log window; plain tensors and containers only,
  read back with ``torch.load(weights_only=True)``.

A checkpoint is written into a hidden temporary directory and renamed into place, so a crash
never leaves a half-written ``step_*`` directory; older ones beyond ``keep`` are deleted only after
the new one is in place.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ..io import first_line
from ..rundir import RunDir

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or belongs to another run."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint's files are incomplete or unreadable (an older kept one may still be good)."""


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class CheckpointManager:
    """Saves and restores a run by key: the model's weights in ``model.safetensors``, and under its key
    in ``state.pt`` the ``state_dict`` of every part (``parts``: key -> a ``Stateful``, None for a part
    the run lacks). Restoring loads the newest intact checkpoint's weights, then gives each part the
    state saved under its key (None where the checkpoint has none), in ``parts``' order; a part that
    refuses it makes the checkpoint one of another run."""

    def __init__(self, run_dir: str | Path, model: torch.nn.Module, config: dict | None,
                 parts: dict[str, Stateful | None], *, keep: int, dist, resume: str | None = None) -> None:
        """``config``: the resolved config a checkpoint must have been written by (None: not checked);
        ``resume``: the command that continues the run (named when a checkpoint cannot be written)."""
        self.run_dir, self.model, self.config, self.parts = Path(run_dir), model, config, parts
        self.keep, self.dist, self.resume = keep, dist, resume

    def save(self, step: int) -> Path | None:
        """Every part's state (a part may gather from every rank); rank 0 writes."""
        state = {"config": self.config,
                 **{key: part.state_dict() if part is not None else None for key, part in self.parts.items()}}
        path = (save_checkpoint(self.run_dir, step, self.model, state, self.keep, resume=self.resume)
                if self.dist.is_main else None)
        self.dist.barrier()
        return path

    def restore(self) -> tuple[int, Path]:
        """Load the newest intact checkpoint into the model and every part; its step and path."""
        path, state = self._load_latest_intact()
        for key, part in self.parts.items():
            if part is None:
                continue
            try:
                part.load_state_dict(state.get(key))
            except CheckpointError as exc:  # the part's own line, naming the checkpoint where it says {checkpoint}
                raise CheckpointError(str(exc).replace("{checkpoint}", path.name)) from None
            except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"checkpoint {path} does not match this run ({key}: {first_line(exc)})"
                                      ) from None
        return int(state["step"]), path

    def _load_latest_intact(self) -> tuple[Path, dict]:
        """The newest checkpoint that loads; a damaged one (a crash, a full disk) is passed over with
        a warning for the one before it. A checkpoint of another config is an error, not passed over."""
        found = list_checkpoints(self.run_dir)
        if not found:
            raise CheckpointError(f"{self.run_dir} has no checkpoint to resume from (checkpoints/step_*)")
        damaged = []
        for _, path in reversed(found):
            try:
                state = load_checkpoint(path, self.model, config=self.config)
            except CheckpointDamaged as exc:
                damaged.append(str(exc))
                continue
            if damaged and self.dist.is_main:
                for message in damaged:
                    print(f"warning: {message}; resuming from the older {path.name}", file=sys.stderr)
            return path, state
        raise CheckpointError(f"no intact checkpoint in {self.run_dir}: {damaged[0]}"
                              + (f" (and {len(damaged) - 1} older)" if len(damaged) > 1 else ""))


class Attr:
    """An attribute of ``owner`` as a checkpoint part: ``save`` turns its value into plain data,
    ``load`` plain data into the value set back."""

    def __init__(self, owner, name: str, *, save: Callable = lambda v: v, load: Callable = lambda v: v) -> None:
        self.owner, self.name, self.save, self.load = owner, name, save, load

    def state_dict(self):
        return self.save(getattr(self.owner, self.name))

    def load_state_dict(self, state) -> None:
        setattr(self.owner, self.name, self.load(state))


class Expected:
    """A value the checkpoint must hold unchanged (e.g. the data's manifest hash); ``changed`` says
    what to do when it differs (``{checkpoint}`` there becomes the checkpoint's name). Checkpoints of
    older versions without it pass."""

    def __init__(self, value, changed: str) -> None:
        self.value, self.changed = value, changed

    def state_dict(self):
        return self.value

    def load_state_dict(self, state) -> None:
        if state is not None and state != self.value:
            raise CheckpointError(self.changed)


class Generator:
    """A ``torch.Generator`` as a checkpoint part (its state restored in place)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


class ProcessRng:
    """This process's RNGs (a single-process run: fine-tuning)."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


class RngState:
    """Every RNG of every rank (one entry per rank, gathered); each rank restores its own."""

    def __init__(self, dist) -> None:
        self.dist = dist

    def state_dict(self) -> list:
        return self.dist.all_gather_object(rng_state())

    def load_state_dict(self, state: list) -> None:
        if len(state) != self.dist.world_size:
            raise CheckpointError(f"{{checkpoint}} was written by {len(state)} processes, this run has "
                                  f"{self.dist.world_size}; resume with the same number of processes")
        set_rng_state(state[self.dist.rank])


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    return RunDir(run_dir).checkpoints()


def latest_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, state: dict, keep: int,
                    resume: str | None = None) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep``; ``resume``: the
    command that continues from the previous one (named when this one cannot be written)."""
    from ..io import WriteError, apply_umask, write_error, write_safetensors

    root = RunDir(run_dir).checkpoints_dir
    final = RunDir(run_dir).checkpoint_path(step)
    tmp = root / f".{final.name}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        write_safetensors(_untie(tensors), tmp / "model.safetensors", metadata={"format": "pt", "step": str(step)})
        try:
            torch.save({"format_version": FORMAT_VERSION, "step": step, **state}, tmp / "state.pt")
        except RuntimeError as exc:  # torch's writer reports a full disk as "file write failed"
            raise write_error(tmp / "state.pt", OSError(errno.EIO, _torch_write_reason(exc, tmp))) from None
        apply_umask(tmp / "state.pt")
        _fsync_dir(tmp)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = (f"the previous checkpoint ({previous[1].name}) is intact; free space and continue with "
                f"{resume or f'python run_pretraining.py --resume {run_dir}'}" if previous else "no checkpoint was kept")
        reason = exc if isinstance(exc, WriteError) else write_error(tmp, exc)
        raise CheckpointError(f"checkpoint step {step} was not written ({reason}); {kept}") from None
    if final.exists():  # the same step saved twice (e.g. a stop right at a checkpoint step)
        old = root / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def _torch_write_reason(exc: RuntimeError, directory: Path) -> str:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    first = first_line(exc)
    if free is not None and free < 1 << 20:
        return f"No space left on device ({first})"
    return first


def load_checkpoint(path: str | Path, model: torch.nn.Module, config: dict | None = None) -> dict:
    """Load checkpoint ``path`` into ``model`` and return its trainer state.

    When ``config`` is given, the checkpoint must have been written by that resolved config;
    a difference is reported by its first key before any weight is touched.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    weights, state_file = path / "model.safetensors", path / "state.pt"
    for file in (weights, state_file):
        if not file.is_file():
            raise CheckpointDamaged(f"checkpoint {path} is incomplete: {file.name} is missing")
    if state_file.stat().st_size == 0:
        raise CheckpointDamaged(f"checkpoint {path} is damaged: {state_file.name} is empty")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types; all mean the same here
        # torch's own text advises weights_only=False, i.e. running the file's code: never the remedy here
        kind = "not a checkpoint state file" if "weights_only" in str(exc) else first_line(exc)
        raise CheckpointDamaged(f"checkpoint {path} is damaged ({state_file.name}: {kind})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointDamaged(f"checkpoint {path} has an unknown format (expected version {FORMAT_VERSION})")
    saved_config = _with_defaults(state.get("config")) if config is not None else None
    if config is not None and saved_config != config:
        raise CheckpointError(f"checkpoint {path} was written by a different config "
                              f"({first_difference(saved_config, config)})")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointDamaged(f"checkpoint {path} is damaged ({weights.name} is not a complete safetensors "
                                f"file: {first_line(exc)})") from None
    expected = _untie(model.state_dict())
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise CheckpointError(f"checkpoint {path} does not match the model ({'missing' if missing else 'unexpected'} {name})")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"checkpoint {path} does not match the model: {key} is {tuple(tensor.shape)}, "
                f"the model's {tuple(expected[key].shape)}"
            )
    try:
        model.load_state_dict(tensors, strict=False)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} does not load: {first_line(exc)}") from None
    return state


def _with_defaults(saved):
    """A saved config read through today's schema: keys added since it was written take their
    defaults (so older checkpoints still resume); one that cannot be read is compared as it is."""
    from ..config import ConfigError, from_dict

    if not isinstance(saved, dict):
        return saved
    try:
        return from_dict(saved).to_dict()
    except (ConfigError, TypeError, ValueError):
        return saved


def first_difference(a, b) -> str:
    """``key: old in the checkpoint, new now`` for the first differing key of two nested dicts."""
    from ..config import differing_key

    key, old, new = differing_key(a, b) or ("", a, b)
    return f"{key}: {old!r} in the checkpoint, {new!r} now"


def _untie(tensors: dict) -> dict:
    """Drop the tied MLM decoder (it is the word embedding)."""
    return {k: v for k, v in tensors.items() if not k.startswith("cls.predictions.decoder.")}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Every RNG a run draws from, as plain tensors and containers."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
