"""What a finished fine-tune leaves, each file written atomically and ``results.json`` last (a folder
without it did not finish): ``model/`` (a dense Hugging Face folder that
``BertForSequenceClassification.from_pretrained`` loads, with the tokenizer and the patterns beside it
as ``export`` writes them), ``dev_predictions.tsv`` (and ``STEM_predictions.tsv`` for every further
dev file), ``STEM_predictions.tsv`` for every ``--test`` file in GLUE's submission format (``index``,
``prediction``), and ``results.json``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..io import apply_umask, atomic_write_bytes


def write_outputs(tuner, results: dict) -> None:
    from ..train.metrics import json_safe

    output = tuner.output
    write_model(tuner, output / "model")
    outputs = tuner.dev_outputs or [tuner.predict(split) for split in tuner.dev_sets]
    for number, (split, found) in enumerate(zip(tuner.dev_sets, outputs)):
        predicted = tuner.prediction_text(found)
        lines = ["index\tlabel\tprediction\n"] + [f"{i}\t{a}\t{b}\n" for i, (a, b) in
                                                  enumerate(zip(split.labels, predicted))]
        name = "dev_predictions.tsv" if number == 0 else f"{split.path.stem}_predictions.tsv"
        atomic_write_bytes(output / name, "".join(lines).encode())
    for split in tuner.test_sets:
        predicted = tuner.prediction_text(tuner.predict(split))
        lines = ["index\tprediction\n"] + [f"{i}\t{p}\n" for i, p in zip(split.ids, predicted)]
        atomic_write_bytes(output / f"{split.path.stem}_predictions.tsv", "".join(lines).encode())
    atomic_write_bytes(output / "results.json", (json.dumps(json_safe(results), indent=2) + "\n").encode())


def write_model(tuner, model_dir: Path) -> None:
    """The fine-tuned model as a dense Hugging Face folder, built aside and renamed into place."""
    from ..data.tokenizer import copy_tokenizer
    from ..model.export import sparsity_sidecar, write_sidecar
    from ..model.sparse_linear import dense_copy

    if not tuner.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # save_pretrained's shard bar
    tmp = model_dir.with_name(f".{model_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sidecar, patterns = sparsity_sidecar(tuner.model, tuner.model_config)
    dense_copy(tuner.model).save_pretrained(str(tmp))
    write_sidecar(tmp, sidecar, patterns)
    copy_tokenizer(tuner.pretrained.tokenizer_dir, tmp)
    for path in tmp.iterdir():
        if path.is_file():
            apply_umask(path)  # safetensors writes its files readable by their owner only
    if model_dir.exists():  # left by a stop between this rename and results.json
        shutil.rmtree(model_dir)
    os.replace(tmp, model_dir)
