"""``python -m ipu_app bench data``: how fast the data pipeline is, and how much memory it needs.

On a synthetic corpus of a given size (the embedded corpus repeated, each copy's documents made
distinct), it measures

* ``prepare-data`` at two corpus sizes: MB/s and the peak RSS of the whole process tree (the main
  process and its tokenising workers, sampled from ``/proc``), which must stay flat as the corpus
  grows;
* the ceiling: the raw ``encode_batch`` speed of the same tokenizer on the same text and cores;
* the sample index: how long the chunk index takes to build and to load once cached;
* the loader: training tokens/s with 0, 1 and 2 worker processes.

Each preparation runs in a fresh process, so imports and caches of one do not hide in another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ...io import atomic_write_bytes

MB = 1 << 20


class BenchDataError(ValueError):
    """Bad arguments of ``bench data``."""


def synthetic_corpus(path: Path, megabytes: float) -> int:
    """Write at least ``megabytes`` MiB of blank-line separated documents to ``path``: the embedded
    corpus over and over, each copy's documents tagged so that every document is distinct (its own
    hash, its own split). Returns the bytes written."""
    from ...data.corpus import embedded_documents

    texts = [d.text.strip() for d in embedded_documents()]
    target, written, copy = int(megabytes * MB), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for text in texts:
                chunk = f"{text} (copy {copy})\n\n"
                f.write(chunk)
                written += len(chunk.encode())
                if written >= target:
                    break
            copy += 1
    return written


def _proc_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Linux ``/proc``; 0 where unreadable)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Run ``cmd``; return (seconds, peak RSS of its process tree in bytes, stdout). A failure raises
    with the command's last error line."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _proc_rss(proc.pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["(no output)"])[-1]
        raise BenchDataError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {last}")
    return seconds, peak[0], out


@dataclass
class PrepareRow:
    corpus_mb: float
    workers: int
    seconds: float
    mb_per_s: float
    peak_rss_mb: float
    tokens: int


def measure_prepare(corpus: Path, output: Path, workers: int) -> PrepareRow:
    cmd = [sys.executable, "-m", "ipu_app", "prepare-data", "--input", str(corpus), "--output", str(output),
           "--workers", str(workers)]
    seconds, peak, _ = run_measured(cmd)
    manifest = json.loads((output / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    size = corpus.stat().st_size / MB
    return PrepareRow(round(size, 1), workers, round(seconds, 2), round(size / seconds, 2), round(peak / MB, 1),
                      tokens)


_CEILING = """
import sys, time
from ipu_app.data.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[1]).backend_tokenizer
encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
text = open(sys.argv[2], encoding="utf-8").read(int(sys.argv[3]))
docs = [d for d in text.split("\\n\\n") if d.strip()]
encode(docs[:256], add_special_tokens=False)  # warm up
start = time.perf_counter()
for i in range(0, len(docs), 4096):
    encode(docs[i : i + 4096], add_special_tokens=False)
print(len(text.encode()) / (time.perf_counter() - start))
"""


def tokenizer_ceiling(tokenizer_dir: Path, corpus: Path, workers: int, megabytes: float = 16) -> float:
    """Bytes/s of the tokenizer's own batch encoding (Rust, ``workers`` threads) on the corpus' text,
    with no sentence splitting, no arrays, no files: what preparation cannot beat."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(workers), TOKENIZERS_PARALLELISM="true")
    _, _, out = run_measured([sys.executable, "-c", _CEILING, str(tokenizer_dir), str(corpus),
                              str(int(megabytes * MB))], env)
    return float(out.strip().splitlines()[-1])


def measure_index(data_dir: Path, seq_len: int) -> dict:
    """Seconds to build the chunk index (nothing cached) and to open it again (cached)."""
    import shutil

    from ...data.sampling import MaskingConfig, PretrainingDataset

    shutil.rmtree(data_dir / "index", ignore_errors=True)
    start = time.perf_counter()
    dataset = PretrainingDataset(data_dir, "train", MaskingConfig(seq_len=seq_len))
    built = time.perf_counter() - start
    start = time.perf_counter()
    PretrainingDataset(data_dir, "train", MaskingConfig(seq_len=seq_len))
    cached = time.perf_counter() - start
    tokens = dataset.corpus.manifest["splits"]["train"]["tokens"]
    return {"train_tokens": tokens, "samples": len(dataset), "build_s": round(built, 3),
            "cached_s": round(cached, 3)}


@dataclass
class LoaderRow:
    workers: int
    batches: int
    tokens_per_s: float


def measure_loader(data_dir: Path, workers: int, batch_size: int, seq_len: int, batches: int) -> LoaderRow:
    """Training tokens (attention positions) per second handed out, after two warm-up batches (the
    workers' start is not counted)."""
    from ...data.ahead import WorkerLoader
    from ...data.batches import BatchIterator
    from ...data.sampling import MaskingConfig, PretrainingDataset

    dataset = PretrainingDataset(data_dir, "train", MaskingConfig(seq_len=seq_len))
    loader = BatchIterator(dataset, batch_size)
    if workers:
        loader = WorkerLoader(loader, workers, prefetch=4)
    try:
        for _ in range(2):
            next(loader)
        tokens, start = 0, time.perf_counter()
        for _ in range(batches):
            tokens += int(next(loader)["attention_mask"].sum())
        seconds = time.perf_counter() - start
    finally:
        if workers:
            loader.close()
    return LoaderRow(workers, batches, round(tokens / seconds))


def _cpu_line() -> str:
    from ...machine import cpu_line

    return cpu_line()


def bench_data(sizes: list[float], workers: int, loader_workers: list[int], batch_size: int, seq_len: int,
               batches: int, work_dir: Path, say=print) -> dict:
    from ...data.tokenizer import build_standard_tokenizer

    rows, corpora = [], []
    for size in sizes:
        corpus = work_dir / f"corpus-{size:g}MB.txt"
        say(f"writing a {size:g} MB synthetic corpus")
        synthetic_corpus(corpus, size)
        corpora.append(corpus)
        say(f"prepare-data on {size:g} MB with {workers} worker(s)")
        rows.append(measure_prepare(corpus, work_dir / f"data-{size:g}MB", workers))
        say(f"  {rows[-1].mb_per_s} MB/s, peak RSS {rows[-1].peak_rss_mb} MB")
    say("raw tokenizer speed (the ceiling)")
    ceiling = tokenizer_ceiling(build_standard_tokenizer(work_dir / "tokenizer"), corpora[0], workers) / MB
    data_dir = work_dir / f"data-{sizes[0]:g}MB"
    say("sample index: build and cached load")
    index = measure_index(data_dir, seq_len)
    loader = []
    for n in loader_workers:
        say(f"loader with {n} worker(s)")
        loader.append(measure_loader(data_dir, n, batch_size, seq_len, batches))
    return {"cpu": _cpu_line(), "prepare": [asdict(r) for r in rows], "ceiling_mb_per_s": round(ceiling, 2),
            "index": index, "loader": [asdict(r) for r in loader], "batch_size": batch_size, "seq_len": seq_len}


def data_table(result: dict) -> str:
    prep = result["prepare"]
    ceiling = result["ceiling_mb_per_s"]
    lines = [result["cpu"], "",
             "| corpus MB | workers | seconds | MB/s | % of raw tokenizer | peak RSS MB (process tree) | tokens |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['corpus_mb']} | {r['workers']} | {r['seconds']} | {r['mb_per_s']} | "
              f"{100 * r['mb_per_s'] / ceiling:.0f}% | {r['peak_rss_mb']} | {r['tokens']:,} |" for r in prep]
    growth = prep[-1]["peak_rss_mb"] - prep[0]["peak_rss_mb"]
    lines += ["", f"raw encode_batch (same text, {prep[0]['workers']} thread(s)): {ceiling} MB/s; "
              f"peak RSS growth from {prep[0]['corpus_mb']} to {prep[-1]['corpus_mb']} MB: {growth:+.1f} MB"]
    ix = result["index"]
    lines += ["", f"sample index over {ix['train_tokens']:,} train tokens ({ix['samples']:,} samples of "
              f"seq_len {result['seq_len']}): built in {ix['build_s']} s, opened cached in {ix['cached_s']} s"]
    lines += ["", f"| loader workers | tokens/s (batch {result['batch_size']} x {result['seq_len']}) |",
              "|---|---|"]
    lines += [f"| {r['workers']} | {r['tokens_per_s']:,} |" for r in result["loader"]]
    return "\n".join(lines)


def main(args) -> int:
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    out = Path(args.output)
    try:
        if len(args.sizes) < 1 or any(s <= 0 for s in args.sizes):
            raise BenchDataError(f"--sizes must be positive megabytes, got {args.sizes}")
        if args.workers is None:
            from ...data.shards import default_workers

            args.workers = default_workers()
        if args.workers < 1 or args.batches < 1 or args.batch_size < 1 or any(w < 0 for w in args.loader_workers):
            raise BenchDataError("--workers, --batches and --batch-size must be >= 1 and --loader-workers >= 0")
        if out.exists() and not out.is_dir():
            raise BenchDataError(f"--output {out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
            result = bench_data(sorted(args.sizes), args.workers, args.loader_workers, args.batch_size, args.seq_len,
                                args.batches, Path(tmp), say)
    except BenchDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = data_table(result)
    atomic_write_bytes(out / "data.json", json.dumps(result, indent=2).encode())
    atomic_write_bytes(out / "data.md", (table + "\n").encode())
    print(table)
    say(f"written to {out}/")
    return 0
