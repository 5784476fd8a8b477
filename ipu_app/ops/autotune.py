"""``auto`` by measurement: the first time a sparse layer kind meets the CPU, time dense against every
kernel path that covers it, keep the fastest, and remember the answer.

A *kind* is what decides the speed of a call: the weight's shape, block size and active blocks, the
compute dtype, the tokens per call (rounded to a power of two) and the threads. For each kind not yet
decided, :func:`decide` times one training step of the layer (forward and both gradients, with a
bias, under autocast where the dtype is bf16, as training runs it) on every candidate: the dense
GEMMs of the reference op and each CPU kernel path (:func:`ops.cpu.paths`), round-robin, and keeps
the one with the lowest median. A kind takes a fraction of a second at BERT sizes.

Decisions are cached on disk per CPU identity (``machine.cpu_identity``), kernel source and PyTorch
version (``$IPU_APP_AUTOTUNE_CACHE`` or ``~/.cache/ipu_app/autotune``), so a second run on the same
kind of machine measures nothing, and another CPU or a changed kernel measures anew. A run records its
decisions (``kernels.json`` in the run directory) and a resume on the same CPU uses them, so that it
computes what the first process did. ``IPU_APP_AUTOTUNE=fresh`` measures anew past the cache.
``IPU_APP_AUTOTUNE=0`` turns measuring off: ``auto`` then uses
the constant density limits of ``ops.auto_max_density`` (the tests run so, to stay independent of the
host's speed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..machine import cpu_identity
from ..sparse.pattern import BlockPattern

ENV = "IPU_APP_AUTOTUNE"
CACHE_ENV = "IPU_APP_AUTOTUNE_CACHE"
CACHE_VERSION = 1
REPEATS = 3          # timed steps per candidate (after one warm-up step each)
MAX_SECONDS = 1.0    # a kind stops timing once this much time went into it (slow CPUs, huge layers)
MEASURE_TOKENS = 2048  # a kind of more tokens per call is timed at this many (the ratios hold; half the time)
MIN_TOKENS = 16
DENSE = "reference"  # the label of the dense GEMMs (the reference op)


def enabled() -> bool:
    """Whether ``auto`` measures (``IPU_APP_AUTOTUNE`` is not ``0``)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def fresh() -> bool:
    """``IPU_APP_AUTOTUNE=fresh``: measure every kind anew, past the disk cache (which the new
    measurements then replace), e.g. after the first ones were taken on a busy machine."""
    return os.environ.get(ENV, "").strip().lower() == "fresh"


def token_bucket(tokens: int) -> int:
    """Tokens per call as a kind counts them: the nearest power of two (at least 16)."""
    if tokens <= MIN_TOKENS:
        return MIN_TOKENS
    return 1 << round(math.log2(tokens))


@dataclass(frozen=True)
class LayerKind:
    """What decides the speed of a sparse layer's call."""
    out_features: int
    in_features: int
    block_size: int
    nnz: int
    dtype: str       # "float32" | "bfloat16"
    tokens: int      # a token_bucket
    threads: int

    @classmethod
    def of(cls, pattern: BlockPattern, dtype: torch.dtype, tokens: int, threads: int | None = None) -> "LayerKind":
        return cls(pattern.out_features, pattern.in_features, pattern.block_size, pattern.nnz,
                   dtype_name(dtype), token_bucket(tokens),
                   threads if threads is not None else torch.get_num_threads())

    @property
    def key(self) -> str:
        return (f"{self.out_features}x{self.in_features} b{self.block_size} nnz{self.nnz} {self.dtype} "
                f"T{self.tokens} t{self.threads}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def density(self) -> float:
        return self.nnz * self.block_size ** 2 / (self.out_features * self.in_features)

    baseline = DENSE  # what a speed-up is counted against

    def measure(self) -> "Decision":
        return measure(self)


@dataclass
class Decision:
    """The measured choice for a kind: for a sparse layer, ``"reference"`` (dense) or ``"cpu/<path>"``;
    ``ms`` the median step time of every candidate; ``source`` says where it came from. A kind is any
    frozen object with ``key``, ``baseline`` (the candidate speed-ups are counted against) and
    ``measure() -> Decision``."""
    kind: Any
    choice: str
    ms: dict[str, float] = field(default_factory=dict)
    source: str = "measured"  # measured | cached | run

    @property
    def speedup(self) -> float:
        """The baseline's time over the chosen candidate's (1.0 where the baseline was chosen)."""
        base = self.ms.get(self.kind.baseline)
        return base / self.ms[self.choice] if base and self.ms.get(self.choice) else 1.0

    @property
    def best_kernel(self) -> str | None:
        """The fastest candidate other than the baseline, or None where there is none."""
        others = {k: v for k, v in self.ms.items() if k != self.kind.baseline}
        return min(others, key=others.get) if others else None

    def to_dict(self) -> dict:
        return {"kind": asdict(self.kind), "key": self.kind.key, "choice": self.choice,
                "ms": {k: round(v, 4) for k, v in self.ms.items()}, "speedup": round(self.speedup, 4),
                "source": self.source}

    @classmethod
    def from_dict(cls, d: dict, kind, source: str) -> "Decision":
        """An entry of the cache or of a run's record, for ``kind`` (whose key it holds)."""
        return cls(kind, str(d["choice"]), {str(k): float(v) for k, v in d["ms"].items()}, source)


# ------------------------------------------------------------------------------------------ timing
def median_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                 sync: Callable[[], None] = lambda: None, max_seconds: float | None = None) -> dict[str, float]:
    """Median wall time of each function in seconds, timed round-robin so that machine noise hits all
    alike; ``max_seconds``: stop after the round in which that much time was spent, the warm-up
    included (where the warm-up alone took that long, its times are the answer)."""
    first: dict[str, float] = {}
    spent = 0.0
    for name, fn in fns.items():
        for _ in range(warmup):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            first[name] = time.perf_counter() - start
            spent += first[name]
    if max_seconds is not None and first and spent > max_seconds:
        return first
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
            spent += times[name][-1]
        if max_seconds is not None and spent > max_seconds:
            break
    return {name: statistics.median(t) for name, t in times.items()}


def _pattern(kind: LayerKind, generator: torch.Generator) -> BlockPattern:
    """A random pattern with exactly the kind's active blocks."""
    grid_rows, grid_cols = kind.out_features // kind.block_size, kind.in_features // kind.block_size
    index = torch.randperm(grid_rows * grid_cols, generator=generator)[:kind.nnz]
    return BlockPattern.from_linear_index(kind.out_features, kind.in_features, kind.block_size, index)


def candidates(kind: LayerKind) -> dict[str, Callable]:
    """The ops ``auto`` may run the kind on here, by label: dense, then each CPU kernel path."""
    from . import cpu, reference

    ops = {DENSE: reference.linear}
    for name in cpu.paths("cpu", kind.torch_dtype, kind.block_size):
        ops[f"cpu/{name}"] = (lambda n: lambda *a: cpu.linear(*a, kernels=n))(name)
    return ops


def measure(kind: LayerKind) -> Decision:
    """Time one training step of the kind on every candidate; the fastest wins."""
    ops = candidates(kind)
    if len(ops) == 1:
        return Decision(kind, DENSE, {}, "measured")
    gen = torch.Generator().manual_seed(0)  # never the global RNG: measuring must not change a run
    pattern = _pattern(kind, gen)
    b, tokens = kind.block_size, min(kind.tokens, MEASURE_TOKENS)
    x = torch.randn(tokens, kind.in_features, generator=gen).requires_grad_()
    values = (torch.randn(kind.nnz, b, b, generator=gen) * 0.02).requires_grad_()
    bias = torch.zeros(kind.out_features, requires_grad=True)
    gy = torch.randn(tokens, kind.out_features, generator=gen).to(kind.torch_dtype)
    autocast = kind.torch_dtype != torch.float32

    def step(op):
        def run():
            with torch.autocast("cpu", dtype=kind.torch_dtype, enabled=autocast):
                y = op(x, values, pattern, bias)
            torch.autograd.grad(y, (x, values, bias), gy)
        return run

    return fastest(kind, {name: step(op) for name, op in ops.items()})


def fastest(kind, steps: dict[str, Callable[[], object]]) -> Decision:
    """Time each candidate's training step (``steps``, by label) for ``kind``, at its threads and with
    autograd on whatever the caller's mode, and keep the fastest median."""
    threads = torch.get_num_threads()
    torch.set_num_threads(kind.threads)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            seconds = median_times(steps, REPEATS, max_seconds=MAX_SECONDS)
    finally:
        torch.set_num_threads(threads)
    ms = {name: 1e3 * t for name, t in seconds.items()}
    return Decision(kind, min(ms, key=ms.get), ms, "measured")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` as a kind names it: ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------------------ the cache
def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "ipu_app" / "autotune"


def identity() -> dict:
    """What a cached decision holds for: this CPU, the kernels' sources and PyTorch (its dense GEMMs)."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for path in (here / "csrc" / "bsmm_cpu.c", here / "cpu.py", here / "fast.py", here / "reference.py"):
        h.update(path.read_bytes())
    return {"cpu": cpu_identity()["key"], "kernels": h.hexdigest()[:16], "torch": torch.__version__}


def cache_path() -> Path:
    ident = identity()
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"decisions_{key}.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if data.get("version") == CACHE_VERSION and isinstance(data.get("decisions"), dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}  # missing or damaged: measured anew (and rewritten)


class Tuner:
    """The decisions of this process: in memory, backed by the disk cache."""

    def __init__(self) -> None:
        self._decisions: dict[str, Decision] = {}
        self._adopted: dict[str, dict] = {}  # a resumed run's record, by key
        self._lock = threading.Lock()
        self.measured: list[Decision] = []  # what this process measured (for the log)

    def get(self, kind) -> Decision | None:
        """The decision already known for ``kind``: this process's, the run's record or the disk cache's."""
        found = self._decisions.get(kind.key)
        if found is not None:
            return found
        cached = None if fresh() else _read(cache_path()).get("decisions", {}).get(kind.key)
        for entry, source in ((self._adopted.get(kind.key), "run"), (cached, "cached")):
            if entry is None:
                continue
            try:
                found = Decision.from_dict(entry, kind, source)
            except (KeyError, TypeError, ValueError, AttributeError):
                continue  # a damaged entry: the next source, or measured anew
            self._decisions[kind.key] = found
            return found
        return None

    def decide(self, kind, progress: bool = False) -> Decision:
        """The decision for ``kind``, measured now where none is known."""
        found = self.get(kind)
        if found is not None:
            return found
        with self._lock:
            if kind.key in self._decisions:
                return self._decisions[kind.key]
            if progress:
                print(f"auto: measuring {kind.key} ...", file=sys.stderr)
            decision = self._decisions[kind.key] = kind.measure()
            self.measured.append(decision)
            self._store(decision)
            return decision

    def adopt(self, entries: list[dict]) -> None:
        """Use these decisions (a resumed run's record, :func:`read_record`) over any other."""
        for entry in entries:
            self._adopted[entry["key"]] = entry
            self._decisions.pop(entry["key"], None)

    def forget(self) -> None:
        self._decisions.clear()
        self._adopted.clear()
        self.measured.clear()

    @staticmethod
    def _store(decision: Decision) -> None:
        path = cache_path()
        data = _read(path) or {"version": CACHE_VERSION, **identity(), "decisions": {}}
        data["decisions"][decision.kind.key] = {**decision.to_dict(), "source": "measured",
                                                "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:  # a temporary of its own: concurrent runs (a sweep's jobs) each replace the file whole
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as exc:  # a read-only home: decided again next time
            print(f"warning: auto: cannot cache kernel decisions in {path.parent} ({exc}); "
                  f"set {CACHE_ENV} to a writable directory", file=sys.stderr)


TUNER = Tuner()


# ------------------------------------------------------------------------------------ a run's record
def write_record(path: Path, decisions: list[Decision]) -> None:
    """A run's decisions (``kernels.json``), with the identity they hold for."""
    from ..io import atomic_write_bytes

    data = {"version": CACHE_VERSION, "identity": identity(), "decisions": [d.to_dict() for d in decisions]}
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


def read_record(path: Path) -> dict | None:
    """``{"identity", "decisions": [entry]}`` of a run's ``kernels.json`` (for :meth:`Tuner.adopt`); None
    where it has none or it does not read (then the kinds are measured again)."""
    try:
        data = json.loads(Path(path).read_text())
        decisions = [d for d in data["decisions"] if isinstance(d, dict) and isinstance(d.get("key"), str)]
        return {"identity": dict(data["identity"]), "decisions": decisions}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
