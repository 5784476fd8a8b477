"""``evaluate``: MLM / NSP loss and accuracy of a run's model or checkpoint on a validation set; JSON out."""

from __future__ import annotations

import json
from pathlib import Path

from ._threads import use_threads


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="MLM / NSP loss and accuracy of a run's model or checkpoint on a validation "
                                        "set (the code training validates with); JSON out")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--checkpoint", default=None,
                   help="final (RUN_DIR/model), latest or a step number (default: final if the run finished, else latest)")
    p.add_argument("--data", help="another prepared data directory (same tokenizer) whose validation split to use")
    p.add_argument("--sequences", type=int, help="a fixed random N of the validation sequences (default: the run's "
                                                 "data.validation_sequences on its own data, all on other data)")
    p.add_argument("--output", help="also write the JSON to this file")
    p.add_argument("--threads", type=int, help="CPU threads (default: OMP_NUM_THREADS or the cores)")
    p.add_argument("--no-progress", action="store_true", help="no start-up line on stderr")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..io import atomic_write_bytes
    from ..train.checkpoint import CheckpointError
    from ..train.evaluate import evaluate_run

    use_threads(args.threads)
    try:
        result = evaluate_run(args.run, checkpoint=args.checkpoint, data=args.data, sequences=args.sequences,
                              progress=not args.no_progress)
    except CheckpointError as exc:  # a damaged or foreign checkpoint: one line, as for any bad input
        raise ValueError(str(exc)) from None
    text = json.dumps(result)
    if args.output:
        atomic_write_bytes(Path(args.output), (text + "\n").encode())
    print(text)
    return 0
