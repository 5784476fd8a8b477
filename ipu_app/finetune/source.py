"""``finetune --model PATH``: the pre-trained BERT to fine-tune, whatever holds it.

A run directory (its final model, else its latest checkpoint; ``--checkpoint`` picks one), a
checkpoint directory (``RUN/checkpoints/step_N``), an ``export`` folder (patterns from its sidecar)
or any Hugging Face BERT folder (``config.json``, weights and a WordPiece tokenizer). A sparse source
keeps its pattern; a dense one stays dense unless ``--sparsity`` asks for sparsity, then each encoder
linear keeps its largest-magnitude blocks (``--block-size``), as ``--init-from`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, RunConfig
from ..model.bert import ModelConfig, SparseBertForPreTraining
from ..choices import MODEL_SIZES
from ..rundir import RunDir


@dataclass
class Pretrained:
    """A model to fine-tune and what came with it."""

    model: SparseBertForPreTraining
    path: Path
    description: str  # "run R, final model", "Hugging Face folder P, pruned by magnitude to s = 0.9", ...
    step: int | None
    tokenizer_dir: Path
    run_config: RunConfig | None  # a run's or a checkpoint's config (precision, DynSparse settings)


def load_pretrained(path: str | Path, checkpoint: str | int | None = None, *, sparsity: float | None = None,
                    block_size: int | None = None) -> Pretrained:
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"--model {path}: no such directory (give a run directory, a checkpoint, an export or a "
                          "Hugging Face BERT folder)")
    if checkpoint is not None and not RunDir(path).config_path.is_file():
        raise ConfigError(f"--checkpoint picks one of a run directory's checkpoints; {path} is not a run directory")
    if (path / "state.pt").is_file() and (path / "model.safetensors").is_file():
        found = _from_checkpoint(path)
    elif RunDir(path).config_path.is_file():
        found = _from_run(RunDir(path), checkpoint)
    elif (path / "config.json").is_file():
        found = _from_folder(path)
    else:
        raise ConfigError(f"--model {path}: not a run directory (no {RunDir.CONFIG}), a checkpoint (no state.pt) or "
                          "a Hugging Face BERT folder (no config.json)")
    return _sparsify(found, sparsity, block_size)


def _from_run(run: RunDir, checkpoint) -> Pretrained:
    from ..train.evaluate import evaluation_data, load_run_model
    from ..data.tokenizer import has_vocabulary

    config = run.load_config()
    data_dir, manifest = evaluation_data(config, None)
    model, what, step = load_run_model(run, config, checkpoint, vocab_size=manifest["vocab_size"])
    tokenizer = run.tokenizer_dir if has_vocabulary(run.tokenizer_dir) else data_dir / "tokenizer"
    return Pretrained(model, run.path, f"run {run.path}, {what}", step, tokenizer, config)


def _from_checkpoint(path: Path) -> Pretrained:
    run = RunDir(path.parent.parent)
    if path.parent.name != RunDir.CHECKPOINTS or not run.config_path.is_file():
        raise ConfigError(f"--model {path}: a checkpoint is read inside its run directory (RUN/checkpoints/step_N)")
    step = path.name.rpartition("_")[2]
    if not step.isdigit():
        raise ConfigError(f"--model {path}: a checkpoint directory is named step_N")
    return _from_run(run, int(step))


def _from_folder(path: Path) -> Pretrained:
    from ..data.tokenizer import has_vocabulary
    from ..model.export import MODEL_CONFIG, load_sparse_export

    if not has_vocabulary(path):
        raise ConfigError(f"--model {path} holds no tokenizer (vocab.txt or tokenizer.json); fine-tuning needs the "
                          "model's own vocabulary beside it")
    if (path / MODEL_CONFIG).is_file():  # an export of ours: the sparse model and its patterns
        return Pretrained(load_sparse_export(path), path, f"export {path}", None, path, None)
    from ..train.init_from import InitFromError, initialize_from, load_source

    try:
        source = load_source(path)
    except InitFromError as exc:
        raise ConfigError(str(exc).replace("--init-from", "--model")) from None
    config = _model_config(path, source.state)
    model = SparseBertForPreTraining(config)
    initialize_from(model, source)
    return Pretrained(model, path, f"Hugging Face folder {path}", None, path, None)


def _model_config(path: Path, state: dict) -> ModelConfig:
    """A dense ``ModelConfig`` for a Hugging Face BERT's weights: its size must be one of the family's."""
    from transformers import BertConfig

    hf = BertConfig.from_pretrained(str(path), local_files_only=True)
    size = next((name for name, shape in MODEL_SIZES.items() if shape == (hf.num_hidden_layers, hf.hidden_size)), None)
    if size is None or hf.intermediate_size != 4 * hf.hidden_size or hf.num_attention_heads != hf.hidden_size // 64:
        sizes = ", ".join(f"{n} (L={l}, H={h})" for n, (l, h) in MODEL_SIZES.items())
        raise ConfigError(f"--model {path}: a BERT of L={hf.num_hidden_layers}, H={hf.hidden_size}, "
                          f"A={hf.num_attention_heads}, FFN={hf.intermediate_size} is not one of the family's "
                          f"sizes ({sizes}; A = H/64, FFN = 4H)")
    return ModelConfig(size=size, vocab_size=hf.vocab_size, max_position_embeddings=hf.max_position_embeddings,
                       dropout=hf.hidden_dropout_prob, nsp="cls.seq_relationship.weight" in state,
                       sparsity_mode="dense", sparsity=0.0)


def _sparsify(found: Pretrained, sparsity: float | None, block_size: int | None) -> Pretrained:
    """A dense source pruned by magnitude when ``sparsity`` asks for it; a sparse source must agree."""
    config = found.model.config
    if config.sparsity_mode != "dense":
        for name, asked, has in (("--sparsity", sparsity, config.sparsity), ("--block-size", block_size,
                                                                             config.block_size)):
            if asked is not None and abs(asked - has) > 1e-9:
                raise ConfigError(f"{name} {asked:g}: {found.path} is sparse already ({name[2:]} {has:g}); leave "
                                  f"{name} out to fine-tune its pattern")
        return found
    if not sparsity:
        if block_size is not None:
            raise ConfigError("--block-size goes with --sparsity (a dense model stays dense without it)")
        return found
    if not 0 < sparsity < 1:
        raise ConfigError(f"--sparsity must be in (0, 1), got {sparsity}")
    if config.hidden_size % (block_size or 1):
        raise ConfigError(f"--block-size {block_size} does not divide the hidden size {config.hidden_size}")
    from dataclasses import replace

    from ..train.init_from import InitSource, initialize_from

    sparse = SparseBertForPreTraining(replace(config, sparsity_mode="static", sparsity=sparsity,
                                              block_size=block_size or 1))
    state = {k: v.detach() for k, v in found.model.state_dict().items()}
    initialize_from(sparse, InitSource(found.path, "dense", state), pattern="magnitude")
    found.model = sparse
    found.description += f", pruned by magnitude to s = {sparsity:g}, block size {block_size or 1}"
    return found
