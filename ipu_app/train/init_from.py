"""``--init-from``: start a new run from another run's, a checkpoint's or a Hugging Face BERT's weights.

A source is read into one form whatever it is: its dense weights under Hugging Face's
``BertForPreTraining`` names, the block patterns of its sparse layers (none for a dense source),
its step and its tokenizer's identity. ``initialize_from`` then writes it into a freshly built
model: every tensor whose name the source has is copied (shapes must agree, except the position
embeddings, which are extended for a longer ``model.max_position_embeddings``); the sparse layers
take the source's pattern (``keep``), the largest-magnitude blocks of the source's weight
(``magnitude``) or the run's own random pattern (``random``), with the source's weights at the
active positions. The optimizer, the learning-rate schedule and the step count start anew.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..choices import INIT_PATTERNS
from ..model.bert import SparseBertForPreTraining
from ..rundir import RunDir
from ..sparse.layer import sparse_weights
from ..sparse.pattern import BlockPattern
from ..sparse.scoring import dense_block_norms, largest
from .build import model_config

POSITIONS = "bert.embeddings.position_embeddings.weight"
TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


class InitFromError(ValueError):
    """The ``--init-from`` source cannot be read or does not fit the new run's model."""


@dataclass
class InitSource:
    """A model to start from: dense weights by Hugging Face name, sparse layers' patterns by layer name."""

    path: Path
    kind: str  # run | checkpoint | export | huggingface
    state: dict[str, torch.Tensor]
    patterns: dict[str, BlockPattern] = field(default_factory=dict)
    step: int | None = None
    tokenizer_sha256: str | None = None


def load_source(path: str | Path) -> InitSource:
    """Read a run directory (its final model, else its latest checkpoint), a checkpoint directory
    (``RUN/checkpoints/step_N``), an export (``python -m ipu_app export``: patterns kept) or a
    Hugging Face BERT folder (``config.json`` + weights)."""
    path = Path(path)
    if not path.is_dir():
        raise InitFromError(f"--init-from {path}: no such directory (give a run directory, a checkpoint "
                            "directory or a Hugging Face BERT folder)")
    if (path / "state.pt").is_file() and (path / "model.safetensors").is_file():
        return _from_checkpoint(path)
    run = RunDir(path)
    if run.config_path.is_file() or (run.model_dir / "model.safetensors").is_file():
        return _from_run(run)
    if (path / "config.json").is_file():
        return _from_huggingface(path)
    raise InitFromError(f"--init-from {path}: not a run directory (no {RunDir.CONFIG}), a checkpoint (no "
                        "state.pt) or a Hugging Face folder (no config.json)")


def _from_run(run: RunDir) -> InitSource:
    from .checkpoint import latest_checkpoint

    if (run.model_dir / "model.safetensors").is_file():
        model = SparseBertForPreTraining.load(run.model_dir)
        steps = _summary_steps(run)
        return _from_model(model, run.path, "run", steps, _run_tokenizer(run))
    latest = latest_checkpoint(run.path)
    if latest is None:
        raise InitFromError(f"--init-from {run}: the run has neither a final model nor a checkpoint yet")
    return _from_checkpoint(latest[1])


def _from_checkpoint(path: Path) -> InitSource:
    from safetensors.torch import safe_open

    from ..config import ConfigError, from_dict
    from .checkpoint import CheckpointError, load_checkpoint

    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        config = from_dict(state["config"])
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            vocab = f.get_slice("bert.embeddings.word_embeddings.weight").get_shape()[0]
    except (ConfigError, KeyError, TypeError, OSError, RuntimeError) as exc:
        raise InitFromError(f"--init-from {path}: not a readable checkpoint ({exc})") from None
    model = SparseBertForPreTraining(model_config(config, vocab), initialize=False)
    try:
        state = load_checkpoint(path, model)
    except CheckpointError as exc:
        raise InitFromError(f"--init-from: {exc}") from None
    tokenizer = _run_tokenizer(RunDir(path.parent.parent))
    return _from_model(model, path, "checkpoint", int(state["step"]), tokenizer)


def _from_huggingface(path: Path) -> InitSource:
    from ..model.export import MODEL_CONFIG, load_sparse_export

    tokenizer = _vocab_sha256(path)
    if (path / MODEL_CONFIG).is_file():  # our export: the sparse model with its patterns
        return _from_model(load_sparse_export(path), path, "export", None, tokenizer)
    from transformers import BertConfig, BertForPreTraining

    try:
        config = BertConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InitFromError(f"--init-from {path}: config.json is not a BERT config ({exc})") from None
    if config.model_type != "bert":
        raise InitFromError(f"--init-from {path}: a {config.model_type!r} model; only BERT models can be used")
    try:
        with _quiet_transformers():  # its load report and progress bar: the start-up line says what was loaded
            hf, info = BertForPreTraining.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InitFromError(f"--init-from {path}: the weights do not load ({str(exc).splitlines()[0]})") from None
    missing = set(info.get("missing_keys", ()))  # heads the folder lacks (e.g. a BertForMaskedLM has no NSP)
    state = {k: v.detach().float().cpu() for k, v in hf.state_dict().items() if k not in missing}
    return InitSource(path, "huggingface", state, tokenizer_sha256=tokenizer)


def _from_model(model: SparseBertForPreTraining, path: Path, kind: str, step, tokenizer) -> InitSource:
    from ..model.sparse_linear import dense_copy

    patterns = {name: BlockPattern(m.out_features, m.in_features, m.block_size, m.block_rows.clone(),
                                   m.block_cols.clone()) for name, m in sparse_weights(model)}
    state = {k: v.detach() for k, v in dense_copy(model).state_dict().items() if k not in TIED}
    return InitSource(path, kind, state, patterns, step, tokenizer)


def _summary_steps(run: RunDir) -> int | None:
    try:
        return int(json.loads(run.summary_path.read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_tokenizer(run: RunDir) -> str | None:
    """The sha256 of the vocabulary a run trained with: its ``tokenizer/`` (written at the end) or,
    before that, its prepared data's manifest."""
    found = _vocab_sha256(run.tokenizer_dir)
    if found:
        return found
    try:
        from ..data.prepare import prepared_data_dir
        from ..data.shards import load_manifest

        return load_manifest(prepared_data_dir(run.load_config().data)).get("tokenizer_sha256")
    except Exception:  # noqa: BLE001 - the data may be gone; the vocabulary size is still checked
        return None


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' logging at errors only and its progress bars off, restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _vocab_sha256(directory: Path) -> str | None:
    from ..data.corpus import CorpusError
    from ..data.tokenizer import has_vocabulary, tokenizer_hash

    try:
        return tokenizer_hash(directory) if has_vocabulary(directory) else None
    except CorpusError:  # not a WordPiece vocabulary: the vocabulary size is still checked
        return None


# ----------------------------------------------------------------------------------- apply
@torch.no_grad()
def initialize_from(model: SparseBertForPreTraining, source: InitSource, pattern: str = "auto",
                    tokenizer_sha256: str | None = None) -> dict:
    """Copy ``source`` into ``model`` (built and initialised as the run's config says); returns the
    record kept in the summary. Tensors the source lacks keep their fresh initialisation."""
    if pattern not in INIT_PATTERNS:
        raise InitFromError(f"unknown sparsity.init_pattern {pattern!r}; use one of {list(INIT_PATTERNS)}")
    _check_vocabulary(model, source, tokenizer_sha256)
    layers = dict(sparse_weights(model))
    record = {"path": str(source.path), "kind": source.kind, "step": source.step, "positions": None}
    fresh = []
    for key, tensor in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if key in TIED or module in layers:
            continue
        found = source.state.get(key)
        if found is None:
            fresh.append(key)
        elif key == POSITIONS and found.shape[0] != tensor.shape[0]:
            record["positions"] = _extend_positions(tensor, found, source)
        else:
            _copy(tensor, found, key, source)
    chosen = set()
    for name, layer in layers.items():
        weight = source.state.get(f"{name}.weight")
        if weight is None:
            raise InitFromError(f"--init-from {source.path} has no {name}.weight: not a BERT encoder of this size")
        _check_shape(weight, (layer.out_features, layer.in_features), f"{name}.weight", source)
        how = _choose_pattern(pattern, source.patterns.get(name), layer, name, source)
        chosen.add(how)
        if how != "random":
            new = source.patterns[name] if how == "keep" else BlockPattern.from_linear_index(
                layer.out_features, layer.in_features, layer.block_size,
                largest(dense_block_norms(weight.float(), layer.block_size, "l1"), layer.nnz))
            layer.block_rows.copy_(new.rows)
            layer.block_cols.copy_(new.cols)
        weight = weight.to(layer.values.device, layer.values.dtype)
        layer.values.copy_(layer.pattern.gather(weight))
        if layer.frozen is not None:
            layer.frozen.copy_(weight.masked_fill(layer.mask(), 0))
        if layer.bias is not None:
            _copy(layer.bias, source.state[f"{name}.bias"], f"{name}.bias", source)
        layer.pattern_changed()
    record["pattern"] = "/".join(sorted(chosen)) if chosen else None
    record["fresh"] = sorted(fresh)
    return record


def _choose_pattern(setting: str, found: BlockPattern | None, layer, name: str, source: InitSource) -> str:
    fits = found is not None and found.block_size == layer.block_size and found.nnz == layer.nnz
    if setting == "auto":
        return "keep" if fits else "magnitude"
    if setting == "keep" and not fits:
        why = ("a dense source has no pattern" if found is None else
               f"the source's {name} has {found.nnz} blocks of {found.block_size}, this run {layer.nnz} of "
               f"{layer.block_size}")
        raise InitFromError(f"sparsity.init_pattern=keep: {why}; use magnitude or random")
    return setting


def _check_vocabulary(model, source: InitSource, tokenizer_sha256: str | None) -> None:
    words = source.state.get("bert.embeddings.word_embeddings.weight")
    if words is None:
        raise InitFromError(f"--init-from {source.path} has no word embeddings: not a BERT model")
    ours = model.config.vocab_size
    if words.shape[0] != ours or (tokenizer_sha256 and source.tokenizer_sha256
                                  and tokenizer_sha256 != source.tokenizer_sha256):
        raise InitFromError(f"--init-from {source.path} was trained with another vocabulary ({words.shape[0]} tokens"
                            f"{', sha256 ' + source.tokenizer_sha256[:12] if source.tokenizer_sha256 else ''}) than "
                            f"this run's data ({ours} tokens"
                            f"{', sha256 ' + tokenizer_sha256[:12] if tokenizer_sha256 else ''}); prepare the data "
                            "with the source's tokenizer")


def _extend_positions(tensor: torch.Tensor, found: torch.Tensor, source: InitSource) -> str:
    """Position embeddings for a longer (or shorter) maximum length: the source's rows first; rows past
    them repeat the source's (a copy of a trained row starts closer than a random one)."""
    _check_shape(found, (found.shape[0], tensor.shape[1]), POSITIONS, source)
    rows = tensor.shape[0]
    repeats = -(-rows // found.shape[0])
    tensor.copy_(found.repeat(repeats, 1)[:rows].to(tensor.device, tensor.dtype))
    return f"{found.shape[0]} -> {rows}"


def _copy(tensor: torch.Tensor, found: torch.Tensor, key: str, source: InitSource) -> None:
    _check_shape(found, tuple(tensor.shape), key, source)
    tensor.copy_(found.to(tensor.device, tensor.dtype))


def _check_shape(found: torch.Tensor, shape: tuple, key: str, source: InitSource) -> None:
    if tuple(found.shape) != tuple(shape):
        raise InitFromError(f"--init-from {source.path}: {key} is {tuple(found.shape)} there, {tuple(shape)} in this "
                            "run's model; the model sizes differ (set model.size to the source's)")


def init_line(record: dict) -> str:
    """The line a run starting from ``training.init_from`` prints: what was loaded (``initialize_from``'s record)."""
    step = "" if record["step"] is None else f", step {record['step']}"
    fresh = f", freshly initialised: {', '.join(record['fresh'])}" if record["fresh"] else ""
    return (f"starting from {record['path']} ({record['kind']}{step}): pattern {record['pattern'] or '-'}, "
            f"position embeddings {record['positions'] or 'as saved'}{fresh}")
