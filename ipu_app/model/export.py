"""Export to a dense Hugging Face model folder, with a sidecar that keeps the sparsity.

The folder loads with ``transformers.BertForPreTraining.from_pretrained`` (or
``BertForMaskedLM``) and holds the tokenizer files. ``sparsity.json`` (metadata)
and ``sparsity_patterns.safetensors`` (block coordinates) describe each sparse
layer, and ``ipu_app_model_config.json`` the model, so ``load_sparse_export``
rebuilds the exact sparse model from the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..io import apply_umask, write_safetensors
from .bert import ModelConfig, SparseBertForPreTraining
from ..sparse.layer import sparse_weights
from .sparse_linear import dense_copy

SIDECAR = "sparsity.json"
PATTERNS = "sparsity_patterns.safetensors"
MODEL_CONFIG = "ipu_app_model_config.json"


class ExportError(ValueError):
    """The export source or destination cannot be used."""


def export_hf(model: SparseBertForPreTraining, output_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write the dense HF model, tokenizer files and the sparsity sidecar into a new folder."""
    from transformers import BertForMaskedLM, BertForPreTraining

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ExportError(f"{output_dir} is not empty; choose a new output directory (nothing was overwritten)")
    sidecar, patterns = sparsity_sidecar(model, model.config)
    dense = dense_copy(model)
    hf_class = BertForPreTraining if model.config.nsp else BertForMaskedLM
    hf = hf_class(model.config.hf_config())
    missing, unexpected = hf.load_state_dict(dense.state_dict(), strict=False)
    missing = [k for k in missing if not k.startswith("cls.predictions.decoder.")]
    if missing or unexpected:
        raise ExportError(f"model does not map onto {hf_class.__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf.tie_weights()
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        _write_export(hf, output_dir, sidecar, patterns, model, tokenizer_dir)
    except BaseException:
        # A failed export (a full disk) leaves no half-written folder that looks like an export.
        shutil.rmtree(output_dir, ignore_errors=True) if created else _empty(output_dir)
        raise
    return output_dir


def sparsity_sidecar(model, config: ModelConfig) -> tuple[dict, dict]:
    """``sparsity.json``'s content (each sparse layer's shape, block size, blocks and sparsity) and the
    patterns' block coordinates by ``LAYER.block_rows`` / ``LAYER.block_cols``, for any model holding
    sparse layers (names as in ``model``)."""
    layers = sparse_weights(model)
    sidecar = {
        "format_version": 1,
        "sparsity_mode": config.sparsity_mode,
        "block_size": config.block_size,
        "target_sparsity": config.sparsity if layers else 0.0,
        "inactive": config.inactive,
        "layers": [
            {"weight": f"{name}.weight", "shape": [m.out_features, m.in_features], "block_size": m.block_size,
             "nnz_blocks": m.nnz, "sparsity": m.sparsity}
            for name, m in layers
        ],
    }
    patterns = {f"{name}.block_rows": m.block_rows.detach().cpu().contiguous() for name, m in layers}
    patterns.update({f"{name}.block_cols": m.block_cols.detach().cpu().contiguous() for name, m in layers})
    return sidecar, patterns


def write_sidecar(output_dir: Path, sidecar: dict, patterns: dict) -> None:
    (output_dir / SIDECAR).write_text(json.dumps(sidecar, indent=2))
    if patterns:
        write_safetensors(patterns, output_dir / PATTERNS)


def _empty(directory: Path) -> None:
    for path in directory.iterdir():
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _write_export(hf, output_dir: Path, sidecar: dict, patterns: dict, model, tokenizer_dir) -> None:
    hf.save_pretrained(str(output_dir))
    write_sidecar(output_dir, sidecar, patterns)
    for path in output_dir.glob("*.safetensors"):  # Hugging Face's too: readable as the umask says
        apply_umask(path)
    (output_dir / MODEL_CONFIG).write_text(model.config.to_json())
    if tokenizer_dir is not None:
        for path in Path(tokenizer_dir).iterdir():
            if path.is_file():
                shutil.copy2(path, output_dir / path.name)


def load_sparse_export(directory: str | Path) -> SparseBertForPreTraining:
    """Rebuild the sparse model from an export folder (patterns from the sidecar, values from the weights)."""
    from safetensors.torch import load_file
    from transformers import BertForMaskedLM, BertForPreTraining

    directory = Path(directory)
    if not (directory / MODEL_CONFIG).is_file():
        raise ExportError(f"{directory} is not an ipu_app export (no {MODEL_CONFIG})")
    config = ModelConfig.from_json(directory / MODEL_CONFIG)
    model = SparseBertForPreTraining(config)
    hf = (BertForPreTraining if config.nsp else BertForMaskedLM).from_pretrained(str(directory))
    patterns = load_file(str(directory / PATTERNS)) if (directory / PATTERNS).is_file() else {}
    layers = dict(sparse_weights(model))
    with torch.no_grad():
        for name, layer in layers.items():
            layer.block_rows.copy_(patterns[f"{name}.block_rows"])
            layer.block_cols.copy_(patterns[f"{name}.block_cols"])
            layer.pattern.validate(expected_nnz=layer.nnz)
            layer.pattern_changed()
        hf_state = hf.state_dict()
        for key, tensor in model.state_dict().items():
            module, _, leaf = key.rpartition(".")
            if module in layers:
                if leaf == "values":
                    tensor.copy_(layers[module].pattern.gather(hf_state[f"{module}.weight"]))
                elif leaf == "frozen":
                    tensor.copy_(hf_state[f"{module}.weight"].masked_fill(layers[module].mask(), 0))
                elif leaf == "bias":
                    tensor.copy_(hf_state[key])
            elif key in hf_state:
                tensor.copy_(hf_state[key])
    return model
