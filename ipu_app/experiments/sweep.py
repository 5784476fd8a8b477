"""``python -m ipu_app sweep SPEC.yaml``: a grid of training runs in one directory.

A sweep spec is YAML::

    figure: pareto            # the report it feeds (python -m ipu_app report --figure)
    set:                      # overrides for every run (dotted config keys)
      training.steps: 400
      training.batch_size: 32
    grid:                     # a list of grids; each is the product of its list-valued keys
      - config: [bert_tiny_dense, bert_mini_dense]
      - config: bert_mini_sparse
        sparsity.block_size: [1, 16]
        seed: [0, 1]

``config`` names a config (or a list); every other key is a dotted config key (``seed`` and
``backend`` are top-level keys). A list value is an axis; wrap a list-valued setting in a second
list (``sparsity.modules: [[query, key]]``). ``label`` replaces the config name in run names.
A run is named after its config (or label) and every grid key besides ``config``:
``bert_mini_sparse,block_size=16,seed=1``.

A paired experiment says its seeds once, beside the grid::

    seeds: [200, 201, 202]    # or {from: 200, count: 10}
    grid:                     # the arms
      - config: [proxy_tiny_static, proxy_tiny_sparse]

Every grid entry runs once per seed, seeds outermost: the arms of one seed are neighbours in the
run order, so ``--jobs 2`` trains a pair side by side on one machine.

Runs live in ``SWEEP_DIR/runs/NAME`` and are trained by ``python -m ipu_app train`` in
subprocesses (``--jobs`` at a time, the CPU threads split between them), output in
``SWEEP_DIR/logs/NAME.log``. Starting a sweep again skips finished runs (``summary.json``),
resumes interrupted ones from their checkpoint, restarts runs that died before their first
checkpoint (the partial directory is moved to ``SWEEP_DIR/attempts/``), and refuses to touch a
run whose saved config differs from the spec (``stale``). A failed run is recorded in
``SWEEP_DIR/status.json`` with its last error line; the others go on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import signals
from ..config import ConfigError, RunConfig, differing_key
from ..io import atomic_write_bytes
from ..rundir import RunDir
from .sweep_spec import RunSpec, Sweep, SweepError, load_sweep

__all__ = ["SweepRunner", "RunResult", "check_devices", "format_plan", "format_results", "load_sweep", "SweepError"]


# --------------------------------------------------------------------------- run directories
def config_difference(run_dir: Path, expected: RunConfig) -> str | None:
    """The first config key where a run's saved config differs from ``expected`` (None: same)."""
    run = RunDir(run_dir)
    if not run.config_path.is_file():
        return None
    try:
        saved = run.load_config()
    except ConfigError as exc:
        return f"config.yaml ({exc})"
    found = differing_key(saved.to_dict(), expected.to_dict())
    return None if found is None else f"{found[0]} (saved {found[1]!r}, spec {found[2]!r})"


# --------------------------------------------------------------------------------- execution
@dataclass
class RunResult:
    name: str
    status: str  # finished | skipped | failed | stale | interrupted | pending
    seconds: float = 0.0  # finished: the run's wall_time_s (all its processes); else this attempt's time
    rc: int | None = None
    error: str | None = None
    final_val_mlm_loss: float | None = None
    attempts: int = 0

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None and k != "name"}


@dataclass
class _Running:
    spec: RunSpec
    process: subprocess.Popen
    log: Any
    started: float
    device: str | None = None  # the GPU it runs on (CUDA_VISIBLE_DEVICES), with --devices


def check_devices(devices: list[str], gpu_count: int | None = None) -> list[str]:
    """``--devices`` entries (GPU indices, or UUIDs as ``CUDA_VISIBLE_DEVICES`` takes them), checked
    against the GPUs this machine has; ``gpu_count`` overrides what torch reports (tests)."""
    devices = [d.strip() for item in devices for d in str(item).split(",") if d.strip()]
    if not devices:
        return []
    if gpu_count is None:
        import torch

        gpu_count = torch.cuda.device_count()
    if gpu_count == 0:
        raise SweepError("--devices: no CUDA GPU is visible here (torch.cuda.device_count() is 0); "
                         "leave --devices out to train on the CPU")
    for device in devices:
        if device.isdigit() and int(device) >= gpu_count:
            raise SweepError(f"--devices: GPU {device} does not exist; this machine has {gpu_count} "
                             f"(0..{gpu_count - 1})")
        if not device.isdigit() and not device.startswith(("GPU-", "MIG-")):
            raise SweepError(f"--devices: {device!r} is not a GPU index or UUID; give e.g. --devices 0,1")
    if len(set(devices)) != len(devices):
        raise SweepError(f"--devices lists a GPU twice ({','.join(devices)}); use --jobs for several runs per GPU")
    return devices


@dataclass
class SweepRunner:
    """Runs the sweep's runs in subprocesses, ``jobs`` at a time, into ``directory``."""

    sweep: Sweep
    directory: Path
    jobs: int = 1
    only: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)  # GPUs the runs are spread over (several per GPU allowed)
    echo: Any = print
    results: dict[str, RunResult] = field(default_factory=dict)
    _stop: bool = False
    _previous: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()
        if self.jobs < 1:
            raise SweepError(f"--jobs must be >= 1, got {self.jobs}")
        if self.only:
            names = {r.name for r in self.sweep.runs}
            missing = [n for n in self.only if n not in names]
            if missing:
                raise SweepError(f"--only {missing[0]!r} is not a run of this sweep (see --list)")
        self.devices = check_devices(self.devices)

    def run_dir(self, run: RunSpec) -> Path:
        return self.directory / "runs" / run.name

    # --------------------------------------------------------------------------- planning
    def plan(self) -> list[tuple[RunSpec, str, str | None]]:
        """Each selected run with its state and, for a stale one, the differing key."""
        rows = []
        for run in self.sweep.runs:
            if self.only and run.name not in self.only:
                continue
            run_dir = self.run_dir(run)
            state = RunDir(run_dir).state()
            diff = config_difference(run_dir, run.resolve()) if state != "new" else None
            rows.append((run, "stale" if diff else state, diff))
        return rows

    # -------------------------------------------------------------------------- execution
    def run(self) -> dict[str, RunResult]:
        self._prepare_directory()
        previous = self._previous = self._read_status()
        queue: list[tuple[RunSpec, bool]] = []
        for run, state, diff in self.plan():
            attempts = previous.get(run.name, {}).get("attempts", 0)
            if state == "finished":
                summary = json.loads(RunDir(self.run_dir(run)).summary_path.read_text())
                self.results[run.name] = RunResult(run.name, "finished", error=None, attempts=attempts,
                                                   final_val_mlm_loss=summary.get("final_val_mlm_loss"),
                                                   seconds=summary.get("wall_time_s", 0.0))
            elif state == "stale":
                self.results[run.name] = RunResult(
                    run.name, "stale", attempts=attempts,
                    error=f"saved config differs from the spec at {diff}; move {self.run_dir(run)} away to re-run it")
            else:
                if state == "partial":
                    self._set_aside(run)
                self.results[run.name] = RunResult(run.name, "pending", attempts=attempts)
                queue.append((run, state == "resumable"))
        done = sum(r.status == "finished" for r in self.results.values())
        self.echo(f"sweep {self.sweep.name}: {len(self.results)} runs, {done} finished, "
                  f"{len(queue)} to run, {len(self.results) - done - len(queue)} stale -> {self.directory}")
        for name, result in self.results.items():
            if result.status == "stale":
                self.echo(f"  stale {name}: {result.error}")
        self._write_status()
        self._execute(queue)
        self._write_status()
        return self.results

    def _execute(self, queue: list[tuple[RunSpec, bool]]) -> None:
        running: list[_Running] = []
        total = len(queue)
        finished = 0
        env = dict(os.environ)
        # Runs see the sweep's working directory (relative paths in specs mean what they say) and
        # import this package even when it is not installed.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_repo_root()), env.get("PYTHONPATH")]))
        if self.jobs > 1 and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.jobs))
        with signals.handling(self._stop_handler(running)):
            while queue or running:
                while queue and len(running) < self.jobs and not self._stop:
                    spec, resume = queue.pop(0)
                    device = self._least_busy_device(running)
                    running.append(self._start(spec, resume, env, device))
                    on = f" (GPU {device})" if device is not None else ""
                    self.echo(f"[{finished + len(running)}/{total}] {'resume' if resume else 'start '} {spec.name}{on}")
                if not running:
                    break
                time.sleep(0.2)
                for job in list(running):
                    rc = job.process.poll()
                    if rc is None:
                        continue
                    running.remove(job)
                    finished += 1
                    self._finish(job, rc)
            for spec, _ in queue:  # stopped before they started
                self.results[spec.name].status = "interrupted" if self._stop else "pending"

    def _least_busy_device(self, running: list[_Running]) -> str | None:
        """The device of ``--devices`` with the fewest runs on it now (the first of equals)."""
        if not self.devices:
            return None
        load = {d: 0 for d in self.devices}
        for job in running:
            load[job.device] += 1
        return min(self.devices, key=lambda d: load[d])

    def _start(self, spec: RunSpec, resume: bool, env: dict, device: str | None = None) -> _Running:
        run_dir = self.run_dir(spec)
        log_path = self.directory / "logs" / f"{spec.name}.log"
        log = open(log_path, "a", encoding="utf-8")
        on = f" on GPU {device}" if device is not None else ""
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resume else 'start'}{on}: "
                  f"{' '.join(spec.command(run_dir, resume))}\n")
        log.flush()
        result = self.results[spec.name]
        result.attempts += 1
        result.status = "running"
        self._write_status()
        if device is not None:
            env = {**env, "CUDA_VISIBLE_DEVICES": device}  # the run sees its GPU as cuda:0
        process = subprocess.Popen(spec.command(run_dir, resume), stdout=log, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
        return _Running(spec, process, log, time.perf_counter(), device)

    def _finish(self, job: _Running, rc: int) -> None:
        job.log.close()
        result = self.results[job.spec.name]
        result.rc = rc
        result.seconds = time.perf_counter() - job.started
        summary_path = RunDir(self.run_dir(job.spec)).summary_path
        if rc == 0 and summary_path.is_file():
            result.status = "finished"
            result.error = None
            summary = json.loads(summary_path.read_text())
            result.final_val_mlm_loss = summary.get("final_val_mlm_loss")
            # The run's own wall time over every process that trained it (what a later listing of
            # the finished run shows too), not this attempt's subprocess time.
            result.seconds = summary.get("wall_time_s", result.seconds)
            self.echo(f"  done   {job.spec.name} in {_duration(result.seconds)}: "
                      f"val MLM {result.final_val_mlm_loss:.4f}")
        elif self._stop and rc in (130, -signal.SIGINT, -signal.SIGTERM):
            result.status = "interrupted"
            self.echo(f"  stopped {job.spec.name} (checkpointed; run the sweep again to resume)")
        else:
            result.status = "failed"
            result.error = _last_error_line(self.directory / "logs" / f"{job.spec.name}.log") or f"exit code {rc}"
            self.echo(f"  FAILED {job.spec.name} (exit {rc}): {result.error}")
        self._write_status()

    # ----------------------------------------------------------------------------- helpers
    def _prepare_directory(self) -> None:
        try:
            for sub in ("runs", "logs"):
                (self.directory / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SweepError(f"cannot write the sweep directory {self.directory}: {exc.strerror or exc}") from None
        atomic_write_bytes(self.directory / "sweep.yaml", self.sweep.text.encode())

    def _set_aside(self, run: RunSpec) -> None:
        """A run that died before its first checkpoint: keep its files, start it afresh."""
        attempts = self.directory / "attempts"
        attempts.mkdir(exist_ok=True)
        index = 1
        while (attempts / f"{run.name}.{index}").exists():
            index += 1
        shutil.move(str(self.run_dir(run)), str(attempts / f"{run.name}.{index}"))
        self.echo(f"  {run.name} stopped before its first checkpoint; moved to attempts/{run.name}.{index}, restarting")

    def _read_status(self) -> dict:
        path = self.directory / "status.json"
        try:
            return json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}
        except (OSError, ValueError):
            return {}

    def _write_status(self) -> None:
        # Runs left out by --only keep their earlier entries.
        runs = {}
        for spec in self.sweep.runs:
            if spec.name in self.results:
                r = self.results[spec.name]
                runs[spec.name] = r.as_dict() | {"status": r.status}
            elif spec.name in self._previous:
                runs[spec.name] = self._previous[spec.name]
        payload = {"sweep": self.sweep.name, "figure": self.sweep.figure, "runs": runs}
        atomic_write_bytes(self.directory / "status.json", (json.dumps(payload, indent=2) + "\n").encode())

    def _stop_handler(self, running: list[_Running]):
        """The first SIGINT/SIGTERM asks the running jobs to checkpoint and exit; a second kills them."""
        def stop(signum, frame):
            if self._stop:  # second signal: stop the children now
                for job in running:
                    _signal_group(job.process, signal.SIGKILL)
                return
            self._stop = True
            self.echo("stopping: the running jobs checkpoint and exit; run the sweep again to resume")
            for job in running:
                _signal_group(job.process, signal.SIGINT)

        return stop

    @property
    def stopped(self) -> bool:
        return self._stop


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent.parent


def _last_error_line(log_path: Path) -> str | None:
    """The run's own one-line error (``error: ...``), else its last non-empty output line."""
    try:
        lines = [line.strip() for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return None
    lines = [line for line in lines if line and not line.startswith("===")]
    for line in reversed(lines):
        if line.startswith("error:") or "Error" in line.split(":", 1)[0]:
            return line[:300]
    return lines[-1][:300] if lines else None


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_plan(runner: SweepRunner) -> str:
    rows = [f"{'run':<48} {'state':<10} config"]
    for run, state, diff in runner.plan():
        rows.append(f"{run.name:<48} {state:<10} {run.config}" + (f"  [{diff}]" if diff else ""))
    return "\n".join(rows)


def format_results(results: dict[str, RunResult]) -> str:
    rows = [f"{'run':<48} {'status':<11} {'val MLM':>8} {'time':>8}"]
    for name, r in results.items():
        loss = f"{r.final_val_mlm_loss:.4f}" if r.final_val_mlm_loss is not None else "-"
        rows.append(f"{name:<48} {r.status:<11} {loss:>8} {_duration(r.seconds):>8}"
                    + (f"  {r.error}" if r.status in ("failed", "stale") and r.error else ""))
    return "\n".join(rows)

